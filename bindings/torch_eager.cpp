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
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/dlpack.h>  // before syncbn's headers (syncbn/dlpack.h uses it then)
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <exception>
#include <string>
#include <tuple>
#include <vector>

#include "eager_table.h"

namespace syncbn_eager {

using torch::autograd::AutogradContext;
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

// What forward passes the node besides the differentiable inputs.
struct Params {
  OptTensor running_mean, running_var, batches;
  double momentum = 0.1, eps = 1e-5;
  int64_t comm = 0, layer = 0;
  std::string name;
  bool verify = true, unbiased = true;
};

// What forward hands back besides y (activation checkpointing reuses it).
struct Saved {
  at::Tensor mean, invstd;
  double count = 0;
};

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

struct SyncBatchNorm : public torch::autograd::Function<SyncBatchNorm> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight,
                            const OptTensor& bias, const Params* p, Saved* out) {
    TORCH_CHECK(table != nullptr, "syncbn_eager.forward: call syncbn_eager.init first");
    const at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
    const int64_t C = x.dim() > 1 ? x.size(1) : 0;
    at::Tensor y = at::empty_like(x);
    const auto f64 = x.options().dtype(at::kDouble).memory_format(std::nullopt);
    out->mean = at::empty({C}, f64);
    out->invstd = at::empty({C}, f64);
    syncbn::ForwardOptions opt;
    opt.axis = 1;
    opt.momentum = p->momentum;
    opt.eps = p->eps;
    opt.unbiased_running_var = p->unbiased;
    opt.layer = p->layer;
    opt.layer_name = p->name.empty() ? nullptr : p->name.c_str();
    opt.verify = p->verify;
    Views v;
    int64_t* batches =
        p->batches && p->batches->defined() ? p->batches->data_ptr<int64_t>() : nullptr;
    std::exception_ptr error;
    if (table->forward(v(x), v(w), v(b), v(p->running_mean.value_or(at::Tensor())),
                       v(p->running_var.value_or(at::Tensor())), v(y), v(out->mean), v(out->invstd),
                       batches, &opt, comm_of(p->comm), &out->count, &error))
      raise(error);
    ctx->save_for_backward({x, w, b});
    ctx->saved_data["mean"] = out->mean;
    ctx->saved_data["invstd"] = out->invstd;
    ctx->saved_data["count"] = out->count;
    ctx->saved_data["comm"] = p->comm;
    ctx->saved_data["layer"] = p->layer;
    ctx->saved_data["name"] = p->name;
    ctx->saved_data["verify"] = p->verify;
    ctx->saved_data["unbiased"] = p->unbiased;
    ctx->saved_data["eps"] = p->eps;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &w = s[1], &b = s[2], &dy = grads[0];
    // needs_input_grad counts the node's edges: one per defined tensor among x, w, b.
    std::array<bool, 3> needs{};
    for (size_t i = 0, edge = 0; i < 3; ++i)
      if (s[i].defined() || i == 0) needs[i] = ctx->needs_input_grad(edge++);
    variable_list out(5);  // x, weight, bias, and the two non-tensor arguments
    const auto& d = ctx->saved_data;
    const int64_t comm = d.at("comm").toInt(), layer = d.at("layer").toInt();
    const std::string& name = d.at("name").toStringRef();
    if (wants_composite(dy)) {
      static auto op =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("syncbn_eager::composite_grads", "")
              .typed<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                             const OptTensor&, int64_t, int64_t, c10::string_view,
                                             bool, double, std::array<bool, 3>)>();
      std::vector<at::Tensor> g =
          op.call(dy, x, w.defined() ? OptTensor(w) : std::nullopt,
                  b.defined() ? OptTensor(b) : std::nullopt, comm, layer, name,
                  d.at("unbiased").toBool(), d.at("eps").toDouble(), needs);
      for (size_t i = 0, k = 0; i < 3; ++i)
        if (needs[i]) out[i] = g.at(k++);
      return out;
    }
    if (needs[0]) out[0] = at::empty_like(x);
    if (needs[1]) out[1] = at::empty_like(w);
    if (needs[2]) out[2] = at::empty_like(w.defined() ? w : b);
    syncbn::BackwardOptions opt;
    opt.axis = 1;
    opt.training = true;
    opt.count = d.at("count").toDouble();
    opt.layer = layer;
    opt.layer_name = name.empty() ? nullptr : name.c_str();
    opt.verify = d.at("verify").toBool();
    const at::Tensor mean = d.at("mean").toTensor(), invstd = d.at("invstd").toTensor();
    Views v;
    std::exception_ptr error;
    if (table->backward(v(dy), v(x), v(mean), v(invstd), v(w), v(out[0]), v(out[1]), v(out[2]),
                        &opt, comm_of(comm), &error))
      raise(error);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, double> forward(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& batches,
    double momentum, double eps, int64_t comm, int64_t layer, c10::string_view name, bool verify,
    bool unbiased) {
  Params p{running_mean, running_var, batches,           momentum, eps,
           comm,         layer,       std::string(name), verify,   unbiased};
  Saved out;
  at::Tensor y = SyncBatchNorm::apply(x, weight, bias, &p, &out);
  return {y, out.mean, out.invstd, out.count};
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
