#include <sched.h>

#include <cstdlib>
#include <thread>

#include "parallel.h"

namespace syncbn {

static int detect_threads() {
  if (const char* env = std::getenv("SYNCBN_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  const unsigned n = std::thread::hardware_concurrency();
  return n ? int(n) : 1;
}

// Read once: the environment is the process's configuration, not a per-call knob.
int num_threads() {
  static const int n = detect_threads();
  return n;
}

}  // namespace syncbn
