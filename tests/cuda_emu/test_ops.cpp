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
// The collective format (ops.h, collective.h): the fingerprint a device sends equals the
// CPU path's bit for bit; ranks that disagree or a communicator that breaks the sum give
// NaN results on the stream (stream-ordered) or the host path's exception with nothing
// written (host-checked), and under MPI every rank raises the same error and goes on.
//
// usage: test_ops local   LocalCommunicator and in-process fake communicators (world of 1)
//        mpiexec -n 3 test_ops mpi   MpiCommunicator(MPI_COMM_WORLD), uneven ranks, one empty
// Prints "<N> checks, <F> failures ..." per rank; exits nonzero on a failure.
#include <cuda_runtime.h>  // the emulation shim: emu::st()
#include <mpi.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "collective.h"  // the slot layout behind the payload, for fault injection
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

// The first n elements of a 1-D array (a copy of it, for reading).
static P head(const Arr& a, int64_t n) {
  P b = twin(a, a.v.device);
  b->v.shape[0] = n;
  b->offs.resize(size_t(n));
  return b;
}

// One rank's fingerprint slots behind a buffer's payload and count (collective.h): one
// rank, the non-finite flag, v_0 = the operation, v_j bytes, and their squares.
static void check_local_slots(const char* what, const Arr& buf, int64_t C, int op, bool nonfinite) {
  const int64_t s = 2 * C + 1;
  int bad = 0;
  bad += buf.get(s + fp::kRanks) != 1;
  bad += buf.get(s + fp::kNonFinite) != (nonfinite ? 1 : 0);
  bad += buf.get(s + fp::kSum) != op;
  for (int j = 0; j < fp::kChunks; ++j) {
    const double v = buf.get(s + fp::kSum + j);
    bad += !(v >= 0 && v <= 255 && v == std::floor(v)) || buf.get(s + fp::kSumSq + j) != v * v;
  }
  EXPECT(bad == 0, "%s: %d fingerprint slots are not one rank's (ranks %g, flag %g, op %g)", what,
         bad, buf.get(s + fp::kRanks), buf.get(s + fp::kNonFinite), buf.get(s + fp::kSum));
}

// The fingerprint slots of one rank's buffer for C channels from the CPU path: `op` 1 the
// stats of batch_norm_stats, 2 the sums of batch_norm_backward_reduce, of layer `layer`.
static Vec cpu_slots(int op, int64_t C, int64_t layer) {
  const Device cpu{DeviceType::CPU, 0};
  P x = make(DType::Float32, cpu, {2, C, 3}), buf = vec(DType::Float64, cpu, stats_buffer_size(C));
  fill(*x, [](int64_t e) { return double(e % 5); });
  CollectiveKey key;
  key.layer = layer;
  if (op == 1) {
    batch_norm_stats(x->v, 1, buf->v, nullptr, key);
  } else {
    P m = vec(DType::Float64, cpu, C), is = vec(DType::Float64, cpu, C);
    fill(*m, [](int64_t) { return 1.0; });
    fill(*is, [](int64_t) { return 1.0; });
    batch_norm_backward_reduce(x->v, x->v, 1, m->v, is->v, buf->v, nullptr, nullptr, nullptr, key);
  }
  const Vec b = buf->values();
  return Vec(b.end() - kFingerprintSlots, b.end());
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
  // Fault injection: rewrites the reduced buffer (what this rank sent: `sent`), as a
  // disagreeing rank or a broken communicator would leave it.
  std::function<void(const Vec& sent, double* reduced, int64_t n)> fault;
  std::vector<Vec>* record = nullptr;  // what this rank sends, call by call

  int rank() const override { return inner ? inner->rank() : 0; }
  int size() const override { return inner ? inner->size() : K; }
  void allreduce_sum(double* d, int64_t n, Device dev, void* s) override {
    ++calls;
    const bool device = dev.type != DeviceType::CPU;
    if (device && (!accepts(dev) || s != stream)) ++bad;
    if (in_device_call && (!device || !stream_ordered()) && !emu::is_stream_drained()) ++undrained;
    const Vec sent(d, d + n);
    if (record) record->push_back(sent);
    if (inner)
      inner->allreduce_sum(d, n, dev, s);
    else
      for (int64_t i = 0; i < n; ++i) d[i] *= K;
    if (fault) fault(sent, d, n);
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
// collectives: all-reduces the call must make; checked: whether the composed op checks
// what comes back on the host where it holds it (a device communicator that is not
// stream-ordered: one more sync and a D2H copy; the all-reduce primitive does not check).
// Returns false if it threw.
static bool device_call(World& w, int dev_id, const char* what, int collectives, bool expect_work,
                        const std::function<void()>& fn, bool checked = true) {
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
      EXPECT(syncs == (checked ? 2 : 1) * collectives && d2h == (checked ? collectives : 0) &&
                 h2d == 0,
             "%s (device, unordered comm): %ld syncs %ld D2H %ld H2D for %d all-reduces%s", what,
             syncs, d2h, h2d, collectives, checked ? " checked on the host" : "");
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
  const int64_t len = stats_buffer_size(C);
  P buf = vec(DType::Float64, dev, len), buf2 = vec(DType::Float64, dev, len, 2);
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
  CollectiveKey call1;  // the primitives count nothing: the caller numbers its calls
  call1.call = 1;
  device_call(w, c.dev_id, "batch_norm_stats (stride-2 buffer)", 0, true,
              [&] { batch_norm_stats(x->v, c.axis, buf2->v, kStream, call1); });
  check_same_bits("stats into a stride-2 buffer", *head(*buf2, 2 * C + 1), *head(*buf, 2 * C + 1));
  check_local_slots("stats buffer (stride 2)", *buf2, C, 1, false);
  {  // another call number of the same layer: another fingerprint
    int differ = 0;
    for (int j = 1; j < fp::kChunks; ++j)
      differ += buf->get(2 * C + 1 + fp::kSum + j) != buf2->get(2 * C + 1 + fp::kSum + j);
    EXPECT(differ > 0, "two calls of one layer gave the same fingerprint");
  }
  check_gaps("stats buffer (stride 2)", *buf2);
  check_local_slots("stats buffer", *buf, C, 1, false);
  {  // local moments: P1 = sum x, P2 = sum x^2 over this rank's part, n
    Vec ref = zeros(2 * C + 1);
    for (int64_t e = 0; e < numel_l; ++e) {
      const double v = xg[size_t(goff + e)];
      ref[size_t(chan(e))] += v;
      ref[size_t(C + chan(e))] += v * v;
    }
    ref[size_t(2 * C)] = double(C ? numel_l / C : 0);
    check_vals("local stats buffer", *head(*buf, 2 * C + 1), ref, 1e-10);
    EXPECT(buf->get(2 * C) == ref[size_t(2 * C)], "local count %g", buf->get(2 * C));
  }
  device_call(
      w, c.dev_id, "allreduce", 1, false, [&] { allreduce(buf->v, *w.comm, kStream); }, false);
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
  P sums = vec(DType::Float64, dev, backward_buffer_size(C));
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
    check_vals("backward_reduce sums", *head(*sums, 2 * C), ref, 1e-10, &sc);
    EXPECT(sums->get(2 * C) == double(C ? numel_l / C : 0), "backward_reduce count %g",
           sums->get(2 * C));
    check_local_slots("backward_reduce sums", *sums, C, 2, false);
  }
  if (gw_p) check_same_bits("backward_reduce grad_weight vs backward", *gw_p, *gw);
  if (gb_p) check_same_bits("backward_reduce grad_bias vs backward", *gb_p, *gb);
  device_call(
      w, c.dev_id, "allreduce (sums)", 1, false, [&] { allreduce(sums->v, *w.comm, kStream); },
      false);
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
    // A reduced buffer of one rank: its fingerprint slots from batch_norm_stats.
    P buf = vec(DType::Float64, dev, stats_buffer_size(C));
    const Vec slots = cpu_slots(1, C, 779);
    fill(*buf, [&](int64_t k) {
      return k > 2 * C    ? slots[size_t(k - 2 * C - 1)]
             : k == 2 * C ? N
                          : (k < C ? 1.5 * N * double(k) : 2.5 * N);
    });
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
    P buf = vec(DType::Float64, dev, stats_buffer_size(3), stride);
    fill(*buf, [](int64_t) { return -777.0; });
    device_call(w, 0, "batch_norm_stats (empty)", 0, true,
                [&] { batch_norm_stats(x->v, 1, buf->v, kStream); });
    check_vals("stats of an empty batch", *head(*buf, 7), zeros(7), 0.0);
    check_local_slots("stats of an empty batch", *buf, 3, 1, false);
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

// ---- fingerprints, faults, NaN/inf parity ------------------------------------------------------

enum class Thrown { Nothing, Mismatch, Comm, Other };
static const char* thrown_name(Thrown t) {
  switch (t) {
    case Thrown::Nothing: return "nothing";
    case Thrown::Mismatch: return "CollectiveMismatchError";
    case Thrown::Comm: return "CommError";
    case Thrown::Other: return "another exception";
  }
  return "?";
}

// A device call that may throw: which exception (and its message), with the emulated
// runtime checked around it as device_call does (no leak, the caller's stream and device,
// the device restored, the stream drained before a communicator read outside it).
static Thrown throwing_call(World& w, const char* what, const std::function<void()>& fn,
                            std::string* msg = nullptr) {
  emu::State& s = emu::st();
  s.check_stream = true;
  s.stream = kStream;
  s.expect_device = 0;
  s.capturing = w.capture;
  if (w.probe) w.probe->in_device_call = true, w.probe->stream = kStream;
  const Counters a = counters(w);
  Thrown t = Thrown::Nothing;
  try {
    fn();
  } catch (const CollectiveMismatchError& e) {
    t = Thrown::Mismatch;
    if (msg) *msg = e.what();
  } catch (const CommError& e) {
    t = Thrown::Comm;
    if (msg) *msg = e.what();
  } catch (const std::exception& e) {
    t = Thrown::Other;
    if (msg) *msg = e.what();
  }
  s.capturing = false;
  s.check_stream = false;
  s.expect_device = -1;
  if (w.probe) w.probe->in_device_call = false;
  const Counters b = counters(w);
  EXPECT(s.mallocs == s.frees, "%s: workspace leak: %ld mallocs, %ld frees", what,
         b.mallocs - a.mallocs, b.frees - a.frees);
  EXPECT(b.wrong_stream == a.wrong_stream && b.wrong_device == a.wrong_device,
         "%s: work on another stream or device", what);
  EXPECT(s.device == 0, "%s: the current device was left at %d", what, s.device);
  EXPECT(s.last == cudaSuccess, "%s: a launch error was left pending", what);
  EXPECT(b.undrained == a.undrained && b.bad == a.bad,
         "%s: the communicator read an undrained stream or got a buffer it does not take", what);
  return t;
}

// Runs fn in a child process, a copy of this one (so the same per-layer call counters),
// and returns the doubles it produced. Local mode only (no MPI in the child).
static bool in_child(const std::function<Vec()>& fn, Vec* out) {
  std::fflush(stdout);
  int fds[2];
  if (pipe(fds) != 0) return false;
  const pid_t pid = fork();
  if (pid < 0) return false;
  if (pid == 0) {
    close(fds[0]);
    Vec v;
    try {
      v = fn();
    } catch (...) {
      _exit(3);
    }
    const uint64_t n = v.size();
    bool ok = write(fds[1], &n, sizeof n) == ssize_t(sizeof n);
    for (size_t done = 0; ok && done < n * sizeof(double);) {
      const ssize_t k =
          write(fds[1], reinterpret_cast<const char*>(v.data()) + done, n * sizeof(double) - done);
      ok = k > 0;
      done += size_t(k > 0 ? k : 0);
    }
    _exit(ok ? 0 : 4);
  }
  close(fds[1]);
  uint64_t n = 0;
  bool ok = read(fds[0], &n, sizeof n) == ssize_t(sizeof n);
  out->assign(ok ? size_t(n) : 0, 0.0);
  for (size_t done = 0; ok && done < n * sizeof(double);) {
    const ssize_t k =
        read(fds[0], reinterpret_cast<char*>(out->data()) + done, n * sizeof(double) - done);
    ok = k > 0;
    done += size_t(k > 0 ? k : 0);
  }
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  return ok && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

// The buffers one rank hands to the communicator, device vs the CPU path, for the same
// calls of one layer (the CPU path runs in a forked copy of this process, so its calls
// have the same call counts): the count and the fingerprint slots are equal bit for bit,
// the payload to rounding; the non-finite flag is set exactly when an input (x forward,
// x or dy backward) holds an inf or a NaN. Four buffers: batch_norm_stats,
// forward's all-reduce, batch_norm_backward_reduce, backward's all-reduce.
struct ParityCase {
  const char* name;
  std::vector<int64_t> shape;
  int axis;
  DType dt;
  Lay lay;
  int64_t x_bad, dy_bad;  // an element set to inf (x) / NaN (dy), or -1
};
static void test_fingerprint_parity() {
  const ParityCase cases[] = {
      {"finite_nchw", {4, 5, 6}, 1, DType::Float32, Lay{}, -1, -1},
      {"x_inf_channels_last", {3, 4, 2, 5}, -1, DType::Float32, Lay{}, 17, -1},
      {"dy_nan_float16", {5, 3, 7}, 1, DType::Float16, strided(2), -1, 40},
      {"x_nan_first_c1", {6, 1, 4}, 1, DType::BFloat16, Lay{}, 0, -1},
  };
  int64_t layer = 5000;
  for (const ParityCase& pc : cases) {
    g_ctx = std::string("fingerprint_parity/") + pc.name;
    ++layer;
    auto run = [&](DeviceType dt_dev) {
      const Device d{dt_dev, 0};
      const bool on_dev = dt_dev != DeviceType::CPU;
      const int nd = int(pc.shape.size()), ax = pc.axis < 0 ? pc.axis + nd : pc.axis;
      const int64_t C = pc.shape[size_t(ax)];
      P x = make(pc.dt, d, pc.shape, pc.lay), dy = make(pc.dt, d, pc.shape, pc.lay);
      P y = make(pc.dt, d, pc.shape), dx = make(pc.dt, d, pc.shape);
      fill(*x, [&](int64_t e) { return e == pc.x_bad ? INFINITY : double((e * 7) % 11) - 3; });
      fill(*dy, [&](int64_t e) { return e == pc.dy_bad ? NAN : double((e * 5) % 9) * 0.25 - 1; });
      P buf = vec(DType::Float64, d, stats_buffer_size(C));
      P sums = vec(DType::Float64, d, backward_buffer_size(C));
      P sm = vec(DType::Float64, d, C), si = vec(DType::Float64, d, C),
        sc = vec(DType::Float64, d, 1);
      TestComm rec;  // one rank, takes device buffers on the stream; records what it is sent
      rec.K = 1, rec.device_ok = true, rec.ordered = true, rec.stream = kStream;
      std::vector<Vec> sent;
      rec.record = &sent;
      CollectiveKey key;
      key.layer = layer;
      void* stream = on_dev ? kStream : nullptr;
      batch_norm_stats(x->v, pc.axis, buf->v, stream, key);
      ForwardOptions fo;
      fo.axis = pc.axis, fo.stream = stream, fo.layer = layer;
      const double count =
          forward(x->v, nullptr, nullptr, nullptr, nullptr, fo, rec, y->v, sm->v, si->v, &sc->v);
      batch_norm_backward_reduce(dy->v, x->v, pc.axis, sm->v, si->v, sums->v, nullptr, nullptr,
                                 stream, key);
      BackwardOptions bo;
      bo.axis = pc.axis, bo.stream = stream, bo.layer = layer;
      bo.count = on_dev ? NAN : count;
      bo.count_view = on_dev ? &sc->v : nullptr;
      backward(dy->v, x->v, sm->v, si->v, nullptr, bo, rec, &dx->v, nullptr, nullptr);
      Vec all = buf->values();
      for (const Vec& v : sent) all.insert(all.end(), v.begin(), v.end());
      const Vec s = sums->values();
      all.insert(all.end(), s.begin(), s.end());
      return all;
    };
    Vec host;
    const bool child_ok = in_child([&] { return run(DeviceType::CPU); }, &host);
    EXPECT(child_ok, "the CPU path failed in the child process");
    Vec dev;
    try {
      dev = run(DeviceType::CUDA);
    } catch (const std::exception& e) {
      unexpected("device path", e);
    }
    const int nd = int(pc.shape.size()), ax = pc.axis < 0 ? pc.axis + nd : pc.axis;
    const int64_t C = pc.shape[size_t(ax)], L = stats_buffer_size(C);
    EXPECT(host.size() == size_t(4 * L) && dev.size() == host.size(),
           "buffers: device %zu values, CPU %zu, expected 4 x %ld", dev.size(), host.size(), L);
    if (!child_ok || dev.size() != host.size() || host.size() != size_t(4 * L)) continue;
    // all: [stats | forward sent | backward sent | backward_reduce sums]
    const char* names[] = {"batch_norm_stats", "forward's all-reduce", "backward's all-reduce",
                           "batch_norm_backward_reduce"};
    const int ops[] = {1, 1, 2, 2};
    for (int b = 0; b < 4; ++b) {
      const double* hb = &host[size_t(b * L)];
      const double* db = &dev[size_t(b * L)];
      int bad_slots = 0, bad_payload = 0;
      for (int64_t i = 2 * C; i < L; ++i) bad_slots += std::memcmp(hb + i, db + i, 8) != 0;
      for (int64_t i = 0; i < 2 * C; ++i) {
        const double h = hb[i], g = db[i];
        bad_payload += !((std::isnan(h) && std::isnan(g)) || h == g ||
                         std::fabs(h - g) <= 1e-12 * std::max(1.0, std::fabs(h)));
      }
      EXPECT(bad_slots == 0, "%s: %d of the count and fingerprint slots differ from the CPU path's",
             names[b], bad_slots);
      EXPECT(bad_payload == 0, "%s: %d payload values differ from the CPU path's", names[b],
             bad_payload);
      const bool nonfinite = pc.x_bad >= 0 || (ops[b] == 2 && pc.dy_bad >= 0);
      const double flag = db[2 * C + 1 + fp::kNonFinite];
      EXPECT(flag == (nonfinite ? 1.0 : 0.0), "%s: non-finite flag %g, inputs %s", names[b], flag,
             nonfinite ? "not finite" : "finite");
      EXPECT(db[2 * C + 1 + fp::kRanks] == 1 && db[2 * C + 1 + fp::kSum] == ops[b],
             "%s: ranks slot %g, operation %g", names[b], db[2 * C + 1 + fp::kRanks],
             db[2 * C + 1 + fp::kSum]);
    }
  }
}

// What a fake communicator does to the reduced buffer: the last of its K ranks disagrees
// (its fingerprint is another layer's, the previous call's, the other direction's), or the
// sum is broken (the ranks slot, the count, a non-finite sum although no rank's payload
// was, a backward count other than the forward's).
enum class CommFault {
  OtherLayer,
  Behind,
  OtherOp,
  Ranks,
  ZeroCount,
  FractionCount,
  NonFiniteSum,
  CountOff
};
struct CommFaultInfo {
  CommFault f;
  const char* name;
  bool mismatch;  // a fingerprint disagreement (else a broken sum)
  bool channel;   // one channel only (the device poisons that channel alone)
  bool forward;   // applies to the forward (CountOff: backward only)
};
static const CommFaultInfo kCommFaults[] = {
    {CommFault::OtherLayer, "another_layer", true, false, true},
    {CommFault::Behind, "a_call_behind", true, false, true},
    {CommFault::OtherOp, "other_direction", true, false, true},
    {CommFault::Ranks, "ranks_slot", false, false, true},
    {CommFault::ZeroCount, "count_0", false, false, true},
    {CommFault::FractionCount, "count_fraction", false, false, true},
    {CommFault::NonFiniteSum, "nonfinite_sum_flag_0", false, true, true},
    {CommFault::CountOff, "count_not_forwards", false, false, false},
};
constexpr int64_t kFaultChannel = 1;

static void set_fault(TestComm& comm, CommFault f, int op, int64_t C, const Vec& prev) {
  Vec other;
  if (f == CommFault::OtherLayer) other = cpu_slots(op, C, 777);
  if (f == CommFault::OtherOp) other = cpu_slots(3 - op, C, 778);
  if (f == CommFault::Behind) other.assign(prev.end() - kFingerprintSlots, prev.end());
  const int K = comm.K;
  comm.fault = [=](const Vec& sent, double* d, int64_t n) {
    double* s = d + 2 * C + 1;
    EXPECT(n == stats_buffer_size(C), "fault: a buffer of %ld values for C=%ld", n, C);
    switch (f) {
      case CommFault::OtherLayer:
      case CommFault::Behind:
      case CommFault::OtherOp:  // K - 1 ranks sent this rank's slots, one sent `other`
        for (int j = 0; j < kFingerprintSlots; ++j)
          s[j] = s[j] - sent[size_t(2 * C + 1 + j)] + other[size_t(j)];
        break;
      case CommFault::Ranks: s[fp::kRanks] += 1; break;
      case CommFault::ZeroCount: d[2 * C] = 0; break;
      case CommFault::FractionCount: d[2 * C] += 0.5; break;
      case CommFault::NonFiniteSum: d[kFaultChannel] = NAN; break;
      case CommFault::CountOff: d[2 * C] += K; break;
    }
  };
}

// Faults through forward() and backward() on a fake world of comm.K ranks.
// Stream-ordered (w.staging == Ordered, under emulated capture): nothing thrown, no host
// sync or copy; a forward gives NaN y, save_mean/save_invstd and save_count and leaves
// the running stats alone; a backward gives NaN dx (grad_weight/grad_bias are this rank's
// local sums, written as without the fault); a non-finite sum with a non-finite flag of 0
// poisons that channel alone (the others as without the fault). Checked on the host
// (host staging, or a device communicator that is not stream-ordered):
// CollectiveMismatchError for a disagreement (naming the layer and the direction),
// CommError for a broken sum (naming the communicator), and nothing written: y,
// save_mean/invstd/count, running stats, dx, grad_weight, grad_bias keep their sentinels.
static void test_comm_faults(World& w, TestComm& comm) {
  const Device dev{DeviceType::CUDA, 0};
  const int64_t C = 3;
  const std::vector<int64_t> shape = {4, C, 5};
  const bool ordered = w.staging == Staging::Ordered;
  P x = make(DType::Float32, dev, shape), dy = make(DType::Float32, dev, shape, strided(2));
  fill(*x, [](int64_t e) { return double((e * 7) % 11) - 3; });
  fill(*dy, [](int64_t e) { return double((e * 5) % 9) * 0.25 - 1; });
  P wt = vec(DType::Float32, dev, C), bs = vec(DType::Float32, dev, C);
  fill(*wt, [](int64_t k) { return 0.5 + 0.25 * double(k); });
  fill(*bs, [](int64_t k) { return 0.125 * double(k); });
  struct Outs {
    P y, sm, si, sc, rm, rv, dx, gw, gb;
  };
  auto fresh = [&] {
    Outs o;
    o.y = make(DType::Float32, dev, shape), o.dx = make(DType::Float32, dev, shape);
    o.sm = vec(DType::Float64, dev, C), o.si = vec(DType::Float64, dev, C, 2);
    o.sc = vec(DType::Float64, dev, 1);
    o.rm = vec(DType::Float16, dev, C), o.rv = vec(DType::Float32, dev, C);
    o.gw = vec(DType::Float32, dev, C), o.gb = vec(DType::Float64, dev, C);
    for (Arr* a :
         {o.y.get(), o.dx.get(), o.sm.get(), o.si.get(), o.sc.get(), o.gw.get(), o.gb.get()})
      fill(*a, [](int64_t) { return -777.0; });
    fill(*o.rm, [](int64_t k) { return 0.5 - 0.25 * double(k); });
    fill(*o.rv, [](int64_t k) { return 1.5 + double(k); });
    return o;
  };
  const char* layer_name = "net.block1.bn";
  ForwardOptions fo;
  fo.stream = kStream, fo.layer = 42, fo.layer_name = layer_name;
  auto fwd = [&](Outs& o) {
    forward(x->v, &wt->v, &bs->v, &o.rm->v, &o.rv->v, fo, comm, o.y->v, o.sm->v, o.si->v, &o.sc->v);
  };
  auto bwd = [&](const Outs& from, Outs& o) {
    BackwardOptions bo;
    bo.stream = kStream, bo.layer = 42, bo.layer_name = layer_name;
    bo.count = NAN;
    bo.count_view = &from.sc->v;
    backward(dy->v, x->v, from.sm->v, from.si->v, &wt->v, bo, comm, &o.dx->v, &o.gw->v, &o.gb->v);
  };
  // Without a fault, recording what this rank sends (the previous call, for Behind).
  const std::string base = w.name + "/comm_faults/";
  g_ctx = base + "clean";
  std::vector<Vec> sent;
  comm.fault = nullptr;
  comm.record = &sent;
  Outs clean = fresh();
  device_call(w, 0, "forward (no fault)", 1, true, [&] { fwd(clean); });
  device_call(w, 0, "backward (no fault)", 1, true, [&] { bwd(clean, clean); });
  comm.record = nullptr;
  EXPECT(sent.size() == 2, "%zu all-reduces recorded", sent.size());
  if (sent.size() != 2) return;
  EXPECT(std::isfinite(clean.y->get(0)) && clean.sc->get(0) == 20.0 * comm.K,
         "the clean forward: y[0] %g, count %g", clean.y->get(0), clean.sc->get(0));
  auto chan = [&](int64_t e) { return (e / 5) % C; };

  for (const CommFaultInfo& fi : kCommFaults) {
    // ---- forward -------------------------------------------------------------------------
    if (fi.forward) {
      g_ctx = base + "forward/" + fi.name;
      Outs o = fresh();
      set_fault(comm, fi.f, 1, C, sent[0]);
      if (ordered) {
        device_call(w, 0, "forward (fault)", 1, true, [&] { fwd(o); });
        int bad = 0;
        for (int64_t e = 0; e < o.y->numel(); ++e) {
          const bool poisoned = !fi.channel || chan(e) == kFaultChannel;
          bad +=
              poisoned ? !std::isnan(o.y->get(e)) : std::memcmp(o.y->at(e), clean.y->at(e), 4) != 0;
        }
        EXPECT(bad == 0, "y: %d elements not as expected (NaN where poisoned, else clean)", bad);
        for (int64_t k = 0; k < C; ++k) {
          const bool poisoned = !fi.channel || k == kFaultChannel;
          if (poisoned) {
            EXPECT(std::isnan(o.sm->get(k)) && std::isnan(o.si->get(k)),
                   "save_mean/invstd[%ld] %g %g, expected NaN", k, o.sm->get(k), o.si->get(k));
            EXPECT(o.rm->get(k) == 0.5 - 0.25 * double(k) && o.rv->get(k) == 1.5 + double(k),
                   "running stats[%ld] changed by a poisoned reduction", k);
          } else {
            EXPECT(o.sm->get(k) == clean.sm->get(k) && o.si->get(k) == clean.si->get(k) &&
                       o.rm->get(k) == clean.rm->get(k) && o.rv->get(k) == clean.rv->get(k),
                   "channel %ld differs from the clean forward", k);
          }
        }
        if (fi.channel)
          EXPECT(o.sc->get(0) == clean.sc->get(0), "save_count %g, clean %g", o.sc->get(0),
                 clean.sc->get(0));
        else
          EXPECT(std::isnan(o.sc->get(0)), "save_count %g, expected NaN", o.sc->get(0));
        check_gaps("y", *o.y);
        check_gaps("save_invstd", *o.si);
      } else {
        std::string msg;
        const Thrown t = throwing_call(w, "forward (fault)", [&] { fwd(o); }, &msg);
        const Thrown want = fi.mismatch ? Thrown::Mismatch : Thrown::Comm;
        EXPECT(t == want, "forward threw %s, expected %s: %s", thrown_name(t), thrown_name(want),
               msg.c_str());
        if (fi.mismatch)
          EXPECT(msg.find(layer_name) != std::string::npos &&
                     msg.find("forward statistics") != std::string::npos,
                 "the message does not name the layer and the direction: %s", msg.c_str());
        else
          EXPECT(msg.find(comm.name) != std::string::npos,
                 "the message does not name the communicator: %s", msg.c_str());
        for (const P* a : {&o.y, &o.sm, &o.si, &o.sc, &o.rm, &o.rv})
          check_untouched("an output of a forward that threw", **a);
      }
    }
    // ---- backward (after the clean forward) -------------------------------------------------
    g_ctx = base + "backward/" + fi.name;
    Outs o = fresh();
    set_fault(comm, fi.f, 2, C, sent[1]);
    if (ordered) {
      device_call(w, 0, "backward (fault)", 1, true, [&] { bwd(clean, o); });
      int bad = 0;
      for (int64_t e = 0; e < o.dx->numel(); ++e) {
        const bool poisoned = !fi.channel || chan(e) == kFaultChannel;
        bad += poisoned ? !std::isnan(o.dx->get(e))
                        : std::memcmp(o.dx->at(e), clean.dx->at(e), 4) != 0;
      }
      EXPECT(bad == 0, "dx: %d elements not as expected (NaN where poisoned, else clean)", bad);
      check_same_bits("grad_weight (local) vs the clean backward", *o.gw, *clean.gw);
      check_same_bits("grad_bias (local) vs the clean backward", *o.gb, *clean.gb);
    } else {
      std::string msg;
      const Thrown t = throwing_call(w, "backward (fault)", [&] { bwd(clean, o); }, &msg);
      const Thrown want = fi.mismatch ? Thrown::Mismatch : Thrown::Comm;
      EXPECT(t == want, "backward threw %s, expected %s: %s", thrown_name(t), thrown_name(want),
             msg.c_str());
      if (fi.mismatch)
        EXPECT(msg.find(layer_name) != std::string::npos &&
                   msg.find("backward sums") != std::string::npos,
               "the message does not name the layer and the direction: %s", msg.c_str());
      for (const P* a : {&o.dx, &o.gw, &o.gb})
        check_untouched("an output of a backward that threw", **a);
    }
  }
  comm.fault = nullptr;
  if (!ordered) return;
  // A poisoned forward (NaN save_count) makes the next backward NaN, with a clean comm.
  g_ctx = base + "backward_after_a_poisoned_forward";
  Outs p = fresh(), o = fresh();
  set_fault(comm, CommFault::OtherLayer, 1, C, sent[0]);
  device_call(w, 0, "forward (fault)", 1, true, [&] { fwd(p); });
  comm.fault = nullptr;
  device_call(w, 0, "backward", 1, true, [&] { bwd(p, o); });
  int finite = 0;
  for (int64_t e = 0; e < o.dx->numel(); ++e) finite += !std::isnan(o.dx->get(e));
  EXPECT(finite == 0, "dx: %d elements not NaN after a poisoned forward", finite);
}

// Torch parity for non-finite inputs, device and CPU alike: a channel of all +inf gives a
// running_mean of +inf (the shift of a non-finite first element is 0, so no inf - inf),
// the other channels as without it; in eval, an inf or NaN in x stays out of every dx
// (dx = dy * invstd * w does not read x).
static void test_nonfinite_parity(World& w) {
  const Device dev{DeviceType::CUDA, 0}, cpu{DeviceType::CPU, 0};
  const int64_t C = 3;
  const std::vector<int64_t> shape = {4, C, 5};
  g_ctx = w.name + "/inf_channel_running_mean";
  for (bool with_inf : {true, false}) {
    P x = make(DType::Float32, dev, shape, channels_last(3)), y = make(DType::Float32, dev, shape);
    fill(*x, [&](int64_t e) {
      return with_inf && (e / 5) % C == 1 ? INFINITY : double((e * 7) % 11) - 3;
    });
    P rm = vec(DType::Float32, dev, C), rv = vec(DType::Float32, dev, C);
    fill(*rm, [](int64_t k) { return 0.25 * double(k); });
    fill(*rv, [](int64_t) { return 1.0; });
    P sm = vec(DType::Float64, dev, C), si = vec(DType::Float64, dev, C),
      sc = vec(DType::Float64, dev, 1);
    P x_c = twin(*x, cpu), y_c = make(DType::Float32, cpu, shape), rm_c = twin(*rm, cpu),
      rv_c = twin(*rv, cpu), sm_c = vec(DType::Float64, cpu, C), si_c = vec(DType::Float64, cpu, C);
    ForwardOptions fo;
    fo.stream = kStream;
    device_call(w, 0, "forward (a channel of +inf)", 1, true, [&] {
      forward(x->v, nullptr, nullptr, &rm->v, &rv->v, fo, *w.comm, y->v, sm->v, si->v, &sc->v);
    });
    try {
      forward(x_c->v, nullptr, nullptr, &rm_c->v, &rv_c->v, fo, *w.comm, y_c->v, sm_c->v, si_c->v,
              nullptr);
    } catch (const std::exception& e) {
      unexpected("CPU forward (a channel of +inf)", e);
    }
    for (const Arr* r : {rm.get(), rm_c.get()}) {
      const char* path = r == rm.get() ? "device" : "CPU";
      if (with_inf) {
        EXPECT(r->get(1) == INFINITY, "%s running_mean[1] %g for a channel of +inf", path,
               r->get(1));
      }
      EXPECT(std::isfinite(r->get(0)) && std::isfinite(r->get(2)), "%s running_mean %g %g", path,
             r->get(0), r->get(2));
    }
    EXPECT(sc->get(0) == 20, "save_count %g", sc->get(0));
    int bad = 0;
    for (int64_t e = 0; e < y->numel(); ++e)
      if ((e / 5) % C != 1 || !with_inf)
        bad += !std::isfinite(y->get(e)) || std::fabs(y->get(e) - y_c->get(e)) > 1e-5;
    EXPECT(bad == 0, "y of the finite channels: %d elements non-finite or not the CPU's", bad);
    EXPECT(rm->get(0) == rm_c->get(0) && rm->get(2) == rm_c->get(2),
           "running_mean of the finite channels differs from the CPU's");
  }
  g_ctx = w.name + "/eval_backward_nonfinite_x";
  for (const Lay& lay : {Lay{}, strided(2)}) {
    P x = make(DType::Float32, dev, shape, lay), dy = make(DType::Float32, dev, shape);
    P dx = make(DType::Float32, dev, shape);
    fill(*x, [](int64_t e) {
      return e == 3 ? INFINITY : e == 11 ? NAN : e == 12 ? -INFINITY : 1.0;
    });
    fill(*dy, [](int64_t e) { return double((e * 5) % 9) * 0.25 - 1; });
    P sm = vec(DType::Float64, dev, C), si = vec(DType::Float64, dev, C),
      wt = vec(DType::Float32, dev, C);
    fill(*sm, [](int64_t k) { return 0.5 * double(k); });
    fill(*si, [](int64_t k) { return 1.0 + double(k); });
    fill(*wt, [](int64_t k) { return 2.0 - double(k); });
    BackwardOptions bo;
    bo.training = false, bo.stream = kStream;
    device_call(w, 0, "backward (eval, inf/NaN in x)", 0, true, [&] {
      backward(dy->v, x->v, sm->v, si->v, &wt->v, bo, *w.comm, &dx->v, nullptr, nullptr);
    });
    P x_c = twin(*x, cpu), dy_c = twin(*dy, cpu), sm_c = twin(*sm, cpu), si_c = twin(*si, cpu),
      wt_c = twin(*wt, cpu), dx_c = make(DType::Float32, cpu, shape);
    try {
      backward(dy_c->v, x_c->v, sm_c->v, si_c->v, &wt_c->v, bo, *w.comm, &dx_c->v, nullptr,
               nullptr);
    } catch (const std::exception& e) {
      unexpected("CPU backward (eval, inf/NaN in x)", e);
    }
    Vec ref = zeros(dx->numel());
    for (int64_t e = 0; e < dx->numel(); ++e) {
      const int64_t k = (e / 5) % C;
      ref[size_t(e)] = dy->get(e) * (1.0 + double(k)) * (2.0 - double(k));
    }
    check_vals("dx (eval, inf/NaN in x)", *dx, ref, 1e-6);
    check_vals("CPU dx (eval, inf/NaN in x)", *dx_c, ref, 1e-6);
    check_untouched("x", *x);
  }
}

// Under MPI: a real disagreement between ranks (rank 1 runs another layer; rank 1 has the
// channels on another axis with the same C; rank 1's backward is another layer's) gives
// CollectiveMismatchError on EVERY rank, nothing written, and the ranks go on in lockstep:
// the next agreeing calls pass (none is left waiting in a collective).
static void test_mpi_disagreement(World& w) {
  const Device dev{DeviceType::CUDA, 0};
  const int64_t C = 3;
  const bool odd = g_rank == 1;
  auto all_ranks = [](bool mine) {
    int v = mine ? 1 : 0, all = 0;
    MPI_Allreduce(&v, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    return all == 1;
  };
  struct Step {
    const char* name;
    int64_t layer;  // rank 1: layer + 1 when `layer_differs`
    bool layer_differs, axis_differs;
  };
  const Step steps[] = {{"another_layer", 3000, true, false}, {"another_axis", 3002, false, true}};
  for (const Step& st_ : steps) {
    g_ctx = w.name + "/disagree_forward/" + st_.name;
    const bool last = odd && st_.axis_differs;
    const std::vector<int64_t> shape =
        last ? std::vector<int64_t>{4, 5, C} : std::vector<int64_t>{4, C, 5};
    P x = make(DType::Float32, dev, shape), y = make(DType::Float32, dev, shape);
    fill(*x, [](int64_t e) { return double(e % 7); });
    fill(*y, [](int64_t) { return -777.0; });
    P sm = vec(DType::Float64, dev, C), si = vec(DType::Float64, dev, C),
      sc = vec(DType::Float64, dev, 1);
    P rm = vec(DType::Float32, dev, C), rv = vec(DType::Float32, dev, C);
    for (Arr* a : {sm.get(), si.get(), sc.get(), rm.get(), rv.get()})
      fill(*a, [](int64_t) { return -777.0; });
    ForwardOptions fo;
    fo.stream = kStream, fo.axis = last ? -1 : 1;
    fo.layer = st_.layer + (odd && st_.layer_differs ? 1 : 0);
    fo.layer_name = "model.bn";
    std::string msg;
    const Thrown t = throwing_call(
        w, "forward (ranks disagree)",
        [&] {
          forward(x->v, nullptr, nullptr, &rm->v, &rv->v, fo, *w.comm, y->v, sm->v, si->v, &sc->v);
        },
        &msg);
    EXPECT(t == Thrown::Mismatch, "threw %s, expected CollectiveMismatchError: %s", thrown_name(t),
           msg.c_str());
    EXPECT(msg.find("model.bn") != std::string::npos, "message: %s", msg.c_str());
    EXPECT(all_ranks(t == Thrown::Mismatch), "not every rank raised CollectiveMismatchError");
    for (const P* a : {&y, &sm, &si, &sc, &rm, &rv}) check_untouched("an output (mismatch)", **a);
  }
  // Agreeing calls go on: a forward of a fresh layer, then a backward disagreeing on the
  // layer, then an agreeing backward.
  g_ctx = w.name + "/disagree_then_agree";
  const std::vector<int64_t> shape = {4, C, 5};
  P x = make(DType::Float32, dev, shape), y = make(DType::Float32, dev, shape),
    dy = make(DType::Float32, dev, shape);
  fill(*x, [](int64_t e) { return double(e % 7) + g_rank; });
  fill(*dy, [](int64_t e) { return double(e % 3) - 1; });
  P sm = vec(DType::Float64, dev, C), si = vec(DType::Float64, dev, C),
    sc = vec(DType::Float64, dev, 1);
  ForwardOptions fo;
  fo.stream = kStream, fo.layer = 3004;
  const bool fwd_ok = device_call(w, 0, "forward (agreeing, after a mismatch)", 1, true, [&] {
    forward(x->v, nullptr, nullptr, nullptr, nullptr, fo, *w.comm, y->v, sm->v, si->v, &sc->v);
  });
  EXPECT(sc->get(0) == 20.0 * g_size, "save_count %g, expected %d", sc->get(0), 20 * g_size);
  EXPECT(all_ranks(fwd_ok), "the agreeing forward failed on some rank");
  P dx = make(DType::Float32, dev, shape), gw = vec(DType::Float32, dev, C),
    gb = vec(DType::Float32, dev, C);
  for (Arr* a : {dx.get(), gw.get(), gb.get()}) fill(*a, [](int64_t) { return -777.0; });
  BackwardOptions bo;
  bo.stream = kStream, bo.count = NAN, bo.count_view = &sc->v;
  bo.layer = odd ? 3005 : 3004;
  std::string msg;
  const Thrown t = throwing_call(
      w, "backward (ranks disagree)",
      [&] { backward(dy->v, x->v, sm->v, si->v, nullptr, bo, *w.comm, &dx->v, &gw->v, &gb->v); },
      &msg);
  EXPECT(t == Thrown::Mismatch && msg.find("backward sums") != std::string::npos,
         "backward threw %s: %s", thrown_name(t), msg.c_str());
  EXPECT(all_ranks(t == Thrown::Mismatch),
         "not every rank raised CollectiveMismatchError (backward)");
  for (const P* a : {&dx, &gw, &gb}) check_untouched("an output (backward mismatch)", **a);
  bo.layer = 3006;  // a layer no rank has run a backward of
  const bool bwd_ok = device_call(w, 0, "backward (agreeing, after a mismatch)", 1, true, [&] {
    backward(dy->v, x->v, sm->v, si->v, nullptr, bo, *w.comm, &dx->v, &gw->v, &gb->v);
  });
  int finite = 0;
  for (int64_t e = 0; e < dx->numel(); ++e)
    finite += std::isfinite(dx->get(e)) && dx->get(e) != -777;
  EXPECT(finite == dx->numel(), "dx: %d of %ld elements written and finite", finite, dx->numel());
  EXPECT(all_ranks(bwd_ok && finite == dx->numel()), "the agreeing backward failed on some rank");
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
    // Faults, each through a stream-ordered, a device-but-unordered and a host-only world.
    for (World* w : {&wn, &wa, &wh}) test_comm_faults(*w, *w->probe);
    test_nonfinite_parity(wl);
    test_fingerprint_parity();
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
      test_mpi_disagreement(wm);
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
