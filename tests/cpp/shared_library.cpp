// The static core links into a shared library (it is position independent): a plugin, a
// framework extension. Referencing forward/backward pulls in the ops and the kernels.
#include "syncbn/ops.h"

extern "C" void* syncbn_entry_points(int which) {
  return which == 0 ? reinterpret_cast<void*>(&syncbn::forward)
                    : reinterpret_cast<void*>(&syncbn::backward);
}
