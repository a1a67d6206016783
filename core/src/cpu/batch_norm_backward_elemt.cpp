#include "../dispatch.h"
#include "kernels.h"
#include "traverse.h"

namespace syncbn::cpu {

void batch_norm_backward_elemt(const void* dy, const void* x, void* dx, DType dt, const Geometry& g,
                               const double* mean, const double* mean_dy, const double* k,
                               const double* gain) {
  SYNCBN_DISPATCH_FLOATING(dt, T, {
    const T* dyp = static_cast<const T*>(dy);
    const T* xp = static_cast<const T*>(x);
    T* dxp = static_cast<T*>(dx);
    map_channels(g, mean, mean_dy, k, gain,
                 [dyp, xp, dxp](int64_t i, double m, double mdy, double kk, double gn) {
                   const double v =
                       (load<double>(dyp + i) - mdy - (load<double>(xp + i) - m) * kk) * gn;
                   store<double>(dxp + i, v);
                 });
  });
}

}  // namespace syncbn::cpu
