// Math shared by the CPU and CUDA kernels, so the two backends cannot drift: 16-bit
// float conversions, the packing of local moments for the all-reduce, and the
// finalization of global statistics.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SYNCBN_HD __host__ __device__ __forceinline__
#else
#define SYNCBN_HD inline
#endif

namespace syncbn {

// 16-bit storage types; arithmetic always happens in float or wider.
struct half_t {
  uint16_t bits;
};
struct bfloat16_t {
  uint16_t bits;
};

SYNCBN_HD float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
SYNCBN_HD uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Exact: a half's exponent/mantissa shifted into float position and scaled by 2^112
// lands normals and subnormals alike; inf/NaN get the float exponent forced.
SYNCBN_HD float half_to_float(half_t h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t em = h.bits & 0x7fffu;
  float f = bits_to_float(em << 13) * 5.192296858534828e+33f;  // 2^112
  uint32_t u = float_to_bits(f);
  if (em >= 0x7c00u) u = 0x7f800000u | (em << 13);
  return bits_to_float(u | sign);
}

// Round to nearest even, overflow to inf, NaN stays NaN.
SYNCBN_HD half_t float_to_half(float f) {
  uint32_t x = float_to_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  uint16_t out;
  if (x >= 0x7f800000u) {
    out = x > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (x >= 0x477ff000u) {  // >= 65520 rounds to inf
    out = 0x7c00u;
  } else if (x < 0x38800000u) {  // below 2^-14: subnormal half; 0.5f has ulp 2^-24
    const float v = bits_to_float(x) + 0.5f;
    out = uint16_t(float_to_bits(v) - 0x3f000000u);
  } else {
    const uint32_t odd = (x >> 13) & 1u;
    x += 0xc8000fffu + odd;  // rebias exponent by -112 and add the rounding bias
    out = uint16_t(x >> 13);
  }
  return half_t{uint16_t(out | sign)};
}

SYNCBN_HD float bfloat16_to_float(bfloat16_t b) {
  return bits_to_float(uint32_t(b.bits) << 16);
}

SYNCBN_HD bfloat16_t float_to_bfloat16(float f) {
  const uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return bfloat16_t{uint16_t((x >> 16) | 0x40u)};
  const uint32_t r = x + 0x7fffu + ((x >> 16) & 1u);
  return bfloat16_t{uint16_t(r >> 16)};
}

// Uniform load/store in the accumulation type `A` (double on CPU).
template <class A>
SYNCBN_HD A load(const float* p) {
  return A(*p);
}
template <class A>
SYNCBN_HD A load(const double* p) {
  return A(*p);
}
template <class A>
SYNCBN_HD A load(const half_t* p) {
  return A(half_to_float(*p));
}
template <class A>
SYNCBN_HD A load(const bfloat16_t* p) {
  return A(bfloat16_to_float(*p));
}

template <class A>
SYNCBN_HD void store(float* p, A v) {
  *p = float(v);
}
template <class A>
SYNCBN_HD void store(double* p, A v) {
  *p = double(v);
}
template <class A>
SYNCBN_HD void store(half_t* p, A v) {
  *p = float_to_half(float(v));
}
template <class A>
SYNCBN_HD void store(bfloat16_t* p, A v) {
  *p = float_to_bfloat16(float(v));
}

// ---- Statistics ------------------------------------------------------------------
//
// Why this method keeps fp32 inputs with mean ~1e4 x std accurate:
// 1. Locally each channel is summed as T1 = sum(x - s), T2 = sum((x - s)^2) in fp64 with
//    s = the channel's first local element, which is within a few std of the mean, so
//    T2 - T1^2/n does not cancel: local mean and M2 are accurate to ~1e-15.
// 2. Ranks exchange raw power sums P1 = n*mean, P2 = M2 + n*mean^2 (plain sums, so any
//    communicator's SUM works and the payload is 2C+1 doubles whatever the world size).
//    Rebuilding M2 = P2 - P1*mean cancels (mean/std)^2 = 1e8 of fp64's 1e16: ~1e-8
//    relative error, four orders inside the 1e-4 contract. A common shift such as the
//    running mean would do better but silently breaks if ranks' buffers ever diverge.
// The count travels as a double: exact to 2^53, never a 16-bit type.

// The per-channel shift from the channel's first element: a non-finite one would turn
// every x - shift into NaN (inf - inf), so it becomes 0 and a channel of +inf keeps a
// mean of +inf, as in torch. (v - v == 0 holds exactly for finite v.)
SYNCBN_HD double moment_shift(double first) {
  return first - first == 0 ? first : 0.0;
}

// Packs one channel's local moments into the all-reduce buffer slots.
SYNCBN_HD void pack_local_moments(double n, double shift, double t1, double t2, double* p1,
                                  double* p2) {
  if (n <= 0) {
    *p1 = 0;
    *p2 = 0;
    return;
  }
  const double dm = t1 / n;
  double m2 = t2 - t1 * dm;
  if (m2 < 0) m2 = 0;
  const double mean = shift + dm;
  *p1 = n * mean;
  *p2 = m2 + n * mean * mean;
}

struct GlobalMoments {
  double mean;
  double var_biased;  // M2 / N, never negative
  double m2;
};

SYNCBN_HD GlobalMoments finalize_moments(double p1, double p2, double n) {
  GlobalMoments g;
  g.mean = p1 / n;
  g.m2 = p2 - p1 * g.mean;
  if (!(g.m2 >= 0)) g.m2 = g.m2 < 0 ? 0.0 : g.m2;  // clamp rounding below zero, keep NaN
  g.var_biased = g.m2 / n;
  return g;
}

SYNCBN_HD double invstd_of(double var, double eps) {
  return 1.0 / std::sqrt(var + eps);
}

}  // namespace syncbn
