// Driver for bench_reduce_walk.py: times syncbn's CPU backward reduction kernel
// (core/src/cpu/batch_norm_backward_reduce.cpp, float32) on one geometry, built once per
// SYNCBN_REDUCE_WALK value (core/src/cpu/traverse.h). Usage:
//   reduce_walk OUTER CHANNELS INNER FLUSH_MIB REPS
// FLUSH_MIB > 0 writes that much memory before each call (x and dy then come from memory);
// 0 leaves them where the previous call put them. Prints the median time in us.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../core/src/cpu/kernels.h"
#include "../core/src/cpu/parallel.h"

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s OUTER CHANNELS INNER FLUSH_MIB REPS\n", argv[0]);
    return 2;
  }
  syncbn::Geometry g;
  g.outer = std::atol(argv[1]);
  g.channels = std::atol(argv[2]);
  g.inner = std::atol(argv[3]);
  const double flush_mib = std::atof(argv[4]);
  const int reps = std::atoi(argv[5]);
  const int64_t n = g.outer * g.channels * g.inner;
  std::vector<float> x(static_cast<size_t>(n)), dy(static_cast<size_t>(n));
  unsigned s = 1;
  for (auto* v : {&x, &dy})
    for (float& e : *v) s = s * 1664525u + 1013904223u, e = float(s >> 8) / float(1 << 24) - 0.5f;
  std::vector<double> mean(size_t(g.channels), 0.01), sum_dy(size_t(g.channels)),
      sum_dy_xmu(size_t(g.channels));
  std::vector<float> flush(size_t(flush_mib * (1 << 18)));
  std::vector<double> t;
  for (int r = 0; r < reps + 1; ++r) {  // the first call warms up
    syncbn::cpu::parallel(syncbn::num_threads(), [&](int i, int k) {
      int64_t b, e;
      syncbn::cpu::split(int64_t(flush.size()), i, k, &b, &e);
      for (int64_t j = b; j < e; ++j) flush[size_t(j)] += 1.0f;
    });
    const auto t0 = std::chrono::steady_clock::now();
    syncbn::cpu::batch_norm_backward_reduce(dy.data(), x.data(), syncbn::DType::Float32, g,
                                            mean.data(), sum_dy.data(), sum_dy_xmu.data());
    const auto t1 = std::chrono::steady_clock::now();
    if (r > 0) t.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  std::sort(t.begin(), t.end());
  std::printf("%.3f %.17g\n", t[t.size() / 2], sum_dy_xmu[0]);
  return 0;
}
