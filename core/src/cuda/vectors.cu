// Per-channel vectors between the caller's arrays (any floating dtype and stride) and the
// float64 arrays the kernels take, plus eval's invstd (one thread per element), and the
// fingerprint behind a device all-reduce buffer.
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

struct Slots {
  double v[kFingerprintSlots];
};

// One block: the non-finite flag of buf[0 .. 2C) by a shared-memory OR, then the slots.
__global__ void fingerprint_kernel(double* buf, int64_t C, double count, Slots slots) {
  __shared__ int bad[detail::kThreads];
  int b = 0;
  for (int64_t i = threadIdx.x; i < 2 * C; i += blockDim.x) {
    const double v = buf[i];
    b |= !(v - v == 0);
  }
  bad[threadIdx.x] = b;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w /= 2) {
    if (int(threadIdx.x) < w) bad[threadIdx.x] |= bad[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    if (count >= 0) buf[2 * C] = count;
    double* s = buf + 2 * C + 1;
    for (int j = 0; j < kFingerprintSlots; ++j) s[j] = slots.v[j];
    s[fp::kNonFinite] = bad[0] ? 1.0 : 0.0;
  }
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

void write_fingerprint(double* buf, int64_t C, double count, const Fingerprint& f,
                       cudaStream_t stream) {
  Slots slots;
  for (int j = 0; j < kFingerprintSlots; ++j) slots.v[j] = f.slots[j];
  fingerprint_kernel<<<1, detail::kThreads, 0, stream>>>(buf, C, count, slots);
  detail::check_launch("write_fingerprint");
}

}  // namespace syncbn::cuda
