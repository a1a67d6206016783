// libsyncbn_torch_eager: syncbn.torch's eager CPU training path as a C++ autograd node.
//
// A Python torch.autograd.Function costs a small BatchNorm layer more than its kernels
// inside a training step (benchmarks/probe_autograd_node.py); this is the same node in
// C++, as torch's own BatchNorm has. It converts tensors and calls the core through the
// table syncbn._core hands over (bindings/eager_table.h): no math here, and no second copy
// of the core. Built against one torch (the one the build saw; SYNCBN_WITH_TORCH) and
// loaded with torch.ops.load_library by syncbn.torch only under that torch.
//
// Ops (namespace syncbn_eager):
//   init(table)    the core's table (syncbn._core.eager_table()), once.
//   forward(...)   -> (y, save_mean, save_invstd, count): y differentiable.
// and two that syncbn.torch implements in Python and this node calls back:
//   raise_error(error)        raises a failed core call's exception as syncbn._core would
//                             (syncbn.CollectiveMismatchError, ValueError, a Python
//                             communicator's own exception, ...), so errors keep their
//                             Python types in forward and in backward;
//   composite_grads(...)      the gradients as a differentiable graph of torch ops, for
//                             double backward, batched gradients and dual tensors.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/dlpack.h>  // before syncbn's headers (syncbn/dlpack.h uses it then)
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <exception>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "eager_table.h"

namespace syncbn_eager {

using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

const syncbn::bindings::EagerTable* table = nullptr;

void init(int64_t address) {
  auto* t = reinterpret_cast<const syncbn::bindings::EagerTable*>(address);
  TORCH_CHECK(t != nullptr && t->version == syncbn::bindings::kEagerTableVersion,
              "syncbn_eager.init: the core's table has another version than this module "
              "(rebuild syncbn)");
  table = t;
}

DLTensor dl(const at::Tensor& t) {
  DLTensor d{};
  d.data = t.data_ptr();
  d.device = t.is_cuda() ? DLDevice{kDLCUDA, int32_t(t.get_device())} : DLDevice{kDLCPU, 0};
  d.ndim = int32_t(t.dim());
  const int bits = int(t.element_size() * 8);
  switch (t.scalar_type()) {
    case at::kFloat:
    case at::kDouble:
    case at::kHalf: d.dtype = DLDataType{kDLFloat, uint8_t(bits), 1}; break;
    case at::kBFloat16: d.dtype = DLDataType{kDLBfloat, 16, 1}; break;
    default:  // the core names the argument and the dtype it expected
      d.dtype = DLDataType{kDLInt, uint8_t(bits), 1};
  }
  d.shape = const_cast<int64_t*>(t.sizes().data());
  d.strides = const_cast<int64_t*>(t.strides().data());
  return d;
}

// DLTensors of optional tensors: null for none.
struct Views {
  std::array<DLTensor, 8> v{};
  size_t n = 0;
  const DLTensor* operator()(const at::Tensor& t) {
    if (!t.defined()) return nullptr;
    v.at(n) = dl(t);
    return &v[n++];
  }
};

// Raises a failed call's exception through the Python op (see the top of the file).
[[noreturn]] void raise(std::exception_ptr& error) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("syncbn_eager::raise_error", "")
                       .typed<void(int64_t)>();
  op.call(reinterpret_cast<int64_t>(&error));
  TORCH_CHECK(false, "syncbn_eager.raise_error returned without raising");
}

syncbn::Communicator* comm_of(int64_t address) {
  return reinterpret_cast<syncbn::Communicator*>(address);
}

// Whether the node must differentiate the composition of torch ops instead: a graph of
// the gradients is wanted (create_graph), or dy is batched (is_grads_batched) or another
// transform's wrapper, or a dual tensor: the core cannot read such a tensor's memory.
bool wants_composite(const at::Tensor& dy) {
  if (at::GradMode::is_enabled() || !dy.has_storage()) return true;
  const c10::DispatchKeySet ks = dy.key_set();
  if (ks.has(c10::DispatchKey::FuncTorchGradWrapper) || ks.has(c10::DispatchKey::FuncTorchBatched))
    return true;
  return dy._fw_grad(/*level=*/0).defined();
}

// The backward node, made the way torch's generated nodes are (a torch::autograd::Node
// with saved variables, not a torch::autograd::Function, whose generic bookkeeping costs
// a small layer's backward about a tenth more inside a training step): next edges to x,
// weight and bias (an empty edge for an absent one).
struct SyncBatchNormBackward : public torch::autograd::Node {
  std::string name() const override { return "SyncBatchNormBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    x_.reset_data();
    weight_.reset_data();
    bias_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(3);
    const at::Tensor& dy = grads.at(0);
    const std::array<bool, 3> needs{task_should_compute_output(0), task_should_compute_output(1),
                                    task_should_compute_output(2)};
    if (!dy.defined() || !(needs[0] || needs[1] || needs[2])) return out;
    const at::Tensor x = x_.unpack(), w = weight_.unpack(), b = bias_.unpack();
    if (wants_composite(dy)) {
      static auto op =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("syncbn_eager::composite_grads", "")
              .typed<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                             const OptTensor&, int64_t, int64_t, c10::string_view,
                                             bool, double, std::array<bool, 3>)>();
      std::vector<at::Tensor> g = op.call(dy, x, w.defined() ? OptTensor(w) : std::nullopt,
                                          b.defined() ? OptTensor(b) : std::nullopt, comm, layer,
                                          layer_name, unbiased, eps, needs);
      for (size_t i = 0, k = 0; i < 3; ++i)
        if (needs[i]) out[i] = g.at(k++);
      return out;
    }
    {
      at::AutoDispatchBelowADInplaceOrView guard;  // allocations need no autograd
      if (needs[0]) out[0] = at::empty_like(x);
      if (needs[1]) out[1] = at::empty_like(w);
      if (needs[2]) out[2] = at::empty_like(b);
    }
    syncbn::BackwardOptions opt;
    opt.axis = 1;
    opt.training = true;
    opt.count = count;
    opt.layer = layer;
    opt.layer_name = layer_name.empty() ? nullptr : layer_name.c_str();
    opt.verify = verify;
    Views v;
    std::exception_ptr error;
    // Needs dx (the all-reduce) when x needs a gradient; any of the three may be absent.
    if (table->backward(v(dy), v(x), v(mean), v(invstd), v(w), v(out[0]), v(out[1]), v(out[2]),
                        &opt, comm_of(comm), &error))
      raise(error);
    return out;
  }

  torch::autograd::SavedVariable x_, weight_, bias_;
  at::Tensor mean, invstd;  // the forward's global statistics (float64, (C,))
  double count = 0, eps = 1e-5;
  int64_t comm = 0, layer = 0;
  std::string layer_name;
  bool verify = true, unbiased = true;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, double> forward(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& batches,
    double momentum, double eps, int64_t comm, int64_t layer, c10::string_view name, bool verify,
    bool unbiased) {
  TORCH_CHECK(table != nullptr, "syncbn_eager.forward: call syncbn_eager.init first");
  const at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
  const int64_t C = x.dim() > 1 ? x.size(1) : 0;
  at::Tensor y, mean, invstd;
  {
    at::AutoDispatchBelowADInplaceOrView guard;  // allocations need no autograd
    y = at::empty_like(x);
    const auto f64 = x.options().dtype(at::kDouble).memory_format(std::nullopt);
    mean = at::empty({C}, f64);
    invstd = at::empty({C}, f64);
  }
  syncbn::ForwardOptions opt;
  opt.axis = 1;
  opt.momentum = momentum;
  opt.eps = eps;
  opt.unbiased_running_var = unbiased;
  opt.layer = layer;
  const std::string layer_name(name);
  opt.layer_name = layer_name.empty() ? nullptr : layer_name.c_str();
  opt.verify = verify;
  Views v;
  int64_t* step = batches && batches->defined() ? batches->data_ptr<int64_t>() : nullptr;
  double count = 0;
  std::exception_ptr error;
  if (table->forward(v(x), v(w), v(b), v(running_mean.value_or(at::Tensor())),
                     v(running_var.value_or(at::Tensor())), v(y), v(mean), v(invstd), step, &opt,
                     comm_of(comm), &count, &error))
    raise(error);
  if (torch::autograd::compute_requires_grad(x, w, b)) {
    auto node = c10::make_intrusive<SyncBatchNormBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, w, b));
    node->x_ = torch::autograd::SavedVariable(x, false);
    node->weight_ = torch::autograd::SavedVariable(w, false);
    node->bias_ = torch::autograd::SavedVariable(b, false);
    node->mean = mean;
    node->invstd = invstd;
    node->count = count;
    node->eps = eps;
    node->comm = comm;
    node->layer = layer;
    node->layer_name = layer_name;
    node->verify = verify;
    node->unbiased = unbiased;
    torch::autograd::set_history(y, node);
  }
  return {y, mean, invstd, count};
}

}  // namespace syncbn_eager

TORCH_LIBRARY(syncbn_eager, m) {
  m.def("init(int table) -> ()");
  m.def(
      "forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, Tensor? batches, float momentum, float eps, int comm, int layer, "
      "str name, bool verify, bool unbiased) -> (Tensor, Tensor, Tensor, float)");
  m.def("raise_error(int error) -> ()");
  m.def(
      "composite_grads(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, int comm, int layer, "
      "str name, bool unbiased, float eps, bool[3] needs) -> Tensor[]");
  m.impl("init", c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(syncbn_eager::init));
  m.impl("forward", c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(syncbn_eager::forward));
}
