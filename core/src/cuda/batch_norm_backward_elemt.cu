#include <limits>

#include "../dispatch.h"
#include "kernels.cuh"
#include "reduce.cuh"

namespace syncbn::cuda {
namespace {

// Per-channel coefficients, computed once so the element loop has no division:
// mean_dy = sum_dy / N, k = invstd^2 * sum_dy_xmu / N, gain = invstd * w, in the CPU
// path's order of operations. Sums that fail the check give NaN coefficients (dx NaN).
__global__ void backward_coeffs_kernel(const double* __restrict__ invstd,
                                       const double* __restrict__ weight,
                                       const double* __restrict__ sums,
                                       const double* __restrict__ count, int64_t C,
                                       fp::DeviceCheck check, double* __restrict__ coef) {
  const double N = *count;
  const bool ok = fp::reduced_ok(sums, C, check) && sums[2 * C] == N;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += int64_t(gridDim.x) * blockDim.x) {
    if (!ok || !fp::reduced_channel_ok(sums, C, c)) {
      coef[c] = coef[C + c] = coef[2 * C + c] = nan;
      continue;
    }
    coef[c] = sums[c] / N;
    coef[C + c] = invstd[c] * invstd[c] * (sums[C + c] / N);
    coef[2 * C + c] = invstd[c] * (weight ? weight[c] : 1.0);
  }
}

// dx = (dy - mean_dy - (x - mean) * k) * gain.
struct TrainOp {
  static constexpr bool kTwoInputs = true;
  const double* mean;
  const double* coef;  // [mean_dy | k | gain]
  int64_t C;
  struct Params {
    double mean, mean_dy, k, gain;
  };
  __device__ Params params(int64_t c) const {
    return {mean[c], coef[c], coef[C + c], coef[2 * C + c]};
  }
  __device__ double operator()(double d, double v, const Params& p) const {
    return (d - p.mean_dy - (v - p.mean) * p.k) * p.gain;
  }
};

// Eval (statistics are constants): dx = dy * invstd * w; x is not read.
struct EvalOp {
  static constexpr bool kTwoInputs = false;
  const double* invstd;
  const double* weight;  // null: 1
  struct Params {
    double gain;
  };
  __device__ Params params(int64_t c) const { return {invstd[c] * (weight ? weight[c] : 1.0)}; }
  __device__ double operator()(double d, double, const Params& p) const { return d * p.gain; }
};

}  // namespace

void batch_norm_backward_elemt(const void* dy, const void* x, void* dx, DType dt, const Geometry& g,
                               const double* mean, const double* invstd, const double* weight,
                               const double* sums, const double* count,
                               const fp::DeviceCheck& check, cudaStream_t stream) {
  const int64_t C = g.channels;
  if (g.outer * C * g.inner == 0) return;
  SYNCBN_DISPATCH_FLOATING(dt, T, {
    const T* dyp = static_cast<const T*>(dy);
    T* dxp = static_cast<T*>(dx);
    if (!sums) {
      detail::map_channels(dyp, static_cast<const T*>(nullptr), dxp, g, EvalOp{invstd, weight},
                           stream, "batch_norm_backward_elemt");
    } else {
      detail::Workspace coef(3 * C, stream, "batch_norm_backward_elemt");
      const int64_t blocks = std::min(detail::ceil_div(C, detail::kThreads), int64_t(4096));
      backward_coeffs_kernel<<<unsigned(blocks), detail::kThreads, 0, stream>>>(
          invstd, weight, sums, count, C, check, coef.get());
      detail::check_launch("batch_norm_backward_elemt (coefficients)");
      detail::map_channels(dyp, static_cast<const T*>(x), dxp, g, TrainOp{mean, coef.get(), C},
                           stream, "batch_norm_backward_elemt");
    }
  });
}

}  // namespace syncbn::cuda
