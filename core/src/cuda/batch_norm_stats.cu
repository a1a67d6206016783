#include "../dispatch.h"
#include "kernels.cuh"
#include "reduce.cuh"

namespace syncbn::cuda {
namespace {

// t1 += x - shift, t2 += (x - shift)^2 with shift = the channel's first element (0 if not
// finite, see moment_shift), which keeps t2 - t1^2/n from cancelling for large channel
// means (see math.h).
template <class T>
struct StatsAcc {
  static constexpr bool kTwoInputs = false;
  const T* x;
  int64_t inner;
  __device__ double param(int64_t c) const { return moment_shift(load<double>(x + c * inner)); }
  __device__ void operator()(double v, double, double shift, double& t1, double& t2) const {
    const double d = v - shift;
    t1 += d;
    t2 += d * d;
  }
};

// [P1 | P2 | n] exactly as the CPU path packs it; the shift is re-read from x, the same
// element the partial kernels used.
template <class T>
struct StatsEpi {
  const T* x;
  int64_t inner;
  int64_t C;
  double n;
  double* buf;
  __device__ void operator()(int64_t c, double t1, double t2) const {
    const double shift = n > 0 ? moment_shift(load<double>(x + c * inner)) : 0.0;
    pack_local_moments(n, shift, t1, t2, &buf[c], &buf[C + c]);
  }
  __device__ void once() const { buf[2 * C] = n; }
};

}  // namespace

void batch_norm_stats(const void* x, DType dt, const Geometry& g, double* buf,
                      cudaStream_t stream) {
  const double n = g.channels > 0 ? double(g.outer * g.inner) : 0.0;  // as count_per_channel
  SYNCBN_DISPATCH_FLOATING(dt, T, {
    const T* xp = static_cast<const T*>(x);
    detail::reduce_channels(xp, static_cast<const T*>(nullptr), g, StatsAcc<T>{xp, g.inner},
                            StatsEpi<T>{xp, g.inner, g.channels, n, buf}, stream,
                            "batch_norm_stats");
  });
}

}  // namespace syncbn::cuda
