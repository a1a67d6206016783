// What this build of the core has, for build_info() and for C++ callers.
#pragma once

#include <string>

namespace syncbn {

struct BuildConfig {
  const char* version;
  bool mpi;
  bool openmp;
  bool cuda;
  bool nccl;
  const char* compiler;
};

BuildConfig build_config();

}  // namespace syncbn
