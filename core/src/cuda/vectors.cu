// Per-channel vectors between the caller's arrays (any floating dtype and stride) and the
// float64 arrays the kernels take, plus eval's invstd; one thread per element.
#include "../dispatch.h"
#include "kernels.cuh"
#include "reduce.cuh"

namespace syncbn::cuda {
namespace {

template <class T>
__global__ void to_double_kernel(const T* __restrict__ src, int64_t stride, int64_t n,
                                 double* __restrict__ dst) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = load<double>(src + i * stride);
}

template <class T>
__global__ void from_double_kernel(const double* __restrict__ src, T* __restrict__ dst,
                                   int64_t stride, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    store<double>(dst + i * stride, src[i]);
}

__global__ void invstd_kernel(const double* __restrict__ var, int64_t n, double eps,
                              double* __restrict__ invstd) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    invstd[i] = invstd_of(var[i], eps);
}

unsigned blocks_for(int64_t n) {
  return unsigned(std::min(detail::ceil_div(n, detail::kThreads), int64_t(4096)));
}

}  // namespace

void vector_to_double(const void* src, DType dt, int64_t stride, int64_t n, double* dst,
                      cudaStream_t stream) {
  if (n <= 0) return;
  SYNCBN_DISPATCH_FLOATING(dt, T, {
    to_double_kernel<T><<<blocks_for(n), detail::kThreads, 0, stream>>>(static_cast<const T*>(src),
                                                                        stride, n, dst);
  });
  detail::check_launch("vector_to_double");
}

void vector_from_double(const double* src, void* dst, DType dt, int64_t stride, int64_t n,
                        cudaStream_t stream) {
  if (n <= 0) return;
  SYNCBN_DISPATCH_FLOATING(dt, T, {
    from_double_kernel<T>
        <<<blocks_for(n), detail::kThreads, 0, stream>>>(src, static_cast<T*>(dst), stride, n);
  });
  detail::check_launch("vector_from_double");
}

void invstd_from_var(const double* var, int64_t n, double eps, double* invstd,
                     cudaStream_t stream) {
  if (n <= 0) return;
  invstd_kernel<<<blocks_for(n), detail::kThreads, 0, stream>>>(var, n, eps, invstd);
  detail::check_launch("invstd_from_var");
}

}  // namespace syncbn::cuda
