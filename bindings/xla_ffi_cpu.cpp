// XLA FFI handlers for the CPU platform: host buffers, no stream (see xla_ffi.h).
#include "xla_ffi.h"

namespace ffi = xla::ffi;
using syncbn::xla::Platform;

namespace {

ffi::Error forward_cpu(ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::AnyBuffer bias,
                       ffi::AnyBuffer mean, ffi::AnyBuffer var, ffi::AnyBuffer token,
                       ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> new_mean,
                       ffi::Result<ffi::AnyBuffer> new_var, ffi::Result<ffi::AnyBuffer> saved,
                       ffi::Result<ffi::AnyBuffer> token_out, int64_t axis, bool training,
                       double momentum, double eps, bool unbiased, int64_t comm, int64_t layer,
                       std::string_view layer_name, bool verify) {
  return syncbn::xla::forward(Platform{}, x, scale, bias, mean, var, token, y, new_mean, new_var,
                              saved, token_out, axis, training, momentum, eps, unbiased, comm,
                              layer, layer_name, verify);
}

ffi::Error backward_cpu(ffi::AnyBuffer dy, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                        ffi::AnyBuffer saved, ffi::AnyBuffer token, ffi::Result<ffi::AnyBuffer> dx,
                        ffi::Result<ffi::AnyBuffer> dscale, ffi::Result<ffi::AnyBuffer> dbias,
                        ffi::Result<ffi::AnyBuffer> token_out, int64_t axis, bool training,
                        int64_t comm, int64_t layer, std::string_view layer_name, bool verify) {
  return syncbn::xla::backward(Platform{}, dy, x, scale, saved, token, dx, dscale, dbias, token_out,
                               axis, training, comm, layer, layer_name, verify);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(syncbn_xla_forward_cpu, forward_cpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // scale
                                  .Arg<ffi::AnyBuffer>()  // bias
                                  .Arg<ffi::AnyBuffer>()  // mean
                                  .Arg<ffi::AnyBuffer>()  // var
                                  .Arg<ffi::AnyBuffer>()  // token
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Ret<ffi::AnyBuffer>()  // new_mean
                                  .Ret<ffi::AnyBuffer>()  // new_var
                                  .Ret<ffi::AnyBuffer>()  // saved
                                  .Ret<ffi::AnyBuffer>()  // token
                                  .Attr<int64_t>("axis")
                                  .Attr<bool>("training")
                                  .Attr<double>("momentum")
                                  .Attr<double>("eps")
                                  .Attr<bool>("unbiased")
                                  .Attr<int64_t>("comm")
                                  .Attr<int64_t>("layer")
                                  .Attr<std::string_view>("layer_name")
                                  .Attr<bool>("verify"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(syncbn_xla_backward_cpu, backward_cpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // scale
                                  .Arg<ffi::AnyBuffer>()  // saved
                                  .Arg<ffi::AnyBuffer>()  // token
                                  .Ret<ffi::AnyBuffer>()  // dx
                                  .Ret<ffi::AnyBuffer>()  // dscale
                                  .Ret<ffi::AnyBuffer>()  // dbias
                                  .Ret<ffi::AnyBuffer>()  // token
                                  .Attr<int64_t>("axis")
                                  .Attr<bool>("training")
                                  .Attr<int64_t>("comm")
                                  .Attr<int64_t>("layer")
                                  .Attr<std::string_view>("layer_name")
                                  .Attr<bool>("verify"));
