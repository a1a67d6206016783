// XLA FFI handlers for JAX (compiled into syncbn._core when SYNCBN_WITH_JAX is on).
//
// They decode XLA buffers and attributes into core views and call syncbn::forward /
// syncbn::backward; no math. The CPU and CUDA handlers (xla_ffi_cpu.cpp, xla_ffi_cuda.cpp)
// differ only in where the buffers live and which stream the core runs on.
//
// Operands and results (python/syncbn/jax.py builds the calls):
//   forward:  (x, scale, bias, mean, var, mask, token) -> (y, new_mean, new_var, saved, token)
//             new_mean/new_var alias mean/var (updated in place by the core), the token
//             out aliases the token in (nothing is written to it: it is a data
//             dependency that orders the collectives, see DESIGN.md).
//   backward: (dy, x, scale, mask, saved, token) -> (dx, dscale, dbias, token)
// A zero-length scale, bias or mask is "absent" (flax's use_scale/use_bias=False, no mask).
// mask: x's shape, or with 1 at the channel axis; x's dtype (ForwardOptions::mask).
// `saved` is uint32[2 * (2C + 1)]: the float64 [mean (C) | invstd (C) | count] of the
// forward (and its per-channel counts (C) behind, with a mask that has the channel axis), kept as
// raw bytes so it needs no jax_enable_x64 (float64 results would be float32 without it).
// Attributes: axis (i64), training (bool), momentum, eps (f64, PyTorch's convention),
// unbiased (bool, forward), comm (i64: a registry id, below), layer (i64), layer_name
// (string), verify (bool).
#pragma once

#include <cstdint>
#include <string_view>
#include <utility>

#include "syncbn/communicator.h"
#include "xla/ffi/api/ffi.h"

namespace syncbn::xla {

namespace ffi = ::xla::ffi;

// Communicators cannot be attributes: the Python side registers each one it uses here and
// passes the id; the handler resolves it when it runs. The caller keeps the communicator
// alive (python/syncbn/jax.py holds it for the life of the process).
int64_t register_communicator(Communicator* comm);

// The operands, results and attributes of each handler, after the platform's own context
// (none on the CPU; XLA's stream and the device ordinal on CUDA): one list for every
// platform, in the order forward() / backward() below take them.
template <class Binding>
auto bind_forward(Binding&& b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()  // x
      .template Arg<ffi::AnyBuffer>()  // scale
      .template Arg<ffi::AnyBuffer>()  // bias
      .template Arg<ffi::AnyBuffer>()  // mean
      .template Arg<ffi::AnyBuffer>()  // var
      .template Arg<ffi::AnyBuffer>()  // mask
      .template Arg<ffi::AnyBuffer>()  // token
      .template Ret<ffi::AnyBuffer>()  // y
      .template Ret<ffi::AnyBuffer>()  // new_mean
      .template Ret<ffi::AnyBuffer>()  // new_var
      .template Ret<ffi::AnyBuffer>()  // saved
      .template Ret<ffi::AnyBuffer>()  // token
      .template Attr<int64_t>("axis")
      .template Attr<bool>("training")
      .template Attr<double>("momentum")
      .template Attr<double>("eps")
      .template Attr<bool>("unbiased")
      .template Attr<int64_t>("comm")
      .template Attr<int64_t>("layer")
      .template Attr<std::string_view>("layer_name")
      .template Attr<bool>("verify");
}

template <class Binding>
auto bind_backward(Binding&& b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()  // dy
      .template Arg<ffi::AnyBuffer>()  // x
      .template Arg<ffi::AnyBuffer>()  // scale
      .template Arg<ffi::AnyBuffer>()  // mask
      .template Arg<ffi::AnyBuffer>()  // saved
      .template Arg<ffi::AnyBuffer>()  // token
      .template Ret<ffi::AnyBuffer>()  // dx
      .template Ret<ffi::AnyBuffer>()  // dscale
      .template Ret<ffi::AnyBuffer>()  // dbias
      .template Ret<ffi::AnyBuffer>()  // token
      .template Attr<int64_t>("axis")
      .template Attr<bool>("training")
      .template Attr<int64_t>("comm")
      .template Attr<int64_t>("layer")
      .template Attr<std::string_view>("layer_name")
      .template Attr<bool>("verify");
}

// Where a handler's buffers live and the stream the core runs on.
struct Platform {
  bool device = false;  // CUDA buffers (else host)
  int32_t ordinal = 0;
  void* stream = nullptr;
};

ffi::Error forward(const Platform& p, ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::AnyBuffer bias,
                   ffi::AnyBuffer mean, ffi::AnyBuffer var, ffi::AnyBuffer mask,
                   ffi::AnyBuffer token, ffi::Result<ffi::AnyBuffer> y,
                   ffi::Result<ffi::AnyBuffer> new_mean, ffi::Result<ffi::AnyBuffer> new_var,
                   ffi::Result<ffi::AnyBuffer> saved, ffi::Result<ffi::AnyBuffer> token_out,
                   int64_t axis, bool training, double momentum, double eps, bool unbiased,
                   int64_t comm, int64_t layer, std::string_view layer_name, bool verify);

ffi::Error backward(const Platform& p, ffi::AnyBuffer dy, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                    ffi::AnyBuffer mask, ffi::AnyBuffer saved, ffi::AnyBuffer token,
                    ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dscale,
                    ffi::Result<ffi::AnyBuffer> dbias, ffi::Result<ffi::AnyBuffer> token_out,
                    int64_t axis, bool training, int64_t comm, int64_t layer,
                    std::string_view layer_name, bool verify);

}  // namespace syncbn::xla

// The handler symbols registered with jax.ffi.register_ffi_target (module.cpp hands
// them out as capsules).
XLA_FFI_DECLARE_HANDLER_SYMBOL(syncbn_xla_forward_cpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(syncbn_xla_backward_cpu);
#ifdef SYNCBN_WITH_CUDA_FFI
XLA_FFI_DECLARE_HANDLER_SYMBOL(syncbn_xla_forward_cuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(syncbn_xla_backward_cuda);
#endif
