// Data-parallel training of a small MLP with SyncBN layers across MPI ranks, in plain C++17:
// syncbn::forward / syncbn::backward (the composed ops) over an MpiCommunicator, gradients
// summed with MPI_Allreduce, SGD by hand. Every rank also trains the same network in one
// process on the whole batch with ordinary batch norm, and, for contrast, data-parallel
// without SyncBN (each rank normalizing its own slice). Prints the largest differences from
// the one-process run over all parameters and running statistics; exits 1 if SyncBN's is
// not at rounding level.
//
//   mpiexec -n 3 ./mlp_mpi
#include <mpi.h>

#include <cstdio>
#include <exception>
#include <memory>

#include "mlp.h"
#include "syncbn/communicator.h"
#include "syncbn/mpi_communicator.h"
#include "syncbn/ops.h"

namespace {

// Batch norm whose statistics are those of the global batch across `comm`.
class SyncBatchNorm final : public mlp::BatchNorm {
 public:
  SyncBatchNorm(int64_t C, int layer, syncbn::Communicator& comm)
      : BatchNorm(C), layer_(layer), comm_(comm), save_mean_(size_t(C)), save_invstd_(size_t(C)) {}

  void forward(const mlp::Mat& x, mlp::Mat& y) override {
    x_ = x;                      // the backward needs the input
    syncbn::ForwardOptions opt;  // axis 1: the channels of (rows, C)
    opt.momentum = kMomentum;
    opt.eps = kEps;
    opt.layer = layer_;  // the same id on every rank: the collective's fingerprint
    const auto w = mlp::view(weight), b = mlp::view(bias);
    const auto rm = mlp::view(running_mean), rv = mlp::view(running_var);
    // One all-reduce; returns the global count per channel (needed by the backward).
    count_ = syncbn::forward(mlp::view(x), &w, &b, &rm, &rv, opt, comm_, mlp::view(y),
                             mlp::view(save_mean_), mlp::view(save_invstd_));
  }

  void backward(const mlp::Mat& dy, mlp::Mat& dx) override {
    syncbn::BackwardOptions opt;
    opt.count = count_;
    opt.layer = layer_;
    const auto w = mlp::view(weight), dxv = mlp::view(dx);
    const auto gw = mlp::view(grad_weight), gb = mlp::view(grad_bias);
    // One all-reduce for dx; grad_weight / grad_bias are this rank's (summed with the rest).
    syncbn::backward(mlp::view(dy), mlp::view(x_), mlp::view(save_mean_), mlp::view(save_invstd_),
                     &w, opt, comm_, &dxv, &gw, &gb);
  }

 private:
  int layer_;
  syncbn::Communicator& comm_;
  mlp::Mat x_;
  mlp::Vec save_mean_, save_invstd_;
  double count_ = 0;
};

int run(int rank, int size) {
  syncbn::MpiCommunicator world(MPI_COMM_WORLD);  // borrows the MPI_Comm, frees nothing
  syncbn::LocalCommunicator alone;                // world of one: per-rank batch norm

  auto sync_bn = [&](int64_t C, int layer) {
    return std::make_unique<SyncBatchNorm>(C, layer, world);
  };
  auto local_bn = [&](int64_t C, int layer) {
    return std::make_unique<SyncBatchNorm>(C, layer, alone);
  };
  auto plain_bn = [](int64_t C, int) { return std::make_unique<mlp::PlainBatchNorm>(C); };
  mlp::Net synced(mlp::kInputs, mlp::kHidden, sync_bn);
  mlp::Net per_rank(mlp::kInputs, mlp::kHidden, local_bn);
  mlp::Net one_process(mlp::kInputs, mlp::kHidden, plain_bn);

  const mlp::SumAcrossRanks allreduce = [](mlp::Vec& g) {
    MPI_Allreduce(MPI_IN_PLACE, g.data(), int(g.size()), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  };
  const mlp::SumAcrossRanks one_rank = [](mlp::Vec&) {};

  int64_t global_n = 0, first = 0;
  for (int r = 0; r < size; ++r) {
    if (r == rank) first = global_n;
    global_n += mlp::rows_of_rank(r, size);
  }
  const int64_t mine = mlp::rows_of_rank(rank, size);

  double loss0 = 0, loss = 0;
  for (int step = 0; step < mlp::kSteps; ++step) {
    mlp::Mat X, T;
    mlp::make_batch(step, global_n, X, T);
    const mlp::Mat x = mlp::rows(X, first, mine), t = mlp::rows(T, first, mine);
    synced.train_step(x, t, global_n, allreduce, mlp::kLearningRate);
    per_rank.train_step(x, t, global_n, allreduce, mlp::kLearningRate);
    loss = one_process.train_step(X, T, global_n, one_rank, mlp::kLearningRate);
    if (step == 0) loss0 = loss;
  }

  double diff[2] = {mlp::max_abs_diff(synced.state(), one_process.state()),
                    mlp::max_abs_diff(per_rank.state(), one_process.state())};
  MPI_Allreduce(MPI_IN_PLACE, diff, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  const bool ok = diff[0] < 1e-10;
  if (rank == 0) {
    std::printf(
        "mlp_mpi: %d ranks (rank 1 empty from 3 on), global batch %lld, %lld SGD steps, "
        "loss %.4f -> %.4f\n",
        size, (long long)global_n, (long long)mlp::kSteps, loss0, loss);
    std::printf("max |SyncBN - one process| = %.3e\n", diff[0]);
    std::printf("max |per-rank BN - one process| = %.3e  (data parallel without SyncBN)\n",
                diff[1]);
    std::printf("%s\n", ok ? "OK" : "MISMATCH");
  }
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  int status;
  try {
    status = run(rank, size);
  } catch (const std::exception& e) {
    // A rank that throws must not leave the others blocked in a collective.
    std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
    MPI_Abort(MPI_COMM_WORLD, 2);
    return 2;
  }
  MPI_Finalize();
  return status;
}
