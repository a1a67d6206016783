#include "syncbn/device_backend.h"

#include <atomic>

#include "syncbn/errors.h"

namespace syncbn {

static std::atomic<const DeviceBackend*> g_cuda{nullptr};

void register_device_backend(const DeviceBackend* backend) {
  if (backend && backend->abi != DeviceBackend::kAbi)
    fail<CommError>("device backend: ABI version ", backend->abi, " does not match the core's ",
                    DeviceBackend::kAbi, "; reinstall syncbn so both modules come from one build");
  g_cuda.store(backend);
}

const DeviceBackend* device_backend(DeviceType device) {
  return device == DeviceType::CUDA ? g_cuda.load() : nullptr;
}

}  // namespace syncbn
