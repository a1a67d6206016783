#include "../dispatch.h"
#include "kernels.h"
#include "traverse.h"

namespace syncbn::cpu {

void batch_norm_stats(const void* x, DType dt, const Geometry& g, const double* shift, double* t1,
                      double* t2) {
  SYNCBN_DISPATCH_FLOATING(dt, T, {
    const T* xp = static_cast<const T*>(x);
    reduce_channels(g, shift, t1, t2, [xp](int64_t i, double s, double& a, double& q) {
      const double d = load<double>(xp + i) - s;
      a += d;
      q += d * d;
    });
  });
}

}  // namespace syncbn::cpu
