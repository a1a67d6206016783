// The two traversals every CPU kernel uses, written once so the kernels are one-liners
// and their inner loops stay simple enough for the compiler to vectorize.
//
// Runs mode (inner >= kRunMin, e.g. NCHW): each (o, c) is a contiguous run of `inner`
// elements with scalar channel parameters; runs are cut in blocks so that even one
// large channel spreads over all threads.
// Rows mode (inner < kRunMin, e.g. channels-last): each o is a row of L = C*inner
// elements; channel parameters are expanded to length L and the loop runs along the row.
//
// Each thread's share runs through run_isa(): compiled twice (baseline and AVX2+FMA,
// chosen at run time) with everything inlined into it, so the extension still loads on
// any x86-64 while the hot loops use 256-bit vectors where the CPU has them.
#pragma once

#include <algorithm>
#include <cstddef>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "syncbn/math.h"
#include "syncbn/tensor.h"

namespace syncbn::cpu {

constexpr int64_t kRunMin = 16;
constexpr int64_t kBlock = 1 << 14;

// Runs are reduced 8 elements at a time into two 4-lane double accumulators: explicit
// vectors, because the compiler keeps an array of scalar lanes in memory when runs are
// short (measured 2.7x slower at NCHW 56x56); every lane stays a sequential sum, so the
// result does not depend on -ffast-math.
#if defined(__GNUC__) || defined(__clang__)
typedef double vec4 __attribute__((vector_size(32)));
#else
#error "syncbn's CPU kernels need GCC or Clang vector extensions"
#endif

template <class T>
inline vec4 load4(const T* p) {
  return vec4{load<double>(p), load<double>(p + 1), load<double>(p + 2), load<double>(p + 3)};
}

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
template <class F>
__attribute__((target("avx2,fma"), flatten)) void run_avx2(F& f) {
  f();
}
inline bool have_avx2() {
  static const bool v = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return v;
}
#endif

template <class F>
#if defined(__GNUC__) || defined(__clang__)
__attribute__((flatten))
#endif
void run_base(F& f) {
  f();
}

template <class F>
void run_isa(F&& f) {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  if (have_avx2()) return run_avx2(f);
#endif
  run_base(f);
}

// Runs mode: calls fn(off, c, n) for thread t's share of the blocks, each n elements of
// channel c starting at flat offset off.
template <class Fn>
inline void for_each_block(const Geometry& g, int t, int nt, Fn&& fn) {
  const int64_t C = g.channels, I = g.inner;
  const int64_t nb = (I + kBlock - 1) / kBlock;
  int64_t b, e;
  split(g.outer * C * nb, t, nt, &b, &e);
  for (int64_t it = b; it < e; ++it) {
    const int64_t oc = it / nb, i0 = (it % nb) * kBlock;
    fn(oc * I + i0, oc % C, std::min(I, i0 + kBlock) - i0);
  }
}

inline std::vector<double> expand_to_row(const double* p, int64_t C, int64_t inner) {
  std::vector<double> r(size_t(C * inner));
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < inner; ++i) r[size_t(c * inner + i)] = p[c];
  return r;
}

// Threads' partial sums sit this many doubles apart, a multiple of a cache line plus
// one, so that no two threads ever write the same line.
inline int64_t padded(int64_t n) {
  return (n + 7) / 8 * 8 + 8;
}

// v1 at element i (4 elements for a vec4): from the second input, or v0 again when
// there is none (x1 = nullptr).
template <class T1, class V>
inline V second(const T1* x1, int64_t i, V v0) {
  if constexpr (std::is_same_v<T1, std::nullptr_t>) {
    return v0;
  } else if constexpr (std::is_same_v<V, vec4>) {
    return load4(x1 + i);
  } else {
    return load<double>(x1 + i);
  }
}

// Per channel c: out_a[c] = sum of a-contributions, out_b[c] = sum of b-contributions,
// where f(v0, v1, p, a, b) adds those of one element (v0 from x0, v1 from x1, both as
// double; p = param[c]); f is generic, also called with vec4 for 4 elements at once.
// T1 = std::nullptr_t means no second input (v1 = v0).
template <class T, class T1, class F>
void reduce_channels(const Geometry& g, const T* x0, const T1* x1, const double* param,
                     double* out_a, double* out_b, F f) {
  const int64_t C = g.channels, I = g.inner, O = g.outer;
  std::fill(out_a, out_a + C, 0.0);
  std::fill(out_b, out_b + C, 0.0);
  const int nt_req = threads_for(O * C * I);
  const bool runs = I >= kRunMin;
  const int64_t L = runs ? C : C * I;  // partial sums per thread, for a and for b
  const int64_t stride = padded(L);
  std::vector<double> part(size_t(nt_req) * 2 * size_t(stride), 0.0);
  const std::vector<double> prow = runs ? std::vector<double>() : expand_to_row(param, C, I);
  parallel(nt_req, [&](int t, int nt) {
    double* pa = part.data() + size_t(t) * 2 * size_t(stride);
    double* pb = pa + stride;
    run_isa([&] {
      if (runs) {
        for_each_block(g, t, nt, [&](int64_t off, int64_t c, int64_t n) {
          const T* __restrict r0 = x0 + off;
          const double p = param[c];
          const vec4 pv = {p, p, p, p};
          vec4 a0 = {}, a1 = {}, q0 = {}, q1 = {};
          int64_t i = 0;
          for (; i + 8 <= n; i += 8) {
            const vec4 v0 = load4(r0 + i), v1 = load4(r0 + i + 4);
            f(v0, second(x1, off + i, v0), pv, a0, q0);
            f(v1, second(x1, off + i + 4, v1), pv, a1, q1);
          }
          const vec4 av = a0 + a1, qv = q0 + q1;
          double a = (av[0] + av[1]) + (av[2] + av[3]), q = (qv[0] + qv[1]) + (qv[2] + qv[3]);
          for (; i < n; ++i) {
            const double v = load<double>(r0 + i);
            f(v, second(x1, off + i, v), p, a, q);
          }
          pa[c] += a;
          pb[c] += q;
        });
      } else {
        const int64_t row = C * I;
        const double* __restrict pr = prow.data();
        int64_t b, e;
        split(O, t, nt, &b, &e);
        for (int64_t o = b; o < e; ++o) {
          const T* __restrict r0 = x0 + o * row;
          for (int64_t j = 0; j < row; ++j) {
            const double v = load<double>(r0 + j);
            f(v, second(x1, o * row + j, v), pr[j], pa[j], pb[j]);
          }
        }
      }
    });
  });
  for (int t = 0; t < nt_req; ++t) {
    const double* pa = part.data() + size_t(t) * 2 * size_t(stride);
    for (int64_t j = 0; j < L; ++j) {
      out_a[runs ? j : j / I] += pa[j];
      out_b[runs ? j : j / I] += pa[stride + j];
    }
  }
}

// Element-wise: y = f(v0, v1, p0, p1, p2, p3) with v0 from x0, v1 from x1 (or x0 when
// null) as double and four per-channel parameters.
template <class T, class F>
void map_channels(const Geometry& g, const T* x0, const T* x1, T* y, const double* p0,
                  const double* p1, const double* p2, const double* p3, F f) {
  const int64_t C = g.channels, I = g.inner, O = g.outer;
  if (!x1) x1 = x0;
  const int nt_req = threads_for(O * C * I);
  const bool runs = I >= kRunMin;
  std::vector<double> r0, r1, r2, r3;
  if (!runs) {
    r0 = expand_to_row(p0, C, I), r1 = expand_to_row(p1, C, I);
    r2 = expand_to_row(p2, C, I), r3 = expand_to_row(p3, C, I);
  }
  parallel(nt_req, [&](int t, int nt) {
    run_isa([&] {
      if (runs) {
        for_each_block(g, t, nt, [&](int64_t off, int64_t c, int64_t n) {
          const T* __restrict a0 = x0 + off;
          const T* __restrict a1 = x1 + off;
          T* __restrict out = y + off;
          const double q0 = p0[c], q1 = p1[c], q2 = p2[c], q3 = p3[c];
          for (int64_t i = 0; i < n; ++i)
            store<double>(out + i, f(load<double>(a0 + i), load<double>(a1 + i), q0, q1, q2, q3));
        });
      } else {
        const int64_t row = C * I;
        const double* __restrict q0 = r0.data(), * __restrict q1 = r1.data();
        const double* __restrict q2 = r2.data(), * __restrict q3 = r3.data();
        int64_t b, e;
        split(O, t, nt, &b, &e);
        for (int64_t o = b; o < e; ++o) {
          const T* __restrict a0 = x0 + o * row;
          const T* __restrict a1 = x1 + o * row;
          T* __restrict out = y + o * row;
          for (int64_t j = 0; j < row; ++j)
            store<double>(
                out + j, f(load<double>(a0 + j), load<double>(a1 + j), q0[j], q1[j], q2[j], q3[j]));
        }
      }
    });
  });
}

}  // namespace syncbn::cpu
