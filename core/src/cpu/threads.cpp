#include <sched.h>

#include <algorithm>
#include <cstdlib>
#include <thread>

#include "parallel.h"

namespace syncbn {

static int positive_env(const char* name) {
  const char* env = std::getenv(name);
  const int n = env ? std::atoi(env) : 0;
  return n > 0 ? n : 0;
}

// Processes of this job on this host, as the launcher tells its ranks (MPICH's Hydra,
// Open MPI, torchrun); 1 when not launched by one of them.
static int local_ranks() {
  for (const char* name : {"MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "LOCAL_WORLD_SIZE"})
    if (const int n = positive_env(name)) return n;
  return 1;
}

// SYNCBN_NUM_THREADS, else OMP_NUM_THREADS (as torch and other OpenMP code read it), else
// the CPUs this process may use, shared with the other ranks on this host unless the
// launcher bound this one to its own CPUs: ranks that each spin as many threads as the
// host has CPUs slow one another by orders of magnitude.
static int detect_threads() {
  if (const int n = positive_env("SYNCBN_NUM_THREADS")) return n;
  if (const int n = positive_env("OMP_NUM_THREADS")) return n;
  const int host = int(std::thread::hardware_concurrency());
  int cpus = host > 0 ? host : 1;
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) cpus = CPU_COUNT(&set);
#endif
  if (host > 0 && cpus < host) return cpus;  // bound by the launcher: these are its own
  return std::max(1, cpus / local_ranks());
}

// Read once: the environment is the process's configuration, not a per-call knob.
int num_threads() {
  static const int n = detect_threads();
  return n;
}

}  // namespace syncbn
