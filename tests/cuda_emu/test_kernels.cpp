// Runs the CUDA launchers (built for the host by the emulation shim) against direct
// sequential references. Integer-valued data makes every sum exact, so the reductions are
// compared bit for bit whatever the summation order; element-wise outputs use the same
// formula as the kernels and are compared bit for bit too. The device check of reduced
// buffers (collective.h) is run on every fault it must catch, and write_fingerprint
// against the host's.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#ifndef EMU_GUARD
#define EMU_GUARD 64
#endif
#include "collective.h"
#include "cuda/kernels.cuh"
#include "dispatch.h"
#include "syncbn/math.h"

using namespace syncbn;

static int g_fail = 0, g_checks = 0;
#define EXPECT(cond, ...)                                \
  do {                                                   \
    ++g_checks;                                          \
    if (!(cond)) {                                       \
      if (++g_fail < 30) {                               \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
        std::printf(__VA_ARGS__);                        \
        std::printf("\n");                               \
      }                                                  \
    }                                                    \
  } while (0)

static bool same(double a, double b) {
  return (std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, 8) == 0;
}

std::mt19937_64 rng(1234);
double uni(double lo, double hi) {
  return std::uniform_real_distribution<double>(lo, hi)(rng);
}
int64_t irand(int64_t lo, int64_t hi) {
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

// A buffer with guard bytes on both sides and an element offset (to break alignment).
template <class T>
struct Buf {
  static constexpr int kGuard = EMU_GUARD;
  std::vector<T> store;
  int64_t n, off;
  Buf(int64_t n_, int64_t off_ = 0) : store(size_t(n_ + 2 * kGuard + off_)), n(n_), off(off_) {
    std::memset(store.data(), 0xA5, store.size() * sizeof(T));
  }
  T* data() { return store.data() + kGuard + off; }
  bool guards_ok() const {
    const unsigned char* p = reinterpret_cast<const unsigned char*>(store.data());
    const size_t head = size_t(kGuard + off) * sizeof(T),
                 tail_start = size_t(kGuard + off + n) * sizeof(T);
    for (size_t i = 0; i < head; ++i)
      if (p[i] != 0xA5) return false;
    for (size_t i = tail_start; i < store.size() * sizeof(T); ++i)
      if (p[i] != 0xA5) return false;
    return true;
  }
};

template <class T>
DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::Float32;
  if constexpr (std::is_same_v<T, double>) return DType::Float64;
  if constexpr (std::is_same_v<T, half_t>) return DType::Float16;
  return DType::BFloat16;
}
template <class T>
const char* tname() {
  return dtype_name(dtype_of<T>());
}

template <class T>
void fill(T* p, int64_t n, bool integers) {
  for (int64_t i = 0; i < n; ++i)
    store<double>(p + i, integers ? double(irand(-8, 8)) : uni(-3, 5));
}

struct Geo {
  int64_t o, c, i;
};

// ---- reduced fingerprint slots (collective.h) ---------------------------------------------

// One rank's fingerprint values v_0..v_{K-1}: v_0 the operation, the rest bytes of `h`.
static std::vector<double> fp_values(int op, uint64_t h) {
  std::vector<double> v(fp::kChunks);
  v[0] = op;
  for (int j = 1; j < fp::kChunks; ++j) v[size_t(j)] = double((h >> (8 * (j - 1))) & 0xffu);
  return v;
}
// The reduced slots of ranks with the given fingerprints (sums and sums of squares).
static void reduce_slots(double* s, const std::vector<std::vector<double>>& ranks,
                         double nonfinite = 0) {
  for (int j = 0; j < kFingerprintSlots; ++j) s[j] = 0;
  s[fp::kRanks] = double(ranks.size());
  s[fp::kNonFinite] = nonfinite;
  for (const auto& v : ranks)
    for (int j = 0; j < fp::kChunks; ++j) {
      s[fp::kSum + j] += v[size_t(j)];
      s[fp::kSumSq + j] += v[size_t(j)] * v[size_t(j)];
    }
}
// W ranks that agree on `op`.
static void agreeing_slots(double* s, int W, int op, double nonfinite = 0) {
  const std::vector<double> v = fp_values(op, 0x5a17c3e9b1d2ull);
  reduce_slots(s, std::vector<std::vector<double>>(size_t(W), v), nonfinite);
}
static fp::DeviceCheck device_check(int op, double ranks, double local_count, bool verify = true) {
  fp::DeviceCheck k;
  k.op = op, k.ranks = ranks, k.local_count = local_count, k.verify = verify;
  return k;
}

// ---- stats / backward_reduce: exact with integer data ---------------------------------

// nonfinite_first: each channel's first element is +inf, -inf or NaN, whose shift is 0
// (moment_shift): a channel of +inf keeps a mean of +inf instead of inf - inf = NaN.
template <class T>
void test_stats(Geo G, int64_t off, bool integers, bool nonfinite_first = false) {
  const Geometry g{G.o, G.c, G.i};
  const int64_t numel = G.o * G.c * G.i, C = G.c, n = C > 0 ? G.o * G.i : 0;
  Buf<T> x(numel, off);
  fill(x.data(), numel, integers);
  for (int64_t c = 0; nonfinite_first && n > 0 && c < C; ++c)
    store<double>(x.data() + c * G.i, c % 3 == 0 ? INFINITY : c % 3 == 1 ? -INFINITY : NAN);
  Buf<double> buf(2 * C + 1);
  cuda::batch_norm_stats(x.data(), dtype_of<T>(), g, buf.data(), nullptr);
  for (int64_t c = 0; c < C; ++c) {
    double shift = 0, t1 = 0, t2 = 0;
    if (n > 0) {
      shift = moment_shift(load<double>(x.data() + c * G.i));
      for (int64_t o = 0; o < G.o; ++o)
        for (int64_t i = 0; i < G.i; ++i) {
          const double d = load<double>(x.data() + (o * C + c) * G.i + i) - shift;
          t1 += d;
          t2 += d * d;
        }
    }
    double p1, p2;
    pack_local_moments(double(n), shift, t1, t2, &p1, &p2);
    const double g1 = buf.data()[c], g2 = buf.data()[C + c];
    if (integers) {
      EXPECT(same(g1, p1) && same(g2, p2),
             "stats<%s> (%ld,%ld,%ld)+%ld c=%ld: got %.17g %.17g want %.17g %.17g", tname<T>(), G.o,
             G.c, G.i, off, c, g1, g2, p1, p2);
    } else {
      EXPECT(std::fabs(g1 - p1) <= 1e-12 * (1 + std::fabs(p1) + n) &&
                 std::fabs(g2 - p2) <= 1e-12 * (1 + std::fabs(p2)),
             "stats<%s> (%ld,%ld,%ld)+%ld c=%ld: got %.17g %.17g want %.17g %.17g", tname<T>(), G.o,
             G.c, G.i, off, c, g1, g2, p1, p2);
    }
  }
  EXPECT(same(buf.data()[2 * C], double(n)), "stats n: got %g want %ld", buf.data()[2 * C], n);
  EXPECT(buf.guards_ok() && x.guards_ok(), "stats guards (%ld,%ld,%ld)", G.o, G.c, G.i);
}

template <class T>
void test_backward_reduce(Geo G, int64_t off, bool with_grads) {
  const Geometry g{G.o, G.c, G.i};
  const int64_t numel = G.o * G.c * G.i, C = G.c;
  Buf<T> dy(numel, off), x(numel, off);
  fill(dy.data(), numel, true);
  fill(x.data(), numel, true);
  std::vector<double> mean(C), invstd(C);
  for (int64_t c = 0; c < C; ++c) mean[c] = double(irand(-4, 4)) * 0.5, invstd[c] = uni(0.1, 2);
  Buf<double> sums(2 * C), gw(C), gb(C);
  cuda::batch_norm_backward_reduce(dy.data(), x.data(), dtype_of<T>(), g, mean.data(),
                                   invstd.data(), sums.data(), with_grads ? gw.data() : nullptr,
                                   with_grads ? gb.data() : nullptr, nullptr);
  for (int64_t c = 0; c < C; ++c) {
    double a = 0, q = 0;
    for (int64_t o = 0; o < G.o; ++o)
      for (int64_t i = 0; i < G.i; ++i) {
        const int64_t e = (o * C + c) * G.i + i;
        const double d = load<double>(dy.data() + e), v = load<double>(x.data() + e);
        a += d;
        q += d * (v - mean[c]);
      }
    EXPECT(same(sums.data()[c], a) && same(sums.data()[C + c], q),
           "backward_reduce<%s> (%ld,%ld,%ld)+%ld c=%ld: got %.17g %.17g want %.17g %.17g",
           tname<T>(), G.o, G.c, G.i, off, c, sums.data()[c], sums.data()[C + c], a, q);
    if (with_grads) {
      EXPECT(same(gw.data()[c], q * invstd[c]) && same(gb.data()[c], a), "grads c=%ld", c);
    }
  }
  EXPECT(sums.guards_ok() && gw.guards_ok() && gb.guards_ok(), "backward_reduce guards");
}

// ---- element-wise: bitwise against the same formula ------------------------------------

template <class T>
void test_elemt(Geo G, int64_t off, bool affine, bool in_place) {
  const Geometry g{G.o, G.c, G.i};
  const int64_t numel = G.o * G.c * G.i, C = G.c;
  Buf<T> x(numel, off), y(numel, off);
  fill(x.data(), numel, false);
  std::vector<T> x0(x.data(), x.data() + numel);
  std::vector<double> mean(C), invstd(C), w(C), b(C);
  for (int64_t c = 0; c < C; ++c)
    mean[c] = uni(-1, 1), invstd[c] = uni(0.1, 2), w[c] = uni(-2, 2), b[c] = uni(-1, 1);
  T* out = in_place ? x.data() : y.data();
  cuda::batch_norm_elemt(x.data(), out, dtype_of<T>(), g, mean.data(), invstd.data(),
                         affine ? w.data() : nullptr, affine ? b.data() : nullptr, nullptr);
  int bad = 0;
  for (int64_t e = 0; e < numel; ++e) {
    const int64_t c = (e / G.i) % C;
    const double s = invstd[c] * (affine ? w[c] : 1.0), bb = affine ? b[c] : 0.0;
    T want;
    store<double>(&want, (load<double>(&x0[e]) - mean[c]) * s + bb);
    if (std::memcmp(&want, out + e, sizeof(T)) != 0) ++bad;
  }
  EXPECT(bad == 0, "elemt<%s> (%ld,%ld,%ld)+%ld affine=%d inplace=%d: %d wrong", tname<T>(), G.o,
         G.c, G.i, off, affine, in_place, bad);
  EXPECT(x.guards_ok() && y.guards_ok(), "elemt guards");
}

template <class T>
void test_backward_elemt(Geo G, int64_t off, bool train, bool affine) {
  const Geometry g{G.o, G.c, G.i};
  const int64_t numel = G.o * G.c * G.i, C = G.c;
  Buf<T> dy(numel, off), x(numel, off), dx(numel, off);
  fill(dy.data(), numel, false);
  fill(x.data(), numel, false);
  if (!train)  // eval does not read x: a NaN or inf there stays out of every dx
    for (int64_t e = 0; e < numel; ++e) store<double>(x.data() + e, e % 2 ? NAN : INFINITY);
  std::vector<double> mean(C), invstd(C), w(C), sums(size_t(stats_buffer_size(C)));
  for (int64_t c = 0; c < C; ++c)
    mean[c] = uni(-1, 1), invstd[c] = uni(0.1, 2), w[c] = uni(-2, 2), sums[c] = uni(-50, 50),
    sums[C + c] = uni(-50, 50);
  double count = double(G.o * G.i) * 3;
  sums[2 * C] = count;  // the reduced backward buffer of 3 agreeing ranks
  agreeing_slots(&sums[2 * C + 1], 3, 2);
  cuda::batch_norm_backward_elemt(dy.data(), x.data(), dx.data(), dtype_of<T>(), g, mean.data(),
                                  invstd.data(), affine ? w.data() : nullptr,
                                  train ? sums.data() : nullptr, train ? &count : nullptr,
                                  device_check(2, off == 0 ? 3 : 0, double(G.o * G.i)), nullptr);
  int bad = 0;
  for (int64_t e = 0; e < numel; ++e) {
    const int64_t c = (e / G.i) % C;
    double mdy = 0, k = 0;
    if (train) {
      mdy = sums[c] / count;
      k = invstd[c] * invstd[c] * (sums[C + c] / count);
    }
    const double gain = invstd[c] * (affine ? w[c] : 1.0);
    const double d = load<double>(dy.data() + e), v = load<double>(x.data() + e);
    T want;
    store<double>(&want, train ? (d - mdy - (v - mean[c]) * k) * gain : d * gain);
    if (std::memcmp(&want, dx.data() + e, sizeof(T)) != 0 || !std::isfinite(load<double>(&want)))
      ++bad;
  }
  EXPECT(bad == 0, "backward_elemt<%s> (%ld,%ld,%ld)+%ld train=%d affine=%d: %d wrong", tname<T>(),
         G.o, G.c, G.i, off, train, affine, bad);
  EXPECT(dx.guards_ok(), "backward_elemt guards");
}

// ---- gather ------------------------------------------------------------------------------

template <class R>
void test_gather(int64_t C, double N, bool unbiased, bool with_running, bool with_var) {
  std::vector<double> buf(size_t(stats_buffer_size(C)));
  for (int64_t c = 0; c < C; ++c) {
    const double m = uni(-100, 100), v = uni(0, 4);
    buf[c] = N * m;
    buf[C + c] = N * v + N * m * m;
  }
  buf[2 * C] = N;
  const int W = int(irand(1, 5));
  agreeing_slots(&buf[2 * C + 1], W, 1);
  const std::vector<double> buf0 = buf;
  Buf<double> count(1);
  count.data()[0] = -7;
  const int64_t stride = 3;
  std::vector<R> rm(C * stride), rv(C * stride);
  for (int64_t i = 0; i < C * stride; ++i)
    store<double>(&rm[i], uni(-1, 1)), store<double>(&rv[i], uni(0.5, 2));
  const std::vector<R> rm0 = rm, rv0 = rv;
  Buf<double> mean(C), invstd(C), var(C);
  for (int64_t c = 0; c < C; ++c) mean.data()[c] = invstd.data()[c] = var.data()[c] = -7;
  cuda::RunningStats rs;
  if (with_running) rs = {rm.data(), rv.data(), dtype_of<R>(), dtype_of<R>(), stride, stride};
  const double momentum = 0.1, eps = 1e-5;
  cuda::batch_norm_gather_stats(buf.data(), C, momentum, eps, unbiased, rs, mean.data(),
                                invstd.data(), with_var ? var.data() : nullptr,
                                device_check(1, C % 2 ? W : 0, -1), C > 1 ? count.data() : nullptr,
                                nullptr);
  EXPECT(buf == buf0, "gather wrote its input buffer");
  if (C > 1) EXPECT(same(count.data()[0], N), "gather count_out %g, want %g", count.data()[0], N);
  EXPECT(count.guards_ok(), "gather count guards");
  for (int64_t c = 0; c < C; ++c) {
    if (N == 0) {
      EXPECT(mean.data()[c] == -7 && invstd.data()[c] == -7 && var.data()[c] == -7,
             "gather N=0 wrote outputs");
      EXPECT(std::memcmp(&rm[c * stride], &rm0[c * stride], sizeof(R)) == 0,
             "gather N=0 wrote running mean");
      continue;
    }
    const GlobalMoments gm = finalize_moments(buf[c], buf[C + c], N);
    EXPECT(same(mean.data()[c], gm.mean) && same(invstd.data()[c], invstd_of(gm.var_biased, eps)),
           "gather c=%ld", c);
    EXPECT(with_var ? same(var.data()[c], gm.var_biased) : var.data()[c] == -7, "gather var c=%ld",
           c);
    if (with_running) {
      R want = rm0[c * stride];  // N < 2: the host path's error; both stats untouched
      if (N >= 2)
        store<double>(&want, (1 - momentum) * load<double>(&rm0[c * stride]) + momentum * gm.mean);
      EXPECT(std::memcmp(&want, &rm[c * stride], sizeof(R)) == 0, "gather running mean c=%ld", c);
      if (N >= 2)
        store<double>(&want, (1 - momentum) * load<double>(&rv0[c * stride]) +
                                 momentum * (gm.m2 / (unbiased ? N - 1 : N)));
      else
        want = rv0[c * stride];
      EXPECT(std::memcmp(&want, &rv[c * stride], sizeof(R)) == 0, "gather running var c=%ld N=%g",
             c, N);
      for (int64_t k = 1; k < stride; ++k)
        EXPECT(std::memcmp(&rm[c * stride + k], &rm0[c * stride + k], sizeof(R)) == 0 &&
                   std::memcmp(&rv[c * stride + k], &rv0[c * stride + k], sizeof(R)) == 0,
               "gather wrote between strided elements");
    }
  }
  EXPECT(mean.guards_ok() && invstd.guards_ok() && var.guards_ok(), "gather guards");
}

// ---- the device check of a reduced buffer ------------------------------------------------

// Faults a reduced buffer can carry; each is what some disagreement or broken communicator
// gives. kFaultsVerified: caught only while the fingerprint is verified.
enum class Fault {
  None,
  Fingerprint,      // one rank of W reduced another layer / call (another hash)
  ZeroTwoOne,       // fingerprints (0, 2, 1): the sum is 3x the third's, the squares differ
  OtherOp,          // all ranks agree, on the other operation
  Ranks,            // W + 1 agreeing contributions where the communicator has W ranks
  RanksFraction,    // 2.5 contributions
  CountFraction,    // N + 0.5
  CountNegative,    // -N - 1
  CountBelowLocal,  // N below this rank's count
  CountNaN,
  CountHuge,          // 1e300: no int64_t conversion before the range check
  FlagAboveRanks,     // more non-finite ranks than ranks
  FlagFraction,       // 0.5 non-finite ranks
  ChannelNaN,         // one channel's sums NaN/inf although no rank's payload was: that channel
  ChannelInfFlagged,  // inf in one channel, a rank said its payload was not finite: fine
  CountDiffers,       // backward: the sums' count is not the forward's (*count)
};
const Fault kFaults[] = {Fault::None,          Fault::Fingerprint,   Fault::ZeroTwoOne,
                         Fault::OtherOp,       Fault::Ranks,         Fault::RanksFraction,
                         Fault::CountFraction, Fault::CountNegative, Fault::CountBelowLocal,
                         Fault::CountNaN,      Fault::CountHuge,     Fault::FlagAboveRanks,
                         Fault::FlagFraction,  Fault::ChannelNaN,    Fault::ChannelInfFlagged,
                         Fault::CountDiffers};
static bool fingerprint_fault(Fault f) {
  return f == Fault::Fingerprint || f == Fault::ZeroTwoOne || f == Fault::OtherOp;
}
static bool whole_fault(Fault f, bool verify) {  // the whole buffer fails the check
  return f != Fault::None && f != Fault::ChannelNaN && f != Fault::ChannelInfFlagged &&
         (verify || !fingerprint_fault(f));
}

// A reduced buffer [payload 2C | N | slots] of W = 3 ranks for `op` with `fault`; sets
// *local (this rank's count for the check) and *bad_c (the faulty channel, or -1).
static std::vector<double> faulty_buffer(int64_t C, double N, int op, Fault fault, double* local,
                                         int64_t* bad_c) {
  const int W = 3;
  std::vector<double> b(size_t(stats_buffer_size(C)));
  for (int64_t c = 0; c < 2 * C; ++c) b[size_t(c)] = double(irand(-50, 50)) + (c >= C ? 60 : 0);
  b[size_t(2 * C)] = N;
  *local = N > 0 ? 1 : 0;
  *bad_c = -1;
  double* s = &b[size_t(2 * C + 1)];
  const std::vector<double> v = fp_values(op, 0x1234567890abull),
                            u = fp_values(op, 0x1234567891abull);
  std::vector<std::vector<double>> ranks(W, v);
  double nonfinite = 0;
  switch (fault) {
    case Fault::Fingerprint: ranks[1] = u; break;
    case Fault::ZeroTwoOne: ranks[0][3] = 0, ranks[1][3] = 2, ranks[2][3] = 1; break;
    case Fault::OtherOp: ranks.assign(W, fp_values(3 - op, 0x1234567890abull)); break;
    case Fault::Ranks: ranks.push_back(v); break;
    case Fault::FlagAboveRanks: nonfinite = W + 1; break;
    case Fault::FlagFraction: nonfinite = 0.5; break;
    case Fault::ChannelInfFlagged: nonfinite = 1; break;
    default: break;
  }
  reduce_slots(s, ranks, nonfinite);
  switch (fault) {
    case Fault::RanksFraction: s[fp::kRanks] = 2.5; break;
    case Fault::CountFraction: b[size_t(2 * C)] = N + 0.5; break;
    case Fault::CountNegative: b[size_t(2 * C)] = -N - 1; break;
    case Fault::CountBelowLocal: *local = N + 1; break;
    case Fault::CountNaN: b[size_t(2 * C)] = NAN; break;
    case Fault::CountHuge: b[size_t(2 * C)] = 1e300; break;
    case Fault::ChannelNaN:
    case Fault::ChannelInfFlagged:
      if (C > 0) {
        *bad_c = irand(0, C - 1);
        b[size_t(*bad_c)] = fault == Fault::ChannelNaN ? NAN : INFINITY;
        if (fault == Fault::ChannelNaN) b[size_t(C + *bad_c)] = INFINITY;
      }
      break;
    default: break;
  }
  return b;
}

// gather on a faulty reduced buffer: poisoned (NaN mean/invstd/var and count_out, running
// stats untouched) exactly when the check must fail, one channel alone for ChannelNaN.
static void test_gather_faults(int64_t C, double N, Fault fault, bool verify) {
  double local;
  int64_t bad_c;
  const std::vector<double> buf = faulty_buffer(C, N, 1, fault, &local, &bad_c);
  std::vector<float> rm(static_cast<size_t>(C)), rv(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c)
    rm[size_t(c)] = float(uni(-1, 1)), rv[size_t(c)] = float(uni(0.5, 2));
  const std::vector<float> rm0 = rm, rv0 = rv;
  Buf<double> mean(C), invstd(C), var(C), count(1);
  for (int64_t c = 0; c < C; ++c) mean.data()[c] = invstd.data()[c] = var.data()[c] = -7;
  count.data()[0] = -7;
  cuda::RunningStats rs{rm.data(), rv.data(), DType::Float32, DType::Float32, 1, 1};
  const double ranks = fault == Fault::Ranks ? 3 : (C % 2 ? 3 : 0);
  cuda::batch_norm_gather_stats(buf.data(), C, 0.1, 1e-5, true, rs, mean.data(), invstd.data(),
                                var.data(), device_check(1, ranks, local, verify), count.data(),
                                nullptr);
  const bool all = whole_fault(fault, verify) && fault != Fault::CountDiffers;
  EXPECT(all ? std::isnan(count.data()[0]) : same(count.data()[0], buf[size_t(2 * C)]),
         "gather fault %d verify=%d C=%ld N=%g: count_out %g", int(fault), verify, C, N,
         count.data()[0]);
  int bad = 0;
  for (int64_t c = 0; c < C; ++c) {
    if (!all && N == 0) {  // an agreed count of 0 writes nothing, whatever the sums
      bad += !(mean.data()[c] == -7 && invstd.data()[c] == -7 && var.data()[c] == -7);
      bad += std::memcmp(&rm[size_t(c)], &rm0[size_t(c)], 4) != 0;
      continue;
    }
    if (all || (c == bad_c && fault == Fault::ChannelNaN)) {
      bad += !(std::isnan(mean.data()[c]) && std::isnan(invstd.data()[c]) &&
               std::isnan(var.data()[c]));
      bad += std::memcmp(&rm[size_t(c)], &rm0[size_t(c)], 4) != 0 ||
             std::memcmp(&rv[size_t(c)], &rv0[size_t(c)], 4) != 0;
      continue;
    }
    const GlobalMoments gm = finalize_moments(buf[size_t(c)], buf[size_t(C + c)], N);
    bad += !same(mean.data()[c], gm.mean) ||
           !same(invstd.data()[c], invstd_of(gm.var_biased, 1e-5)) ||
           !same(var.data()[c], gm.var_biased);
    float want;
    store<double>(&want, 0.9 * double(rm0[size_t(c)]) + 0.1 * gm.mean);
    bad += std::memcmp(&want, &rm[size_t(c)], 4) != 0 &&
           !(std::isnan(want) && std::isnan(rm[size_t(c)]));
    if (c == bad_c)
      bad += !(std::isinf(mean.data()[c]) && std::isinf(rm[size_t(c)]));  // flagged inf
  }
  EXPECT(bad == 0, "gather fault %d verify=%d C=%ld N=%g: %d channels wrong", int(fault), verify, C,
         N, bad);
  EXPECT(mean.guards_ok() && invstd.guards_ok() && var.guards_ok() && count.guards_ok(),
         "gather fault guards");
}

// backward_elemt on faulty reduced sums: dx NaN exactly when the check must fail (or the
// sums' count is not *count), one channel alone for ChannelNaN.
static void test_backward_elemt_faults(Fault fault, bool verify) {
  const Geo G{3, 5, 7};
  const Geometry g{G.o, G.c, G.i};
  const int64_t C = G.c, numel = G.o * C * G.i;
  double local;
  int64_t bad_c;
  std::vector<double> sums = faulty_buffer(C, 63, 2, fault, &local, &bad_c);
  double count = fault == Fault::CountDiffers ? 62 : sums[size_t(2 * C)];
  if (fault == Fault::CountNaN || fault == Fault::CountFraction || fault == Fault::CountHuge)
    count = 63;  // the forward's count; the sums' is the faulty one
  Buf<float> dy(numel), x(numel), dx(numel);
  fill(dy.data(), numel, false);
  fill(x.data(), numel, false);
  std::vector<double> mean(C), invstd(C);
  for (int64_t c = 0; c < C; ++c) mean[c] = uni(-1, 1), invstd[c] = uni(0.1, 2);
  cuda::batch_norm_backward_elemt(
      dy.data(), x.data(), dx.data(), DType::Float32, g, mean.data(), invstd.data(), nullptr,
      sums.data(), &count, device_check(2, fault == Fault::Ranks ? 3 : 0, local, verify), nullptr);
  const bool all = whole_fault(fault, verify);
  int bad = 0;
  for (int64_t e = 0; e < numel; ++e) {
    const int64_t c = (e / G.i) % C;
    const bool poisoned = all || (c == bad_c && fault == Fault::ChannelNaN);
    const double got = load<double>(dx.data() + e);
    if (poisoned) {
      bad += !std::isnan(got);
      continue;
    }
    const double N = count, mdy = sums[c] / N, k = invstd[c] * invstd[c] * (sums[C + c] / N);
    float want;
    store<double>(&want,
                  (load<double>(dy.data() + e) - mdy - (load<double>(x.data() + e) - mean[c]) * k) *
                      invstd[c]);
    bad += std::memcmp(&want, dx.data() + e, 4) != 0 && !(std::isnan(want) && std::isnan(got));
  }
  EXPECT(bad == 0, "backward_elemt fault %d verify=%d: %d elements wrong", int(fault), verify, bad);
  EXPECT(dx.guards_ok(), "backward_elemt fault guards");
}

// The device write_fingerprint equals the host's (collective.cpp) bit for bit for the same
// Fingerprint: slots, the non-finite flag of the payload (inf/NaN anywhere in it), the
// count when given; the payload itself untouched.
static void test_write_fingerprint(int64_t C, int nonfinite, double count) {
  CollectiveKey key;
  key.layer = irand(0, 1000);
  key.call = irand(0, 50);
  Fingerprint f = next_fingerprint(irand(0, 1) ? CollectiveOp::Forward : CollectiveOp::Backward, C,
                                   int(irand(0, 3)), key, nullptr);
  const int64_t n = stats_buffer_size(C);
  Buf<double> dev(n);
  for (int64_t i = 0; i < n; ++i) dev.data()[i] = i < 2 * C ? uni(-1e6, 1e6) : -7.0;
  for (int k = 0; k < nonfinite && C > 0; ++k) {
    const int64_t at = k == 0 ? 2 * C - 1 : irand(0, 2 * C - 1);
    dev.data()[at] = k % 3 == 0 ? INFINITY : (k % 3 == 1 ? NAN : -INFINITY);
  }
  std::vector<double> host(dev.data(), dev.data() + n);
  write_fingerprint(f, host.data());
  if (count >= 0) host[size_t(2 * C)] = count;
  cuda::write_fingerprint(dev.data(), C, count, f, nullptr);
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += std::memcmp(&host[size_t(i)], &dev.data()[i], 8) != 0;
  EXPECT(bad == 0,
         "write_fingerprint C=%ld nonfinite=%d count=%g: %d of %ld values differ from the host's",
         C, nonfinite, count, bad, n);
  EXPECT(dev.data()[2 * C + 1 + fp::kNonFinite] == (nonfinite > 0 && C > 0 ? 1.0 : 0.0),
         "write_fingerprint C=%ld: non-finite flag %g with %d non-finite values", C,
         dev.data()[2 * C + 1 + fp::kNonFinite], nonfinite);
  EXPECT(dev.guards_ok(), "write_fingerprint guards");
}

// ---- copy_strided ------------------------------------------------------------------------

template <class T>
void test_copy(int ndim) {
  int64_t shape[kMaxDims];
  for (int d = 0; d < ndim; ++d) shape[d] = irand(1, 5);
  if (irand(0, 4) == 0) shape[irand(0, ndim - 1)] = 1;
  // Random dense layouts (a permutation of dims, optional step 2 slicing) for both sides.
  auto make = [&](std::vector<T>& storage, TensorView& v) {
    int perm[kMaxDims];
    for (int d = 0; d < ndim; ++d) perm[d] = d;
    std::shuffle(perm, perm + ndim, rng);
    const int64_t step = irand(1, 2);
    int64_t st = step, strides[kMaxDims];
    for (int k = ndim - 1; k >= 0; --k) strides[perm[k]] = st, st *= shape[perm[k]];
    storage.assign(size_t(st + 4), T{});
    v = TensorView{};
    v.data = storage.data() + 1;
    v.dtype = dtype_of<T>();
    v.ndim = ndim;
    for (int d = 0; d < ndim; ++d) v.shape[d] = shape[d], v.strides[d] = strides[d];
  };
  std::vector<T> s_store, d_store;
  TensorView s, d;
  make(s_store, s);
  make(d_store, d);
  for (auto& e : s_store) store<double>(&e, double(irand(-1000, 1000)));
  const std::vector<T> d_before = d_store;
  cuda::copy_strided(s, d, nullptr);
  // Walk every index.
  int64_t numel = 1;
  for (int k = 0; k < ndim; ++k) numel *= shape[k];
  std::vector<char> touched(d_store.size(), 0);
  int bad = 0;
  for (int64_t e = 0; e < numel; ++e) {
    int64_t rem = e, so = 0, dso = 0;
    for (int k = ndim - 1; k >= 0; --k) {
      const int64_t co = rem % shape[k];
      rem /= shape[k];
      so += co * s.strides[k], dso += co * d.strides[k];
    }
    const T* sp = static_cast<const T*>(s.data) + so;
    T* dp = static_cast<T*>(d.data) + dso;
    touched[size_t(dp - d_store.data())] = 1;
    if (std::memcmp(sp, dp, sizeof(T)) != 0) ++bad;
  }
  for (size_t i = 0; i < d_store.size(); ++i)
    if (!touched[i] && std::memcmp(&d_store[i], &d_before[i], sizeof(T)) != 0) ++bad;
  EXPECT(bad == 0, "copy_strided<%s> ndim=%d: %d wrong", tname<T>(), ndim, bad);
}

// ---- vectors -------------------------------------------------------------------------------

template <class T>
void test_vectors() {
  const int64_t n = irand(1, 700), stride = irand(1, 3);
  std::vector<T> src(n * stride), dst(n * stride);
  for (auto& e : src) store<double>(&e, uni(-10, 10));
  for (auto& e : dst) store<double>(&e, 99.0);
  std::vector<double> d(n), back(n);
  cuda::vector_to_double(src.data(), dtype_of<T>(), stride, n, d.data(), nullptr);
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += !same(d[i], load<double>(&src[i * stride]));
  for (int64_t i = 0; i < n; ++i) back[i] = d[i] * 1.37;
  cuda::vector_from_double(back.data(), dst.data(), dtype_of<T>(), stride, n, nullptr);
  for (int64_t i = 0; i < n * stride; ++i) {
    T want;
    store<double>(&want, i % stride == 0 ? back[i / stride] : 99.0);
    bad += std::memcmp(&want, &dst[i], sizeof(T)) != 0;
  }
  EXPECT(bad == 0, "vectors<%s>: %d wrong", tname<T>(), bad);
}

void test_invstd() {
  const int64_t n = 1000;
  std::vector<double> var(n), out(n);
  for (auto& v : var) v = uni(0, 3);
  cuda::invstd_from_var(var.data(), n, 1e-3, out.data(), nullptr);
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += !same(out[i], invstd_of(var[i], 1e-3));
  EXPECT(bad == 0, "invstd_from_var: %d wrong", bad);
}

template <class T>
void run_all(const std::vector<Geo>& geos) {
  for (const Geo& G : geos) {
    for (int64_t off : {0, 1}) {
      test_stats<T>(G, off, true);
      test_stats<T>(G, off, false);
      test_backward_reduce<T>(G, off, off == 0);
      test_elemt<T>(G, off, off == 0, false);
      test_elemt<T>(G, off, off == 1, true);
      test_backward_elemt<T>(G, off, true, off == 0);
      test_backward_elemt<T>(G, off, false, off == 1);
    }
  }
  for (int nd = 1; nd <= 6; ++nd)
    for (int rep = 0; rep < 6; ++rep) test_copy<T>(nd);
  test_vectors<T>();
}

int main(int argc, char** argv) {
  std::vector<Geo> geos = {
      {1, 1, 1},    {2, 3, 1},    {7, 5, 1},    {500, 37, 1}, {300, 512, 1}, {129, 96, 1},
      {64, 3, 2},   {33, 7, 9},   {50, 11, 31}, {3, 5, 32},   {70, 3, 32},   {4, 300, 49},
      {3, 2, 1000}, {8, 4, 3136}, {1, 3, 4096}, {5, 1, 4100}, {3, 1, 2051},  {2, 1, 300000},
      {0, 4, 9},    {5, 4, 0},    {3, 0, 5},    {1, 6, 1},    {2, 3, 7},     {41, 13, 64},
      {9, 1000, 1}, {2, 70, 33},
  };
  if (argc > 1 && std::string(argv[1]) == "big") {
    for (Geo G : {Geo{16, 4, 50176}, Geo{20000, 64, 1}, Geo{64, 256, 49}}) {
      test_stats<float>(G, 0, true);
      test_stats<half_t>(G, 0, true);
      test_backward_reduce<bfloat16_t>(G, 0, true);
      test_elemt<half_t>(G, 0, true, false);
      test_backward_elemt<float>(G, 0, true, true);
    }
    std::printf("%d checks, %d failures\n", g_checks, g_fail);
    return g_fail != 0;
  }
  if (argc > 1) geos.resize(std::min<size_t>(geos.size(), size_t(std::atoi(argv[1]))));
  run_all<float>(geos);
  run_all<double>(geos);
  run_all<half_t>(geos);
  run_all<bfloat16_t>(geos);
  for (double N : {0.0, 1.0, 2.0, 17.0}) {
    for (bool ub : {true, false}) {
      test_gather<float>(37, N, ub, true, true);
      test_gather<half_t>(300, N, ub, true, false);
      test_gather<double>(5, N, ub, false, true);
      test_gather<bfloat16_t>(1, N, ub, true, true);
    }
  }
  test_invstd();
  for (size_t k = 0; k < 12 && k < geos.size(); ++k) {
    test_stats<float>(geos[k], 0, true, true);
    test_stats<half_t>(geos[k], 1, true, true);
  }
  for (Fault f : kFaults)
    for (bool verify : {true, false}) {
      if (f != Fault::CountDiffers)
        for (int64_t C : {int64_t(0), int64_t(1), int64_t(37)})
          for (double N : {0.0, 9.0}) test_gather_faults(C, N, f, verify);
      test_backward_elemt_faults(f, verify);
    }
  for (int64_t C : {0, 1, 3, 127, 128, 129, 700, 3000})
    for (int nonfinite : {0, 1, 5})
      for (double count : {-1.0, 17.0}) test_write_fingerprint(C, nonfinite, count);
  const auto& s = emu::st();
  EXPECT(s.mallocs == s.frees, "workspace leak: %ld mallocs, %ld frees", s.mallocs, s.frees);
  std::printf("%d checks, %d failures, %ld launches, %ld workspaces\n", g_checks, g_fail,
              s.launches, s.mallocs);
  return g_fail != 0;
}
