#include "../dispatch.h"
#include "kernels.h"
#include "traverse.h"

namespace syncbn::cpu {

void batch_norm_stats(const void* x, DType dt, const Geometry& g, const double* shift, double* t1,
                      double* t2) {
  SYNCBN_DISPATCH_FLOATING(dt, T, {
    reduce_channels(g, static_cast<const T*>(x), static_cast<const std::nullptr_t*>(nullptr), shift,
                    t1, t2, [](auto v, auto, auto s, auto& a, auto& q) {
                      const auto d = v - s;
                      a += d;
                      q += d * d;
                    });
  });
}

}  // namespace syncbn::cpu
