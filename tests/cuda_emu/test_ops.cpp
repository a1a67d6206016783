// Runs the CUDA device backend's orchestration (core/src/cuda/ops.cu, built for the host by
// gen.py + shim/cuda_runtime.h) through the PUBLIC core API (syncbn/ops.h) on views whose
// device is CUDA but whose memory is host memory (what device memory is under emulation),
// and checks every result against a float64 reference computed here from the GLOBAL batch
// (all ranks concatenated), against the CPU path on the same data, and the composed
// primitives against forward()/backward() bit for bit. Per call it also checks the
// emulated runtime: no workspace leak, every piece of work on the caller's stream and
// device, no host synchronization or host<->device copy when the communicator is
// stream-ordered (run under emulated CUDA-graph capture), exactly the staging copies and
// syncs otherwise, and the stream drained before a communicator reads a buffer.
//
// usage: test_ops local   LocalCommunicator and in-process fake communicators (world of 1)
//        mpiexec -n 3 test_ops mpi   MpiCommunicator(MPI_COMM_WORLD), uneven ranks, one empty
// Prints "<N> checks, <F> failures ..." per rank; exits nonzero on a failure.
#include <cuda_runtime.h>  // the emulation shim: emu::st()
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dispatch.h"
#include "syncbn/communicator.h"
#include "syncbn/device_backend.h"
#include "syncbn/errors.h"
#include "syncbn/math.h"
#include "syncbn/mpi_communicator.h"
#include "syncbn/ops.h"

namespace syncbn::cuda {
const DeviceBackend* backend_table();
}
using namespace syncbn;

// ---- checks ----------------------------------------------------------------------------

static int g_rank = 0, g_size = 1, g_checks = 0, g_fail = 0;
static bool g_mpi = false;
static std::string g_ctx;  // the running case, for messages

#define EXPECT(cond, ...)                                                              \
  do {                                                                                 \
    ++g_checks;                                                                        \
    if (!(cond)) {                                                                     \
      if (++g_fail <= 60) {                                                            \
        std::printf("FAIL [rank %d] line %d [%s]: ", g_rank, __LINE__, g_ctx.c_str()); \
        std::printf(__VA_ARGS__);                                                      \
        std::printf("\n");                                                             \
        std::fflush(stdout);                                                           \
      }                                                                                \
    }                                                                                  \
  } while (0)

// An exception nobody expected: under MPI the other ranks would wait in a collective.
static void unexpected(const char* what, const std::exception& e) {
  EXPECT(false, "%s threw: %s", what, e.what());
  if (g_mpi) {
    std::fflush(stdout);
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
}

// ---- dtypes ----------------------------------------------------------------------------

static double ld(DType dt, const void* p) {
  SYNCBN_DISPATCH_FLOATING(dt, T, return load<double>(static_cast<const T*>(p)));
  return NAN;
}
static void st(DType dt, void* p, double v) {
  SYNCBN_DISPATCH_FLOATING(dt, T, store<double>(static_cast<T*>(p), v));
}
static double rnd(DType dt, double v) {  // v rounded to dt
  unsigned char b[8];
  st(dt, b, v);
  return ld(dt, b);
}
// Tolerance against the float64 reference (relative to max(1, |ref|, scale)) and one
// rounding step of the dtype (device vs the CPU path: both compute in float64 from the
// same inputs, only the summation order differs).
static double tol_ref(DType t) {
  switch (t) {
    case DType::Float64: return 1e-10;
    case DType::Float32: return 1e-5;
    case DType::Float16: return 1e-3;
    case DType::BFloat16: return 1e-2;
  }
  return 0;
}
static double tol_ulp(DType t) {
  switch (t) {
    case DType::Float64: return 1e-12;
    case DType::Float32: return 2.5e-7;
    case DType::Float16: return 0x1p-10 * 1.01;
    case DType::BFloat16: return 0x1p-7 * 1.01;
  }
  return 0;
}

// Counter-based random numbers: every rank generates the same global batch.
static uint64_t mix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
static double unit(uint64_t seed, uint64_t i) {  // [0, 1)
  return double(mix(mix(seed) ^ (i * 0xff51afd7ed558ccdull + 1)) >> 11) * 0x1p-53;
}
static double gauss(uint64_t seed, uint64_t i) {  // roughly N(0, 1)
  double s = 0;
  for (int k = 0; k < 4; ++k) s += unit(seed * 4 + k, i);
  return (s - 2.0) * std::sqrt(3.0);
}

using Vec = std::vector<double>;
static Vec zeros(int64_t n, double v = 0.0) {
  return Vec(static_cast<size_t>(n), v);
}

// ---- strided arrays with guard bytes ----------------------------------------------------

struct Lay {
  std::vector<int> perm;  // dims in memory order, outermost first; empty: row-major
  int64_t step = 1;       // stride of the innermost memory dim (2: every second element)
  int flip = -1;          // a dim with a negative stride
  int64_t off = 0;        // extra elements before the data (breaks 16-byte alignment)
};
static Lay channels_last(int nd) {
  Lay l;
  l.perm.push_back(0);
  for (int d = 2; d < nd; ++d) l.perm.push_back(d);
  l.perm.push_back(1);
  return l;
}
static Lay reversed(int nd) {
  Lay l;
  for (int d = nd - 1; d >= 0; --d) l.perm.push_back(d);
  return l;
}
static Lay flipped(int d) {
  Lay l;
  l.flip = d;
  return l;
}
static Lay offset1() {
  Lay l;
  l.off = 1;
  return l;
}
static Lay strided(int64_t s) {
  Lay l;
  l.step = s;
  return l;
}

// A view over its own storage (0xA5 everywhere but the elements). Elements are addressed
// in logical row-major order. snapshot() records the bytes; stray() counts the bytes
// changed since, outside the elements (outputs) or anywhere (inputs).
struct Arr {
  TensorView v;
  std::vector<unsigned char> mem, snap;
  std::vector<int64_t> offs;
  std::vector<char> covered;
  int es = 0;

  int64_t numel() const { return int64_t(offs.size()); }
  const char* at(int64_t e) const {
    return static_cast<const char*>(v.data) + offs[size_t(e)] * es;
  }
  double get(int64_t e) const { return ld(v.dtype, at(e)); }
  void set(int64_t e, double x) { st(v.dtype, const_cast<char*>(at(e)), x); }
  void snapshot() { snap = mem; }
  int64_t stray(bool output) const {
    int64_t bad = 0;
    for (size_t i = 0; i < mem.size(); ++i)
      if (!(output && covered[i]) && mem[i] != snap[i]) ++bad;
    return bad;
  }
  Vec values() const {
    Vec r = zeros(numel());
    for (int64_t e = 0; e < numel(); ++e) r[size_t(e)] = get(e);
    return r;
  }
};
using P = std::unique_ptr<Arr>;

static P make(DType dt, Device dev, const std::vector<int64_t>& shape, const Lay& lay = {}) {
  P a(new Arr);
  const int nd = int(shape.size());
  std::vector<int> perm = lay.perm;
  if (perm.empty())
    for (int d = 0; d < nd; ++d) perm.push_back(d);
  int64_t strides[kMaxDims] = {};
  int64_t s = lay.step;
  for (int k = nd - 1; k >= 0; --k) {
    strides[perm[size_t(k)]] = s;
    s *= std::max<int64_t>(shape[size_t(perm[size_t(k)])], 1);
  }
  int64_t span = 1, numel = 1, lead = 0;
  for (int d = 0; d < nd; ++d) {
    numel *= shape[size_t(d)];
    if (shape[size_t(d)] > 0) span += (shape[size_t(d)] - 1) * strides[d];
  }
  if (lay.flip >= 0) {
    lead = std::max<int64_t>(shape[size_t(lay.flip)] - 1, 0) * strides[lay.flip];
    strides[lay.flip] = -strides[lay.flip];
  }
  const int64_t G = 8;  // guard elements on both sides
  a->es = dtype_size(dt);
  a->mem.assign(size_t((span + 2 * G + lay.off) * a->es), 0xA5);
  a->covered.assign(a->mem.size(), 0);
  a->v.data = a->mem.data() + (G + lay.off + lead) * a->es;
  a->v.dtype = dt;
  a->v.device = dev;
  a->v.ndim = nd;
  for (int d = 0; d < nd; ++d) a->v.shape[d] = shape[size_t(d)], a->v.strides[d] = strides[d];
  a->offs.resize(size_t(numel));
  for (int64_t e = 0; e < numel; ++e) {
    int64_t rem = e, o = 0;
    for (int d = nd - 1; d >= 0; --d) {
      o += (rem % shape[size_t(d)]) * strides[d];
      rem /= shape[size_t(d)];
    }
    a->offs[size_t(e)] = o;
    const size_t b =
        size_t(static_cast<char*>(a->v.data) - reinterpret_cast<char*>(a->mem.data()) + o * a->es);
    for (int k = 0; k < a->es; ++k) a->covered[b + size_t(k)] = 1;
  }
  a->snapshot();
  return a;
}
static P vec(DType dt, Device dev, int64_t n, int64_t stride = 1) {
  return make(dt, dev, {n}, strided(stride));
}
// The same storage contents and layout on another device (a CPU twin of device inputs).
static P twin(const Arr& a, Device dev) {
  P b(new Arr(a));
  b->v.data = b->mem.data() + (static_cast<const unsigned char*>(a.v.data) - a.mem.data());
  b->v.device = dev;
  return b;
}
static void fill(Arr& a, const std::function<double(int64_t)>& f) {
  for (int64_t e = 0; e < a.numel(); ++e) a.set(e, f(e));
  a.snapshot();
}
static const TensorView* opt(const P& p) {
  return p ? &p->v : nullptr;
}

// got[e] vs ref[e] within tol * max(1, |ref|, scale[e]).
static void check_vals(const char* what, const Arr& got, const Vec& ref, double tol,
                       const Vec* scale = nullptr) {
  int64_t bad = 0, first = -1;
  const int64_t n = got.numel();
  EXPECT(int64_t(ref.size()) == n, "%s: %ld elements, reference has %zu", what, n, ref.size());
  if (int64_t(ref.size()) != n) return;
  for (int64_t e = 0; e < n; ++e) {
    const double g = got.get(e), r = ref[size_t(e)];
    const double sc = std::max({1.0, std::fabs(r), scale ? (*scale)[size_t(e)] : 0.0});
    if (!(std::fabs(g - r) <= tol * sc)) {
      if (first < 0) first = e;
      ++bad;
    }
  }
  EXPECT(bad == 0, "%s: %ld of %ld elements off (tol %g), first e=%ld got %.17g want %.17g", what,
         bad, n, tol, first, first >= 0 ? got.get(first) : 0.0,
         first >= 0 ? ref[size_t(first)] : 0.0);
}
static void check_same_bits(const char* what, const Arr& a, const Arr& b) {
  int64_t bad = 0, first = -1;
  EXPECT(a.numel() == b.numel() && a.v.dtype == b.v.dtype, "%s: shapes/dtypes differ", what);
  if (a.numel() != b.numel() || a.v.dtype != b.v.dtype) return;
  for (int64_t e = 0; e < a.numel(); ++e)
    if (std::memcmp(a.at(e), b.at(e), size_t(a.es)) != 0) {
      if (first < 0) first = e;
      ++bad;
    }
  EXPECT(bad == 0, "%s: %ld of %ld elements differ bitwise, first e=%ld: %.17g vs %.17g", what, bad,
         a.numel(), first, first >= 0 ? a.get(first) : 0.0, first >= 0 ? b.get(first) : 0.0);
}
static void check_untouched(const char* what, const Arr& a) {
  const int64_t n = a.stray(false);
  EXPECT(n == 0, "%s: %ld bytes changed (an input or a buffer that must not be written)", what, n);
}
static void check_gaps(const char* what, const Arr& a) {
  const int64_t n = a.stray(true);
  EXPECT(n == 0, "%s: %ld bytes written outside the view's elements", what, n);
}

// ---- communicators -----------------------------------------------------------------------

// Wraps a real communicator (forwarding accepts / stream_ordered) or fakes a world of K
// identical ranks (the sum is K times the buffer), and checks each call: device buffers
// only when accepted, on the caller's stream, and the stream drained first whenever the
// communicator reads outside the stream (host staging, not stream-ordered).
class TestComm final : public Communicator {
 public:
  Communicator* inner = nullptr;
  int K = 1;
  bool device_ok = false, ordered = false;
  const char* name = "test";
  void* stream = nullptr;
  bool in_device_call = false;
  long calls = 0, undrained = 0, bad = 0;

  int rank() const override { return inner ? inner->rank() : 0; }
  int size() const override { return inner ? inner->size() : K; }
  void allreduce_sum(double* d, int64_t n, Device dev, void* s) override {
    ++calls;
    const bool device = dev.type != DeviceType::CPU;
    if (device && (!accepts(dev) || s != stream)) ++bad;
    if (in_device_call && (!device || !stream_ordered()) && !emu::is_stream_drained()) ++undrained;
    if (inner)
      inner->allreduce_sum(d, n, dev, s);
    else
      for (int64_t i = 0; i < n; ++i) d[i] *= K;
  }
  const char* kind() const override { return name; }
  bool accepts(Device d) const override {
    return inner ? inner->accepts(d) : (d.type == DeviceType::CPU || device_ok);
  }
  bool stream_ordered() const override { return inner ? inner->stream_ordered() : ordered; }
};

enum class Staging { Ordered, Unordered, Host };

struct World {
  std::string name;
  Communicator* comm = nullptr;
  TestComm* probe = nullptr;  // comm when it is a TestComm
  int W = 1, rank = 0;        // ranks the global batch is split over
  bool tiled = false;         // fake K-rank world: the global batch is K copies of the local one
  bool capture = false;       // device calls run under emulated CUDA-graph capture
  Staging staging = Staging::Ordered;
};

static cudaStream_t const kStream = reinterpret_cast<cudaStream_t>(uintptr_t(0x5ee0));

struct Counters {
  long launches, mallocs, frees, syncs, d2h, h2d, refused, wrong_stream, wrong_device, calls,
      undrained, bad;
};
static Counters counters(const World& w) {
  const emu::State& s = emu::st();
  Counters c{s.launches, s.mallocs,      s.frees,        s.syncs, s.d2h, s.h2d,
             s.refused,  s.wrong_stream, s.wrong_device, 0,       0,     0};
  if (w.probe) c.calls = w.probe->calls, c.undrained = w.probe->undrained, c.bad = w.probe->bad;
  return c;
}

// One call of the public API on device views, with the emulated runtime checked around it.
// collectives: all-reduces the call must make; returns false if it threw.
static bool device_call(World& w, int dev_id, const char* what, int collectives, bool expect_work,
                        const std::function<void()>& fn) {
  emu::State& s = emu::st();
  EXPECT(s.device == 0, "%s: current device %d before the call", what, s.device);
  s.check_stream = true;
  s.stream = kStream;
  s.expect_device = dev_id;
  s.capturing = w.capture;
  if (w.probe) w.probe->in_device_call = true, w.probe->stream = kStream;
  const Counters a = counters(w);
  bool ok = true;
  try {
    fn();
  } catch (const std::exception& e) {
    s.capturing = false;
    unexpected(what, e);
    ok = false;
  }
  s.capturing = false;
  s.check_stream = false;
  s.expect_device = -1;
  if (w.probe) w.probe->in_device_call = false;
  const Counters b = counters(w);
  const long syncs = b.syncs - a.syncs, d2h = b.d2h - a.d2h, h2d = b.h2d - a.h2d;
  EXPECT(b.mallocs - a.mallocs == b.frees - a.frees && s.mallocs == s.frees,
         "%s: workspace leak: %ld mallocs, %ld frees", what, b.mallocs - a.mallocs,
         b.frees - a.frees);
  EXPECT(b.wrong_stream == a.wrong_stream, "%s: %ld operations on another stream than the caller's",
         what, b.wrong_stream - a.wrong_stream);
  EXPECT(b.wrong_device == a.wrong_device, "%s: %ld operations while device %d was not current",
         what, b.wrong_device - a.wrong_device, dev_id);
  EXPECT(s.device == 0, "%s: the current device was left at %d", what, s.device);
  EXPECT(b.refused == a.refused, "%s: %ld runtime calls refused under capture", what,
         b.refused - a.refused);
  EXPECT(s.last == cudaSuccess, "%s: a launch error was left pending", what);
  if (expect_work) EXPECT(b.launches > a.launches, "%s: launched no kernel", what);
  if (w.capture)
    EXPECT(syncs == 0 && d2h == 0 && h2d == 0,
           "%s: not capturable: %ld stream syncs, %ld D2H, %ld H2D copies", what, syncs, d2h, h2d);
  switch (w.staging) {
    case Staging::Ordered:
      EXPECT(syncs == 0 && d2h == 0 && h2d == 0,
             "%s (stream-ordered comm): %ld syncs %ld D2H %ld H2D", what, syncs, d2h, h2d);
      break;
    case Staging::Unordered:
      EXPECT(syncs == collectives && d2h == 0 && h2d == 0,
             "%s (device, unordered comm): %ld syncs %ld D2H %ld H2D for %d all-reduces", what,
             syncs, d2h, h2d, collectives);
      break;
    case Staging::Host:
      EXPECT(syncs == 2 * collectives && d2h == collectives && h2d == collectives,
             "%s (host staging): %ld syncs %ld D2H %ld H2D for %d all-reduces", what, syncs, d2h,
             h2d, collectives);
      break;
  }
  if (w.probe) {
    EXPECT(b.calls - a.calls == collectives, "%s: %ld all-reduces, expected %d", what,
           b.calls - a.calls, collectives);
    EXPECT(b.undrained == a.undrained,
           "%s: the communicator read a buffer before the stream was drained", what);
    EXPECT(b.bad == a.bad,
           "%s: a device buffer went to a communicator that does not take it, or on "
           "another stream",
           what);
  }
  return ok;
}

// ---- one forward/backward case ---------------------------------------------------------------

struct Case {
  std::string name;
  std::vector<int64_t> shape;  // global (shape[0]: the batch, split over the ranks)
  int axis = 1;
  DType dt = DType::Float32;
  Lay x, dy, y, dx;
  bool weight = true, bias = true;
  DType wdt = DType::Float32;
  int64_t wstride = 1;
  bool running = true;
  DType rdt = DType::Float32;
  int64_t rstride = 1;
  bool training = true, unbiased = true;
  double momentum = 0.1, eps = 1e-5;
  bool want_dx = true, want_gw = true, want_gb = true;
  DType gdt = DType::Float32;
  int64_t gstride = 1;
  int64_t sstride = 1;   // save_mean / save_invstd (float64) stride
  bool inplace = false;  // y aliases x (forward), dx aliases dy (backward)
  bool primitives = false;
  int dev_id = 0;
  uint64_t seed = 1;
};

static std::vector<int64_t> split(int64_t n, const World& w) {
  std::vector<int64_t> s(size_t(w.W), 0);
  if (w.tiled) {
    std::fill(s.begin(), s.end(), n);
  } else if (w.W == 1) {
    s[0] = n;
  } else {  // uneven, rank 1 empty: rank 0 about half, the rest over ranks 2..
    s[0] = (n + 1) / 2;
    int64_t left = n - s[0];
    const int others = w.W - 2;
    for (int r = 2; r < w.W; ++r) {
      s[size_t(r)] = r == w.W - 1 ? left : left / others;
      left -= s[size_t(r)];
    }
    if (others == 0) s[0] = n;
  }
  return s;
}

static void run_case(const Case& c, World& w) {
  g_ctx = w.name + "/" + c.name + "/" + dtype_name(c.dt);
  const int nd = int(c.shape.size());
  const int ax = c.axis < 0 ? c.axis + nd : c.axis;
  const int64_t C = c.shape[size_t(ax)];
  const Device dev{DeviceType::CUDA, c.dev_id}, cpu{DeviceType::CPU, 0};
  const std::vector<int64_t> sizes = split(c.shape[0], w);
  int64_t off = 0, Ng = 0;
  for (int r = 0; r < w.W; ++r) {
    if (r < w.rank) off += sizes[size_t(r)];
    Ng += sizes[size_t(r)];
  }
  const int64_t nloc = sizes[size_t(w.rank)];
  std::vector<int64_t> ls = c.shape, gs = c.shape;
  ls[0] = nloc, gs[0] = Ng;
  int64_t row = 1, inner = 1;
  for (int d = 1; d < nd; ++d) row *= c.shape[size_t(d)];
  for (int d = ax + 1; d < nd; ++d) inner *= c.shape[size_t(d)];
  const int64_t numel_g = Ng * row, numel_l = nloc * row;
  auto chan = [&](int64_t e) { return (e / inner) % C; };

  // The global batch (every rank generates it; a tiled world repeats the local one).
  Vec xg = zeros(numel_g), dyg = zeros(numel_g);
  for (int64_t e = 0; e < numel_g; ++e) {
    const uint64_t src = uint64_t(w.tiled ? e % std::max<int64_t>(numel_l, 1) : e);
    xg[size_t(e)] = rnd(c.dt, 3 + 2 * gauss(c.seed, src));
    dyg[size_t(e)] = rnd(c.dt, 2 * unit(c.seed + 1000, src) - 1);
  }
  const int64_t goff = (w.tiled ? 0 : off) * row;
  Vec wv = zeros(C), bv = zeros(C), rm0 = zeros(C), rv0 = zeros(C);
  for (int64_t k = 0; k < C; ++k) {
    wv[size_t(k)] = c.weight ? rnd(c.wdt, 0.5 + unit(c.seed + 2, uint64_t(k))) : 1.0;
    bv[size_t(k)] = c.bias ? rnd(c.wdt, unit(c.seed + 3, uint64_t(k)) - 0.5) : 0.0;
    rm0[size_t(k)] = rnd(c.rdt, 2 * unit(c.seed + 4, uint64_t(k)) - 1);
    rv0[size_t(k)] = rnd(c.rdt, 0.5 + 1.5 * unit(c.seed + 5, uint64_t(k)));
  }

  // ---- float64 reference --------------------------------------------------------------
  const int64_t cnt = C > 0 ? numel_g / C : 0;
  Vec mean = zeros(C), m2 = zeros(C), mu = zeros(C), is = zeros(C);
  for (int64_t e = 0; e < numel_g; ++e) mean[size_t(chan(e))] += xg[size_t(e)];
  for (int64_t k = 0; k < C; ++k) mean[size_t(k)] = cnt ? mean[size_t(k)] / double(cnt) : 0;
  for (int64_t e = 0; e < numel_g; ++e) {
    const double d = xg[size_t(e)] - mean[size_t(chan(e))];
    m2[size_t(chan(e))] += d * d;
  }
  Vec rm_ref = rm0, rv_ref = rv0, rv_ref_unb = rv0;
  for (int64_t k = 0; k < C; ++k) {
    const size_t i = size_t(k);
    if (c.training) {
      mu[i] = mean[i];
      is[i] = cnt ? 1.0 / std::sqrt(m2[i] / double(cnt) + c.eps) : 0.0;
      if (cnt >= 2) {
        rm_ref[i] = rnd(c.rdt, (1 - c.momentum) * rm0[i] + c.momentum * mean[i]);
        rv_ref[i] = rnd(c.rdt, (1 - c.momentum) * rv0[i] +
                                   c.momentum * m2[i] / double(c.unbiased ? cnt - 1 : cnt));
        rv_ref_unb[i] =
            rnd(c.rdt, (1 - c.momentum) * rv0[i] + c.momentum * m2[i] / double(cnt - 1));
      }
    } else {
      mu[i] = rm0[i];
      is[i] = 1.0 / std::sqrt(rv0[i] + c.eps);
    }
  }
  Vec sdy = zeros(C), sdx = zeros(C), sdy_l = zeros(C), sdx_l = zeros(C), gscale = zeros(C),
      bscale = zeros(C);
  for (int64_t e = 0; e < numel_g; ++e) {
    const size_t k = size_t(chan(e));
    const double t = dyg[size_t(e)] * (xg[size_t(e)] - mu[k]);
    sdy[k] += dyg[size_t(e)];
    sdx[k] += t;
    if (e >= goff && e < goff + numel_l) {
      sdy_l[k] += dyg[size_t(e)];
      sdx_l[k] += t;
      gscale[k] += std::fabs(t) * is[k];
      bscale[k] += std::fabs(dyg[size_t(e)]);
    }
  }
  Vec y_ref = zeros(numel_l), dx_ref = zeros(numel_l), dx_scale = zeros(numel_l);
  for (int64_t e = 0; e < numel_l; ++e) {
    const size_t k = size_t(chan(e));
    const double xv = xg[size_t(goff + e)], dv = dyg[size_t(goff + e)];
    y_ref[size_t(e)] = (xv - mu[k]) * is[k] * wv[k] + bv[k];
    if (c.training) {
      const double n = double(cnt);
      dx_ref[size_t(e)] =
          (dv - sdy[k] / n - (xv - mu[k]) * is[k] * is[k] * sdx[k] / n) * is[k] * wv[k];
      // the terms dx is the difference of
      dx_scale[size_t(e)] = (std::fabs(dv) + std::fabs(sdy[k] / n) +
                             std::fabs((xv - mu[k]) * is[k] * is[k] * sdx[k] / n)) *
                            is[k] * std::fabs(wv[k]);
    } else {
      dx_ref[size_t(e)] = dv * is[k] * wv[k];
    }
  }
  Vec gw_ref = zeros(C), gb_ref = sdy_l;
  for (int64_t k = 0; k < C; ++k) gw_ref[size_t(k)] = sdx_l[size_t(k)] * is[size_t(k)];

  // ---- device arrays ------------------------------------------------------------------
  P x = make(c.dt, dev, ls, c.x), dy = make(c.dt, dev, ls, c.dy);
  fill(*x, [&](int64_t e) { return xg[size_t(goff + e)]; });
  fill(*dy, [&](int64_t e) { return dyg[size_t(goff + e)]; });
  P y = c.inplace ? twin(*x, dev) : make(c.dt, dev, ls, c.y);
  P dx = c.want_dx ? (c.inplace ? twin(*dy, dev) : make(c.dt, dev, ls, c.dx)) : nullptr;
  if (!c.inplace) fill(*y, [](int64_t) { return -777.0; });
  if (dx && !c.inplace) fill(*dx, [](int64_t) { return -777.0; });
  P wt = c.weight ? vec(c.wdt, dev, C, c.wstride) : nullptr;
  P bs = c.bias ? vec(c.wdt, dev, C, c.wstride) : nullptr;
  if (wt) fill(*wt, [&](int64_t k) { return wv[size_t(k)]; });
  if (bs) fill(*bs, [&](int64_t k) { return bv[size_t(k)]; });
  P rm = c.running ? vec(c.rdt, dev, C, c.rstride) : nullptr;
  P rv = c.running ? vec(c.rdt, dev, C, c.rstride) : nullptr;
  if (rm) fill(*rm, [&](int64_t k) { return rm0[size_t(k)]; });
  if (rv) fill(*rv, [&](int64_t k) { return rv0[size_t(k)]; });
  P sm = vec(DType::Float64, dev, C, c.sstride), si = vec(DType::Float64, dev, C, c.sstride);
  P scount = vec(DType::Float64, dev, 1);
  fill(*sm, [](int64_t) { return -777.0; });
  fill(*si, [](int64_t) { return -777.0; });
  fill(*scount, [](int64_t) { return -777.0; });
  P gw = c.want_gw ? vec(c.gdt, dev, C, c.gstride) : nullptr;
  P gb = c.want_gb ? vec(c.gdt, dev, C, c.gstride) : nullptr;
  if (gw) fill(*gw, [](int64_t) { return -777.0; });
  if (gb) fill(*gb, [](int64_t) { return -777.0; });
  // CPU twins of the inputs, taken before anything runs (running stats still initial).
  P x_c = twin(*x, cpu), dy_c = twin(*dy, cpu), wt_c = wt ? twin(*wt, cpu) : nullptr,
    bs_c = bs ? twin(*bs, cpu) : nullptr, rm_c = rm ? twin(*rm, cpu) : nullptr,
    rv_c = rv ? twin(*rv, cpu) : nullptr;

  // ---- forward -----------------------------------------------------------------------
  ForwardOptions fo;
  fo.axis = c.axis;
  fo.training = c.training;
  fo.momentum = c.momentum;
  fo.eps = c.eps;
  fo.unbiased_running_var = c.unbiased;
  fo.stream = kStream;
  double ret = 0;
  const TensorView& xin = c.inplace ? y->v : x->v;  // in place: y is x's storage
  device_call(w, c.dev_id, "forward", c.training ? 1 : 0, C > 0, [&] {
    ret = forward(xin, opt(wt), opt(bs), opt(rm), opt(rv), fo, *w.comm, y->v, sm->v, si->v,
                  &scount->v);
  });
  EXPECT(std::isnan(ret), "forward on a device returned %g, expected NaN", ret);
  check_vals("y", *y, y_ref, tol_ref(c.dt));
  if (!c.inplace) check_gaps("y", *y);
  if (cnt > 0 || !c.training) {
    check_vals("save_mean", *sm, mu, 1e-10);
    check_vals("save_invstd", *si, is, 1e-10);
  } else {  // a global count of 0 writes nothing there, as on the host
    check_untouched("save_mean (global count 0)", *sm);
    check_untouched("save_invstd (global count 0)", *si);
  }
  check_gaps("save_mean", *sm);
  check_gaps("save_invstd", *si);
  const double count_ref = c.training ? double(cnt) : double(C ? numel_l / C : 0);
  EXPECT(scount->get(0) == count_ref, "save_count %.17g, expected %g", scount->get(0), count_ref);
  check_gaps("save_count", *scount);
  if (rm) {
    check_vals("running_mean", *rm, rm_ref, tol_ref(c.rdt));
    check_vals("running_var", *rv, rv_ref, tol_ref(c.rdt));
    check_gaps("running_mean", *rm);
    check_gaps("running_var", *rv);
    if (cnt < 2) {
      check_untouched("running_mean (global count < 2)", *rm);
      check_untouched("running_var (global count < 2)", *rv);
    }
  }
  check_untouched("x", *x);
  if (wt) check_untouched("weight", *wt);
  if (bs) check_untouched("bias", *bs);

  // ---- backward ----------------------------------------------------------------------
  sm->snapshot();  // backward reads save_mean/save_invstd and must not write them
  si->snapshot();
  BackwardOptions bo;
  bo.axis = c.axis;
  bo.training = c.training;
  bo.count = NAN;  // a device reads count_view
  bo.count_view = (c.training && c.want_dx) ? &scount->v : nullptr;
  bo.stream = kStream;
  const TensorView& dyin = c.inplace ? dx->v : dy->v;
  const bool work = (numel_l > 0 && c.want_dx) || c.want_gw || c.want_gb;
  device_call(w, c.dev_id, "backward", (c.training && c.want_dx) ? 1 : 0, work, [&] {
    backward(dyin, x->v, sm->v, si->v, opt(wt), bo, *w.comm, opt(dx), opt(gw), opt(gb));
  });
  if (dx) {
    check_vals("dx", *dx, dx_ref, tol_ref(c.dt), c.training ? &dx_scale : nullptr);
    if (!c.inplace) check_gaps("dx", *dx);
  }
  if (gw) {
    check_vals("grad_weight", *gw, gw_ref, std::max(tol_ref(c.gdt), 1e-12), &gscale);
    check_gaps("grad_weight", *gw);
  }
  if (gb) {
    check_vals("grad_bias", *gb, gb_ref, std::max(tol_ref(c.gdt), 1e-12), &bscale);
    check_gaps("grad_bias", *gb);
  }
  check_untouched("x after backward", *x);
  if (!c.inplace) check_untouched("dy", *dy);
  check_untouched("save_mean (read by backward)", *sm);
  check_untouched("save_invstd (read by backward)", *si);

  // ---- the CPU path on the same data ------------------------------------------------------
  if (c.training && cnt < 2) {
    // The host raises for a global count of 1 (a device cannot: its count stays there)
    // and writes nothing for 0.
    P y_c = twin(*y, cpu), sm_c = twin(*sm, cpu), si_c = twin(*si, cpu);
    bool threw = false;
    double r = -1;
    try {
      r = forward(x_c->v, opt(wt_c), opt(bs_c), opt(rm_c), opt(rv_c), fo, *w.comm, y_c->v, sm_c->v,
                  si_c->v, nullptr);
    } catch (const ValueError&) {
      threw = true;
    }
    if (cnt == 1) EXPECT(threw, "CPU forward with a global count of 1 did not raise");
    if (cnt == 0) EXPECT(!threw && r == 0, "CPU forward with a global count of 0: %g", r);
  } else {
    P y_c = make(c.dt, cpu, ls, c.y), sm_c = vec(DType::Float64, cpu, C, c.sstride),
      si_c = vec(DType::Float64, cpu, C, c.sstride), sc_c = vec(DType::Float64, cpu, 1);
    double r = NAN;
    try {
      r = forward(x_c->v, opt(wt_c), opt(bs_c), opt(rm_c), opt(rv_c), fo, *w.comm, y_c->v, sm_c->v,
                  si_c->v, &sc_c->v);
    } catch (const std::exception& e) {
      unexpected("CPU forward", e);
    }
    EXPECT(r == count_ref && sc_c->get(0) == count_ref, "CPU forward count %g, expected %g", r,
           count_ref);
    check_vals("y vs CPU", *y, y_c->values(), tol_ulp(c.dt));
    check_vals("save_mean vs CPU", *sm, sm_c->values(), 1e-12);
    check_vals("save_invstd vs CPU", *si, si_c->values(), 1e-12);
    if (rm) {
      check_vals("running_mean vs CPU", *rm, rm_c->values(), tol_ulp(c.rdt));
      check_vals("running_var vs CPU", *rv, rv_c->values(), tol_ulp(c.rdt));
    }
    P dx_c = c.want_dx ? make(c.dt, cpu, ls, c.dx) : nullptr;
    P gw_c = c.want_gw ? vec(c.gdt, cpu, C, c.gstride) : nullptr;
    P gb_c = c.want_gb ? vec(c.gdt, cpu, C, c.gstride) : nullptr;
    BackwardOptions cb = bo;
    cb.count = r;
    cb.count_view = nullptr;
    try {
      backward(dy_c->v, x_c->v, sm_c->v, si_c->v, opt(wt_c), cb, *w.comm, opt(dx_c), opt(gw_c),
               opt(gb_c));
    } catch (const std::exception& e) {
      unexpected("CPU backward", e);
    }
    if (dx)
      check_vals("dx vs CPU", *dx, dx_c->values(), tol_ulp(c.dt), c.training ? &dx_scale : nullptr);
    if (gw) check_vals("grad_weight vs CPU", *gw, gw_c->values(), tol_ulp(c.gdt), &gscale);
    if (gb) check_vals("grad_bias vs CPU", *gb, gb_c->values(), tol_ulp(c.gdt), &bscale);
  }

  // ---- the primitives, composed, equal forward()/backward() bit for bit ---------------------
  if (!c.primitives || !c.training) return;
  P buf = vec(DType::Float64, dev, 2 * C + 1), buf2 = vec(DType::Float64, dev, 2 * C + 1, 2);
  P mean_p = vec(DType::Float64, dev, C, c.sstride), inv_p = vec(DType::Float64, dev, C, c.sstride);
  P var_p = vec(DType::Float64, dev, C), y_p = make(c.dt, dev, ls, c.y);
  P rm_p = rm ? vec(c.rdt, dev, C, c.rstride) : nullptr,
    rv_p = rv ? vec(c.rdt, dev, C, c.rstride) : nullptr;
  if (rm_p) fill(*rm_p, [&](int64_t k) { return rm0[size_t(k)]; });
  if (rv_p) fill(*rv_p, [&](int64_t k) { return rv0[size_t(k)]; });
  for (Arr* a : {buf.get(), buf2.get(), mean_p.get(), inv_p.get(), var_p.get(), y_p.get()})
    fill(*a, [](int64_t) { return -777.0; });
  device_call(w, c.dev_id, "batch_norm_stats", 0, numel_l > 0,
              [&] { batch_norm_stats(x->v, c.axis, buf->v, kStream); });
  device_call(w, c.dev_id, "batch_norm_stats (stride-2 buffer)", 0, true,
              [&] { batch_norm_stats(x->v, c.axis, buf2->v, kStream); });
  check_same_bits("stats into a stride-2 buffer", *buf2, *buf);
  check_gaps("stats buffer (stride 2)", *buf2);
  {  // local moments: P1 = sum x, P2 = sum x^2 over this rank's part, n
    Vec ref = zeros(2 * C + 1);
    for (int64_t e = 0; e < numel_l; ++e) {
      const double v = xg[size_t(goff + e)];
      ref[size_t(chan(e))] += v;
      ref[size_t(C + chan(e))] += v * v;
    }
    ref[size_t(2 * C)] = double(C ? numel_l / C : 0);
    check_vals("local stats buffer", *buf, ref, 1e-10);
    EXPECT(buf->get(2 * C) == ref[size_t(2 * C)], "local count %g", buf->get(2 * C));
  }
  device_call(w, c.dev_id, "allreduce", 1, false, [&] { allreduce(buf->v, *w.comm, kStream); });
  EXPECT(buf->get(2 * C) == double(cnt), "all-reduced count %g, expected %ld", buf->get(2 * C),
         cnt);
  double gret = 0;
  device_call(w, c.dev_id, "batch_norm_gather_stats", 0, true, [&] {
    gret = batch_norm_gather_stats(buf->v, c.momentum, c.eps, opt(rm_p), opt(rv_p), mean_p->v,
                                   inv_p->v, &var_p->v, kStream);
  });
  EXPECT(std::isnan(gret), "gather on a device returned %g", gret);
  check_same_bits("gather mean vs forward save_mean", *mean_p, *sm);
  check_same_bits("gather invstd vs forward save_invstd", *inv_p, *si);
  {
    Vec vb = zeros(C);
    for (int64_t k = 0; k < C; ++k) vb[size_t(k)] = m2[size_t(k)] / double(cnt);
    check_vals("gather var_biased", *var_p, vb, 1e-10);
  }
  if (rm_p) {  // the primitive always updates running_var unbiased
    if (c.unbiased) {
      check_same_bits("gather running_mean vs forward", *rm_p, *rm);
      check_same_bits("gather running_var vs forward", *rv_p, *rv);
    }
    check_vals("gather running_mean", *rm_p, rm_ref, tol_ref(c.rdt));
    check_vals("gather running_var", *rv_p, rv_ref_unb, tol_ref(c.rdt));
  }
  device_call(w, c.dev_id, "batch_norm_elemt", 0, numel_l > 0, [&] {
    batch_norm_elemt(x->v, c.axis, mean_p->v, inv_p->v, opt(wt), opt(bs), y_p->v, kStream);
  });
  if (!c.inplace) check_same_bits("elemt y vs forward y", *y_p, *y);
  check_vals("elemt y", *y_p, y_ref, tol_ref(c.dt));
  check_gaps("elemt y", *y_p);
  P sums = vec(DType::Float64, dev, 2 * C);
  P gw_p = c.want_gw ? vec(c.gdt, dev, C, c.gstride) : nullptr;
  P gb_p = c.want_gb ? vec(c.gdt, dev, C, c.gstride) : nullptr;
  fill(*sums, [](int64_t) { return -777.0; });
  device_call(w, c.dev_id, "batch_norm_backward_reduce", 0, true, [&] {
    batch_norm_backward_reduce(dy->v, x->v, c.axis, mean_p->v, inv_p->v, sums->v, opt(gw_p),
                               opt(gb_p), kStream);
  });
  {
    Vec ref = zeros(2 * C), sc = zeros(2 * C);
    for (int64_t k = 0; k < C; ++k) {
      ref[size_t(k)] = sdy_l[size_t(k)], ref[size_t(C + k)] = sdx_l[size_t(k)];
      sc[size_t(k)] = bscale[size_t(k)], sc[size_t(C + k)] = gscale[size_t(k)] / is[size_t(k)];
    }
    check_vals("backward_reduce sums", *sums, ref, 1e-10, &sc);
  }
  if (gw_p) check_same_bits("backward_reduce grad_weight vs backward", *gw_p, *gw);
  if (gb_p) check_same_bits("backward_reduce grad_bias vs backward", *gb_p, *gb);
  device_call(w, c.dev_id, "allreduce (sums)", 1, false,
              [&] { allreduce(sums->v, *w.comm, kStream); });
  if (!c.want_dx) return;
  P dx_p = make(c.dt, dev, ls, c.dx);
  fill(*dx_p, [](int64_t) { return -777.0; });
  TensorView cv = buf->v;  // count_view: buffer[2C:] of the reduced stats buffer
  cv.data = static_cast<double*>(buf->v.data) + 2 * C;
  cv.shape[0] = 1;
  device_call(w, c.dev_id, "batch_norm_backward_elemt", 0, numel_l > 0, [&] {
    batch_norm_backward_elemt(dy->v, x->v, c.axis, mean_p->v, inv_p->v, opt(wt), sums->v, NAN,
                              dx_p->v, &cv, kStream);
  });
  if (!c.inplace) check_same_bits("backward_elemt dx vs backward dx", *dx_p, *dx);
  check_vals("backward_elemt dx", *dx_p, dx_ref, tol_ref(c.dt), &dx_scale);
  check_gaps("backward_elemt dx", *dx_p);
  check_untouched("x after the primitives", *x);
  check_untouched("dy after the primitives", *dy);
}

// ---- the matrix of cases ---------------------------------------------------------------------

static std::vector<Case> main_cases(DType dt) {
  std::vector<Case> v;
  auto add = [&](Case c) {
    c.dt = dt;
    c.seed = v.size() * 7919 + uint64_t(dt) * 104729 + 11;
    v.push_back(c);
    return &v.back();
  };
  Case c;
  // NCHW, small H*W (the "rows" reduction), every output and option plain.
  c = Case{};
  c.name = "nchw", c.shape = {5, 6, 4, 5};
  c.rstride = 2, c.primitives = true;
  add(c);
  // NCHW with long channel runs (the "runs" reduction), no weight, float64 bias/stats/grads,
  // biased running var, another momentum.
  c = Case{};
  c.name = "nchw_runs", c.shape = {4, 3, 24, 30};
  c.weight = false, c.wdt = DType::Float64, c.rdt = DType::Float64, c.gdt = DType::Float64;
  c.unbiased = false, c.momentum = 0.3, c.primitives = true;
  add(c);
  // Several partial blocks per channel in both reductions and grid-stride element loops.
  c = Case{};
  c.name = "runs_multiblock", c.shape = {4, 2, 64, 72};
  add(c);
  c = Case{};
  c.name = "rows_multiblock_cl", c.shape = {128, 8, 2, 2};
  c.x = c.dy = c.y = c.dx = channels_last(4);
  add(c);
  // Channels-last everywhere; float16 weight, strided save/grads.
  c = Case{};
  c.name = "channels_last", c.shape = {5, 6, 4, 5};
  c.x = c.dy = c.y = c.dx = channels_last(4);
  c.wdt = DType::Float16, c.rstride = 2, c.sstride = 2, c.gstride = 3, c.eps = 1e-3;
  c.primitives = true;
  add(c);
  // (N, C) with axis -1; no running stats; float64 grads.
  c = Case{};
  c.name = "nc_axis_m1", c.shape = {7, 5}, c.axis = -1;
  c.running = false, c.gdt = DType::Float64, c.primitives = true;
  add(c);
  // 3-D with the channel last (axis -1); float16 running stats; no grad_weight.
  c = Case{};
  c.name = "nlc_axis_m1", c.shape = {4, 3, 6}, c.axis = -1;
  c.rdt = DType::Float16, c.want_gw = false;
  add(c);
  // 5-D channels-last-3d; strided float32 weight; no dx.
  c = Case{};
  c.name = "ncdhw_channels_last", c.shape = {3, 3, 2, 3, 4};
  c.x = c.dy = c.y = channels_last(5);
  c.wstride = 2, c.rstride = 2, c.want_dx = false, c.primitives = true;
  add(c);
  // C not a power of two, many channels; dx only.
  c = Case{};
  c.name = "c67", c.shape = {4, 67, 3, 3};
  c.want_gw = c.want_gb = false, c.primitives = true;
  add(c);
  // One channel; non-dense y (every second W) and a transposed dx.
  c = Case{};
  c.name = "c1", c.shape = {6, 1, 7, 5};
  c.rstride = 3, c.y = strided(2), c.dx = reversed(4);
  add(c);
  // Non-dense x (every second W), contiguous y/dy, non-dense dx: packing and unpacking.
  c = Case{};
  c.name = "strided_x_dx", c.shape = {4, 5, 3, 8};
  c.x = strided(2), c.dx = strided(2);
  c.sstride = 2, c.primitives = true;
  add(c);
  // Negative stride (non-dense) x and dx, channels-last y and dy.
  c = Case{};
  c.name = "flipped", c.shape = {4, 5, 3, 8};
  c.x = flipped(3), c.dx = flipped(2), c.y = c.dy = channels_last(4);
  c.bias = false, c.gdt = DType::Float64, c.gstride = 2, c.primitives = true;
  add(c);
  // A transposed (column-major) (N, C) array: dense, other strides than dy/dx.
  c = Case{};
  c.name = "transposed", c.shape = {9, 4};
  c.x = c.y = reversed(2);
  c.primitives = true;
  add(c);
  // Misaligned views (no vector packs); dy non-dense.
  c = Case{};
  c.name = "misaligned", c.shape = {5, 6, 4, 8};
  c.x = c.dx = offset1(), c.dy = strided(2), c.y = offset1();
  add(c);
  // Eval: running stats instead of batch stats, no communication; backward eval.
  c = Case{};
  c.name = "eval_nchw", c.shape = {5, 6, 4, 5};
  c.training = false, c.rstride = 2, c.eps = 1e-3;
  add(c);
  c = Case{};
  c.name = "eval_cl_strided", c.shape = {4, 5, 3, 8};
  c.training = false, c.x = channels_last(4), c.dx = strided(2), c.rdt = DType::Float64;
  c.weight = false;
  add(c);
  // Another current device: the guard must switch to it and back.
  c = Case{};
  c.name = "device1", c.shape = {5, 6, 4, 5};
  c.dev_id = 1;
  add(c);
  // In place: y over x, dx over dy.
  c = Case{};
  c.name = "inplace", c.shape = {5, 6, 4, 5};
  c.inplace = true;
  add(c);
  // Global count 1 (no exception on a device, running stats untouched) and 0.
  c = Case{};
  c.name = "global_count_1", c.shape = {1, 4};
  add(c);
  c = Case{};
  c.name = "global_count_0", c.shape = {0, 3, 4};
  add(c);
  return v;
}

static const DType kDtypes[] = {DType::Float32, DType::Float64, DType::Float16, DType::BFloat16};

static void run_cases(World& w, const std::vector<std::string>& only,
                      const std::vector<DType>& dts) {
  for (DType dt : dts)
    for (const Case& c : main_cases(dt))
      if (only.empty() || std::find(only.begin(), only.end(), c.name) != only.end()) run_case(c, w);
}

// ---- targeted tests ----------------------------------------------------------------------------

// gather on a device with a reduced count of 0 writes nothing; with 1, mean/invstd but not
// the running stats; neither raises (the count is not read back).
static void test_gather_small_counts(World& w) {
  const Device dev{DeviceType::CUDA, 0};
  const int64_t C = 5;
  for (double N : {0.0, 1.0}) {
    g_ctx = w.name + "/gather_count_" + std::to_string(int(N));
    P buf = vec(DType::Float64, dev, 2 * C + 1);
    fill(*buf, [&](int64_t k) { return k == 2 * C ? N : (k < C ? 1.5 * N * double(k) : 2.5 * N); });
    P mean = vec(DType::Float64, dev, C), inv = vec(DType::Float32, dev, C, 2),
      var = vec(DType::Float64, dev, C, 3);
    P rm = vec(DType::BFloat16, dev, C), rv = vec(DType::BFloat16, dev, C);
    for (Arr* a : {mean.get(), inv.get(), var.get(), rm.get(), rv.get()})
      fill(*a, [](int64_t k) { return 0.25 * double(k); });
    double r = 0;
    device_call(w, 0, "batch_norm_gather_stats", 0, N > 0, [&] {
      r = batch_norm_gather_stats(buf->v, 0.1, 1e-5, &rm->v, &rv->v, mean->v, inv->v, &var->v,
                                  kStream);
    });
    EXPECT(std::isnan(r), "returned %g", r);
    check_untouched("running_mean", *rm);
    check_untouched("running_var", *rv);
    check_untouched("buffer", *buf);
    if (N == 0) {
      check_untouched("mean (count 0 writes nothing)", *mean);
      check_untouched("invstd (count 0 writes nothing)", *inv);
      check_untouched("var (count 0 writes nothing)", *var);
    } else {
      Vec m = zeros(C), s = zeros(C, 1 / std::sqrt(1e-5)), v0 = zeros(C);
      for (int64_t k = 0; k < C; ++k) m[size_t(k)] = 1.5 * double(k);
      for (int64_t k = 0; k < C; ++k)
        v0[size_t(k)] =
            2.5 - m[size_t(k)] * m[size_t(k)] < 0 ? 0 : 2.5 - m[size_t(k)] * m[size_t(k)];
      for (int64_t k = 0; k < C; ++k) s[size_t(k)] = 1 / std::sqrt(v0[size_t(k)] + 1e-5);
      check_vals("mean (count 1)", *mean, m, 1e-12);
      check_vals("invstd (count 1)", *inv, s, tol_ref(DType::Float32));
      check_vals("var (count 1)", *var, v0, 1e-12);
      check_gaps("invstd", *inv);
      check_gaps("var", *var);
    }
  }
}

// The local stats of an empty batch are all zeros, count included, whatever the buffer held.
static void test_stats_of_empty_batch(World& w) {
  g_ctx = w.name + "/stats_empty";
  const Device dev{DeviceType::CUDA, 0};
  P x = make(DType::Float16, dev, {0, 3, 4});
  for (int64_t stride : {1, 2}) {
    P buf = vec(DType::Float64, dev, 7, stride);
    fill(*buf, [](int64_t) { return -777.0; });
    device_call(w, 0, "batch_norm_stats (empty)", 0, false,
                [&] { batch_norm_stats(x->v, 1, buf->v, kStream); });
    check_vals("stats of an empty batch", *buf, zeros(7), 0.0);
    check_gaps("stats buffer", *buf);
  }
}

// Running stats of two dtypes (float32 mean, float64 var) train as on the CPU: the device
// updates each in its own dtype.
static void test_running_dtype_mismatch() {
  g_ctx = "running_two_dtypes";
  TestComm comm;
  comm.K = 2, comm.device_ok = true, comm.ordered = true, comm.stream = kStream;
  const Device dev{DeviceType::CUDA, 0}, cpu{DeviceType::CPU, 0};
  const int64_t C = 3;
  P x = make(DType::Float32, dev, {4, C, 5}), y = make(DType::Float32, dev, {4, C, 5});
  fill(*x, [](int64_t e) { return double(e % 7); });
  P rm = vec(DType::Float32, dev, C), rv = vec(DType::Float64, dev, C, 2);
  fill(*rm, [](int64_t k) { return 0.25 * double(k); });
  fill(*rv, [](int64_t k) { return 2.0 + double(k); });
  P rm_c = twin(*rm, cpu), rv_c = twin(*rv, cpu);
  P sm = vec(DType::Float64, dev, C), si = vec(DType::Float64, dev, C),
    sc = vec(DType::Float64, dev, 1);
  ForwardOptions fo;
  fo.stream = kStream;
  World wt;
  wt.name = "train", wt.comm = wt.probe = &comm;
  device_call(wt, 0, "forward (training, two running dtypes)", 1, true, [&] {
    forward(x->v, nullptr, nullptr, &rm->v, &rv->v, fo, comm, y->v, sm->v, si->v, &sc->v);
  });
  // The CPU path on the same data: its communicator sums K = 2 identical ranks as well.
  P x_c = twin(*x, cpu), y_c = make(DType::Float32, cpu, {4, C, 5});
  P sm_c = vec(DType::Float64, cpu, C), si_c = vec(DType::Float64, cpu, C);
  TestComm host;
  host.K = 2;
  try {
    forward(x_c->v, nullptr, nullptr, &rm_c->v, &rv_c->v, fo, host, y_c->v, sm_c->v, si_c->v,
            nullptr);
  } catch (const std::exception& e) {
    unexpected("CPU forward (two running dtypes)", e);
  }
  Vec rm_ref = zeros(C), rv_ref = zeros(C);
  for (int64_t k = 0; k < C; ++k)
    rm_ref[size_t(k)] = rm_c->get(k), rv_ref[size_t(k)] = rv_c->get(k);
  check_vals("running_mean (float32) vs CPU", *rm, rm_ref, 1e-7);
  check_vals("running_var (float64) vs CPU", *rv, rv_ref, 1e-12);
  check_gaps("running_var", *rv);
  EXPECT(std::fabs(rv->get(0) - 2.0) > 1e-3, "running_var was not updated: %.17g", rv->get(0));

  // Eval only reads them, each converted on its own: two dtypes are fine there (as on the CPU).
  g_ctx = "running_dtype_mismatch_eval";
  fill(*rm, [](int64_t k) { return 0.5 * double(k); });
  fill(*rv, [](int64_t k) { return 1.0 + double(k); });
  fo.training = false;
  World w;
  w.name = "eval", w.comm = w.probe = &comm;
  device_call(w, 0, "forward (eval, two running dtypes)", 0, true, [&] {
    forward(x->v, nullptr, nullptr, &rm->v, &rv->v, fo, comm, y->v, sm->v, si->v, &sc->v);
  });
  Vec ref = zeros(x->numel());
  for (int64_t e = 0; e < x->numel(); ++e) {
    const int64_t k = (e / 5) % C;
    ref[size_t(e)] = (x->get(e) - 0.5 * double(k)) / std::sqrt(1.0 + double(k) + fo.eps);
  }
  check_vals("y (eval, two running dtypes)", *y, ref, tol_ref(DType::Float32));
  check_untouched("running_mean (eval)", *rm);
  check_untouched("running_var (eval)", *rv);
}

// The emulated capture refuses what capture forbids, so the capture checks can fail: a
// communicator that needs host staging or a stream sync cannot run under capture.
static void test_capture_is_enforced() {
  for (bool device_ok : {false, true}) {
    g_ctx = std::string("capture_refuses_") + (device_ok ? "sync" : "host_staging");
    TestComm comm;
    comm.K = 2, comm.device_ok = device_ok, comm.ordered = false, comm.stream = kStream;
    const Device dev{DeviceType::CUDA, 0};
    P x = make(DType::Float32, dev, {4, 3, 5}), y = make(DType::Float32, dev, {4, 3, 5});
    fill(*x, [](int64_t e) { return double(e % 7); });
    P sm = vec(DType::Float64, dev, 3), si = vec(DType::Float64, dev, 3),
      sc = vec(DType::Float64, dev, 1);
    ForwardOptions fo;
    fo.stream = kStream;
    const long refused = emu::st().refused;
    emu::st().capturing = true;
    bool threw = false;
    try {
      forward(x->v, nullptr, nullptr, nullptr, nullptr, fo, comm, y->v, sm->v, si->v, &sc->v);
    } catch (const CommError& e) {
      threw = std::strstr(e.what(), "capturing") != nullptr;
    } catch (const std::exception& e) {
      EXPECT(false, "threw %s", e.what());
    }
    emu::st().capturing = false;
    EXPECT(threw, "forward under capture with a %s communicator did not fail",
           device_ok ? "not stream-ordered" : "host-only");
    EXPECT(emu::st().refused > refused, "nothing was refused under capture");
    EXPECT(comm.calls == 0, "the communicator ran under a refused capture");
    EXPECT(emu::st().mallocs == emu::st().frees, "workspace leak after a refused capture");
  }
}

// C = 0: nothing to compute, the calls still succeed and write the count 0.
static void test_zero_channels(World& w) {
  g_ctx = w.name + "/zero_channels";
  const Device dev{DeviceType::CUDA, 0};
  P x = make(DType::Float32, dev, {3, 0, 4}), y = make(DType::Float32, dev, {3, 0, 4});
  P dx = make(DType::Float32, dev, {3, 0, 4});
  P sm = vec(DType::Float64, dev, 0), si = vec(DType::Float64, dev, 0),
    sc = vec(DType::Float64, dev, 1);
  fill(*sc, [](int64_t) { return -1.0; });
  ForwardOptions fo;
  fo.stream = kStream;
  device_call(w, 0, "forward (C=0)", 1, false, [&] {
    forward(x->v, nullptr, nullptr, nullptr, nullptr, fo, *w.comm, y->v, sm->v, si->v, &sc->v);
  });
  EXPECT(sc->get(0) == 0, "save_count %g for no channels", sc->get(0));
  BackwardOptions bo;
  bo.stream = kStream;
  bo.count_view = &sc->v;
  device_call(w, 0, "backward (C=0)", 1, false, [&] {
    backward(x->v, x->v, sm->v, si->v, nullptr, bo, *w.comm, &dx->v, nullptr, nullptr);
  });
  check_gaps("save_count", *sc);
}

// ---- main
// ----------------------------------------------------------------------------------------

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "local";
  if (mode != "local" && mode != "mpi") {
    std::fprintf(stderr, "usage: %s local|mpi\n", argv[0]);
    return 2;
  }
  register_device_backend(cuda::backend_table());
  emu::st().device_count = 2;

  if (mode == "local") {
    LocalCommunicator local;
    World wl;
    wl.name = "local", wl.comm = &local, wl.capture = true, wl.staging = Staging::Ordered;
    run_cases(wl, {}, {std::begin(kDtypes), std::end(kDtypes)});
    test_gather_small_counts(wl);
    test_zero_channels(wl);
    test_stats_of_empty_batch(wl);

    // Fake worlds of K identical ranks (the global batch is K copies of the local one):
    // a stream-ordered device communicator (as NCCL: capturable), a device one that is not
    // stream-ordered (as CUDA-aware MPI: one sync per all-reduce) and a host-only one
    // (staged: D2H, sync, all-reduce, H2D, sync).
    TestComm nccl_like, aware_like, host_like;
    nccl_like.K = 3, nccl_like.device_ok = true, nccl_like.ordered = true,
    nccl_like.name = "nccl-like";
    aware_like.K = 3, aware_like.device_ok = true, aware_like.ordered = false,
    aware_like.name = "aware-like";
    host_like.K = 2, host_like.name = "host-only";
    World wn, wa, wh;
    wn.name = "nccl_like", wn.comm = wn.probe = &nccl_like, wn.W = 3, wn.tiled = true,
    wn.capture = true;
    wa.name = "aware_like", wa.comm = wa.probe = &aware_like, wa.W = 3, wa.tiled = true;
    wa.staging = Staging::Unordered;
    wh.name = "host_only", wh.comm = wh.probe = &host_like, wh.W = 2, wh.tiled = true;
    wh.staging = Staging::Host;
    for (World* w : {&wn, &wa, &wh}) {
      run_cases(*w, {}, {DType::Float32, DType::BFloat16});
      test_gather_small_counts(*w);
    }
    test_zero_channels(wh);
    test_running_dtype_mismatch();
    test_capture_is_enforced();
  } else {
    g_mpi = true;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_size);
    try {
      MpiCommunicator mpi(MPI_COMM_WORLD);
      TestComm probe;
      probe.inner = &mpi, probe.name = "mpi";
      const Staging staging = mpi.cuda_aware() ? Staging::Unordered : Staging::Host;
      World wm;
      wm.name = "mpi", wm.comm = wm.probe = &probe, wm.W = g_size, wm.rank = g_rank;
      wm.staging = staging;
      run_cases(wm, {}, {std::begin(kDtypes), std::end(kDtypes)});
      test_gather_small_counts(wm);
      test_stats_of_empty_batch(wm);
      // The bare MpiCommunicator, as the bindings hand it over.
      World wb = wm;
      wb.name = "mpi_bare", wb.comm = &mpi, wb.probe = nullptr;
      run_cases(wb, {"nchw"}, {DType::BFloat16});
      test_zero_channels(wb);
      if (g_rank == 0)
        std::printf("mpi: %d ranks, %s\n", g_size,
                    mpi.cuda_aware() ? "CUDA-aware (device buffers)" : "host staging");
    } catch (const std::exception& e) {
      unexpected("mpi run", e);
    }
  }
  const auto& s = emu::st();
  EXPECT(s.mallocs == s.frees, "workspace leak: %ld mallocs, %ld frees", s.mallocs, s.frees);
  std::printf(
      "%d checks, %d failures [%s rank %d/%d] %ld launches, %ld workspaces, %ld syncs, %ld D2H, "
      "%ld H2D\n",
      g_checks, g_fail, mode.c_str(), g_rank, g_size, s.launches, s.mallocs, s.syncs, s.d2h, s.h2d);
  std::fflush(stdout);
  if (g_mpi) MPI_Finalize();
  return g_fail != 0;
}
