// Fork-join over the CPU threads (OpenMP when the build has it, else serial).
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef SYNCBN_WITH_OPENMP
#include <omp.h>
#endif

namespace syncbn {
int num_threads();
}

namespace syncbn::cpu {

// Elements below which one more thread costs more than it saves.
constexpr int64_t kGrainElements = 1 << 15;

inline int threads_for(int64_t elements) {
  const int64_t want = std::max<int64_t>(1, elements / kGrainElements);
  return int(std::min<int64_t>(want, num_threads()));
}

// Calls fn(thread, nthreads) on `nt` threads; fn splits its own work by thread index.
template <class F>
void parallel(int nt, F&& fn) {
#ifdef SYNCBN_WITH_OPENMP
  if (nt > 1) {
#pragma omp parallel num_threads(nt)
    fn(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  fn(0, 1);
}

// [begin, end) of `n` items for thread t of nt.
inline void split(int64_t n, int t, int nt, int64_t* begin, int64_t* end) {
  *begin = n * t / nt;
  *end = n * (t + 1) / nt;
}

}  // namespace syncbn::cpu
