// XLA FFI handlers for JAX (compiled into syncbn._core when SYNCBN_WITH_JAX is on).
//
// They decode XLA buffers and attributes into core views and call syncbn::forward /
// syncbn::backward; no math. The CPU and CUDA handlers (xla_ffi_cpu.cpp, xla_ffi_cuda.cpp)
// differ only in where the buffers live and which stream the core runs on.
//
// Operands and results (python/syncbn/jax.py builds the calls):
//   forward:  (x, scale, bias, mean, var, token) -> (y, new_mean, new_var, saved, token)
//             new_mean/new_var alias mean/var (updated in place by the core), the token
//             out aliases the token in (nothing is written to it: it is a data
//             dependency that orders the collectives, see DESIGN.md).
//   backward: (dy, x, scale, saved, token) -> (dx, dscale, dbias, token)
// A zero-length scale or bias is "absent" (flax's use_scale/use_bias=False).
// `saved` is uint32[2 * (2C + 1)]: the float64 [mean (C) | invstd (C) | count] of the
// forward, kept as raw bytes so it needs no jax_enable_x64 (float64 results would be
// float32 without it).
// Attributes: axis (i64), training (bool), momentum, eps (f64, PyTorch's convention),
// unbiased (bool, forward), comm (i64: a registry id, below), layer (i64), layer_name
// (string), verify (bool).
#pragma once

#include <cstdint>

#include "syncbn/communicator.h"
#include "xla/ffi/api/ffi.h"

namespace syncbn::xla {

namespace ffi = ::xla::ffi;

// Communicators cannot be attributes: the Python side registers each one it uses here and
// passes the id; the handler resolves it when it runs. The caller keeps the communicator
// alive (python/syncbn/jax.py holds it for the life of the process).
int64_t register_communicator(Communicator* comm);

// Where a handler's buffers live and the stream the core runs on.
struct Platform {
  bool device = false;  // CUDA buffers (else host)
  int32_t ordinal = 0;
  void* stream = nullptr;
};

ffi::Error forward(const Platform& p, ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::AnyBuffer bias,
                   ffi::AnyBuffer mean, ffi::AnyBuffer var, ffi::AnyBuffer token,
                   ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> new_mean,
                   ffi::Result<ffi::AnyBuffer> new_var, ffi::Result<ffi::AnyBuffer> saved,
                   ffi::Result<ffi::AnyBuffer> token_out, int64_t axis, bool training,
                   double momentum, double eps, bool unbiased, int64_t comm, int64_t layer,
                   std::string_view layer_name, bool verify);

ffi::Error backward(const Platform& p, ffi::AnyBuffer dy, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                    ffi::AnyBuffer saved, ffi::AnyBuffer token, ffi::Result<ffi::AnyBuffer> dx,
                    ffi::Result<ffi::AnyBuffer> dscale, ffi::Result<ffi::AnyBuffer> dbias,
                    ffi::Result<ffi::AnyBuffer> token_out, int64_t axis, bool training,
                    int64_t comm, int64_t layer, std::string_view layer_name, bool verify);

}  // namespace syncbn::xla

// The handler symbols registered with jax.ffi.register_ffi_target (module.cpp hands
// them out as capsules).
XLA_FFI_DECLARE_HANDLER_SYMBOL(syncbn_xla_forward_cpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(syncbn_xla_backward_cpu);
#ifdef SYNCBN_WITH_CUDA_FFI
XLA_FFI_DECLARE_HANDLER_SYMBOL(syncbn_xla_forward_cuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(syncbn_xla_backward_cuda);
#endif
