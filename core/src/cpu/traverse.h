// The two traversals every CPU kernel uses, written once so the kernels are one-liners
// and their inner loops stay simple enough for the compiler to vectorize.
//
// Runs mode (inner >= kRunMin, e.g. NCHW): each (o, c) is a contiguous run of `inner`
// elements with scalar channel parameters; runs are cut in blocks so that even one
// large channel spreads over all threads.
// Rows mode (inner < kRunMin, e.g. channels-last): each o is a row of L = C*inner
// elements; channel parameters are expanded to length L and the loop runs along the row.
#pragma once

#include <algorithm>
#include <vector>

#include "parallel.h"
#include "syncbn/tensor.h"

namespace syncbn::cpu {

constexpr int64_t kRunMin = 16;
constexpr int64_t kBlock = 1 << 14;

inline std::vector<double> expand_to_row(const double* p, int64_t C, int64_t inner) {
  std::vector<double> r(size_t(C * inner));
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < inner; ++i) r[size_t(c * inner + i)] = p[c];
  return r;
}

// Per channel c: out_a[c] = sum f_a, out_b[c] = sum f_b, where f(idx, p, a, b) adds the
// contributions of flat element idx (param p = param[c]) into a and b.
template <class F>
void reduce_channels(const Geometry& g, const double* param, double* out_a, double* out_b, F f) {
  const int64_t C = g.channels, I = g.inner, O = g.outer;
  std::fill(out_a, out_a + C, 0.0);
  std::fill(out_b, out_b + C, 0.0);
  const int nt_req = threads_for(O * C * I);
  if (I >= kRunMin) {
    const int64_t nb = (I + kBlock - 1) / kBlock;
    const int64_t items = O * C * nb;
    std::vector<double> part(size_t(nt_req) * 2 * C, 0.0);
    parallel(nt_req, [&](int t, int nt) {
      double* pa = part.data() + size_t(t) * 2 * C;
      double* pb = pa + C;
      int64_t b, e;
      split(items, t, nt, &b, &e);
      for (int64_t it = b; it < e; ++it) {
        const int64_t oc = it / nb, c = oc % C;
        const int64_t i0 = (it % nb) * kBlock, i1 = std::min(I, i0 + kBlock);
        const int64_t base = oc * I;
        const double p = param[c];
        double a = 0, q = 0;
#pragma omp simd reduction(+ : a, q)
        for (int64_t i = i0; i < i1; ++i) f(base + i, p, a, q);
        pa[c] += a;
        pb[c] += q;
      }
    });
    for (int t = 0; t < nt_req; ++t)
      for (int64_t c = 0; c < C; ++c) {
        out_a[c] += part[size_t(t) * 2 * C + c];
        out_b[c] += part[size_t(t) * 2 * C + C + c];
      }
  } else {
    const int64_t L = C * I;
    const std::vector<double> prow = expand_to_row(param, C, I);
    std::vector<double> part(size_t(nt_req) * 2 * L, 0.0);
    parallel(nt_req, [&](int t, int nt) {
      double* pa = part.data() + size_t(t) * 2 * L;
      double* pb = pa + L;
      const double* pr = prow.data();
      int64_t b, e;
      split(O, t, nt, &b, &e);
      for (int64_t o = b; o < e; ++o) {
        const int64_t base = o * L;
#pragma omp simd
        for (int64_t j = 0; j < L; ++j) f(base + j, pr[j], pa[j], pb[j]);
      }
    });
    for (int t = 0; t < nt_req; ++t)
      for (int64_t j = 0; j < L; ++j) {
        out_a[j / I] += part[size_t(t) * 2 * L + j];
        out_b[j / I] += part[size_t(t) * 2 * L + L + j];
      }
  }
}

// Element-wise map with four per-channel parameters: f(idx, p0, p1, p2, p3).
template <class F>
void map_channels(const Geometry& g, const double* p0, const double* p1, const double* p2,
                  const double* p3, F f) {
  const int64_t C = g.channels, I = g.inner, O = g.outer;
  const int nt_req = threads_for(O * C * I);
  if (I >= kRunMin) {
    const int64_t nb = (I + kBlock - 1) / kBlock;
    const int64_t items = O * C * nb;
    parallel(nt_req, [&](int t, int nt) {
      int64_t b, e;
      split(items, t, nt, &b, &e);
      for (int64_t it = b; it < e; ++it) {
        const int64_t oc = it / nb, c = oc % C;
        const int64_t i0 = (it % nb) * kBlock, i1 = std::min(I, i0 + kBlock);
        const int64_t base = oc * I;
        const double a = p0[c], bb = p1[c], cc = p2[c], d = p3[c];
#pragma omp simd
        for (int64_t i = i0; i < i1; ++i) f(base + i, a, bb, cc, d);
      }
    });
  } else {
    const int64_t L = C * I;
    const std::vector<double> r0 = expand_to_row(p0, C, I), r1 = expand_to_row(p1, C, I),
                              r2 = expand_to_row(p2, C, I), r3 = expand_to_row(p3, C, I);
    parallel(nt_req, [&](int t, int nt) {
      const double *q0 = r0.data(), *q1 = r1.data(), *q2 = r2.data(), *q3 = r3.data();
      int64_t b, e;
      split(O, t, nt, &b, &e);
      for (int64_t o = b; o < e; ++o) {
        const int64_t base = o * L;
#pragma omp simd
        for (int64_t j = 0; j < L; ++j) f(base + j, q0[j], q1[j], q2[j], q3[j]);
      }
    });
  }
}

}  // namespace syncbn::cpu
