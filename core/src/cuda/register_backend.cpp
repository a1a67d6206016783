// syncbn::register_cuda_backend: hands the CUDA backend's table (ops.cu) to the core.
#include "syncbn/cuda_backend.h"
#include "syncbn/device_backend.h"

namespace syncbn {
namespace cuda {
const DeviceBackend* backend_table();
}

void register_cuda_backend() {
  register_device_backend(cuda::backend_table());
}

}  // namespace syncbn
