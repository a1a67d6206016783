// Device building blocks shared by the CUDA primitives, the mirror of cpu/traverse.h:
// launch checks, stream-ordered workspace, aligned packs, and the two traversals of the
// dense (outer, C, inner) geometry that every kernel is written in terms of.
//
// reduce_channels: per-channel sums of a-, b-contributions (stats, backward_reduce).
//   Deterministic two-stage: each block writes its partial sums to a workspace and a
//   finalize kernel adds them per channel in a fixed order; no atomics, so the bits do
//   not depend on scheduling. Two partial kernels, chosen by layout:
//   - runs (inner >= kRunMin, e.g. NCHW): grid (C, S), a block sums a 1/S share of one
//     channel, its threads striding along the channel's runs of `inner` elements.
//   - rows (inner < kRunMin, e.g. channels-last): each o is a contiguous row of
//     L = C*inner columns; a (bx, by) block owns bx column packs and sums a 1/S share of
//     the rows, so a warp reads a contiguous stretch of a row.
// map_channels: element-wise y = f(x0, x1, per-channel params), one flat grid-stride
//   loop that is coalesced for every layout; the channel of each element is tracked
//   incrementally instead of divided out.
//
// All index math is int64_t. Launch shapes depend only on the geometry, dtype and
// pointer alignment (not on the device), so a reduction gives the same bits on any GPU.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "syncbn/math.h"
#include "syncbn/tensor.h"

namespace syncbn::cuda::detail {

constexpr int kThreads = 256;  // threads per block in every kernel
constexpr int kWarp = 32;
// Loads a thread issues before using them: enough bytes in flight per SM to cover DRAM
// latency; 16-byte packs need fewer, and more would only cost registers (occupancy).
template <class T, int V>
constexpr int kUnroll = sizeof(T) * V >= 16 ? 2 : 4;
constexpr int64_t kRunMin = 32;         // inner at/above which a channel is read as runs
constexpr int64_t kRunMinCount = 2048;  // ...and a channel holds enough for a full block
// About 8 resident 256-thread blocks on each of ~132 SMs. Fixed rather than queried so
// the summation order, hence the result, is the same on every GPU.
constexpr int64_t kTargetBlocks = 1024;
constexpr int64_t kMinPerThread = 32;  // runs: fewer elements per thread is overhead
constexpr int64_t kMinRowsPerThread = 4;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = int64_t(1) << 30;

// ---- host-side checks and workspace --------------------------------------------------

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("syncbn CUDA: ") + what + " failed: " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

// Right after a launch: a bad configuration or a missing kernel image surfaces here.
inline void check_launch(const char* kernel) {
  check(cudaGetLastError(), (std::string("launching kernel ") + kernel).c_str());
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

inline int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Stream-ordered scratch of n doubles: cudaMallocAsync/cudaFreeAsync on the caller's
// stream, so it needs no synchronization and records into a CUDA graph. The free is
// enqueued after every kernel launched before the destructor runs, also on a throw.
class Workspace {
 public:
  Workspace(int64_t n, cudaStream_t stream, const char* who) : stream_(stream) {
    if (n > 0)
      check(cudaMallocAsync(reinterpret_cast<void**>(&p_), size_t(n) * sizeof(double), stream),
            (std::string("cudaMallocAsync for ") + who).c_str());
  }
  ~Workspace() {
    if (p_) cudaFreeAsync(p_, stream_);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  double* get() const { return p_; }

 private:
  double* p_ = nullptr;
  cudaStream_t stream_;
};

// ---- packs: V consecutive elements moved by one vector load/store ----------------------

template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <class T, int V>
bool aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * V) == 0;
}

template <int V, class T>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <int V, class T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

// ---- deterministic sums ----------------------------------------------------------------

// Shuffle-down tree: lane 0 ends with the warp's sum, always added in the same order.
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sums a and b over a 1-D block of kThreads; the results are valid in thread 0.
__device__ __forceinline__ void block_sum2(double& a, double& b) {
  __shared__ double sa[kThreads / kWarp], sb[kThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) sa[warp] = a, sb[warp] = b;
  __syncthreads();
  if (warp == 0) {
    a = lane < kThreads / kWarp ? sa[lane] : 0.0;
    b = lane < kThreads / kWarp ? sb[lane] : 0.0;
    a = warp_sum(a);
    b = warp_sum(b);
  }
}

// ---- reduce_channels -------------------------------------------------------------------
//
// Acc (device functor):
//   static constexpr bool kTwoInputs;          // false: x1 is not read (v1 = v0)
//   double param(int64_t c) const;             // per-channel parameter p
//   void operator()(double v0, double v1, double p, double& a, double& b) const;
// Epi (device functor), called once per channel with the channel's totals:
//   void operator()(int64_t c, double a, double b) const;
//   void once() const;                         // by one thread, for non-channel outputs

// Runs: block (c, s) sums packs j = s*kThreads + t, stepping S*kThreads, of channel c's
// outer x (inner / V) packs; (o, i) and the offset advance by carries, never by division.
// Partials: ws[c*S + s] (a), ws[C*S + c*S + s] (b), so a channel's S partials are adjacent.
template <class T, int V, class Acc>
__global__ void __launch_bounds__(kThreads)
    reduce_runs_kernel(const T* __restrict__ x0, const T* __restrict__ x1, int64_t outer, int64_t C,
                       int64_t inner, Acc acc, double* __restrict__ ws) {
  constexpr int U = kUnroll<T, V>;
  const int64_t c = blockIdx.x, s = blockIdx.y, S = gridDim.y;
  const int64_t Iv = inner / V;          // packs per run (V divides inner)
  const int64_t run_stride = C * inner;  // elements from (o, c, i) to (o + 1, c, i)
  const int64_t step = S * kThreads;     // packs per grid step within the channel
  const int64_t so = step / Iv, si = step % Iv;
  const int64_t doff = so * run_stride + si * V;
  const int64_t wrap = run_stride - inner;  // i passed the run's end: next run, i -= Iv
  const int64_t j = s * kThreads + threadIdx.x;
  int64_t o = j / Iv, i = j % Iv;
  int64_t off = o * run_stride + c * inner + i * V;
  const double p = acc.param(c);
  double a = 0.0, b = 0.0;
  while (o < outer) {
    int64_t offs[U];
    bool ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      ok[u] = o < outer;
      offs[u] = off;
      off += doff, o += so, i += si;
      if (i >= Iv) i -= Iv, o += 1, off += wrap;
    }
    Pack<T, V> v0[U], v1[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (ok[u]) {
        v0[u] = load_pack<V>(x0 + offs[u]);
        if constexpr (Acc::kTwoInputs) v1[u] = load_pack<V>(x1 + offs[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (!ok[u]) continue;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const double d0 = load<double>(&v0[u].v[k]);
        const double d1 = Acc::kTwoInputs ? load<double>(&v1[u].v[k]) : d0;
        acc(d0, d1, p, a, b);
      }
    }
  }
  block_sum2(a, b);
  if (threadIdx.x == 0) {
    ws[c * S + s] = a;
    ws[C * S + c * S + s] = b;
  }
}

// Rows: a (bx, by) block; thread (tx, ty) owns column pack cp = blockIdx.x*bx + tx of the
// L = C*inner columns and rows r = blockIdx.y*by + ty, stepping gridDim.y*by; the by
// partials of a column are then added in a fixed tree. Partials: ws[s*L + col] (a),
// ws[S*L + s*L + col] (b).
template <class T, int V, class Acc>
__global__ void __launch_bounds__(kThreads)
    reduce_rows_kernel(const T* __restrict__ x0, const T* __restrict__ x1, int64_t outer, int64_t L,
                       int64_t inner, Acc acc, double* __restrict__ ws) {
  // [k][thread] so that consecutive threads hit consecutive banks.
  __shared__ double sa[V][kThreads], sb[V][kThreads];
  constexpr int U = kUnroll<T, V>;
  const int64_t Lv = L / V;  // V divides L
  const int64_t cp = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = cp < Lv;
  double a[V], b[V], p[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    a[k] = 0.0, b[k] = 0.0;
    p[k] = active ? acc.param((cp * V + k) / inner) : 0.0;
  }
  if (active) {
    const int64_t rstep = int64_t(gridDim.y) * blockDim.y;
    for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < outer; r += U * rstep) {
      Pack<T, V> v0[U], v1[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (r + u * rstep < outer) {
          const int64_t off = (r + u * rstep) * L + cp * V;
          v0[u] = load_pack<V>(x0 + off);
          if constexpr (Acc::kTwoInputs) v1[u] = load_pack<V>(x1 + off);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (r + u * rstep >= outer) continue;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const double d0 = load<double>(&v0[u].v[k]);
          const double d1 = Acc::kTwoInputs ? load<double>(&v1[u].v[k]) : d0;
          acc(d0, d1, p[k], a[k], b[k]);
        }
      }
    }
  }
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int k = 0; k < V; ++k) sa[k][t] = a[k], sb[k][t] = b[k];
  __syncthreads();
  for (unsigned h = blockDim.y / 2; h > 0; h >>= 1) {  // blockDim.y is a power of two
    if (threadIdx.y < h) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        sa[k][t] += sa[k][t + h * blockDim.x];
        sb[k][t] += sb[k][t + h * blockDim.x];
      }
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && active) {
    const int64_t S = gridDim.y, s = blockIdx.y;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      ws[s * L + cp * V + k] = sa[k][t];
      ws[S * L + s * L + cp * V + k] = sb[k][t];
    }
  }
}

// One warp per channel: channel c's partials are the parts*width entries
// ws[(k / width) * L + c * width + k % width], k = 0.. (b at ws + parts*L). Lanes take
// every 32nd entry in order, then a warp tree: a fixed order for a fixed launch shape.
template <class Epi>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const double* __restrict__ ws, int64_t parts, int64_t width, int64_t L,
                    int64_t C, Epi epi) {
  const int lane = threadIdx.x % kWarp;
  const int64_t K = parts * width;
  const double* wb = ws + parts * L;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / kWarp);
  // c is uniform within a warp, so every lane of a warp reaches warp_sum together.
  for (int64_t c = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / kWarp; c < C; c += warps) {
    double a = 0.0, b = 0.0;
    for (int64_t k = lane; k < K; k += kWarp) {
      const int64_t idx = (k / width) * L + c * width + k % width;
      a += ws[idx];
      b += wb[idx];
    }
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) epi(c, a, b);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) epi.once();
}

template <class Epi>
void launch_finalize(const double* ws, int64_t parts, int64_t width, int64_t L, int64_t C,
                     const Epi& epi, cudaStream_t stream, const char* name) {
  // At least one block: epi.once() runs even when there are no channels.
  const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(C, kThreads / kWarp), kMaxGridX));
  finalize_kernel<<<unsigned(blocks), kThreads, 0, stream>>>(ws, parts, width, L, C, epi);
  check_launch(name);
}

template <class T, int V, class Acc, class Epi>
void reduce_runs(const T* x0, const T* x1, const Geometry& g, const Acc& acc, const Epi& epi,
                 cudaStream_t stream, const char* name) {
  const int64_t C = g.channels, n = g.outer * g.inner;
  // Enough blocks per channel to fill the GPU, but each thread keeps a useful share.
  const int64_t S = std::max<int64_t>(
      1, std::min({ceil_div(kTargetBlocks, C), ceil_div(n, kThreads * kMinPerThread), kMaxGridY}));
  Workspace ws(2 * C * S, stream, name);
  reduce_runs_kernel<T, V, Acc><<<dim3(unsigned(C), unsigned(S)), kThreads, 0, stream>>>(
      x0, x1, g.outer, C, g.inner, acc, ws.get());
  check_launch(name);
  launch_finalize(ws.get(), 1, S, C * S, C, epi, stream, name);
}

template <class T, int V, class Acc, class Epi>
void reduce_rows(const T* x0, const T* x1, const Geometry& g, const Acc& acc, const Epi& epi,
                 cudaStream_t stream, const char* name) {
  const int64_t C = g.channels, O = g.outer, L = C * g.inner, Lv = L / V;
  // by: rows per block, at most what gives each thread kMinRowsPerThread rows; bx: column
  // packs, up to 32 (one warp along a row) or more when there are few rows.
  const int64_t bx_min = std::min<int64_t>(kWarp, pow2_ceil(Lv));
  const int64_t by = std::min(kThreads / bx_min, pow2_ceil(ceil_div(O, kMinRowsPerThread)));
  const int64_t bx = std::min(kThreads / by, pow2_ceil(Lv));
  const int64_t gx = ceil_div(Lv, bx);
  if (gx > kMaxGridX)
    throw std::runtime_error(std::string("syncbn CUDA: ") + name + ": too many channels");
  const int64_t S = std::max<int64_t>(
      1, std::min({ceil_div(kTargetBlocks, gx), ceil_div(O, by * kMinRowsPerThread), kMaxGridY}));
  Workspace ws(2 * S * L, stream, name);
  reduce_rows_kernel<T, V, Acc>
      <<<dim3(unsigned(gx), unsigned(S)), dim3(unsigned(bx), unsigned(by)), 0, stream>>>(
          x0, x1, O, L, g.inner, acc, ws.get());
  check_launch(name);
  launch_finalize(ws.get(), S, g.inner, L, C, epi, stream, name);
}

// Per-channel reduction of x0 (and x1, same traversal) into epi. For an empty tensor the
// totals are 0 and epi still runs, like the CPU path that writes zero sums.
template <class T, class Acc, class Epi>
void reduce_channels(const T* x0, const T* x1, const Geometry& g, const Acc& acc, const Epi& epi,
                     cudaStream_t stream, const char* name) {
  const int64_t C = g.channels;
  if (C > kMaxGridX)
    throw std::runtime_error(std::string("syncbn CUDA: ") + name + ": too many channels");
  if (C == 0 || g.outer * g.inner == 0)
    return launch_finalize<Epi>(nullptr, 0, 1, 0, C, epi, stream, name);
  if (g.inner >= kRunMin && g.outer * g.inner >= kRunMinCount) {
    // 16-byte loads when whole packs sit inside one run.
    constexpr int V = 16 / sizeof(T);
    if (g.inner % V == 0 && aligned<T, V>(x0) && (!Acc::kTwoInputs || aligned<T, V>(x1)))
      return reduce_runs<T, V>(x0, x1, g, acc, epi, stream, name);
    return reduce_runs<T, 1>(x0, x1, g, acc, epi, stream, name);
  }
  // 8-byte packs: a warp then reads 256 contiguous bytes of a row; wider packs would
  // multiply the per-thread accumulators and the shared memory of the column tree.
  constexpr int V = sizeof(T) >= 8 ? 1 : 8 / sizeof(T);
  if ((C * g.inner) % V == 0 && aligned<T, V>(x0) && (!Acc::kTwoInputs || aligned<T, V>(x1)))
    return reduce_rows<T, V>(x0, x1, g, acc, epi, stream, name);
  return reduce_rows<T, 1>(x0, x1, g, acc, epi, stream, name);
}

// ---- map_channels ----------------------------------------------------------------------
//
// Op (device functor):
//   static constexpr bool kTwoInputs;            // false: x1 is not read
//   struct Params; Params params(int64_t c) const;
//   double operator()(double v0, double v1, const Params& p) const;
//
// Thread t handles packs p = t, t + P, ... (P = grid size): flat and coalesced whatever
// the layout. Element e = p*V sits at i = e % inner, c = (e / inner) % C; both advance by
// carries. kUniform (V divides inner): a pack lies in one channel, params load once.
template <class T, int V, bool kUniform, class Op>
__global__ void __launch_bounds__(kThreads)
    map_kernel(const T* x0, const T* x1, T* y, int64_t npacks, int64_t C, int64_t inner, Op op) {
  constexpr int U = kUnroll<T, V>;
  const int64_t P = int64_t(gridDim.x) * kThreads;
  const int64_t E = P * V;  // elements per grid step
  const int64_t si = E % inner, sc = (E / inner) % C;
  int64_t p = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  int64_t i = (p * V) % inner, c = (p * V / inner) % C;
  // y may alias an input exactly (in place): a thread reads each of its packs before it
  // writes that pack, and no other thread touches it.
  while (p < npacks) {
    Pack<T, V> v0[U], v1[U];
    int64_t cs[U], is[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      cs[u] = c, is[u] = i;
      i += si, c += sc;
      if (i >= inner) i -= inner, c += 1;
      if (c >= C) c -= C;
      if (p + u * P < npacks) {
        v0[u] = load_pack<V>(x0 + (p + u * P) * V);
        if constexpr (Op::kTwoInputs) v1[u] = load_pack<V>(x1 + (p + u * P) * V);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (p + u * P >= npacks) continue;
      Pack<T, V> out;
      if constexpr (kUniform) {
        const auto prm = op.params(cs[u]);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const double d0 = load<double>(&v0[u].v[k]);
          const double d1 = Op::kTwoInputs ? load<double>(&v1[u].v[k]) : d0;
          store<double>(&out.v[k], op(d0, d1, prm));
        }
      } else {
        int64_t ii = is[u], cc = cs[u];
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const auto prm = op.params(cc);
          const double d0 = load<double>(&v0[u].v[k]);
          const double d1 = Op::kTwoInputs ? load<double>(&v1[u].v[k]) : d0;
          store<double>(&out.v[k], op(d0, d1, prm));
          if (++ii == inner) {
            ii = 0;
            if (++cc == C) cc = 0;
          }
        }
      }
      store_pack<V>(y + (p + u * P) * V, out);
    }
    p += U * P;
  }
}

template <class T, int V, bool kUniform, class Op>
void launch_map(const T* x0, const T* x1, T* y, const Geometry& g, const Op& op,
                cudaStream_t stream, const char* name) {
  const int64_t npacks = g.outer * g.channels * g.inner / V;
  const int64_t blocks = std::min(ceil_div(npacks, int64_t(kThreads) * kUnroll<T, V>), kMaxGridX);
  map_kernel<T, V, kUniform, Op>
      <<<unsigned(blocks), kThreads, 0, stream>>>(x0, x1, y, npacks, g.channels, g.inner, op);
  check_launch(name);
}

// y = op(x0, x1, params(c)) element-wise; x1 is read only if Op::kTwoInputs.
template <class T, class Op>
void map_channels(const T* x0, const T* x1, T* y, const Geometry& g, const Op& op,
                  cudaStream_t stream, const char* name) {
  const int64_t numel = g.outer * g.channels * g.inner;
  if (numel == 0) return;
  // 16-byte loads and stores when every pointer allows and packs tile the tensor.
  constexpr int V = 16 / sizeof(T);
  if (numel % V == 0 && aligned<T, V>(x0) && (!Op::kTwoInputs || aligned<T, V>(x1)) &&
      aligned<T, V>(y)) {
    if (g.inner % V == 0) return launch_map<T, V, true>(x0, x1, y, g, op, stream, name);
    return launch_map<T, V, false>(x0, x1, y, g, op, stream, name);
  }
  launch_map<T, 1, true>(x0, x1, y, g, op, stream, name);
}

}  // namespace syncbn::cuda::detail
