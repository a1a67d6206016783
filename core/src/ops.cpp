// Orchestration of the primitives: validation (all of it before any output is written
// or any collective runs), layout packing, dispatch to the CPU kernels, communication.
#include "syncbn/ops.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <utility>
#include <vector>

#include "collective.h"
#include "cpu/kernels.h"
#include "dispatch.h"
#include "layout.h"
#include "syncbn/device_backend.h"
#include "syncbn/errors.h"
#include "syncbn/math.h"

namespace syncbn {
namespace {

// Per-channel temporaries. Vec(n) leaves its doubles uninitialized (each is written
// before it is read; Vec(n, v) still fills): zeroing the ~20 of a fwd+bwd was the largest
// host cost besides the kernels at C = 512.
template <class T>
struct UninitAllocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = UninitAllocator<U>;
  };
  UninitAllocator() = default;
  template <class U>
  UninitAllocator(const UninitAllocator<U>&) noexcept {}
  template <class U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... A>
  void construct(U* p, A&&... a) {
    ::new (static_cast<void*>(p)) U(std::forward<A>(a)...);
  }
};
using Vec = std::vector<double, UninitAllocator<double>>;

// ---- validation --------------------------------------------------------------------

int check_input(const TensorView& x, const char* name, int axis) {
  if (x.ndim < 2)
    fail(name, ": expected at least 2 dimensions (N, C, ...), got shape ", x.shape_str());
  if (axis < -x.ndim || axis >= x.ndim)
    fail("axis: expected an integer in [", -x.ndim, ", ", x.ndim, ") for ", name, " of shape ",
         x.shape_str(), ", got ", axis);
  if (x.device.type != DeviceType::CPU && !device_backend(x.device.type))
    fail(name,
         ": expected a CPU array (no CUDA backend is loaded: syncbn.build_info()['cuda'] "
         "says whether this build has one), got ",
         device_name(x.device));
  return axis < 0 ? axis + x.ndim : axis;
}

// The registered backend when `d` is a device, else null (host path).
const DeviceBackend* on_device(Device d) {
  return d.type == DeviceType::CPU ? nullptr : device_backend(d.type);
}

const TensorView& require_count_view(const TensorView* v, const char* name, Device dev) {
  if (!v)
    fail(name, ": expected a float64 (1,) array on ", device_name(dev),
         " (device results stay on the device), got None");
  return *v;
}

void check_like(const TensorView& t, const char* name, const TensorView& x, const char* xname,
                bool writable) {
  if (t.ndim != x.ndim || !std::equal(t.shape, t.shape + t.ndim, x.shape))
    fail(name, ": expected shape ", x.shape_str(), " (the shape of ", xname, "), got ",
         t.shape_str());
  if (t.dtype != x.dtype)
    fail<TypeError>(name, ": expected dtype ", dtype_name(x.dtype), " (the dtype of ", xname,
                    "), got ", dtype_name(t.dtype));
  if (t.device != x.device)
    fail(name, ": expected device ", device_name(x.device), " (the device of ", xname, "), got ",
         device_name(t.device));
  if (writable && t.read_only) fail(name, ": expected a writable array, got a read-only one");
}

void check_vec(const TensorView* t, const char* name, int64_t C, Device dev, bool writable,
               const char* what = "the channel count of x") {
  if (!t) return;
  if (t->ndim != 1 || t->shape[0] != C)
    fail(name, ": expected shape (", C, ",) (", what, "), got ", t->shape_str());
  if (t->device != dev)
    fail(name, ": expected device ", device_name(dev), " (the device of x), got ",
         device_name(t->device));
  if (writable && t->read_only) fail(name, ": expected a writable array, got a read-only one");
}

void check_f64(const TensorView& t, const char* name, int64_t n, Device dev, bool writable,
               const char* what) {
  check_vec(&t, name, n, dev, writable, what);
  if (t.dtype != DType::Float64)
    fail<TypeError>(name, ": expected dtype float64, got ", dtype_name(t.dtype));
}

void check_scalar(double v, const char* name, bool unit_interval) {
  if (!std::isfinite(v) || v < 0 || (unit_interval && v > 1))
    fail(name, ": expected a finite number", unit_interval ? " in [0, 1]" : " >= 0", ", got ", v);
}

void check_finite(double v, const char* name) {
  if (!std::isfinite(v)) fail(name, ": expected a finite number, got ", v);
}

int64_t count_per_channel(const TensorView& x, int axis) {
  const int64_t C = x.shape[axis];
  return C > 0 ? x.numel() / C : 0;
}

// ForwardOptions::mask: x's shape (a count per channel: returns true), or x's shape with
// extent 1 at the channel axis (one count for every channel); floating, on the CPU.
bool check_mask(const TensorView* mask, const TensorView& x, int axis) {
  if (!mask) return false;
  bool ok = mask->ndim == x.ndim;
  for (int d = 0; ok && d < x.ndim; ++d)
    ok = mask->shape[d] == x.shape[d] || (d == axis && mask->shape[d] == 1);
  if (!ok) {
    TensorView want = x;
    want.shape[axis] = 1;
    fail("mask: expected shape ", x.shape_str(), " (the shape of x) or ", want.shape_str(),
         " (1 at the channel axis: one value per position for every channel), got ",
         mask->shape_str());
  }
  if (mask->device.type != DeviceType::CPU || x.device.type != DeviceType::CPU)
    fail(
        "mask: masked statistics run on CPU arrays only (no device kernels for them yet), got "
        "x on ",
        device_name(x.device), " and mask on ", device_name(mask->device));
  return mask->shape[axis] != 1;
}

// A mask with the channel axis: the per-channel global counts (ForwardOptions::counts).
void check_counts(const TensorView* counts, int64_t C, bool writable) {
  if (!counts)
    fail("counts: expected a float64 (", C,
         ",) array for the per-channel counts of a mask with the channel axis, got None");
  check_f64(*counts, "counts", C, Device{}, writable, "the channel count of x");
}

// The number of positions where the mask is nonzero.
int64_t mask_count(const TensorView& mask) {
  const int64_t n = mask.numel();
  std::vector<char> dense(size_t(n) * size_t(dtype_size(mask.dtype)));
  TensorView d = contiguous_view(dense.data(), mask.dtype, Device{}, mask.ndim, mask.shape);
  copy_strided(mask, d);
  int64_t m = 0;
  SYNCBN_DISPATCH_FLOATING(mask.dtype, T, {
    const T* p = static_cast<const T*>(d.data);
    for (int64_t j = 0; j < n; ++j) m += load<double>(p + j) != 0;
  });
  return m;
}

// ---- per-channel vectors (CPU) ------------------------------------------------------

Vec read_vec(const TensorView& t) {
  Vec v(static_cast<size_t>(t.shape[0]));
  SYNCBN_DISPATCH_FLOATING(t.dtype, T, {
    const T* p = static_cast<const T*>(t.data);
    for (int64_t i = 0; i < t.shape[0]; ++i) v[size_t(i)] = load<double>(p + i * t.strides[0]);
  });
  return v;
}

Vec read_vec_or(const TensorView* t, int64_t C, double fill) {
  return t ? read_vec(*t) : Vec(size_t(C), fill);
}

void write_vec(const TensorView& t, const double* v) {
  SYNCBN_DISPATCH_FLOATING(t.dtype, T, {
    T* p = static_cast<T*>(t.data);
    for (int64_t i = 0; i < t.shape[0]; ++i) store<double>(p + i * t.strides[0], v[i]);
  });
}

// ---- layout -------------------------------------------------------------------------

// Host scratch for Layout: heap blocks freed with the op.
struct HostMemory {
  std::vector<std::unique_ptr<char[]>> blocks;
  void* bytes(size_t n) {
    blocks.emplace_back(new char[n ? n : 1]);
    return blocks.back().get();
  }
  void copy(const TensorView& src, const TensorView& dst) { copy_strided(src, dst); }
};
using HostLayout = Layout<HostMemory>;

// The mask broadcast over x's channels, one uint8 (1: counted) per element of x in the
// layout's dense traversal.
std::vector<uint8_t> dense_mask(const TensorView& mask, const TensorView& x, int axis,
                                HostLayout& lay) {
  TensorView b = mask;
  if (b.shape[axis] == 1) {
    b.shape[axis] = x.shape[axis];
    b.strides[axis] = 0;
  }
  const void* p = lay.input(b);
  std::vector<uint8_t> m(size_t(x.numel()));
  SYNCBN_DISPATCH_FLOATING(mask.dtype, T, {
    const T* q = static_cast<const T*>(p);
    for (size_t j = 0; j < m.size(); ++j) m[j] = load<double>(q + j) != 0;
  });
  return m;
}

// ---- unchecked building blocks -------------------------------------------------------

// Local packed moments [P1 | P2 | n] of x (the first 2C+1 doubles of a host buffer). With
// a mask, of the elements it counts: n is the number of counted positions, or with a
// per-channel mask the number of counted elements, whose per-channel counts go behind
// the fingerprint (buf[stats_buffer_size(C) + c]). Masked-out elements are replaced by
// the channel's shift, so they add exactly 0 to the shifted sums (NaN included).
void local_stats(const TensorView& x, int axis, double* buf, const TensorView* mask = nullptr,
                 bool per_channel = false) {
  const int64_t C = x.shape[axis];
  const int64_t n = count_per_channel(x, axis);
  // t1, t2: the kernel's sums (zero when there is nothing to sum).
  Vec t1(static_cast<size_t>(C)), t2(static_cast<size_t>(C)), shift(static_cast<size_t>(C), 0.0),
      nc(static_cast<size_t>(C), static_cast<double>(n));
  if (n == 0) std::fill(t1.begin(), t1.end(), 0.0), std::fill(t2.begin(), t2.end(), 0.0);
  if (n > 0) {
    HostLayout lay(x, axis);
    const Geometry& g = lay.geometry();
    const void* xp = lay.input(x);
    std::vector<int64_t> first;  // with a mask: each channel's first counted element
    std::vector<char> selected;
    std::vector<uint8_t> m;
    if (mask) {
      first.resize(size_t(C));
      m = dense_mask(*mask, x, axis, lay);
      // A mask of positions is the same for every channel: count channel 0's elements.
      for (int64_t c = 0; c < (per_channel ? C : std::min<int64_t>(C, 1)); ++c) {
        int64_t k = 0, f = -1;
        for (int64_t o = 0; o < g.outer; ++o) {
          const uint8_t* r = m.data() + (o * C + c) * g.inner;
          int64_t ko = 0;
          for (int64_t i = 0; i < g.inner; ++i) ko += r[i];  // no branch: masks are data
          if (f < 0 && ko > 0) f = (o * C + c) * g.inner + (std::find(r, r + g.inner, 1) - r);
          k += ko;
        }
        nc[size_t(c)] = double(k);
        first[size_t(c)] = f < 0 ? 0 : f;
      }
      if (!per_channel)
        for (int64_t c = 1; c < C; ++c) {
          nc[size_t(c)] = nc[0];
          first[size_t(c)] = first[0] + c * g.inner;
        }
    }
    SYNCBN_DISPATCH_FLOATING(x.dtype, T, {
      const T* p = static_cast<const T*>(xp);
      if (!mask)  // every channel counts its first element, c * inner
        for (int64_t c = 0; c < C; ++c)
          shift[size_t(c)] = moment_shift(load<double>(p + c * g.inner));
      else
        for (int64_t c = 0; c < C; ++c)
          if (nc[size_t(c)] > 0)
            shift[size_t(c)] = moment_shift(load<double>(p + first[size_t(c)]));
    });
    if (mask) {
      selected.resize(size_t(x.numel()) * size_t(dtype_size(x.dtype)));
      cpu::select_masked(xp, m.data(), selected.data(), x.dtype, g, shift.data());
      xp = selected.data();
    }
    cpu::batch_norm_stats(xp, x.dtype, g, shift.data(), t1.data(), t2.data());
  }
  if (!per_channel) {  // one count for every channel
    const double k = C > 0 ? nc[0] : 0.0;
    for (int64_t c = 0; c < C; ++c)
      pack_local_moments(k, shift[size_t(c)], t1[size_t(c)], t2[size_t(c)], &buf[c], &buf[C + c]);
    buf[2 * C] = k;
    return;
  }
  double total = 0;
  for (int64_t c = 0; c < C; ++c) {
    pack_local_moments(nc[size_t(c)], shift[size_t(c)], t1[size_t(c)], t2[size_t(c)], &buf[c],
                       &buf[C + c]);
    total += nc[size_t(c)];
    buf[stats_buffer_size(C) + c] = nc[size_t(c)];
  }
  buf[2 * C] = total;
}

// The reduced per-channel counts behind a per-channel mask's buffer: whole numbers, at
// least this rank's, summing to the reduced total.
void check_reduced_counts(const double* buf, int64_t C, const double* local,
                          const Communicator& comm) {
  const double* k = buf + stats_buffer_size(C);
  double total = 0;
  for (int64_t c = 0; c < C; ++c) {
    if (!(k[c] >= local[c] && k[c] <= 9007199254740992.0 && k[c] == std::floor(k[c])))
      fail<CommError>("syncbn: ", comm.kind(), " all-reduce returned a count of ", k[c],
                      " for channel ", c, " (this rank counted ", local[c],
                      "): the communicator must sum the buffer across all ranks");
    total += k[c];
  }
  if (total != buf[2 * C])
    fail<CommError>("syncbn: ", comm.kind(), " all-reduce returned per-channel counts summing to ",
                    total, " and a total of ", buf[2 * C],
                    ": the ranks' buffers differ in layout "
                    "(a mask with the channel axis on some ranks only?)");
}

// Global statistics from a reduced buffer; updates running stats. Returns the count.
// `counts`: per-channel global counts (a mask with the channel axis), else buf[2C] for
// every channel. A channel with a count of 0 (masked out everywhere) normalizes with mean
// 0 and variance 0 and keeps its running statistics.
double gather(const double* buf, int64_t C, double momentum, double eps, bool unbiased,
              const TensorView* running_mean, const TensorView* running_var, double* mean,
              double* invstd, double* var_b, const double* counts = nullptr) {
  const double N = C > 0 ? buf[2 * C] : 0.0;
  if (N == 0) return 0;
  for (int64_t c = 0; c < (counts ? C : 1); ++c)
    if ((counts ? counts[c] : N) == 1)
      fail(
          "x: expected more than 1 value per channel when training, got a global batch of 1 "
          "value",
          counts ? detail::cat(" in channel ", c, " (counted by the mask)") : " per channel",
          " (all ranks together)");
  Vec m2(static_cast<size_t>(C));
  if (!counts) {  // one count for all: a branch-free loop (it vectorizes)
    for (int64_t c = 0; c < C; ++c) {
      const GlobalMoments gm = finalize_moments(buf[c], buf[C + c], N);
      mean[c] = gm.mean;
      invstd[c] = invstd_of(gm.var_biased, eps);
      m2[size_t(c)] = gm.m2;
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const double n = counts[c];
      const GlobalMoments gm = n > 0 ? finalize_moments(buf[c], buf[C + c], n) : GlobalMoments{};
      mean[c] = gm.mean;
      invstd[c] = invstd_of(gm.var_biased, eps);
      m2[size_t(c)] = gm.m2;
    }
  }
  if (var_b)
    for (int64_t c = 0; c < C; ++c) {
      const double n = counts ? counts[c] : N;
      var_b[c] = n > 0 ? m2[size_t(c)] / n : 0.0;
    }
  // In place, element by element (the running statistics may be float32 or strided).
  auto update = [&](const TensorView* t, auto batch_value) {
    if (!t) return;
    SYNCBN_DISPATCH_FLOATING(t->dtype, T, {
      T* p = static_cast<T*>(t->data);
      const int64_t s = t->strides[0];
      for (int64_t c = 0; c < C; ++c)
        if (!counts || counts[c] > 0)
          store<double>(p + c * s,
                        (1 - momentum) * load<double>(p + c * s) + momentum * batch_value(c));
    });
  };
  update(running_mean, [&](int64_t c) { return mean[c]; });
  update(running_var, [&](int64_t c) {
    const double n = counts ? counts[c] : N;
    return m2[size_t(c)] / (unbiased ? n - 1 : n);
  });
  return N;
}

void elemt(const TensorView& x, int axis, const double* mean, const double* invstd,
           const double* weight, const double* bias, const TensorView& y) {
  const int64_t C = x.shape[axis];
  if (x.numel() == 0) return;
  Vec scale(static_cast<size_t>(C)), b(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) {
    scale[size_t(c)] = invstd[c] * (weight ? weight[c] : 1.0);
    b[size_t(c)] = bias ? bias[c] : 0.0;
  }
  HostLayout lay(x, axis);
  const void* xp = lay.input(x);
  void* yp = lay.output(y);
  cpu::batch_norm_elemt(xp, yp, x.dtype, lay.geometry(), mean, scale.data(), b.data());
  lay.finish();
}

void backward_reduce(const TensorView& dy, const TensorView& x, int axis, const double* mean,
                     double* sum_dy, double* sum_dy_xmu) {
  const int64_t C = x.shape[axis];
  if (x.numel() == 0) {
    std::fill(sum_dy, sum_dy + C, 0.0);
    std::fill(sum_dy_xmu, sum_dy_xmu + C, 0.0);
    return;
  }
  HostLayout lay(x, axis);
  const void* xp = lay.input(x);
  const void* dyp = lay.input(dy);
  cpu::batch_norm_backward_reduce(dyp, xp, x.dtype, lay.geometry(), mean, sum_dy, sum_dy_xmu);
}

// dx from the global sums; count is the global count per channel. Without sums (eval:
// mean and invstd were constants) dx = dy * invstd * weight, x unread, so a NaN or inf
// in x stays in its own element's gradient (as in torch).
// With a mask (and sums): the masked-out elements' gradient is dy * invstd * weight (the
// statistics do not depend on them).
void backward_elemt(const TensorView& dy, const TensorView& x, int axis, const double* mean,
                    const double* invstd, const double* weight, const double* sums, double count,
                    const TensorView& dx, const TensorView* mask = nullptr,
                    const double* counts = nullptr) {
  const int64_t C = x.shape[axis];
  if (x.numel() == 0) return;
  Vec mdy(static_cast<size_t>(C)), k(static_cast<size_t>(C)), gain(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) {
    const double n = counts ? counts[c] : count;
    // n = 0: a channel masked out everywhere had constant statistics.
    const bool with = sums && n > 0;
    mdy[size_t(c)] = with ? sums[c] / n : 0.0;
    k[size_t(c)] = with ? invstd[c] * invstd[c] * (sums[C + c] / n) : 0.0;
    gain[size_t(c)] = invstd[c] * (weight ? weight[c] : 1.0);
  }
  HostLayout lay(x, axis);
  if (!sums) {
    const void* dyp = lay.input(dy);
    void* dxp = lay.output(dx);
    cpu::batch_norm_elemt(dyp, dxp, x.dtype, lay.geometry(), mdy.data(), gain.data(), k.data());
    lay.finish();
    return;
  }
  const void* xp = lay.input(x);
  const void* dyp = lay.input(dy);
  void* dxp = lay.output(dx);
  cpu::batch_norm_backward_elemt(dyp, xp, dxp, x.dtype, lay.geometry(), mean, mdy.data(), k.data(),
                                 gain.data());
  if (mask) {
    const std::vector<uint8_t> m = dense_mask(*mask, x, axis, lay);
    cpu::scale_masked_out(dyp, m.data(), dxp, x.dtype, lay.geometry(), gain.data());
  }
  lay.finish();
}

const double* ptr_or_null(const Vec& v, const TensorView* t) {
  return t ? v.data() : nullptr;
}

}  // namespace

// ---- primitives ---------------------------------------------------------------------

void batch_norm_stats(const TensorView& x, int axis, const TensorView& buffer, void* stream,
                      const CollectiveKey& key) {
  axis = check_input(x, "x", axis);
  const int64_t C = x.shape[axis];
  check_f64(buffer, "buffer", stats_buffer_size(C), x.device, true, "stats_buffer_size(channels)");
  const Fingerprint f = next_fingerprint(CollectiveOp::Forward, C, axis, key, nullptr);
  if (auto* b = on_device(x.device)) return b->batch_norm_stats(x, axis, buffer, f, stream);
  Vec buf(static_cast<size_t>(stats_buffer_size(C)));
  local_stats(x, axis, buf.data());
  write_fingerprint(f, buf.data());
  write_vec(buffer, buf.data());
}

void allreduce(const TensorView& buffer, Communicator& comm, void* stream) {
  if (buffer.ndim != 1 || buffer.dtype != DType::Float64)
    fail<TypeError>("buffer: expected a 1-D float64 array, got ", dtype_name(buffer.dtype),
                    " of shape ", buffer.shape_str());
  if (buffer.read_only) fail("buffer: expected a writable array, got a read-only one");
  if (buffer.shape[0] > 1 && buffer.strides[0] != 1)
    fail("buffer: expected a contiguous array, got stride ", buffer.strides[0]);
  if (buffer.device.type != DeviceType::CPU && !device_backend(buffer.device.type))
    fail("buffer: expected a CPU array (no CUDA backend is loaded), got ",
         device_name(buffer.device));
  if (auto* b = on_device(buffer.device)) return b->allreduce(buffer, comm, stream);
  comm.allreduce_sum(static_cast<double*>(buffer.data), buffer.shape[0], buffer.device, stream);
}

double allreduce_checked(const TensorView& buffer, bool backward, int axis, Communicator& comm,
                         const CollectiveKey& key) {
  const int64_t extra = stats_buffer_size(0);
  if (buffer.ndim != 1 || buffer.shape[0] < extra || (buffer.shape[0] - extra) % 2 != 0)
    fail("buffer: expected a 1-D buffer of 2 * P + ", extra,
         " values (payload, count, fingerprint), got shape ", buffer.shape_str());
  const int64_t P = (buffer.shape[0] - extra) / 2;
  check_f64(buffer, "buffer", stats_buffer_size(P), Device{}, true, "2 * P + 17");
  if (buffer.shape[0] > 1 && buffer.strides[0] != 1)
    fail("buffer: expected a contiguous array, got stride ", buffer.strides[0]);
  double* buf = static_cast<double*>(buffer.data);
  const double n = buf[2 * P];
  if (!std::isfinite(n) || n < 0 || n != std::floor(n))
    fail("buffer: expected this rank's count (a whole number >= 0) at index ", 2 * P, ", got ", n);
  const CollectiveOp op = backward ? CollectiveOp::Backward : CollectiveOp::Forward;
  const Fingerprint f = next_fingerprint(op, P, axis, key, &comm);
  write_fingerprint(f, buf);
  allreduce_naming(comm, buf, buffer.shape[0], Device{}, nullptr, f);
  Expected e;
  e.op = op;
  e.channels = P;
  e.mine = &f;
  e.comm = &comm;
  e.local_count = n;
  check_reduced(buf, e);
  return buf[2 * P];
}

double batch_norm_gather_stats(const TensorView& buffer, double momentum, double eps,
                               const TensorView* running_mean, const TensorView* running_var,
                               const TensorView& mean, const TensorView& invstd,
                               const TensorView* var_biased, void* stream,
                               const CollectiveKey& key) {
  const int64_t extra = stats_buffer_size(0);
  if (buffer.ndim != 1 || buffer.shape[0] < extra || (buffer.shape[0] - extra) % 2 != 0)
    fail("buffer: expected a 1-D stats buffer of stats_buffer_size(channels) = 2 * channels + ",
         extra, " values (from batch_norm_stats), got shape ", buffer.shape_str());
  const int64_t C = (buffer.shape[0] - extra) / 2;
  const Device dev = buffer.device;
  check_f64(buffer, "buffer", stats_buffer_size(C), dev, false, "stats_buffer_size(channels)");
  check_finite(momentum, "momentum");
  check_scalar(eps, "eps", false);
  check_vec(running_mean, "running_mean", C, dev, true, "the channel count of buffer");
  check_vec(running_var, "running_var", C, dev, true, "the channel count of buffer");
  check_vec(&mean, "mean", C, dev, true, "the channel count of buffer");
  check_vec(&invstd, "invstd", C, dev, true, "the channel count of buffer");
  check_vec(var_biased, "var", C, dev, true, "the channel count of buffer");
  if (dev.type != DeviceType::CPU && !device_backend(dev.type))
    fail("buffer: expected a CPU array (no CUDA backend is loaded), got ", device_name(dev));
  if (auto* b = on_device(dev)) {
    b->batch_norm_gather_stats(buffer, momentum, eps, true, running_mean, running_var, mean, invstd,
                               var_biased, key, stream);
    return std::nan("");
  }
  const Vec buf = read_vec(buffer);
  Expected e;
  e.op = CollectiveOp::Forward;
  e.channels = C;
  e.key = key;
  check_reduced(buf.data(), e);
  Vec m(static_cast<size_t>(C)), s(static_cast<size_t>(C)), v(static_cast<size_t>(C));
  const double N = gather(buf.data(), C, momentum, eps, true, running_mean, running_var, m.data(),
                          s.data(), v.data());
  if (N > 0) {
    write_vec(mean, m.data());
    write_vec(invstd, s.data());
    if (var_biased) write_vec(*var_biased, v.data());
  }
  return N;
}

void batch_norm_elemt(const TensorView& x, int axis, const TensorView& mean,
                      const TensorView& invstd, const TensorView* weight, const TensorView* bias,
                      const TensorView& y, void* stream) {
  axis = check_input(x, "x", axis);
  const int64_t C = x.shape[axis];
  check_vec(&mean, "mean", C, x.device, false);
  check_vec(&invstd, "invstd", C, x.device, false);
  check_vec(weight, "weight", C, x.device, false);
  check_vec(bias, "bias", C, x.device, false);
  check_like(y, "y", x, "x", true);
  if (auto* be = on_device(x.device))
    return be->batch_norm_elemt(x, axis, mean, invstd, weight, bias, y, stream);
  const Vec m = read_vec(mean), s = read_vec(invstd);
  const Vec w = read_vec_or(weight, C, 1.0), b = read_vec_or(bias, C, 0.0);
  elemt(x, axis, m.data(), s.data(), ptr_or_null(w, weight), ptr_or_null(b, bias), y);
}

void batch_norm_backward_reduce(const TensorView& dy, const TensorView& x, int axis,
                                const TensorView& mean, const TensorView& invstd,
                                const TensorView& sums, const TensorView* grad_weight,
                                const TensorView* grad_bias, void* stream,
                                const CollectiveKey& key) {
  axis = check_input(x, "x", axis);
  const int64_t C = x.shape[axis];
  check_like(dy, "dy", x, "x", false);
  check_vec(&mean, "mean", C, x.device, false);
  check_vec(&invstd, "invstd", C, x.device, false);
  check_f64(sums, "sums", backward_buffer_size(C), x.device, true,
            "backward_buffer_size(channels)");
  check_vec(grad_weight, "grad_weight", C, x.device, true);
  check_vec(grad_bias, "grad_bias", C, x.device, true);
  const Fingerprint f = next_fingerprint(CollectiveOp::Backward, C, axis, key, nullptr);
  if (auto* b = on_device(x.device))
    return b->batch_norm_backward_reduce(dy, x, axis, mean, invstd, sums, grad_weight, grad_bias, f,
                                         stream);
  const Vec m = read_vec(mean), s = read_vec(invstd);
  Vec buf(static_cast<size_t>(backward_buffer_size(C)));
  backward_reduce(dy, x, axis, m.data(), buf.data(), buf.data() + C);
  buf[size_t(2 * C)] = double(count_per_channel(x, axis));
  write_fingerprint(f, buf.data());
  if (grad_weight) {
    Vec gw(static_cast<size_t>(C));
    for (int64_t c = 0; c < C; ++c) gw[size_t(c)] = buf[size_t(C + c)] * s[size_t(c)];
    write_vec(*grad_weight, gw.data());
  }
  if (grad_bias) write_vec(*grad_bias, buf.data());
  write_vec(sums, buf.data());
}

void batch_norm_backward_elemt(const TensorView& dy, const TensorView& x, int axis,
                               const TensorView& mean, const TensorView& invstd,
                               const TensorView* weight, const TensorView& sums, double count,
                               const TensorView& dx, const TensorView* count_view, void* stream,
                               const CollectiveKey& key) {
  axis = check_input(x, "x", axis);
  const int64_t C = x.shape[axis];
  check_like(dy, "dy", x, "x", false);
  check_vec(&mean, "mean", C, x.device, false);
  check_vec(&invstd, "invstd", C, x.device, false);
  check_vec(weight, "weight", C, x.device, false);
  check_vec(&sums, "sums", backward_buffer_size(C), x.device, false,
            "backward_buffer_size(channels)");
  check_like(dx, "dx", x, "x", true);
  if (auto* b = on_device(x.device)) {
    const TensorView& cv = require_count_view(count_view, "count", x.device);
    check_f64(cv, "count", 1, x.device, false, "one value");
    return b->batch_norm_backward_elemt(dy, x, axis, mean, invstd, weight, sums, cv, dx, key,
                                        stream);
  }
  const double n = double(count_per_channel(x, axis));
  if (!std::isfinite(count) || count != std::floor(count) || count < n ||
      (count <= 0 && x.numel() > 0))
    fail("count: expected the global count per channel (a whole number, at least this rank's ", n,
         "), got ", count);
  const Vec m = read_vec(mean), s = read_vec(invstd), sm = read_vec(sums);
  Expected e;
  e.op = CollectiveOp::Backward;
  e.channels = C;
  e.key = key;
  e.local_count = n;
  check_reduced(sm.data(), e);
  if (sm[size_t(2 * C)] != count)
    fail("count: expected the global count the backward sums were reduced over (",
         sm[size_t(2 * C)], ", from sums), got ", count);
  const Vec w = read_vec_or(weight, C, 1.0);
  backward_elemt(dy, x, axis, m.data(), s.data(), ptr_or_null(w, weight), sm.data(), count, dx);
}

// ---- composed -----------------------------------------------------------------------

double forward(const TensorView& x, const TensorView* weight, const TensorView* bias,
               const TensorView* running_mean, const TensorView* running_var,
               const ForwardOptions& opt, Communicator& comm, const TensorView& y,
               const TensorView& save_mean, const TensorView& save_invstd,
               const TensorView* save_count) {
  const int axis = check_input(x, "x", opt.axis);
  const int64_t C = x.shape[axis];
  const Device dev = x.device;
  check_vec(weight, "weight", C, dev, false);
  check_vec(bias, "bias", C, dev, false);
  check_vec(running_mean, "running_mean", C, dev, opt.training);
  check_vec(running_var, "running_var", C, dev, opt.training);
  if (bool(running_mean) != bool(running_var))
    fail(running_mean ? "running_var" : "running_mean", ": expected an array when ",
         running_mean ? "running_mean" : "running_var", " is given (both or neither)");
  if (!opt.training && !running_mean)
    fail("running_mean: expected running statistics when training=False, got None");
  // Any finite momentum, as torch takes; the Python functional API keeps it in [0, 1].
  check_finite(opt.momentum, "momentum");
  check_scalar(opt.eps, "eps", false);
  check_like(y, "y", x, "x", true);
  check_f64(save_mean, "save_mean", C, dev, true, "the channel count of x");
  check_f64(save_invstd, "save_invstd", C, dev, true, "the channel count of x");
  if (save_count) check_f64(*save_count, "save_count", 1, dev, true, "one value");
  const TensorView* mask = opt.training ? opt.mask : nullptr;
  const bool per_channel = check_mask(opt.mask, x, axis) && opt.training;
  if (per_channel) check_counts(opt.counts, C, true);
  if (auto* b = on_device(dev)) {
    const TensorView& sc = require_count_view(save_count, "save_count", dev);
    Fingerprint f;
    if (opt.training) f = next_fingerprint(CollectiveOp::Forward, C, axis, opt.key(), &comm);
    b->forward(x, axis, weight, bias, running_mean, running_var, opt, comm, y, save_mean,
               save_invstd, sc, opt.training ? &f : nullptr);
    return std::nan("");
  }

  Vec mean(static_cast<size_t>(C)), invstd(static_cast<size_t>(C));
  double count;
  if (opt.training) {
    const int64_t K = stats_buffer_size(C);
    Vec buf(size_t(K + (per_channel ? C : 0)));
    local_stats(x, axis, buf.data(), mask, per_channel);
    const double local = buf[size_t(2 * C)];
    const Vec local_counts(buf.begin() + K, buf.end());
    const Fingerprint f = next_fingerprint(CollectiveOp::Forward, C, axis, opt.key(), &comm);
    write_fingerprint(f, buf.data());
    allreduce_naming(comm, buf.data(), int64_t(buf.size()), Device{}, opt.stream, f);
    Expected e;
    e.op = CollectiveOp::Forward;
    e.channels = C;
    e.mine = &f;
    e.comm = &comm;
    e.local_count = local;
    check_reduced(buf.data(), e);
    if (per_channel) check_reduced_counts(buf.data(), C, local_counts.data(), comm);
    const double* counts = per_channel ? buf.data() + K : nullptr;
    count = gather(buf.data(), C, opt.momentum, opt.eps, opt.unbiased_running_var, running_mean,
                   running_var, mean.data(), invstd.data(), nullptr, counts);
    if (per_channel) write_vec(*opt.counts, counts);
    if (count == 0 && (!mask || x.numel() == 0)) return 0;
    if (count == 0)  // every position masked out on every rank: mean 0, variance 0
      for (int64_t c = 0; c < C; ++c)
        mean[size_t(c)] = 0.0, invstd[size_t(c)] = invstd_of(0.0, opt.eps);
  } else {
    mean = read_vec(*running_mean);
    const Vec rv = read_vec(*running_var);
    for (int64_t c = 0; c < C; ++c) invstd[size_t(c)] = invstd_of(rv[size_t(c)], opt.eps);
    count = double(count_per_channel(x, axis));
  }
  const Vec w = read_vec_or(weight, C, 1.0), b = read_vec_or(bias, C, 0.0);
  elemt(x, axis, mean.data(), invstd.data(), ptr_or_null(w, weight), ptr_or_null(b, bias), y);
  write_vec(save_mean, mean.data());
  write_vec(save_invstd, invstd.data());
  if (save_count) write_vec(*save_count, &count);
  return count;
}

void backward(const TensorView& dy, const TensorView& x, const TensorView& save_mean,
              const TensorView& save_invstd, const TensorView* weight, const BackwardOptions& opt,
              Communicator& comm, const TensorView* dx, const TensorView* grad_weight,
              const TensorView* grad_bias) {
  const int axis = check_input(x, "x", opt.axis);
  const int64_t C = x.shape[axis];
  const Device dev = x.device;
  check_like(dy, "dy", x, "x", false);
  check_vec(&save_mean, "save_mean", C, dev, false);
  check_vec(&save_invstd, "save_invstd", C, dev, false);
  check_vec(weight, "weight", C, dev, false);
  if (dx) check_like(*dx, "dx", x, "x", true);
  check_vec(grad_weight, "grad_weight", C, dev, true);
  check_vec(grad_bias, "grad_bias", C, dev, true);
  const bool sync = dx && opt.training;
  const TensorView* mask = opt.training ? opt.mask : nullptr;
  const bool per_channel = check_mask(opt.mask, x, axis) && opt.training;
  if (per_channel && sync) check_counts(opt.counts, C, false);
  if (auto* b = on_device(dev)) {
    if (sync) {
      const TensorView& cv = require_count_view(opt.count_view, "count", dev);
      check_f64(cv, "count", 1, dev, false, "one value");
    }
    Fingerprint f;
    if (sync) f = next_fingerprint(CollectiveOp::Backward, C, axis, opt.key(), &comm);
    return b->backward(dy, x, axis, save_mean, save_invstd, weight, opt, comm, dx, grad_weight,
                       grad_bias, sync ? &f : nullptr);
  }
  const double local = double(mask && sync ? mask_count(*mask) : count_per_channel(x, axis));
  if (sync && (!std::isfinite(opt.count) || opt.count < local))
    fail("count: expected the global count per channel from forward, got ", opt.count);

  const Vec m = read_vec(save_mean), s = read_vec(save_invstd);
  Vec sums(static_cast<size_t>(backward_buffer_size(C)));  // written where it is used
  if (grad_weight || grad_bias || sync)
    backward_reduce(dy, x, axis, m.data(), sums.data(), sums.data() + C);
  // This rank's parameter gradients, from the local sums; written after the checks.
  Vec gw, gb;
  if (grad_weight) {
    gw.resize(size_t(C));
    for (int64_t c = 0; c < C; ++c) gw[size_t(c)] = sums[size_t(C + c)] * s[size_t(c)];
  }
  if (grad_bias) gb.assign(sums.begin(), sums.begin() + C);
  if (dx && sync && opt.count > 0) {  // count 0: every rank is empty, all skip it alike
    sums[size_t(2 * C)] = local;
    const Fingerprint f = next_fingerprint(CollectiveOp::Backward, C, axis, opt.key(), &comm);
    write_fingerprint(f, sums.data());
    allreduce_naming(comm, sums.data(), int64_t(sums.size()), Device{}, opt.stream, f);
    Expected e;
    e.op = CollectiveOp::Backward;
    e.channels = C;
    e.mine = &f;
    e.comm = &comm;
    e.local_count = local;
    e.count = opt.count;
    check_reduced(sums.data(), e);
  }
  if (grad_weight) write_vec(*grad_weight, gw.data());
  if (grad_bias) write_vec(*grad_bias, gb.data());
  // A count of 0: x is empty, or (mask) every position was masked out everywhere and the
  // statistics were constants.
  if (!dx || (sync && opt.count == 0 && (!mask || x.numel() == 0))) return;
  const Vec w = read_vec_or(weight, C, 1.0);
  const bool with_sums = sync && opt.count > 0;
  const Vec counts = per_channel && with_sums ? read_vec(*opt.counts) : Vec();
  backward_elemt(dy, x, axis, m.data(), s.data(), ptr_or_null(w, weight),
                 with_sums ? sums.data() : nullptr, opt.count, *dx, with_sums ? mask : nullptr,
                 counts.empty() ? nullptr : counts.data());
}

}  // namespace syncbn
