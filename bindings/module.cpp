// nanobind module syncbn._core: converts arrays to core views, releases the GIL, and
// exposes the primitives, communicators and build facts. No math here.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <array>
#include <cstring>
#include <optional>
#include <vector>

#include "eager_table.h"
#include "errors.h"
#include "syncbn/build_config.h"
#include "syncbn/communicator.h"
#include "syncbn/device_backend.h"
#include "syncbn/errors.h"
#include "syncbn/ops.h"
#ifdef SYNCBN_WITH_MPI
#include "syncbn/mpi_communicator.h"
#endif
#ifdef SYNCBN_WITH_JAX
#include "xla_ffi.h"
#endif

namespace nb = nanobind;
using namespace nb::literals;
using syncbn::TensorView;

namespace {

using Array = nb::ndarray<nb::ro>;

template <class A>
TensorView to_view(const A& a, const char* name, bool read_only) {
  DLTensor t{};
  t.data = a.data_handle();
  t.byte_offset = a.byte_offset();
  t.ndim = int32_t(a.ndim());
  t.shape = const_cast<int64_t*>(a.shape_ptr());
  t.strides = const_cast<int64_t*>(a.stride_ptr());
  t.dtype = DLDataType{a.dtype().code, a.dtype().bits, a.dtype().lanes};
  t.device = DLDevice{DLDeviceType(a.device_type()), a.device_id()};
  return syncbn::from_dlpack(t, name, read_only);
}

// Imports arguments and keeps them alive for the duration of one call.
struct Args {
  // Fixed slots, no heap: a small layer's whole call is a few microseconds (no call
  // takes more than 12 arrays).
  std::array<nb::ndarray<>, 12> writable_held;
  std::array<Array, 12> read_held;
  size_t n_writable = 0, n_read = 0;

  TensorView view(nb::handle obj, const char* name, bool writable) {
    // convert=false: an output must be the caller's memory, never a converted copy.
    nb::ndarray<> w;
    if (writable && nb::try_cast(obj, w, false)) {
      nb::ndarray<>& held = writable_held.at(n_writable++) = std::move(w);
      return to_view(held, name, false);
    }
    Array ro;
    if (nb::try_cast(obj, ro, false)) {
      Array& held = read_held.at(n_read++) = std::move(ro);
      // Only a read-only array fails the writable import and passes this one; the core
      // then names the argument in its error.
      return to_view(held, name, writable);
    }
    throw syncbn::TypeError(std::string(name) +
                            ": expected an array supporting DLPack or the buffer protocol, got " +
                            nb::type_name(obj.type()).c_str());
  }

  std::optional<TensorView> maybe(nb::handle obj, const char* name, bool writable) {
    if (obj.is_none()) return std::nullopt;
    return view(obj, name, writable);
  }
};

const TensorView* ptr(const std::optional<TensorView>& v) {
  return v ? &*v : nullptr;
}

// The fingerprint fields every collective-issuing call takes (see CollectiveKey).
#define SYNCBN_KEY_ARGS "layer"_a = 0, "layer_name"_a = "", "verify"_a = true
// The primitives also take the call number of their fingerprint (they count nothing).
#define SYNCBN_PRIMITIVE_KEY_ARGS SYNCBN_KEY_ARGS, "call"_a = 0
syncbn::CollectiveKey make_key(int64_t layer, const std::string& name, bool verify,
                               int64_t call = 0) {
  return syncbn::CollectiveKey{layer, name.empty() ? nullptr : name.c_str(), verify, call};
}

// A communicator implemented in Python: integer `rank`, `size`, and `allreduce(buf)` that
// sums a 1-D float64 NumPy array in place (or returns the summed array).
class PythonCommunicator final : public syncbn::Communicator {
 public:
  explicit PythonCommunicator(nb::object obj) : obj_(std::move(obj)) {
    if (!nb::try_cast(obj_.attr("rank"), rank_) || !nb::try_cast(obj_.attr("size"), size_) ||
        rank_ < 0 || rank_ >= size_)
      throw syncbn::ValueError(
          std::string("comm: expected integer `rank` and `size` with 0 <= rank < size <= "
                      "2**31 - 1, got rank=") +
          nb::repr(obj_.attr("rank")).c_str() + ", size=" + nb::repr(obj_.attr("size")).c_str());
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* kind() const override { return "python"; }
  nb::object object() const { return obj_; }

  void allreduce_sum(double* data, int64_t count, syncbn::Device device, void*) override {
    if (device.type != syncbn::DeviceType::CPU)
      syncbn::fail("buffer: a Python communicator takes host buffers, got ",
                   syncbn::device_name(device));
    nb::gil_scoped_acquire gil;
    // A copy the callee owns: it may keep a reference without dangling into the core.
    double* copy = new double[size_t(count)];
    std::memcpy(copy, data, size_t(count) * sizeof(double));
    nb::capsule owner(copy, [](void* p) noexcept { delete[] static_cast<double*>(p); });
    size_t shape[1] = {size_t(count)};
    nb::object arr = nb::cast(nb::ndarray<nb::numpy, double, nb::ndim<1>>(copy, 1, shape, owner));
    nb::object out = obj_.attr("allreduce")(arr);
    if (!out.is_none() && !out.is(arr)) {
      nb::ndarray<nb::ro, double, nb::ndim<1>, nb::device::cpu> res;
      if (!nb::try_cast(out, res) || res.shape(0) != size_t(count))
        syncbn::fail<syncbn::TypeError>(
            "comm: allreduce(buf) must sum buf in place and return None (or return the summed "
            "1-D float64 array of length ",
            count, ")");
      for (int64_t i = 0; i < count; ++i) data[i] = res.data()[i * res.stride(0)];
      return;
    }
    std::memcpy(data, copy, size_t(count) * sizeof(double));
  }

 private:
  nb::object obj_;
  int rank_ = 0, size_ = 1;
};

// A communicator made by another of syncbn's modules (the CUDA module's NCCL one), handed
// over as a capsule that owns it; kept alive by holding the capsule.
class ForeignCommunicator final : public syncbn::Communicator {
 public:
  explicit ForeignCommunicator(nb::capsule c) : owner_(c) {
    if (std::string(c.name()) != "syncbn.Communicator")
      throw syncbn::TypeError("comm: expected a 'syncbn.Communicator' capsule");
    inner_ = static_cast<syncbn::Communicator*>(c.data());
  }
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  const char* kind() const override { return inner_->kind(); }
  bool accepts(syncbn::Device d) const override { return inner_->accepts(d); }
  bool stream_ordered() const override { return inner_->stream_ordered(); }
  void allreduce_sum(double* data, int64_t count, syncbn::Device device, void* stream) override {
    inner_->allreduce_sum(data, count, device, stream);
  }
  nb::capsule capsule() const { return owner_; }

 private:
  nb::capsule owner_;
  syncbn::Communicator* inner_ = nullptr;
};

// ---- the table of bindings/eager_table.h (the torch module's C++ autograd node) ----------

const TensorView* dl_view(const DLTensor* t, const char* name, bool writable, TensorView* out) {
  if (t == nullptr) return nullptr;
  *out = syncbn::from_dlpack(*t, name, !writable);
  return out;
}

int eager_forward(const DLTensor* x, const DLTensor* weight, const DLTensor* bias,
                  const DLTensor* running_mean, const DLTensor* running_var, const DLTensor* y,
                  const DLTensor* save_mean, const DLTensor* save_invstd, int64_t* batches,
                  const syncbn::ForwardOptions* opt, syncbn::Communicator* comm, double* count,
                  std::exception_ptr* error) noexcept {
  try {
    TensorView v[8];
    *count = syncbn::forward(
        *dl_view(x, "x", false, &v[0]), dl_view(weight, "weight", false, &v[1]),
        dl_view(bias, "bias", false, &v[2]), dl_view(running_mean, "running_mean", true, &v[3]),
        dl_view(running_var, "running_var", true, &v[4]), *opt, *comm,
        *dl_view(y, "y", true, &v[5]), *dl_view(save_mean, "save_mean", true, &v[6]),
        *dl_view(save_invstd, "save_invstd", true, &v[7]));
    if (batches != nullptr) ++*batches;
    return 0;
  } catch (...) {
    *error = std::current_exception();
    return 1;
  }
}

int eager_backward(const DLTensor* dy, const DLTensor* x, const DLTensor* save_mean,
                   const DLTensor* save_invstd, const DLTensor* weight, const DLTensor* dx,
                   const DLTensor* grad_weight, const DLTensor* grad_bias,
                   const syncbn::BackwardOptions* opt, syncbn::Communicator* comm,
                   std::exception_ptr* error) noexcept {
  try {
    TensorView v[8];
    syncbn::backward(*dl_view(dy, "dy", false, &v[0]), *dl_view(x, "x", false, &v[1]),
                     *dl_view(save_mean, "save_mean", false, &v[2]),
                     *dl_view(save_invstd, "save_invstd", false, &v[3]),
                     dl_view(weight, "weight", false, &v[4]), *opt, *comm,
                     dl_view(dx, "dx", true, &v[5]),
                     dl_view(grad_weight, "grad_weight", true, &v[6]),
                     dl_view(grad_bias, "grad_bias", true, &v[7]));
    return 0;
  } catch (...) {
    *error = std::current_exception();
    return 1;
  }
}

const syncbn::bindings::EagerTable eager_table{syncbn::bindings::kEagerTableVersion, eager_forward,
                                               eager_backward};

nb::dict build_info() {
  const syncbn::BuildConfig c = syncbn::build_config();
  nb::dict d;
  d["version"] = c.version;
  d["threads"] = syncbn::num_threads();
  d["mpi"] = c.mpi;
#ifdef SYNCBN_WITH_MPI
  d["mpi_library_version"] = syncbn::mpi_library_version();
#else
  d["mpi_library_version"] = nb::none();
#endif
  d["openmp"] = c.openmp;
  d["cuda"] = c.cuda;
  d["nccl"] = c.nccl;
  d["compiler"] = c.compiler;
#ifdef SYNCBN_WITH_JAX
  d["jax"] = true;
  d["xla_ffi_api"] = std::to_string(XLA_FFI_API_MAJOR) + "." + std::to_string(XLA_FFI_API_MINOR);
#else
  d["jax"] = false;
  d["xla_ffi_api"] = nb::none();
#endif
  // The torch the C++ autograd node of syncbn.torch was built against (SYNCBN_WITH_TORCH).
#ifdef SYNCBN_TORCH_VERSION
  d["torch"] = SYNCBN_TORCH_VERSION;
#else
  d["torch"] = nb::none();
#endif
  return d;
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "syncbn core bindings (internal; use the syncbn package)";
  // Communicators cached for the life of the process (the default one, or ones held by
  // torch.compile's caches) are legitimately alive at exit.
  nb::set_leak_warnings(false);

  syncbn::bindings::register_exception_translators();
  PyObject* mismatch = PyErr_NewExceptionWithDoc(
      "syncbn.CollectiveMismatchError",
      "Ranks reduced different things in one all-reduce (another layer, operation, channel "
      "axis, channel count or call count). Raised on every rank, before anything is written.",
      PyExc_RuntimeError, nullptr);
  syncbn::bindings::collective_mismatch_slot() = mismatch;
  m.attr("CollectiveMismatchError") = nb::borrow(mismatch);

  nb::class_<syncbn::Communicator>(m, "Communicator", nb::dynamic_attr())
      .def_prop_ro("rank", &syncbn::Communicator::rank)
      .def_prop_ro("size", &syncbn::Communicator::size)
      .def_prop_ro("kind", &syncbn::Communicator::kind)
      .def_prop_ro(
          "cuda_buffers",
          [](const syncbn::Communicator& c) { return c.accepts({syncbn::DeviceType::CUDA, 0}); },
          "Whether device buffers go to the all-reduce directly (else staged through host).")
      .def("__repr__", [](const syncbn::Communicator& c) {
        return std::string("<syncbn communicator ") + c.kind() +
               " rank=" + std::to_string(c.rank()) + " size=" + std::to_string(c.size()) + ">";
      });
  nb::class_<syncbn::LocalCommunicator, syncbn::Communicator>(m, "LocalCommunicator")
      .def(nb::init<>());
  nb::class_<ForeignCommunicator, syncbn::Communicator>(m, "ForeignCommunicator")
      .def(nb::init<nb::capsule>(), "capsule"_a)
      .def_prop_ro("capsule", &ForeignCommunicator::capsule);
  nb::class_<PythonCommunicator, syncbn::Communicator>(m, "PythonCommunicator")
      .def(nb::init<nb::object>(), "obj"_a)
      .def_prop_ro("object", &PythonCommunicator::object);
#ifdef SYNCBN_WITH_MPI
  nb::class_<syncbn::MpiCommunicator, syncbn::Communicator>(m, "MpiCommunicator")
      .def(
          "__init__",
          [](syncbn::MpiCommunicator* self, uint64_t handle, double timeout) {
            // MPI_Comm is an int in MPICH and a pointer in Open MPI: copy its bytes.
            MPI_Comm c;
            static_assert(sizeof(MPI_Comm) <= sizeof(handle), "MPI_Comm wider than 64 bits");
            std::memcpy(&c, &handle, sizeof(MPI_Comm));
            new (self) syncbn::MpiCommunicator(c, timeout);
          },
          "handle"_a, "timeout"_a = 0.0)
      .def_prop_ro("timeout", &syncbn::MpiCommunicator::timeout);
  m.def("mpi_library_version", &syncbn::mpi_library_version);
#endif

  m.def(
      "batch_norm_stats",
      [](nb::handle x, int axis, nb::handle buffer, uintptr_t stream, int64_t layer,
         const std::string& name, bool verify, int64_t call) {
        Args a;
        TensorView xv = a.view(x, "x", false), bv = a.view(buffer, "buffer", true);
        nb::gil_scoped_release nogil;
        syncbn::batch_norm_stats(xv, axis, bv, reinterpret_cast<void*>(stream),
                                 make_key(layer, name, verify, call));
      },
      "x"_a.none(), "axis"_a, "buffer"_a.none(), "stream"_a = 0, SYNCBN_PRIMITIVE_KEY_ARGS);

  m.def(
      "allreduce",
      [](nb::handle buffer, syncbn::Communicator& comm, uintptr_t stream) {
        Args a;
        TensorView bv = a.view(buffer, "buffer", true);
        nb::gil_scoped_release nogil;
        syncbn::allreduce(bv, comm, reinterpret_cast<void*>(stream));
      },
      "buffer"_a.none(), "comm"_a, "stream"_a = 0);

  m.def(
      "allreduce_checked",
      [](nb::handle buffer, bool backward, int axis, syncbn::Communicator& comm, int64_t layer,
         const std::string& name, bool verify) {
        Args a;
        TensorView bv = a.view(buffer, "buffer", true);
        nb::gil_scoped_release nogil;
        return syncbn::allreduce_checked(bv, backward, axis, comm, make_key(layer, name, verify));
      },
      "buffer"_a.none(), "backward"_a, "axis"_a, "comm"_a, SYNCBN_KEY_ARGS);

  m.def(
      "batch_norm_gather_stats",
      [](nb::handle buffer, double momentum, double eps, nb::handle running_mean,
         nb::handle running_var, nb::handle mean, nb::handle invstd, nb::handle var,
         uintptr_t stream, int64_t layer, const std::string& name, bool verify, int64_t call) {
        Args a;
        TensorView bv = a.view(buffer, "buffer", false);
        auto rm = a.maybe(running_mean, "running_mean", true);
        auto rv = a.maybe(running_var, "running_var", true);
        TensorView mv = a.view(mean, "mean", true), sv = a.view(invstd, "invstd", true);
        auto vv = a.maybe(var, "var", true);
        nb::gil_scoped_release nogil;
        return syncbn::batch_norm_gather_stats(bv, momentum, eps, ptr(rm), ptr(rv), mv, sv, ptr(vv),
                                               reinterpret_cast<void*>(stream),
                                               make_key(layer, name, verify, call));
      },
      "buffer"_a.none(), "momentum"_a, "eps"_a, "running_mean"_a.none(), "running_var"_a.none(),
      "mean"_a.none(), "invstd"_a.none(), "var"_a.none(), "stream"_a = 0,
      SYNCBN_PRIMITIVE_KEY_ARGS);

  m.def(
      "batch_norm_elemt",
      [](nb::handle x, int axis, nb::handle mean, nb::handle invstd, nb::handle weight,
         nb::handle bias, nb::handle y, uintptr_t stream) {
        Args a;
        TensorView xv = a.view(x, "x", false);
        TensorView mv = a.view(mean, "mean", false), sv = a.view(invstd, "invstd", false);
        auto wv = a.maybe(weight, "weight", false), bv = a.maybe(bias, "bias", false);
        TensorView yv = a.view(y, "y", true);
        nb::gil_scoped_release nogil;
        syncbn::batch_norm_elemt(xv, axis, mv, sv, ptr(wv), ptr(bv), yv,
                                 reinterpret_cast<void*>(stream));
      },
      "x"_a.none(), "axis"_a, "mean"_a.none(), "invstd"_a.none(), "weight"_a.none(),
      "bias"_a.none(), "y"_a.none(), "stream"_a = 0);

  m.def(
      "batch_norm_backward_reduce",
      [](nb::handle dy, nb::handle x, int axis, nb::handle mean, nb::handle invstd, nb::handle sums,
         nb::handle grad_weight, nb::handle grad_bias, uintptr_t stream, int64_t layer,
         const std::string& name, bool verify, int64_t call) {
        Args a;
        TensorView dyv = a.view(dy, "dy", false), xv = a.view(x, "x", false);
        TensorView mv = a.view(mean, "mean", false), sv = a.view(invstd, "invstd", false);
        TensorView su = a.view(sums, "sums", true);
        auto gw = a.maybe(grad_weight, "grad_weight", true);
        auto gb = a.maybe(grad_bias, "grad_bias", true);
        nb::gil_scoped_release nogil;
        syncbn::batch_norm_backward_reduce(dyv, xv, axis, mv, sv, su, ptr(gw), ptr(gb),
                                           reinterpret_cast<void*>(stream),
                                           make_key(layer, name, verify, call));
      },
      "dy"_a.none(), "x"_a.none(), "axis"_a, "mean"_a.none(), "invstd"_a.none(), "sums"_a.none(),
      "grad_weight"_a.none(), "grad_bias"_a.none(), "stream"_a = 0, SYNCBN_PRIMITIVE_KEY_ARGS);

  m.def(
      "batch_norm_backward_elemt",
      [](nb::handle dy, nb::handle x, int axis, nb::handle mean, nb::handle invstd,
         nb::handle weight, nb::handle sums, nb::handle count, nb::handle dx, uintptr_t stream,
         int64_t layer, const std::string& name, bool verify, int64_t call) {
        Args a;
        TensorView dyv = a.view(dy, "dy", false), xv = a.view(x, "x", false);
        TensorView mv = a.view(mean, "mean", false), sv = a.view(invstd, "invstd", false);
        auto wv = a.maybe(weight, "weight", false);
        TensorView su = a.view(sums, "sums", false), dxv = a.view(dx, "dx", true);
        // The count is a number on the host, or a (1,) array where it stays on the device.
        double n = 0;
        std::optional<TensorView> cv;
        if (nb::isinstance<nb::float_>(count) || nb::isinstance<nb::int_>(count))
          n = nb::cast<double>(count);
        else
          cv = a.view(count, "count", false);
        nb::gil_scoped_release nogil;
        syncbn::batch_norm_backward_elemt(dyv, xv, axis, mv, sv, ptr(wv), su, n, dxv, ptr(cv),
                                          reinterpret_cast<void*>(stream),
                                          make_key(layer, name, verify, call));
      },
      "dy"_a.none(), "x"_a.none(), "axis"_a, "mean"_a.none(), "invstd"_a.none(), "weight"_a.none(),
      "sums"_a.none(), "count"_a, "dx"_a.none(), "stream"_a = 0, SYNCBN_PRIMITIVE_KEY_ARGS);

  m.def(
      "forward",
      [](nb::handle x, nb::handle weight, nb::handle bias, nb::handle running_mean,
         nb::handle running_var, nb::handle y, nb::handle save_mean, nb::handle save_invstd,
         bool training, double momentum, double eps, int axis, syncbn::Communicator& comm,
         bool unbiased_running_var, nb::handle save_count, uintptr_t stream, int64_t layer,
         const std::string& name, bool verify, nb::handle mask, nb::handle counts,
         nb::handle batches) {
        Args a;
        TensorView xv = a.view(x, "x", false);
        auto mv = a.maybe(mask, "mask", false), cn = a.maybe(counts, "counts", true);
        // batches: a counter of training steps (torch's num_batches_tracked), one int64 on
        // the CPU, incremented once the call has succeeded - here, because a Python
        // in-place add costs more than a small layer's kernels.
        nb::ndarray<int64_t, nb::device::cpu> step;
        if (!batches.is_none() && (!nb::try_cast(batches, step, false) || step.size() != 1))
          throw syncbn::TypeError(
              std::string("batches: expected one writable int64 on the CPU, got ") +
              nb::type_name(batches.type()).c_str());
        auto wv = a.maybe(weight, "weight", false), bv = a.maybe(bias, "bias", false);
        // Eval only reads the running stats: read-only (e.g. memory-mapped) ones are fine.
        auto rm = a.maybe(running_mean, "running_mean", training);
        auto rv = a.maybe(running_var, "running_var", training);
        TensorView yv = a.view(y, "y", true);
        TensorView sm = a.view(save_mean, "save_mean", true);
        TensorView si = a.view(save_invstd, "save_invstd", true);
        auto sc = a.maybe(save_count, "save_count", true);
        syncbn::ForwardOptions opt;
        opt.axis = axis;
        opt.training = training;
        opt.momentum = momentum;
        opt.eps = eps;
        opt.unbiased_running_var = unbiased_running_var;
        opt.stream = reinterpret_cast<void*>(stream);
        opt.layer = layer;
        opt.layer_name = name.empty() ? nullptr : name.c_str();
        opt.verify = verify;
        opt.mask = ptr(mv);
        opt.counts = ptr(cn);
        double n;
        {
          nb::gil_scoped_release nogil;
          n = syncbn::forward(xv, ptr(wv), ptr(bv), ptr(rm), ptr(rv), opt, comm, yv, sm, si,
                              ptr(sc));
        }
        if (step.is_valid()) ++step.data()[0];
        return n;
      },
      "x"_a.none(), "weight"_a.none(), "bias"_a.none(), "running_mean"_a.none(),
      "running_var"_a.none(), "y"_a.none(), "save_mean"_a.none(), "save_invstd"_a.none(),
      "training"_a, "momentum"_a, "eps"_a, "axis"_a, "comm"_a, "unbiased_running_var"_a = true,
      "save_count"_a.none() = nb::none(), "stream"_a = 0, SYNCBN_KEY_ARGS,
      "mask"_a.none() = nb::none(), "counts"_a.none() = nb::none(),
      "batches"_a.none() = nb::none());

  m.def(
      "backward",
      [](nb::handle dy, nb::handle x, nb::handle save_mean, nb::handle save_invstd,
         nb::handle weight, nb::handle dx, nb::handle grad_weight, nb::handle grad_bias,
         bool training, double count, int axis, syncbn::Communicator& comm, nb::handle count_view,
         uintptr_t stream, int64_t layer, const std::string& name, bool verify, nb::handle mask,
         nb::handle counts) {
        Args a;
        TensorView dyv = a.view(dy, "dy", false), xv = a.view(x, "x", false);
        auto mv = a.maybe(mask, "mask", false), cn = a.maybe(counts, "counts", false);
        TensorView sm = a.view(save_mean, "save_mean", false);
        TensorView si = a.view(save_invstd, "save_invstd", false);
        auto wv = a.maybe(weight, "weight", false);
        auto dxv = a.maybe(dx, "dx", true);
        auto gw = a.maybe(grad_weight, "grad_weight", true);
        auto gb = a.maybe(grad_bias, "grad_bias", true);
        auto cv = a.maybe(count_view, "count", false);
        syncbn::BackwardOptions opt;
        opt.axis = axis;
        opt.training = training;
        opt.count = count;
        opt.count_view = ptr(cv);
        opt.stream = reinterpret_cast<void*>(stream);
        opt.layer = layer;
        opt.layer_name = name.empty() ? nullptr : name.c_str();
        opt.verify = verify;
        opt.mask = ptr(mv);
        opt.counts = ptr(cn);
        nb::gil_scoped_release nogil;
        syncbn::backward(dyv, xv, sm, si, ptr(wv), opt, comm, ptr(dxv), ptr(gw), ptr(gb));
      },
      "dy"_a.none(), "x"_a.none(), "save_mean"_a.none(), "save_invstd"_a.none(), "weight"_a.none(),
      "dx"_a.none(), "grad_weight"_a.none(), "grad_bias"_a.none(), "training"_a, "count"_a,
      "axis"_a, "comm"_a, "count_view"_a.none() = nb::none(), "stream"_a = 0, SYNCBN_KEY_ARGS,
      "mask"_a.none() = nb::none(), "counts"_a.none() = nb::none());

  // The CUDA module hands its operation table over as a capsule (see device_backend.h).
  m.def("register_device_backend", [](nb::capsule backend) {
    if (std::string(backend.name()) != "syncbn.DeviceBackend")
      throw syncbn::TypeError("backend: expected a 'syncbn.DeviceBackend' capsule");
    syncbn::register_device_backend(static_cast<const syncbn::DeviceBackend*>(backend.data()));
  });
  m.def("device_backend_loaded", [](int device_type) {
    return syncbn::device_backend(syncbn::DeviceType(device_type)) != nullptr;
  });

  m.def("build_info", &build_info);

  // For the torch module's C++ autograd node (bindings/torch_eager.cpp): the address of the
  // core's table, of a communicator (the caller keeps it alive), and the Python exception
  // of a failed call (an std::exception_ptr the module holds while this runs).
  m.def("eager_table", [] { return reinterpret_cast<uintptr_t>(&eager_table); });
  m.def("communicator_address",
        [](syncbn::Communicator& comm) { return reinterpret_cast<uintptr_t>(&comm); });
  m.def("eager_raise", [](uintptr_t error) {
    std::rethrow_exception(*reinterpret_cast<const std::exception_ptr*>(error));
  });

#ifdef SYNCBN_WITH_JAX
  // XLA FFI handlers for syncbn.jax, by platform, as capsules for
  // jax.ffi.register_ffi_target.
  m.def("xla_handlers", [] {
    auto capsule = [](XLA_FFI_Error* (*fn)(XLA_FFI_CallFrame*)) {
      return nb::capsule(reinterpret_cast<void*>(fn));
    };
    nb::dict d, cpu;
    cpu["forward"] = capsule(syncbn_xla_forward_cpu);
    cpu["backward"] = capsule(syncbn_xla_backward_cpu);
    d["cpu"] = cpu;
#ifdef SYNCBN_WITH_CUDA_FFI
    nb::dict cuda;
    cuda["forward"] = capsule(syncbn_xla_forward_cuda);
    cuda["backward"] = capsule(syncbn_xla_backward_cuda);
    d["CUDA"] = cuda;
#endif
    return d;
  });
  // The id under which the handlers find `comm` (its attribute in the compiled call); the
  // caller keeps `comm` alive.
  m.def("xla_register_communicator",
        [](syncbn::Communicator& comm) { return syncbn::xla::register_communicator(&comm); });
#endif
}
