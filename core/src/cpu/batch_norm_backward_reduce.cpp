#include "../dispatch.h"
#include "kernels.h"
#include "traverse.h"

namespace syncbn::cpu {

void batch_norm_backward_reduce(const void* dy, const void* x, DType dt, const Geometry& g,
                                const double* mean, double* sum_dy, double* sum_dy_xmu) {
  SYNCBN_DISPATCH_FLOATING(dt, T, {
    reduce_channels(g, static_cast<const T*>(dy), static_cast<const T*>(x), mean, sum_dy,
                    sum_dy_xmu, [](auto d, auto v, auto m, auto& a, auto& q) {
                      a += d;
                      q += d * (v - m);
                    });
  });
}

}  // namespace syncbn::cpu
