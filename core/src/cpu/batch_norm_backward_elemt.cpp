#include <type_traits>

#include "../dispatch.h"
#include "kernels.h"
#include "traverse.h"

namespace syncbn::cpu {

void batch_norm_backward_elemt(const void* dy, const void* x, void* dx, DType dt, const Geometry& g,
                               const double* mean, const double* mean_dy, const double* k,
                               const double* gain) {
  SYNCBN_DISPATCH_FLOATING(dt, T, {
    if constexpr (std::is_same_v<T, float>) {
      // float32 in float math, as batch_norm_elemt: m = mean rounded to float, the rest of
      // the mean folded into mean_dy (dy - mdy - (x - mean) k = dy - (mdy - (mean - m) k)
      // - (x - m) k).
      const int64_t C = g.channels;
      float* p = scratch<float>(5, size_t(4 * C));
      for (int64_t c = 0; c < C; ++c) {
        const float m = float(mean[c]);
        p[c] = m, p[C + c] = float(mean_dy[c] - (mean[c] - double(m)) * k[c]);
        p[2 * C + c] = float(k[c]), p[3 * C + c] = float(gain[c]);
      }
      map_channels(g, static_cast<const float*>(dy), static_cast<const float*>(x),
                   static_cast<float*>(dx), p, p + C, p + 2 * C, p + 3 * C,
                   [](float d, float v, float m, float mdy, float kk, float gn) {
                     return (d - mdy - (v - m) * kk) * gn;
                   });
    } else {
      map_channels(g, static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<T*>(dx),
                   mean, mean_dy, k, gain,
                   [](double d, double v, double m, double mdy, double kk, double gn) {
                     return (d - mdy - (v - m) * kk) * gn;
                   });
    }
  });
}

}  // namespace syncbn::cpu
