#include "../dispatch.h"
#include "kernels.cuh"
#include "reduce.cuh"

namespace syncbn::cuda {
namespace {

// sum_dy += dy, sum_dy_xmu += dy * (x - mean).
struct BackwardAcc {
  static constexpr bool kTwoInputs = true;
  const double* mean;
  __device__ double param(int64_t c) const { return mean[c]; }
  __device__ void operator()(double d, double v, double m, double& a, double& q) const {
    a += d;
    q += d * (v - m);
  }
};

struct BackwardEpi {
  int64_t C;
  const double* invstd;
  double* sums;
  double* grad_weight;
  double* grad_bias;
  __device__ void operator()(int64_t c, double sum_dy, double sum_dy_xmu) const {
    sums[c] = sum_dy;
    sums[C + c] = sum_dy_xmu;
    if (grad_weight) grad_weight[c] = sum_dy_xmu * invstd[c];
    if (grad_bias) grad_bias[c] = sum_dy;
  }
  __device__ void once() const {}
};

}  // namespace

void batch_norm_backward_reduce(const void* dy, const void* x, DType dt, const Geometry& g,
                                const double* mean, const double* invstd, double* sums,
                                double* grad_weight, double* grad_bias, cudaStream_t stream) {
  SYNCBN_DISPATCH_FLOATING(dt, T, {
    detail::reduce_channels(static_cast<const T*>(dy), static_cast<const T*>(x), g,
                            BackwardAcc{mean},
                            BackwardEpi{g.channels, invstd, sums, grad_weight, grad_bias}, stream,
                            "batch_norm_backward_reduce");
  });
}

}  // namespace syncbn::cuda
