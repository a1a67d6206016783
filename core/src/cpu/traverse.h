// The two traversals every CPU kernel uses, written once so the kernels are one-liners
// and their inner loops stay simple enough for the compiler to vectorize.
//
// Runs mode (inner >= kRunMin, e.g. NCHW): each (o, c) is a contiguous run of `inner`
// elements with scalar channel parameters; runs are cut in blocks so that even one
// large channel spreads over all threads.
// Rows mode (inner < kRunMin, e.g. channels-last): each o is a row of L = C*inner
// elements (parameters expanded to length L when inner > 1, used as they are when
// inner == 1). Reductions cut the row in tiles of 16 elements; a tile runs down a chunk
// of rows with its sums and parameters in vector registers, so a row costs loads of x
// only (2x faster than summing into memory along the row where x is in cache); large
// two-input reductions over rows of 64-128 positions (the backward's x and dy in a
// channels_last training step) run along the rows instead, in address order (see
// reduce_rows). Maps run along the row.
//
// Each thread's share runs through run_isa(): compiled twice (baseline and AVX2+FMA,
// chosen at run time) with everything inlined into it, so the extension still loads on
// any x86-64 while the hot loops use 256-bit vectors where the CPU has them.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "syncbn/math.h"
#include "syncbn/tensor.h"

namespace syncbn::cpu {

constexpr int64_t kRunMin = 16;
constexpr int64_t kChunk = 1 << 14;  // rows mode: elements of the rows one tile pass reads
constexpr int64_t kBlock = 1 << 14;
// Rows mode, two inputs: a thread's share above kStreamBytes in rows of kStreamRowMin to
// kStreamRowMax positions is summed along the rows (reduce_rows), not in tiles.
constexpr int64_t kStreamBytes = 1 << 20;
constexpr int64_t kStreamRowMin = 64, kStreamRowMax = 128;
// 0: that rule; 1: tiles only; 2: along the rows at any row length (above kStreamBytes).
// benchmarks/bench_reduce_walk.py builds each to compare them; the package builds 0.
#ifndef SYNCBN_REDUCE_WALK
#define SYNCBN_REDUCE_WALK 0
#endif

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

inline vec4 loadu4(const double* p) {
  vec4 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
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
  if (b >= e) return;
  // Two divisions per thread, none per block: short runs are many.
  int64_t oc = b / nb, blk = b % nb, c = oc % C;
  for (int64_t it = b; it < e; ++it) {
    const int64_t i0 = blk * kBlock;
    fn(oc * I + i0, c, std::min(I, i0 + kBlock) - i0);
    if (++blk == nb) {
      blk = 0, ++oc;
      if (++c == C) c = 0;
    }
  }
}

// Scratch of the calling thread, kept between calls: slot k holds n doubles (contents
// unspecified). Fresh vectors of a few 10 KB per call cost more than small kernels: glibc
// returns the freed top of the heap to the system and faults the pages in again.
// Slots 0-4 are the traversals' own, 5 the kernels' (float32 parameters); each parameter
// type has its own set.
template <class P = double>
inline P* scratch(int slot, size_t n) {
  static_assert(sizeof(P) <= sizeof(double) && alignof(P) <= alignof(double));
  thread_local std::vector<double> s[6];
  const size_t words = (n * sizeof(P) + sizeof(double) - 1) / sizeof(double);
  if (s[slot].size() < words) s[slot].resize(words);
  return reinterpret_cast<P*>(s[slot].data());
}

// p[c] repeated `inner` times per channel, in scratch slot `slot`.
template <class P>
inline const P* expand_to_row(int slot, const P* p, int64_t C, int64_t inner) {
  P* r = scratch<P>(slot, size_t(C * inner));
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < inner; ++i) r[c * inner + i] = p[c];
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

// Rows mode reductions: rows [b, e) cut in chunks of about kChunk elements (16 rows at
// least); in each chunk the row positions j in [jb, je) go in tiles: wide(j, o0, o1) for
// 16 positions, narrow(...) for 4, one(...) for the rest, each running down the chunk's
// rows.
template <class A, class B, class D>
inline void for_each_chunk(int64_t L, int64_t b, int64_t e, int64_t jb, int64_t je, A&& wide,
                           B&& narrow, D&& one) {
  const int64_t rows = std::max<int64_t>(16, kChunk / L);
  for (int64_t o0 = b; o0 < e; o0 += rows) {
    const int64_t o1 = std::min(e, o0 + rows);
    int64_t j = jb;
    for (; j + 16 <= je; j += 16) wide(j, o0, o1);
    for (; j + 4 <= je; j += 4) narrow(j, o0, o1);
    for (; j < je; ++j) one(j, o0, o1);
  }
}

// Rows mode tiles run down the rows, one line of each row per tile: in a training step x
// and dy arrive from memory, not cache, and the hardware prefetchers do not follow that
// walk far enough ahead. So each row's line of the tile after next is prefetched (in situ
// in ResNet-18, bench_torch --resnet18: the core's channels_last forward and backward
// about 10 % faster; in a loop, where the data is in cache, no change beyond noise).
constexpr int64_t kPrefetchTiles = 2;
template <class T>
inline void prefetch_tile(const T* p) {
  // An address, not a pointer: near a row's end it lies past the data (a prefetch of it
  // is harmless, pointer arithmetic there would not be).
  const uintptr_t a = reinterpret_cast<uintptr_t>(p) + kPrefetchTiles * 16 * sizeof(T);
  for (size_t k = 0; k < 16 * sizeof(T); k += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(a + k));
}

// Adds the sums of row positions [j, j + 4W) over rows [o0, o1) to pa, pb (PF: prefetching
// ahead, for whole tiles).
template <int W, bool PF, class T, class T1, class F>
inline void reduce_tile(const T* x0, const T1* x1, const double* pr, int64_t L, int64_t j,
                        int64_t o0, int64_t o1, double* pa, double* pb, F& f) {
  vec4 p[W], a[W], q[W];
  for (int w = 0; w < W; ++w) p[w] = loadu4(pr + j + 4 * w), a[w] = vec4{}, q[w] = vec4{};
  for (int64_t o = o0; o < o1; ++o) {
    const int64_t off = o * L + j;
    if constexpr (PF) {
      prefetch_tile(x0 + off);
      if constexpr (!std::is_same_v<T1, std::nullptr_t>) prefetch_tile(x1 + off);
    }
    for (int w = 0; w < W; ++w) {
      const vec4 v = load4(x0 + off + 4 * w);
      f(v, second(x1, off + 4 * w, v), p[w], a[w], q[w]);
    }
  }
  for (int w = 0; w < W; ++w)
    for (int l = 0; l < 4; ++l) pa[j + 4 * w + l] += a[w][l], pb[j + 4 * w + l] += q[w][l];
}

// Adds the sums of rows [b, e) to pa, pb along each row, in address order, with the sums
// in memory (L1) rather than registers. Where x and dy come from memory (the backward's x
// was saved by the forward long before) and a row is 4-8 tiles long, the tiles' walk down
// the rows, one cache line of each row per pass, is what the hardware prefetchers follow
// worst, even with software prefetching: in situ in training steps (bench_torch
// --resnet18) the backward node at channels_last (8, 64, 48, 48) went from 1.09-1.18 of
// torch's to 0.90-1.14 (median 0.96). benchmarks/bench_reduce_walk.py, time / the tiles' from
// memory and in cache: rows of 64-128 positions 0.57-0.72 and 0.59-1.36 (in cache the loads and
// stores of the sums cost more than the walk saves); 16-32 positions, where a tile is most of a
// row, 1.09-1.23 and 1.65-1.89; 256-2304 positions 0.59-0.84 and 0.64-1.82. Only the
// first run along the rows.
template <class T, class T1, class F>
inline void reduce_rows(const T* __restrict x0, const T1* __restrict x1,
                        const double* __restrict pr, int64_t L, int64_t b, int64_t e,
                        double* __restrict pa, double* __restrict pb, F& f) {
  for (int64_t o = b; o < e; ++o) {
    const int64_t off = o * L;
    int64_t j = 0;
    for (; j + 4 <= L; j += 4) {
      vec4 a = loadu4(pa + j), q = loadu4(pb + j);
      const vec4 v = load4(x0 + off + j);
      f(v, second(x1, off + j, v), loadu4(pr + j), a, q);
      __builtin_memcpy(pa + j, &a, sizeof a);
      __builtin_memcpy(pb + j, &q, sizeof q);
    }
    for (; j < L; ++j) {
      const double v = load<double>(x0 + off + j);
      f(v, second(x1, off + j, v), pr[j], pa[j], pb[j]);
    }
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
  const bool runs = I >= kRunMin;
  // Channels-last inputs: two threads from half a grain on (the same rule as in
  // map_channels; 1.2x on the backward reduction at channels_last (8, 512, 3, 3)).
  const int nt_req = threads_for(I == 1 ? 2 * O * C * I : O * C * I);
  const int64_t L = runs ? C : C * I;  // partial sums per thread, for a and for b
  // Rows mode splits the row positions among the threads where rows are few and long
  // (NCHW 3x3 has as few rows as the batch): each sums its own positions over every row,
  // into one shared array, no partial sums to add up. Many rows split by rows: each
  // thread then streams its own memory (by positions both read every cache line).
  const bool by_positions = !runs && O < 16 * nt_req && L >= 32 * nt_req;
  const int parts = by_positions ? 1 : nt_req;
  const int64_t stride = padded(L);
  double* part = scratch(0, size_t(parts) * 2 * size_t(stride));
  std::fill(part, part + size_t(parts) * 2 * size_t(stride), 0.0);
  const double* prow = runs || I == 1 ? param : expand_to_row(1, param, C, I);
  parallel(nt_req, [&](int t, int nt) {
    double* pa = part + (by_positions ? 0 : size_t(t) * 2 * size_t(stride));
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
        int64_t b = 0, e = O, jb = 0, je = L;
        if (by_positions) {  // whole tiles of 16 each; the last thread also takes the rest
          split(L / 16, t, nt, &jb, &je);
          jb *= 16, je = t == nt - 1 ? L : je * 16;
        } else {
          split(O, t, nt, &b, &e);
        }
        const double* pr = prow;
        constexpr bool two = !std::is_same_v<T1, std::nullptr_t>;
        const bool rows_walk =
            two && !by_positions && (e - b) * L * int64_t(2 * sizeof(T)) > kStreamBytes &&
            (SYNCBN_REDUCE_WALK == 2 ||
             (SYNCBN_REDUCE_WALK == 0 && L >= kStreamRowMin && L <= kStreamRowMax));
        if (rows_walk) return reduce_rows(x0, x1, pr, L, b, e, pa, pb, f);
        for_each_chunk(
            L, b, e, jb, je,
            [&](int64_t j, int64_t o0, int64_t o1) {
              reduce_tile<4, true>(x0, x1, pr, L, j, o0, o1, pa, pb, f);
            },
            [&](int64_t j, int64_t o0, int64_t o1) {
              reduce_tile<1, false>(x0, x1, pr, L, j, o0, o1, pa, pb, f);
            },
            [&](int64_t j, int64_t o0, int64_t o1) {
              for (int64_t o = o0; o < o1; ++o) {
                const double v = load<double>(x0 + o * L + j);
                f(v, second(x1, o * L + j, v), pr[j], pa[j], pb[j]);
              }
            });
      }
    });
  });
  // out = 0 + the threads' partial sums in thread order. Position j's belong to channel j
  // (runs, or rows with inner 1), else to channel j / inner: no division per position.
  const int64_t per = runs ? 1 : I;
  for (int t = 0; t < parts; ++t) {
    const double* pa = part + size_t(t) * 2 * size_t(stride);
    const double* pb = pa + stride;
    if (per == 1 && t == 0) {
      for (int64_t c = 0; c < C; ++c) out_a[c] = 0.0 + pa[c], out_b[c] = 0.0 + pb[c];
    } else if (per == 1) {
      for (int64_t c = 0; c < C; ++c) out_a[c] += pa[c], out_b[c] += pb[c];
    } else {
      for (int64_t c = 0; c < C; ++c) {
        double a = t == 0 ? 0.0 : out_a[c], b = t == 0 ? 0.0 : out_b[c];
        for (int64_t i = c * per; i < (c + 1) * per; ++i) a += pa[i], b += pb[i];
        out_a[c] = a, out_b[c] = b;
      }
    }
  }
}

// Element-wise: y = f(v0, v1, p0, p1, p2, p3) with v0 from x0, v1 from x1 (or x0 when
// null) and four per-channel parameters, all in the parameters' type P (double; float
// where a float32 kernel has made its math safe in float: 8 lanes instead of 4).
template <class T, class P, class F>
void map_channels(const Geometry& g, const T* x0, const T* x1, T* y, const P* p0, const P* p1,
                  const P* p2, const P* p3, F f) {
  const int64_t C = g.channels, I = g.inner, O = g.outer;
  if (!x1) x1 = x0;
  const bool runs = I >= kRunMin;
  // Two threads from half a grain on where no expanded parameter rows have to cross to
  // the other thread's cache (1.6x on ResNet-18's channels_last (8, 512, 3, 3) maps; with
  // expanded rows, NCHW 3x3, it was 2x slower).
  const int nt_req = threads_for(runs || I == 1 ? 2 * O * C * I : O * C * I);
  const P* q[4] = {p0, p1, p2, p3};
  if (!runs && I > 1) {
    q[0] = expand_to_row(1, p0, C, I), q[1] = expand_to_row(2, p1, C, I);
    q[2] = expand_to_row(3, p2, C, I), q[3] = expand_to_row(4, p3, C, I);
  }
  parallel(nt_req, [&](int t, int nt) {
    run_isa([&] {
      if (runs) {
        for_each_block(g, t, nt, [&](int64_t off, int64_t c, int64_t n) {
          const T* __restrict a0 = x0 + off;
          const T* __restrict a1 = x1 + off;
          T* __restrict out = y + off;
          const P q0 = p0[c], q1 = p1[c], q2 = p2[c], q3 = p3[c];
          for (int64_t i = 0; i < n; ++i)
            store<P>(out + i, f(load<P>(a0 + i), load<P>(a1 + i), q0, q1, q2, q3));
        });
      } else {
        int64_t b, e;
        split(O, t, nt, &b, &e);
        const int64_t row = C * I;
        const P* __restrict q0 = q[0], * __restrict q1 = q[1];
        const P* __restrict q2 = q[2], * __restrict q3 = q[3];
        for (int64_t o = b; o < e; ++o) {
          const T* __restrict a0 = x0 + o * row;
          const T* __restrict a1 = x1 + o * row;
          T* __restrict out = y + o * row;
          for (int64_t j = 0; j < row; ++j)
            store<P>(out + j, f(load<P>(a0 + j), load<P>(a1 + j), q0[j], q1[j], q2[j], q3[j]));
        }
      }
    });
  });
}

}  // namespace syncbn::cpu
