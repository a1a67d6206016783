// A syncbn::Communicator over a transport of your own: here the "ranks" are threads of one
// process that sum through shared memory. Each thread trains the same small MLP on its slice
// of every global batch, with SyncBN wired from the six primitives (stats -> all-reduce ->
// gather -> elemt; backward_reduce -> all-reduce -> backward_elemt) and gradients summed over
// the same transport. Checks the result against one process training on the whole batch with
// ordinary batch norm, and shows data parallelism without SyncBN for contrast. Prints the
// largest differences; exits 1 if SyncBN's is not at rounding level.
//
//   ./custom_communicator [ranks]      (default 3)
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "mlp.h"
#include "syncbn/communicator.h"
#include "syncbn/errors.h"
#include "syncbn/ops.h"

namespace {

// The transport: `size` threads meet at a barrier and read each other's buffers.
class ThreadGroup {
 public:
  explicit ThreadGroup(int size) : size_(size), data_(size_t(size)), count_(size_t(size)) {}
  int size() const { return size_; }

  // Sums `count` doubles in place across all ranks. Every rank adds the inputs in rank order,
  // so all ranks get bitwise the same sums (syncbn relies on ranks agreeing exactly).
  void allreduce_sum(int rank, double* data, int64_t count) {
    data_[size_t(rank)] = data;
    count_[size_t(rank)] = count;
    barrier();  // every input is published
    for (int r = 0; r < size_; ++r)
      if (count_[size_t(r)] != count)  // all ranks see the same counts: all throw alike
        throw syncbn::CommError(
            "threads: ranks all-reduce different sizes (" + std::to_string(count) + " here, " +
            std::to_string(count_[size_t(r)]) + " on rank " + std::to_string(r) + ")");
    std::vector<double> sum(size_t(count), 0.0);
    for (int r = 0; r < size_; ++r)
      for (int64_t i = 0; i < count; ++i) sum[size_t(i)] += data_[size_t(r)][i];
    barrier();  // every rank has read every input before any input is overwritten
    std::copy(sum.begin(), sum.end(), data);
  }

  // A rank that fails wakes the others with an error instead of leaving them waiting.
  void abort() {
    std::lock_guard<std::mutex> lock(mutex_);
    aborted_ = true;
    cv_.notify_all();
  }

 private:
  void barrier() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++arrived_ == size_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != generation || aborted_; });
    }
    if (aborted_) throw syncbn::CommError("threads: another rank failed");
  }

  int size_;
  std::vector<double*> data_;
  std::vector<int64_t> count_;
  std::mutex mutex_;
  std::condition_variable cv_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  bool aborted_ = false;
};

// What syncbn needs from a transport: rank, size and an in-place SUM that every rank calls
// in the same order. Host buffers only (the default accepts()), so no stream is involved.
class ThreadCommunicator final : public syncbn::Communicator {
 public:
  ThreadCommunicator(ThreadGroup& group, int rank) : group_(group), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return group_.size(); }
  void allreduce_sum(double* data, int64_t count, syncbn::Device, void*) override {
    group_.allreduce_sum(rank_, data, count);
  }
  const char* kind() const override { return "threads"; }

 private:
  ThreadGroup& group_;
  int rank_;
};

// SyncBN wired from the primitives, over any communicator.
class PrimitivesBatchNorm final : public mlp::BatchNorm {
 public:
  PrimitivesBatchNorm(int64_t C, int layer, syncbn::Communicator& comm)
      : BatchNorm(C), layer_(layer), comm_(comm), mean_(size_t(C)), invstd_(size_t(C)) {}

  void forward(const mlp::Mat& x, mlp::Mat& y) override {
    x_ = x;
    const int64_t C = x.cols;
    const int axis = 1;
    syncbn::CollectiveKey key;  // what the fingerprint says: the same on every rank
    key.layer = layer_;
    key.call = ++forward_calls_;  // the primitives count nothing themselves
    mlp::Vec stats(size_t(syncbn::stats_buffer_size(C)));
    syncbn::batch_norm_stats(mlp::view(x), axis, mlp::view(stats), nullptr, key);  // 1.
    syncbn::allreduce(mlp::view(stats), comm_);  // 2. the one collective
    const auto rm = mlp::view(running_mean), rv = mlp::view(running_var);
    count_ = syncbn::batch_norm_gather_stats(mlp::view(stats), kMomentum, kEps, &rm, &rv,
                                             mlp::view(mean_), mlp::view(invstd_), nullptr, nullptr,
                                             key);  // 3. checks the fingerprint
    const auto w = mlp::view(weight), b = mlp::view(bias);
    syncbn::batch_norm_elemt(mlp::view(x), axis, mlp::view(mean_), mlp::view(invstd_), &w, &b,
                             mlp::view(y));  // 4.
  }

  void backward(const mlp::Mat& dy, mlp::Mat& dx) override {
    const int64_t C = dy.cols;
    const int axis = 1;
    mlp::Vec sums(size_t(syncbn::backward_buffer_size(C)));
    const auto gw = mlp::view(grad_weight), gb = mlp::view(grad_bias);
    syncbn::CollectiveKey key;
    key.layer = layer_;
    key.call = ++backward_calls_;
    syncbn::batch_norm_backward_reduce(mlp::view(dy), mlp::view(x_), axis, mlp::view(mean_),
                                       mlp::view(invstd_), mlp::view(sums), &gw, &gb, nullptr,
                                       key);  // 5.
    syncbn::allreduce(mlp::view(sums), comm_);
    const auto w = mlp::view(weight);
    syncbn::batch_norm_backward_elemt(mlp::view(dy), mlp::view(x_), axis, mlp::view(mean_),
                                      mlp::view(invstd_), &w, mlp::view(sums), count_,
                                      mlp::view(dx), nullptr, nullptr, key);  // 6.
  }

 private:
  int layer_;
  syncbn::Communicator& comm_;
  mlp::Mat x_;
  mlp::Vec mean_, invstd_;
  double count_ = 0;
  int64_t forward_calls_ = 0, backward_calls_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
  const int size = argc > 1 ? std::atoi(argv[1]) : 3;
  if (size < 1) {
    std::fprintf(stderr, "usage: %s [ranks >= 1]\n", argv[0]);
    return 2;
  }
  int64_t global_n = 0;
  std::vector<int64_t> first(static_cast<size_t>(size) + 1, 0);
  for (int r = 0; r < size; ++r) first[size_t(r) + 1] = global_n += mlp::rows_of_rank(r, size);

  // One process, whole batch, ordinary batch norm: the reference.
  mlp::Net one_process(mlp::kInputs, mlp::kHidden,
                       [](int64_t C, int) { return std::make_unique<mlp::PlainBatchNorm>(C); });
  double loss0 = 0, loss = 0;
  for (int step = 0; step < mlp::kSteps; ++step) {
    mlp::Mat X, T;
    mlp::make_batch(step, global_n, X, T);
    loss = one_process.train_step(X, T, global_n, [](mlp::Vec&) {}, mlp::kLearningRate);
    if (step == 0) loss0 = loss;
  }

  // `size` ranks as threads: SyncBN over the thread transport, and per-rank batch norm
  // (LocalCommunicator) with gradients still summed, each rank checking its own replica.
  ThreadGroup group(size);
  std::vector<double> diff_sync(static_cast<size_t>(size)), diff_local(static_cast<size_t>(size));
  std::vector<std::string> errors(static_cast<size_t>(size));
  std::vector<std::thread> threads;
  for (int rank = 0; rank < size; ++rank)
    threads.emplace_back([&, rank] {
      try {
        ThreadCommunicator comm(group, rank);
        syncbn::LocalCommunicator alone;
        mlp::Net synced(mlp::kInputs, mlp::kHidden, [&](int64_t C, int layer) {
          return std::make_unique<PrimitivesBatchNorm>(C, layer, comm);
        });
        mlp::Net per_rank(mlp::kInputs, mlp::kHidden, [&](int64_t C, int layer) {
          return std::make_unique<PrimitivesBatchNorm>(C, layer, alone);
        });
        const mlp::SumAcrossRanks sum = [&](mlp::Vec& g) {
          group.allreduce_sum(rank, g.data(), int64_t(g.size()));
        };
        for (int step = 0; step < mlp::kSteps; ++step) {
          mlp::Mat X, T;
          mlp::make_batch(step, global_n, X, T);
          const int64_t begin = first[size_t(rank)], n = first[size_t(rank) + 1] - begin;
          const mlp::Mat x = mlp::rows(X, begin, n), t = mlp::rows(T, begin, n);
          synced.train_step(x, t, global_n, sum, mlp::kLearningRate);
          per_rank.train_step(x, t, global_n, sum, mlp::kLearningRate);
        }
        diff_sync[size_t(rank)] = mlp::max_abs_diff(synced.state(), one_process.state());
        diff_local[size_t(rank)] = mlp::max_abs_diff(per_rank.state(), one_process.state());
      } catch (const std::exception& e) {
        errors[size_t(rank)] = e.what();
        group.abort();
      }
    });
  for (std::thread& t : threads) t.join();

  for (int rank = 0; rank < size; ++rank)
    if (!errors[size_t(rank)].empty()) {
      std::fprintf(stderr, "rank %d: %s\n", rank, errors[size_t(rank)].c_str());
      return 2;
    }
  double sync = 0, local = 0;
  for (int rank = 0; rank < size; ++rank) {
    sync = std::max(sync, diff_sync[size_t(rank)]);
    local = std::max(local, diff_local[size_t(rank)]);
  }
  const bool ok = sync < 1e-10;
  std::printf(
      "custom_communicator: %d ranks as threads (rank 1 empty from 3 on), global batch "
      "%lld, %lld SGD steps, loss %.4f -> %.4f\n",
      size, (long long)global_n, (long long)mlp::kSteps, loss0, loss);
  std::printf("max |SyncBN - one process| = %.3e\n", sync);
  std::printf("max |per-rank BN - one process| = %.3e  (data parallel without SyncBN)\n", local);
  std::printf("%s\n", ok ? "OK" : "MISMATCH");
  return ok ? 0 : 1;
}
