// Element-wise copy between two device views of one shape and dtype, any strides: the
// fallback that packs non-dense inputs and unpacks outputs, so it is general first. Dims
// are simplified on the host, which turns most real cases into one to three dims.
#include <algorithm>
#include <cstdlib>

#include "kernels.cuh"
#include "reduce.cuh"

namespace syncbn::cuda {
namespace {

struct Dims {
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t src[kMaxDims] = {};
  int64_t dst[kMaxDims] = {};
};

// Drops size-1 dims, orders the rest by decreasing |dst stride| (consecutive threads then
// write neighbouring elements) and merges a dim into the previous one when the pair is a
// single run in both src and dst. Any common order is valid: it is an element-wise copy.
Dims simplify(const TensorView& s, const TensorView& d) {
  int idx[kMaxDims];
  int n = 0;
  for (int k = 0; k < s.ndim; ++k)
    if (s.shape[k] != 1) idx[n++] = k;
  std::stable_sort(idx, idx + n, [&](int a, int b) {
    return std::llabs(d.strides[a]) > std::llabs(d.strides[b]);
  });
  Dims r;
  for (int m = 0; m < n; ++m) {
    const int k = idx[m];
    const int q = r.ndim - 1;
    if (q >= 0 && r.src[q] == s.strides[k] * s.shape[k] && r.dst[q] == d.strides[k] * s.shape[k]) {
      r.shape[q] *= s.shape[k];
      r.src[q] = s.strides[k];
      r.dst[q] = d.strides[k];
      continue;
    }
    r.shape[r.ndim] = s.shape[k];
    r.src[r.ndim] = s.strides[k];
    r.dst[r.ndim] = d.strides[k];
    ++r.ndim;
  }
  return r;
}

// E: an unsigned integer of the element's size (a copy needs no arithmetic). Index: the
// type the flat index is divided in; 32-bit division is several times cheaper.
template <class E, class Index>
__global__ void __launch_bounds__(detail::kThreads)
    copy_strided_kernel(const E* __restrict__ src, E* __restrict__ dst, int64_t numel, Dims d) {
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < numel;
       idx += int64_t(gridDim.x) * blockDim.x) {
    Index rem = Index(idx);
    int64_t so = 0, dso = 0;
    for (int k = d.ndim - 1; k >= 0; --k) {
      const Index n = Index(d.shape[k]);
      const Index q = rem / n;
      const int64_t coord = int64_t(rem - q * n);
      rem = q;
      so += coord * d.src[k];
      dso += coord * d.dst[k];
    }
    dst[dso] = src[so];
  }
}

template <class E>
void launch_copy(const TensorView& src, const TensorView& dst, int64_t numel, const Dims& d,
                 cudaStream_t stream) {
  const unsigned blocks =
      unsigned(std::min(detail::ceil_div(numel, detail::kThreads), detail::kMaxGridX));
  const E* s = static_cast<const E*>(src.data);
  E* t = static_cast<E*>(dst.data);
  if (numel <= int64_t(UINT32_MAX))
    copy_strided_kernel<E, uint32_t><<<blocks, detail::kThreads, 0, stream>>>(s, t, numel, d);
  else
    copy_strided_kernel<E, uint64_t><<<blocks, detail::kThreads, 0, stream>>>(s, t, numel, d);
  detail::check_launch("copy_strided");
}

}  // namespace

void copy_strided(const TensorView& src, const TensorView& dst, cudaStream_t stream) {
  if (src.ndim != dst.ndim || !std::equal(src.shape, src.shape + src.ndim, dst.shape) ||
      src.dtype != dst.dtype)
    throw std::runtime_error(
        "syncbn CUDA: copy_strided: expected views of one shape and dtype, got " + src.shape_str() +
        " " + dtype_name(src.dtype) + " and " + dst.shape_str() + " " + dtype_name(dst.dtype));
  const int64_t numel = src.numel();
  if (numel == 0) return;
  const Dims d = simplify(src, dst);
  switch (dtype_size(src.dtype)) {
    case 2: return launch_copy<uint16_t>(src, dst, numel, d, stream);
    case 4: return launch_copy<uint32_t>(src, dst, numel, d, stream);
    case 8: return launch_copy<uint64_t>(src, dst, numel, d, stream);
    default: throw std::runtime_error("syncbn CUDA: copy_strided: unsupported element size");
  }
}

}  // namespace syncbn::cuda
