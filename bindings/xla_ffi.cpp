// The XLA FFI handlers' shared part: the communicator registry, XLA buffers -> core
// views, the calls to syncbn::forward / syncbn::backward, and the core's exceptions ->
// ffi::Error. No math here.
#include "xla_ffi.h"

#include <cstring>
#include <exception>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "syncbn/errors.h"
#include "syncbn/ops.h"

namespace syncbn::xla {
namespace {

std::mutex g_registry_mu;
std::unordered_map<int64_t, Communicator*> g_registry;
int64_t g_next_id = 1;

Communicator& lookup(int64_t id) {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  auto it = g_registry.find(id);
  if (it == g_registry.end())
    fail("comm: no communicator is registered under id ", id,
         " (ids come from syncbn.jax in this process; a compiled function cannot be reused "
         "in another process)");
  return *it->second;
}

DType dtype_of(ffi::DataType t, const char* name) {
  switch (t) {
    case ffi::DataType::F16: return DType::Float16;
    case ffi::DataType::BF16: return DType::BFloat16;
    case ffi::DataType::F32: return DType::Float32;
    case ffi::DataType::F64: return DType::Float64;
    default:
      fail<TypeError>(name,
                      ": expected float16, bfloat16, float32 or float64, got XLA "
                      "data type ",
                      int(t));
  }
}

// XLA hands the handlers dense row-major buffers (the default layouts jax.ffi asks for).
TensorView view(const ffi::AnyBuffer& b, const char* name, const Platform& p, bool read_only) {
  const auto dims = b.dimensions();
  if (dims.size() > size_t(kMaxDims))
    fail(name, ": expected at most ", kMaxDims, " dimensions, got ", dims.size());
  TensorView v = contiguous_view(b.untyped_data(), dtype_of(b.element_type(), name),
                                 Device{p.device ? DeviceType::CUDA : DeviceType::CPU, p.ordinal},
                                 int(dims.size()), dims.begin());
  v.read_only = read_only;
  return v;
}

// A per-channel operand that may be absent (zero length).
std::optional<TensorView> maybe(const ffi::AnyBuffer& b, const char* name, const Platform& p,
                                bool read_only) {
  if (b.element_count() == 0) return std::nullopt;
  return view(b, name, p, read_only);
}

// The mask: absent when it is the 1-D placeholder (x has at least 2 dimensions); an empty
// mask of x's rank (a rank with no samples) is still a mask.
std::optional<TensorView> mask_or_none(const ffi::AnyBuffer& b, const Platform& p) {
  if (b.dimensions().size() < 2) return std::nullopt;
  return view(b, "mask", p, true);
}

const TensorView* ptr(const std::optional<TensorView>& v) {
  return v ? &*v : nullptr;
}

// The float64 vector at `offset` doubles into a device `saved` buffer (the host path
// copies through aligned host memory instead).
TensorView f64_slice(const ffi::AnyBuffer& saved, int64_t offset, int64_t n, const Platform& p) {
  auto* base = static_cast<char*>(saved.untyped_data()) + offset * int64_t(sizeof(double));
  if (reinterpret_cast<uintptr_t>(base) % alignof(double) != 0)
    fail("saved: expected a buffer aligned to 8 bytes, got address ",
         reinterpret_cast<uintptr_t>(base));
  return contiguous_view(base, DType::Float64, Device{DeviceType::CUDA, p.ordinal}, 1, &n);
}

// x's channel count (the core validates x and axis again, naming them the same way).
int64_t channels(const TensorView& x, int64_t axis) {
  if (x.ndim < 2) fail("x: expected at least 2 dimensions (N, C, ...), got shape ", x.shape_str());
  if (axis < -x.ndim || axis >= x.ndim)
    fail("axis: expected an integer in [", -x.ndim, ", ", x.ndim, ") for x of shape ",
         x.shape_str(), ", got ", axis);
  return x.shape[axis < 0 ? axis + x.ndim : axis];
}

// A mask with the channel axis (per-channel counts); the core checks its shape.
bool per_channel(const std::optional<TensorView>& mask, const TensorView& x, int64_t axis) {
  return mask && mask->ndim == x.ndim && mask->shape[axis < 0 ? axis + x.ndim : axis] != 1;
}

// [mean (C) | invstd (C) | count | counts (C), with a per-channel mask] as float64.
int64_t saved_len(int64_t C, bool counts) {
  return 2 * C + 1 + (counts ? C : 0);
}

void check_saved(const ffi::AnyBuffer& saved, int64_t C, bool counts) {
  const size_t want = size_t(saved_len(C, counts)) * sizeof(double);
  if (saved.element_type() != ffi::DataType::U32 || saved.size_bytes() != want)
    fail("saved: expected uint32[", want / 4, "] (the forward's statistics for C=", C, "), got ",
         saved.size_bytes(), " bytes");
}

// The core's exceptions as XLA errors; the message starts with the Python exception the
// functional API would raise, so a user of jax sees which one it is.
template <class F>
ffi::Error guarded(F&& f) {
  try {
    f();
    return ffi::Error::Success();
  } catch (const CollectiveMismatchError& e) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      std::string("syncbn.CollectiveMismatchError: ") + e.what());
  } catch (const TypeError& e) {
    return ffi::Error::InvalidArgument(std::string("TypeError: ") + e.what());
  } catch (const ValueError& e) {
    return ffi::Error::InvalidArgument(std::string("ValueError: ") + e.what());
  } catch (const CommError& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("RuntimeError: ") + e.what());
  } catch (const std::exception& e) {  // e.g. a Python communicator raised
    return ffi::Error::Internal(std::string("syncbn: ") + e.what());
  }
}

// In-place updates need the result to be the operand's buffer (input_output_aliases);
// XLA guarantees it, this checks it.
void check_aliased(const ffi::AnyBuffer& in, const ffi::AnyBuffer& out, const char* name,
                   const Platform& p) {
  if (in.untyped_data() == out.untyped_data() || in.element_count() == 0) return;
  if (p.device)
    fail("new_", name, ": expected XLA to alias it with ", name, " (input_output_aliases)");
  std::memcpy(out.untyped_data(), in.untyped_data(), in.size_bytes());
}

}  // namespace

int64_t register_communicator(Communicator* comm) {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  for (const auto& kv : g_registry)
    if (kv.second == comm) return kv.first;
  g_registry[g_next_id] = comm;
  return g_next_id++;
}

ffi::Error forward(const Platform& p, ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::AnyBuffer bias,
                   ffi::AnyBuffer mean, ffi::AnyBuffer var, ffi::AnyBuffer mask,
                   ffi::AnyBuffer token, ffi::Result<ffi::AnyBuffer> y,
                   ffi::Result<ffi::AnyBuffer> new_mean, ffi::Result<ffi::AnyBuffer> new_var,
                   ffi::Result<ffi::AnyBuffer> saved, ffi::Result<ffi::AnyBuffer> token_out,
                   int64_t axis, bool training, double momentum, double eps, bool unbiased,
                   int64_t comm, int64_t layer, std::string_view layer_name, bool verify) {
  (void)token, (void)token_out;  // only a data dependency
  return guarded([&] {
    const std::string name(layer_name);
    TensorView xv = view(x, "x", p, true), yv = view(*y, "y", p, false);
    auto wv = maybe(scale, "scale", p, true), bv = maybe(bias, "bias", p, true);
    auto mv = mask_or_none(mask, p);
    check_aliased(mean, *new_mean, "mean", p);
    check_aliased(var, *new_var, "var", p);
    TensorView rm = view(*new_mean, "mean", p, false), rv = view(*new_var, "var", p, false);
    const int64_t C = channels(xv, axis);
    const bool pc = training && per_channel(mv, xv, axis);
    check_saved(*saved, C, pc);
    ForwardOptions opt;
    opt.axis = int(axis);
    opt.training = training;
    opt.momentum = momentum;
    opt.eps = eps;
    opt.unbiased_running_var = unbiased;
    opt.stream = p.stream;
    opt.layer = layer;
    opt.layer_name = name.empty() ? nullptr : name.c_str();
    opt.verify = verify;
    opt.mask = ptr(mv);
    LocalCommunicator local;
    Communicator& used = training ? lookup(comm) : local;  // eval never communicates
    if (p.device) {  // (masks are host-only: the core refuses them here)
      TensorView sm = f64_slice(*saved, 0, C, p), si = f64_slice(*saved, C, C, p);
      TensorView sc = f64_slice(*saved, 2 * C, 1, p);
      syncbn::forward(xv, ptr(wv), ptr(bv), &rm, &rv, opt, used, yv, sm, si, &sc);
      return;
    }
    // Host: float64 scratch (saved may be only 4-byte aligned), zero so that an all-empty
    // batch (nothing written) leaves defined statistics.
    std::vector<double> host(size_t(saved_len(C, pc)), 0.0);
    TensorView sm = contiguous_view(host.data(), DType::Float64, Device{}, 1, &C);
    TensorView si = contiguous_view(host.data() + C, DType::Float64, Device{}, 1, &C);
    TensorView cn = contiguous_view(host.data() + 2 * C + 1, DType::Float64, Device{}, 1, &C);
    if (pc) opt.counts = &cn;
    host[size_t(2 * C)] =
        syncbn::forward(xv, ptr(wv), ptr(bv), &rm, &rv, opt, used, yv, sm, si, nullptr);
    std::memcpy(saved->untyped_data(), host.data(), host.size() * sizeof(double));
  });
}

ffi::Error backward(const Platform& p, ffi::AnyBuffer dy, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                    ffi::AnyBuffer mask, ffi::AnyBuffer saved, ffi::AnyBuffer token,
                    ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dscale,
                    ffi::Result<ffi::AnyBuffer> dbias, ffi::Result<ffi::AnyBuffer> token_out,
                    int64_t axis, bool training, int64_t comm, int64_t layer,
                    std::string_view layer_name, bool verify) {
  (void)token, (void)token_out;
  return guarded([&] {
    const std::string name(layer_name);
    TensorView dyv = view(dy, "dy", p, true), xv = view(x, "x", p, true);
    TensorView dxv = view(*dx, "dx", p, false);
    auto wv = maybe(scale, "scale", p, true), mv = mask_or_none(mask, p);
    auto gw = maybe(*dscale, "dscale", p, false), gb = maybe(*dbias, "dbias", p, false);
    const int64_t C = channels(xv, axis);
    const bool pc = training && per_channel(mv, xv, axis);
    check_saved(saved, C, pc);
    BackwardOptions opt;
    opt.axis = int(axis);
    opt.training = training;
    opt.stream = p.stream;
    opt.layer = layer;
    opt.layer_name = name.empty() ? nullptr : name.c_str();
    opt.verify = verify;
    opt.mask = ptr(mv);
    LocalCommunicator local;
    Communicator& used = training ? lookup(comm) : local;
    if (p.device) {
      TensorView sm = f64_slice(saved, 0, C, p), si = f64_slice(saved, C, C, p);
      TensorView sc = f64_slice(saved, 2 * C, 1, p);
      opt.count = 0;
      opt.count_view = &sc;
      syncbn::backward(dyv, xv, sm, si, ptr(wv), opt, used, &dxv, ptr(gw), ptr(gb));
      return;
    }
    std::vector<double> host(size_t(saved_len(C, pc)));
    std::memcpy(host.data(), saved.untyped_data(), host.size() * sizeof(double));
    TensorView sm = contiguous_view(host.data(), DType::Float64, Device{}, 1, &C);
    TensorView si = contiguous_view(host.data() + C, DType::Float64, Device{}, 1, &C);
    TensorView cn = contiguous_view(host.data() + 2 * C + 1, DType::Float64, Device{}, 1, &C);
    if (pc) opt.counts = &cn;
    opt.count = host[size_t(2 * C)];
    syncbn::backward(dyv, xv, sm, si, ptr(wv), opt, used, &dxv, ptr(gw), ptr(gb));
  });
}

}  // namespace syncbn::xla
