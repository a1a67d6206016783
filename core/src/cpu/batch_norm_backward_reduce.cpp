#include "../dispatch.h"
#include "kernels.h"
#include "traverse.h"

namespace syncbn::cpu {

void batch_norm_backward_reduce(const void* dy, const void* x, DType dt, const Geometry& g,
                                const double* mean, double* sum_dy, double* sum_dy_xmu) {
  SYNCBN_DISPATCH_FLOATING(dt, T, {
    const T* dyp = static_cast<const T*>(dy);
    const T* xp = static_cast<const T*>(x);
    reduce_channels(g, mean, sum_dy, sum_dy_xmu,
                    [dyp, xp](int64_t i, double m, double& a, double& q) {
                      const double d = load<double>(dyp + i);
                      a += d;
                      q += d * (load<double>(xp + i) - m);
                    });
  });
}

}  // namespace syncbn::cpu
