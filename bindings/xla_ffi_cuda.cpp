// XLA FFI handlers for the CUDA platform: device buffers, run on XLA's stream (see
// xla_ffi.h). The core's CUDA backend (syncbn._cuda, loaded by syncbn.jax before these
// run) does the work; with NCCL the collective is enqueued on that stream (no host sync).
// No CUDA headers needed: the stream is an opaque pointer here.
#include "xla_ffi.h"

namespace ffi = xla::ffi;
using syncbn::xla::Platform;

namespace {

ffi::Error forward_cuda(void* stream, int32_t ordinal, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                        ffi::AnyBuffer bias, ffi::AnyBuffer mean, ffi::AnyBuffer var,
                        ffi::AnyBuffer mask, ffi::AnyBuffer token, ffi::Result<ffi::AnyBuffer> y,
                        ffi::Result<ffi::AnyBuffer> new_mean, ffi::Result<ffi::AnyBuffer> new_var,
                        ffi::Result<ffi::AnyBuffer> saved, ffi::Result<ffi::AnyBuffer> token_out,
                        int64_t axis, bool training, double momentum, double eps, bool unbiased,
                        int64_t comm, int64_t layer, std::string_view layer_name, bool verify) {
  return syncbn::xla::forward(Platform{true, ordinal, stream}, x, scale, bias, mean, var, mask,
                              token, y, new_mean, new_var, saved, token_out, axis, training,
                              momentum, eps, unbiased, comm, layer, layer_name, verify);
}

ffi::Error backward_cuda(void* stream, int32_t ordinal, ffi::AnyBuffer dy, ffi::AnyBuffer x,
                         ffi::AnyBuffer scale, ffi::AnyBuffer mask, ffi::AnyBuffer saved,
                         ffi::AnyBuffer token, ffi::Result<ffi::AnyBuffer> dx,
                         ffi::Result<ffi::AnyBuffer> dscale, ffi::Result<ffi::AnyBuffer> dbias,
                         ffi::Result<ffi::AnyBuffer> token_out, int64_t axis, bool training,
                         int64_t comm, int64_t layer, std::string_view layer_name, bool verify) {
  return syncbn::xla::backward(Platform{true, ordinal, stream}, dy, x, scale, mask, saved, token,
                               dx, dscale, dbias, token_out, axis, training, comm, layer,
                               layer_name, verify);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(syncbn_xla_forward_cuda, forward_cuda,
                              syncbn::xla::bind_forward(ffi::Ffi::Bind()
                                                            .Ctx<ffi::PlatformStream<void*>>()
                                                            .Ctx<ffi::DeviceOrdinal>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(syncbn_xla_backward_cuda, backward_cuda,
                              syncbn::xla::bind_backward(ffi::Ffi::Bind()
                                                             .Ctx<ffi::PlatformStream<void*>>()
                                                             .Ctx<ffi::DeviceOrdinal>()));
