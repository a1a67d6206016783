// Host emulation of the tiny part of CUDA the syncbn kernels use, to execute the real
// kernel source on a machine without a GPU. Blocks run one after another; the threads of
// a block are ucontext coroutines on one OS thread, switched at __syncthreads and at warp
// shuffles (a barrier over the warp), so block/warp cooperation runs as written.
#pragma once
#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorMemoryAllocation = 2, cudaErrorInvalidConfiguration = 9 };
inline const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaErrorEmu"; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }

namespace emu {
struct Thread {
  ucontext_t ctx;
  uint3 tid;
  int linear;
  bool done;
};
struct State {
  uint3 block;
  dim3 bdim, gdim;
  Thread* cur = nullptr;
  ucontext_t sched;
  int nthreads = 0;
  int block_count = 0;
  long block_gen = 0;
  int warp_count[32] = {};
  long warp_gen[32] = {};
  double slot[1024];
  cudaError_t last = cudaSuccess;
  const std::function<void()>* body = nullptr;
  std::vector<Thread> threads;
  std::vector<std::vector<char>> stacks;
  long launches = 0, mallocs = 0, frees = 0;
};
inline State& st() {
  static State s;
  return s;
}
inline void yield() {
  swapcontext(&st().cur->ctx, &st().sched);
}
inline void syncthreads() {
  State& s = st();
  const long gen = s.block_gen;
  if (++s.block_count == s.nthreads) {
    s.block_count = 0;
    ++s.block_gen;
  } else {
    while (s.block_gen == gen) yield();
  }
}
inline void syncwarp() {
  State& s = st();
  const int w = s.cur->linear / 32;
  const int n = std::min(32, s.nthreads - w * 32);
  const long gen = s.warp_gen[w];
  if (++s.warp_count[w] == n) {
    s.warp_count[w] = 0;
    ++s.warp_gen[w];
  } else {
    while (s.warp_gen[w] == gen) yield();
  }
}
inline double shfl_down(double v, int off) {
  State& s = st();
  const int t = s.cur->linear, lane = t % 32;
  s.slot[t] = v;
  syncwarp();
  const double r = (lane + off < 32 && t + off < s.nthreads) ? s.slot[t + off] : v;
  syncwarp();
  return r;
}
inline void entry() {
  (*st().body)();
  st().cur->done = true;
  swapcontext(&st().cur->ctx, &st().sched);
}
inline void launch(dim3 grid, dim3 block, size_t, cudaStream_t, const std::function<void()>& body) {
  State& s = st();
  ++s.launches;
  const long nt = long(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || nt == 0 ||
      nt > 1024 || block.z > 64) {
    s.last = cudaErrorInvalidConfiguration;
    return;
  }
  s.body = &body;
  s.bdim = block;
  s.gdim = grid;
  s.nthreads = int(nt);
  s.threads.resize(nt);
  if (s.stacks.size() < size_t(nt)) s.stacks.resize(nt, std::vector<char>(1 << 17));
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        s.block = uint3{bx, by, bz};
        s.block_count = 0;
        std::fill(s.warp_count, s.warp_count + 32, 0);
        for (int t = 0; t < nt; ++t) {
          Thread& th = s.threads[t];
          th.linear = t;
          th.tid = uint3{unsigned(t % block.x), unsigned((t / block.x) % block.y),
                         unsigned(t / (block.x * block.y))};
          th.done = false;
          getcontext(&th.ctx);
          th.ctx.uc_stack.ss_sp = s.stacks[t].data();
          th.ctx.uc_stack.ss_size = s.stacks[t].size();
          th.ctx.uc_link = nullptr;
          makecontext(&th.ctx, entry, 0);
        }
        for (bool all = false; !all;) {
          all = true;
          for (int t = 0; t < nt; ++t) {
            Thread& th = s.threads[t];
            if (th.done) continue;
            s.cur = &th;
            swapcontext(&s.sched, &th.ctx);
            all = all && th.done;
          }
        }
      }
}
}  // namespace emu

#define threadIdx (::emu::st().cur->tid)
#define blockIdx (::emu::st().block)
#define blockDim (::emu::st().bdim)
#define gridDim (::emu::st().gdim)
#define __syncthreads() ::emu::syncthreads()
#define __shfl_down_sync(mask, v, off) ::emu::shfl_down((v), (off))

inline cudaError_t cudaGetLastError() {
  cudaError_t e = emu::st().last;
  emu::st().last = cudaSuccess;
  return e;
}
inline cudaError_t cudaMallocAsync(void** p, size_t n, cudaStream_t) {
  *p = std::malloc(n);
  if (!*p) return cudaErrorMemoryAllocation;
  std::memset(*p, 0xff, n);  // NaN doubles: a read of an unwritten partial shows
  ++emu::st().mallocs;
  return cudaSuccess;
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) {
  ++emu::st().frees;
  std::free(p);
  return cudaSuccess;
}
