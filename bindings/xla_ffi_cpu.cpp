// XLA FFI handlers for the CPU platform: host buffers, no stream (see xla_ffi.h).
#include "xla_ffi.h"

namespace ffi = xla::ffi;
using syncbn::xla::Platform;

namespace {

ffi::Error forward_cpu(ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::AnyBuffer bias,
                       ffi::AnyBuffer mean, ffi::AnyBuffer var, ffi::AnyBuffer mask,
                       ffi::AnyBuffer token, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Result<ffi::AnyBuffer> new_mean, ffi::Result<ffi::AnyBuffer> new_var,
                       ffi::Result<ffi::AnyBuffer> saved, ffi::Result<ffi::AnyBuffer> token_out,
                       int64_t axis, bool training, double momentum, double eps, bool unbiased,
                       int64_t comm, int64_t layer, std::string_view layer_name, bool verify) {
  return syncbn::xla::forward(Platform{}, x, scale, bias, mean, var, mask, token, y, new_mean,
                              new_var, saved, token_out, axis, training, momentum, eps, unbiased,
                              comm, layer, layer_name, verify);
}

ffi::Error backward_cpu(ffi::AnyBuffer dy, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                        ffi::AnyBuffer mask, ffi::AnyBuffer saved, ffi::AnyBuffer token,
                        ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dscale,
                        ffi::Result<ffi::AnyBuffer> dbias, ffi::Result<ffi::AnyBuffer> token_out,
                        int64_t axis, bool training, int64_t comm, int64_t layer,
                        std::string_view layer_name, bool verify) {
  return syncbn::xla::backward(Platform{}, dy, x, scale, mask, saved, token, dx, dscale, dbias,
                               token_out, axis, training, comm, layer, layer_name, verify);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(syncbn_xla_forward_cpu, forward_cpu,
                              syncbn::xla::bind_forward(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(syncbn_xla_backward_cpu, backward_cpu,
                              syncbn::xla::bind_backward(ffi::Ffi::Bind()));
