// SyncBN inside a libtorch training loop: at::Tensors go to syncbn through DLPack
// (at::toDLPack -> syncbn::from_dlpack, no copy), wrapped in a torch::autograd::Function,
// across MPI ranks. Trains a small conv net for a few SGD steps on each rank's slice of every
// global batch and checks it against the same net with torch::nn::BatchNorm2d trained in
// one process on the whole batch; for contrast also data-parallel without SyncBN (each rank
// normalizing its own slice). Prints the largest differences over parameters and running
// statistics; exits 1 if SyncBN's is not at rounding level.
//
//   mpiexec -n 2 ./libtorch_syncbn
#include <ATen/DLConvertor.h>  // at::toDLPack
#include <mpi.h>
#include <torch/torch.h>

#include <cstdio>
#include <exception>
#include <memory>

#include "syncbn/mpi_communicator.h"
#include "syncbn/ops.h"

namespace {

// A syncbn view of a tensor, keeping the DLPack capsule alive until the view is done with.
class DLPackView {
 public:
  DLPackView(const at::Tensor& t, const char* name, bool read_only = false)
      : managed_(at::toDLPack(t), [](DLManagedTensor* m) { m->deleter(m); }),
        view_(syncbn::from_dlpack(managed_->dl_tensor, name, read_only)) {}
  const syncbn::TensorView& operator*() const { return view_; }
  const syncbn::TensorView* operator->() const { return &view_; }
  const syncbn::TensorView* get() const { return &view_; }

 private:
  std::unique_ptr<DLManagedTensor, void (*)(DLManagedTensor*)> managed_;
  syncbn::TensorView view_;
};

// Training-mode SyncBN as an autograd function: syncbn::forward / syncbn::backward, one
// all-reduce each. The communicator travels as an integer (saved_data holds IValues).
struct SyncBatchNormFunction : torch::autograd::Function<SyncBatchNormFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& running_mean, const at::Tensor& running_var,
                            int64_t comm_address, int64_t layer, double momentum, double eps) {
    auto& comm = *reinterpret_cast<syncbn::Communicator*>(comm_address);
    const int64_t C = x.size(1);
    at::Tensor y = at::empty_like(x);  // keeps x's memory format
    at::Tensor save_mean = at::empty({C}, x.options().dtype(at::kDouble));
    at::Tensor save_invstd = at::empty({C}, x.options().dtype(at::kDouble));
    syncbn::ForwardOptions opt;  // axis 1: NCHW
    opt.momentum = momentum;
    opt.eps = eps;
    opt.layer = layer;  // this layer's id, the same on every rank (the fingerprint)
    DLPackView xv(x, "x", true), wv(weight, "weight", true), bv(bias, "bias", true);
    DLPackView rm(running_mean, "running_mean"), rv(running_var, "running_var");
    const double count = syncbn::forward(*xv, wv.get(), bv.get(), rm.get(), rv.get(), opt, comm,
                                         *DLPackView(y, "y"), *DLPackView(save_mean, "save_mean"),
                                         *DLPackView(save_invstd, "save_invstd"));
    ctx->save_for_backward({x, weight, save_mean, save_invstd});
    ctx->saved_data["count"] = count;
    ctx->saved_data["comm"] = comm_address;
    ctx->saved_data["layer"] = layer;
    return y;
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1];
    auto& comm = *reinterpret_cast<syncbn::Communicator*>(ctx->saved_data["comm"].toInt());
    at::Tensor dy = grads[0];
    at::Tensor dx = at::empty_like(x), dw = at::empty_like(weight), db = at::empty_like(weight);
    syncbn::BackwardOptions opt;
    opt.count = ctx->saved_data["count"].toDouble();
    opt.layer = ctx->saved_data["layer"].toInt();
    DLPackView dxv(dx, "dx"), dwv(dw, "grad_weight"), dbv(db, "grad_bias");
    syncbn::backward(
        *DLPackView(dy, "dy", true), *DLPackView(x, "x", true),
        *DLPackView(saved[2], "save_mean", true), *DLPackView(saved[3], "save_invstd", true),
        DLPackView(weight, "weight", true).get(), opt, comm, dxv.get(), dwv.get(), dbv.get());
    // One gradient per forward input; none for the running stats and the scalars.
    return {dx,           dw,           db,           at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// torch::nn::BatchNorm2d's parameters and buffers, normalized over all ranks in training.
struct SyncBatchNorm2dImpl : torch::nn::Module {
  // `layer`: this layer's id for the collective fingerprint (the same on every rank).
  SyncBatchNorm2dImpl(int64_t C, syncbn::Communicator& comm, int64_t layer = 1)
      : comm(&comm), layer(layer) {
    weight = register_parameter("weight", torch::ones({C}));
    bias = register_parameter("bias", torch::zeros({C}));
    running_mean = register_buffer("running_mean", torch::zeros({C}));
    running_var = register_buffer("running_var", torch::ones({C}));
  }
  at::Tensor forward(const at::Tensor& x) {
    if (!is_training())  // eval: the running statistics, no communication
      return torch::batch_norm(x, weight, bias, running_mean, running_var, false, 0.1, 1e-5, false);
    return SyncBatchNormFunction::apply(x, weight, bias, running_mean, running_var,
                                        reinterpret_cast<int64_t>(comm), layer, 0.1, 1e-5);
  }
  syncbn::Communicator* comm;
  int64_t layer;
  at::Tensor weight, bias, running_mean, running_var;
};
TORCH_MODULE(SyncBatchNorm2d);

// conv -> batch norm -> relu -> global average pool -> linear; BN is SyncBatchNorm2d or
// torch::nn::BatchNorm2d.
template <class BN>
struct NetImpl : torch::nn::Module {
  explicit NetImpl(BN batch_norm)
      : conv(register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 8, 3)))),
        bn(register_module("bn", batch_norm)),
        fc(register_module("fc", torch::nn::Linear(8, 1))) {}
  at::Tensor forward(const at::Tensor& x) {
    at::Tensor h = torch::relu(bn->forward(conv->forward(x)));
    return fc->forward(h.mean({2, 3}));
  }
  torch::nn::Conv2d conv;
  BN bn;
  torch::nn::Linear fc;
};

constexpr int kSteps = 5;
constexpr double kLearningRate = 0.1;

// Images of rank r: uneven slices, and rank 1 holds none from three ranks on.
int64_t images_of_rank(int rank, int size) {
  return size >= 3 && rank == 1 ? 0 : 2 + 2 * int64_t(rank);
}

using SyncNet = NetImpl<SyncBatchNorm2d>;

// One data-parallel SGD step on this rank's slice (x, t) of a global batch of `global_n`:
// the loss is the mean over the global batch, the gradients are summed over the ranks.
void data_parallel_step(SyncNet& net, torch::optim::SGD& opt, const at::Tensor& x,
                        const at::Tensor& t, int64_t global_n) {
  opt.zero_grad();
  (net.forward(x) - t).pow(2).sum().div(double(global_n)).backward();
  for (auto& p : net.parameters()) {
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
    MPI_Allreduce(MPI_IN_PLACE, p.grad().data_ptr<double>(), int(p.numel()), MPI_DOUBLE, MPI_SUM,
                  MPI_COMM_WORLD);
  }
  opt.step();
}

// Largest difference of the parameters and running statistics from the reference's.
template <class Net>
double max_difference(Net& net, NetImpl<torch::nn::BatchNorm2d>& reference) {
  double diff = 0;
  auto params = reference.named_parameters();
  for (auto& p : net.named_parameters())
    diff = std::max(diff, (p.value() - params[p.key()]).abs().max().template item<double>());
  auto buffers = reference.named_buffers();
  for (auto& b : net.named_buffers())
    diff = std::max(diff, (b.value() - buffers[b.key()]).abs().max().template item<double>());
  return diff;
}

int run(int rank, int size) {
  torch::set_num_threads(1);  // one rank per core
  torch::set_default_dtype(caffe2::TypeMeta::Make<double>());
  syncbn::MpiCommunicator world(MPI_COMM_WORLD);
  syncbn::LocalCommunicator alone;  // per-rank batch norm, for contrast

  torch::manual_seed(0);
  auto synced = std::make_shared<SyncNet>(SyncBatchNorm2d(8, world));
  auto per_rank = std::make_shared<SyncNet>(SyncBatchNorm2d(8, alone));
  auto reference = std::make_shared<NetImpl<torch::nn::BatchNorm2d>>(
      torch::nn::BatchNorm2d(torch::nn::BatchNorm2dOptions(8).momentum(0.1).eps(1e-5)));
  {
    torch::NoGradGuard no_grad;  // same initial parameters
    auto src = synced->named_parameters();
    for (auto& p : per_rank->named_parameters()) p.value().copy_(src[p.key()]);
    for (auto& p : reference->named_parameters()) p.value().copy_(src[p.key()]);
  }
  torch::optim::SGD opt_sync(synced->parameters(), kLearningRate);
  torch::optim::SGD opt_local(per_rank->parameters(), kLearningRate);
  torch::optim::SGD opt_ref(reference->parameters(), kLearningRate);

  int64_t global_n = 0, first = 0;
  for (int r = 0; r < size; ++r) {
    if (r == rank) first = global_n;
    global_n += images_of_rank(r, size);
  }
  for (int step = 0; step < kSteps; ++step) {
    torch::manual_seed(100 + step);  // the same global batch on every rank
    const at::Tensor X = torch::randn({global_n, 3, 6, 6}) * 2 + 1;
    const at::Tensor T = torch::randn({global_n, 1});

    const at::Tensor x = X.narrow(0, first, images_of_rank(rank, size));
    const at::Tensor t = T.narrow(0, first, x.size(0));
    data_parallel_step(*synced, opt_sync, x, t, global_n);
    data_parallel_step(*per_rank, opt_local, x, t, global_n);

    // One process, the whole batch, torch::nn::BatchNorm2d.
    opt_ref.zero_grad();
    (reference->forward(X) - T).pow(2).mean().backward();
    opt_ref.step();
  }

  double diff[2] = {max_difference(*synced, *reference), max_difference(*per_rank, *reference)};
  MPI_Allreduce(MPI_IN_PLACE, diff, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  const bool ok = diff[0] < 1e-10;
  if (rank == 0) {
    std::printf(
        "libtorch_syncbn: %d ranks (rank 1 empty from 3 on), global batch %lld images, "
        "%d SGD steps\n",
        size, (long long)global_n, kSteps);
    std::printf("max |SyncBN - torch::nn::BatchNorm2d on the whole batch| = %.3e\n", diff[0]);
    std::printf(
        "max |per-rank BN - torch::nn::BatchNorm2d on the whole batch| = %.3e  "
        "(data parallel without SyncBN)\n",
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
    std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
    MPI_Abort(MPI_COMM_WORLD, 2);
    return 2;
  }
  MPI_Finalize();
  return status;
}
