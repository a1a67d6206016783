#include <type_traits>

#include "../dispatch.h"
#include "kernels.h"
#include "traverse.h"

namespace syncbn::cpu {

void batch_norm_elemt(const void* x, void* y, DType dt, const Geometry& g, const double* mean,
                      const double* scale, const double* bias) {
  SYNCBN_DISPATCH_FLOATING(dt, T, {
    if constexpr (std::is_same_v<T, float>) {
      // float32 in float math (twice the lanes): y = (x - m) * s + (b - (mean - m) * s)
      // with m = mean rounded to float, so x - m is exact where x is near the mean and the
      // rest of the mean lands in the bias; a few float roundings in all.
      const int64_t C = g.channels;
      float* p = scratch<float>(5, size_t(3 * C));
      for (int64_t c = 0; c < C; ++c) {
        const float m = float(mean[c]);
        p[c] = m, p[C + c] = float(scale[c]);
        p[2 * C + c] = float(bias[c] - (mean[c] - double(m)) * scale[c]);
      }
      map_channels(
          g, static_cast<const float*>(x), static_cast<const float*>(nullptr),
          static_cast<float*>(y), p, p + C, p + 2 * C, p + 2 * C,
          [](float v, float, float m, float s, float b, float) { return (v - m) * s + b; });
    } else {
      // (x - mean) first: folding mean into the bias would cancel for large channel means.
      map_channels(
          g, static_cast<const T*>(x), static_cast<const T*>(nullptr), static_cast<T*>(y), mean,
          scale, bias, bias,
          [](double v, double, double m, double s, double b, double) { return (v - m) * s + b; });
    }
  });
}

}  // namespace syncbn::cpu
