// CUDA kernels, the mirror of core/src/cpu/kernels.h: the same primitives over the same
// dense (outer, C, inner) traversal (see Geometry), stream-ordered on the caller's stream,
// no host synchronization, 64-bit indexing. Per-channel parameters are float64 device
// arrays of length C. Element-wise launchers are no-ops for empty tensors; the two
// reductions still write their outputs then (zero sums, n = 0), as the CPU path does.
// Launch errors throw std::runtime_error naming the kernel.
#pragma once

#include <cuda_runtime.h>

#include "../collective.h"
#include "syncbn/tensor.h"

namespace syncbn::cuda {

// Local packed moments of x into `buf` (device, 2C+1 doubles): [P1 | P2 | n] exactly as
// cpu::batch_norm_stats followed by pack_local_moments (math.h) on the host: per-channel
// shift = the channel's first element (o=0, i=0), float64 shifted sums, then
// pack_local_moments(n, shift, t1, t2). n = outer*inner (0 when the tensor is empty,
// then buf is all zeros).
void batch_norm_stats(const void* x, DType dt, const Geometry& g, double* buf, cudaStream_t stream);

// From a reduced stats buffer (device, 2C+1): mean, invstd (finalize_moments, invstd_of
// from math.h), and running stats update in place when running_mean/var are non-null:
// new = (1-m)*old + m*batch with batch var = M2/(N-1) if unbiased else M2/N. N = buf[2C]
// is read on the device: N == 0 writes nothing; N < 2 leaves the running stats as they are (no
// host sync is possible to raise, see ops). running stats are 1-D views on the device, each
// of any floating dtype and stride.
struct RunningStats {
  void* mean = nullptr;
  void* var = nullptr;
  DType mean_dtype = DType::Float32;
  DType var_dtype = DType::Float32;
  int64_t mean_stride = 1;
  int64_t var_stride = 1;
};
// `check`: the reduced buffer is judged on the device first (fp::reduced_ok); when it
// fails, mean/invstd/var_biased get NaN and the running stats are left alone; a channel
// whose sums are not finite although no rank's were (fp::reduced_channel_ok) gets NaN
// alone. *count_out (nullable, not inside buf) gets N, or NaN when the check fails.
void batch_norm_gather_stats(const double* buf, int64_t C, double momentum, double eps,
                             bool unbiased, RunningStats running, double* mean, double* invstd,
                             double* var_biased /*nullable*/, const fp::DeviceCheck& check,
                             double* count_out /*nullable*/, cudaStream_t stream);

// y = (x - mean) * invstd * w + b, w/b device float64 arrays (null: 1 / 0).
void batch_norm_elemt(const void* x, void* y, DType dt, const Geometry& g, const double* mean,
                      const double* invstd, const double* weight, const double* bias,
                      cudaStream_t stream);

// sums (device, 2C) = [sum(dy) | sum(dy * (x - mean))] per channel, and optionally
// grad_weight = sum(dy*(x-mean)) * invstd, grad_bias = sum(dy) into float64 device
// arrays (nullable).
void batch_norm_backward_reduce(const void* dy, const void* x, DType dt, const Geometry& g,
                                const double* mean, const double* invstd, double* sums,
                                double* grad_weight, double* grad_bias, cudaStream_t stream);

// dx = (dy - sum_dy/N - (x - mean) * invstd^2 * sum_dy_xmu/N) * invstd * w, with
// sums = the globally reduced backward buffer [sum_dy | sum_dy_xmu | n | fingerprint]
// (null: eval, the two terms are 0, so dx = dy * invstd * w and x is not read) and N read
// on the device from *count (null when sums is null). `check` judges sums on the device
// (fp::reduced_ok, and its count must equal *count): when it fails, dx is NaN.
void batch_norm_backward_elemt(const void* dy, const void* x, void* dx, DType dt, const Geometry& g,
                               const double* mean, const double* invstd, const double* weight,
                               const double* sums, const double* count,
                               const fp::DeviceCheck& check, cudaStream_t stream);

// Writes fingerprint f behind a device buffer's payload (buf[2C + 1 ...]), its non-finite
// flag from buf[0 .. 2C); count >= 0 is written to buf[2C] first (backward buffers).
void write_fingerprint(double* buf, int64_t C, double count, const Fingerprint& f,
                       cudaStream_t stream);

// Element-wise copy between two device views of the same shape and dtype, any strides
// (up to kMaxDims dims). Used to pack non-dense inputs and unpack outputs.
void copy_strided(const TensorView& src, const TensorView& dst, cudaStream_t stream);

// Per-channel vectors: dst[i] = (double) src[i * stride] (src of dtype dt), and back
// (rounding like store<double> in math.h).
void vector_to_double(const void* src, DType dt, int64_t stride, int64_t n, double* dst,
                      cudaStream_t stream);
void vector_from_double(const double* src, void* dst, DType dt, int64_t stride, int64_t n,
                        cudaStream_t stream);

// eval: invstd[c] = invstd_of(var[c], eps) from a float64 device array.
void invstd_from_var(const double* var, int64_t n, double eps, double* invstd, cudaStream_t stream);

}  // namespace syncbn::cuda
