#include "syncbn/build_config.h"

namespace syncbn {

BuildConfig build_config() {
  BuildConfig c{};
  c.version = SYNCBN_VERSION;
#ifdef SYNCBN_WITH_MPI
  c.mpi = true;
#endif
#ifdef SYNCBN_WITH_OPENMP
  c.openmp = true;
#endif
#if defined(__clang__)
  c.compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
  c.compiler = "gcc " __VERSION__;
#else
  c.compiler = "unknown";
#endif
  return c;
}

}  // namespace syncbn
