#include "../dispatch.h"
#include "kernels.h"
#include "traverse.h"

namespace syncbn::cpu {

void batch_norm_backward_elemt(const void* dy, const void* x, void* dx, DType dt, const Geometry& g,
                               const double* mean, const double* mean_dy, const double* k,
                               const double* gain) {
  SYNCBN_DISPATCH_FLOATING(dt, T, {
    map_channels(g, static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<T*>(dx), mean,
                 mean_dy, k, gain,
                 [](double d, double v, double m, double mdy, double kk, double gn) {
                   return (d - mdy - (v - m) * kk) * gn;
                 });
  });
}

}  // namespace syncbn::cpu
