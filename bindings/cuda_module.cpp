// nanobind module syncbn._cuda: hands the CUDA device backend to the core (as a capsule,
// see device_backend.h), reports devices, and makes NCCL communicators. Imported lazily
// by the Python package; importing it needs no GPU (static cudart loads the driver only
// when a CUDA call is made).
#include <cuda_runtime.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <string>

#include "errors.h"
#include "syncbn/device_backend.h"
#include "syncbn/errors.h"
#ifdef SYNCBN_WITH_NCCL
#include "syncbn/nccl_communicator.h"
#endif

namespace nb = nanobind;
using namespace nb::literals;

namespace syncbn::cuda {
const DeviceBackend* backend_table();
}

namespace {

// Number of visible CUDA devices; 0 (not an error) without a driver or a device.
int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

// A communicator handed to the core as a capsule; the capsule owns it.
nb::capsule communicator_capsule(syncbn::Communicator* c) {
  return nb::capsule(c, "syncbn.Communicator",
                     [](void* p) noexcept { delete static_cast<syncbn::Communicator*>(p); });
}

}  // namespace

NB_MODULE(_cuda, m) {
  m.doc() = "syncbn CUDA backend (internal; loaded by the syncbn package when needed)";
  syncbn::bindings::register_exception_translators();

  m.def("backend", [] {
    return nb::capsule(const_cast<syncbn::DeviceBackend*>(syncbn::cuda::backend_table()),
                       "syncbn.DeviceBackend");
  });
  m.def("device_count", &device_count);
  m.def("runtime_version", [] {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });
  m.def("driver_version", [] {
    int v = 0;
    if (cudaDriverGetVersion(&v) != cudaSuccess) cudaGetLastError();
    return v;
  });
  m.attr("architectures") = SYNCBN_CUDA_ARCHITECTURES;
#ifdef SYNCBN_WITH_NCCL
  m.attr("nccl") = true;
  m.def("nccl_version", &syncbn::nccl_version);
  m.def("nccl_unique_id", [] { return nb::bytes(syncbn::nccl_unique_id().data(), 128); });
  m.def(
      "nccl_communicator",
      [](nb::bytes id, int rank, int size, int device) {
        std::string s(id.c_str(), id.size());
        syncbn::Communicator* c;
        {
          nb::gil_scoped_release nogil;  // ncclCommInitRank blocks until all ranks join
          c = new syncbn::NcclCommunicator(s, rank, size, device);
        }
        return communicator_capsule(c);
      },
      "id"_a, "rank"_a, "size"_a, "device"_a);
  m.def(
      "nccl_split",
      [](nb::capsule parent, int color, int key) {
        auto* p = static_cast<syncbn::Communicator*>(parent.data());
        auto* nccl = dynamic_cast<syncbn::NcclCommunicator*>(p);
        if (!nccl) throw syncbn::TypeError("comm: expected an NCCL communicator to split");
        syncbn::Communicator* c;
        {
          nb::gil_scoped_release nogil;
          c = nccl->split(color, key);
        }
        if (!c) return nb::object(nb::none());  // color -1: this rank joins no subgroup
        return nb::object(communicator_capsule(c));
      },
      "comm"_a, "color"_a, "key"_a);
#else
  m.attr("nccl") = false;
#endif
}
