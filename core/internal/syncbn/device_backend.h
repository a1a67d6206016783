// The seam between the CPU core and a device backend (the CUDA module). The core has no
// CUDA dependency: the backend registers a table of operations at run time, and the core
// calls it for device tensors after validating every argument (ops.cpp). The table is
// passed between shared objects as a plain pointer, so its layout is versioned.
#pragma once

#include "syncbn/communicator.h"
#include "syncbn/ops.h"
#include "syncbn/tensor.h"

namespace syncbn {

struct Fingerprint;  // core/src/collective.h: what this rank reduces in one all-reduce

struct DeviceBackend {
  static constexpr int kAbi = 2;
  int abi = kAbi;
  DeviceType device = DeviceType::CUDA;

  // Same meaning as the functions of ops.h, arguments already validated; the count of a
  // training forward stays on the device (save_count / count_view), so these return NaN
  // where the host versions return it. `fp`: the fingerprint the core made for this call
  // (its slots go behind the payload, the non-finite flag computed on the device); the
  // reduced buffer is checked against it (collective.h) before anything is written: on the
  // host where the buffer is staged there anyway, else on the device (no host sync).
  void (*batch_norm_stats)(const TensorView& x, int axis, const TensorView& buffer,
                           const Fingerprint& fp, void* stream);
  void (*allreduce)(const TensorView& buffer, Communicator& comm, void* stream);
  void (*batch_norm_gather_stats)(const TensorView& buffer, double momentum, double eps,
                                  bool unbiased, const TensorView* running_mean,
                                  const TensorView* running_var, const TensorView& mean,
                                  const TensorView& invstd, const TensorView* var_biased,
                                  const CollectiveKey& key, void* stream);
  void (*batch_norm_elemt)(const TensorView& x, int axis, const TensorView& mean,
                           const TensorView& invstd, const TensorView* weight,
                           const TensorView* bias, const TensorView& y, void* stream);
  void (*batch_norm_backward_reduce)(const TensorView& dy, const TensorView& x, int axis,
                                     const TensorView& mean, const TensorView& invstd,
                                     const TensorView& sums, const TensorView* grad_weight,
                                     const TensorView* grad_bias, const Fingerprint& fp,
                                     void* stream);
  void (*batch_norm_backward_elemt)(const TensorView& dy, const TensorView& x, int axis,
                                    const TensorView& mean, const TensorView& invstd,
                                    const TensorView* weight, const TensorView& sums,
                                    const TensorView& count, const TensorView& dx,
                                    const CollectiveKey& key, void* stream);
  void (*forward)(const TensorView& x, int axis, const TensorView* weight, const TensorView* bias,
                  const TensorView* running_mean, const TensorView* running_var,
                  const ForwardOptions& opt, Communicator& comm, const TensorView& y,
                  const TensorView& save_mean, const TensorView& save_invstd,
                  const TensorView& save_count, const Fingerprint* fp /*training only*/);
  void (*backward)(const TensorView& dy, const TensorView& x, int axis, const TensorView& save_mean,
                   const TensorView& save_invstd, const TensorView* weight,
                   const BackwardOptions& opt, Communicator& comm, const TensorView* dx,
                   const TensorView* grad_weight, const TensorView* grad_bias,
                   const Fingerprint* fp /*when dx is synchronized*/);
};

// Registers the backend for its device type (replacing an earlier one); null clears it.
void register_device_backend(const DeviceBackend* backend);
const DeviceBackend* device_backend(DeviceType device);

}  // namespace syncbn
