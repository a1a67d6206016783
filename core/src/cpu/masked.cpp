// The two element-wise steps masked statistics add around the unmasked kernels (ops.cpp):
// masked-out elements are replaced by the channel's shift before the moments, so they add
// exactly zero, and get the gradient of a constant mean and variance after backward_elemt.
#include <vector>

#include "../dispatch.h"
#include "kernels.h"
#include "parallel.h"

namespace syncbn::cpu {
namespace {

// fn(j, c) for every element j = (o * C + c) * inner + i of thread t's share of rows.
template <class Fn>
void for_each_element(const Geometry& g, Fn&& fn) {
  const int64_t C = g.channels, I = g.inner;
  parallel(threads_for(g.outer * C * I), [&](int t, int nt) {
    int64_t b, e;
    split(g.outer, t, nt, &b, &e);
    for (int64_t o = b; o < e; ++o)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t j0 = (o * C + c) * I;
        for (int64_t i = 0; i < I; ++i) fn(j0 + i, c);
      }
  });
}

}  // namespace

// Both select without branching: the masks are data, often random-looking (a branch per
// element mispredicted a third of the time).
void select_masked(const void* x, const uint8_t* mask, void* out, DType dt, const Geometry& g,
                   const double* fill) {
  SYNCBN_DISPATCH_FLOATING(dt, T, {
    const T* xp = static_cast<const T*>(x);
    T* op = static_cast<T*>(out);
    std::vector<T> f(static_cast<size_t>(g.channels));
    for (size_t c = 0; c < f.size(); ++c) store<double>(&f[c], fill[c]);
    for_each_element(g, [&](int64_t j, int64_t c) { op[j] = mask[j] ? xp[j] : f[size_t(c)]; });
  });
}

void scale_masked_out(const void* dy, const uint8_t* mask, void* dx, DType dt, const Geometry& g,
                      const double* gain) {
  SYNCBN_DISPATCH_FLOATING(dt, T, {
    const T* dyp = static_cast<const T*>(dy);
    T* dxp = static_cast<T*>(dx);
    for_each_element(g, [&](int64_t j, int64_t c) {
      T v;
      store<double>(&v, load<double>(dyp + j) * gain[c]);
      dxp[j] = mask[j] ? dxp[j] : v;
    });
  });
}

}  // namespace syncbn::cpu
