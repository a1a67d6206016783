// Host emulation of the tiny part of CUDA the syncbn kernels use, to execute the real
// kernel source on a machine without a GPU. Blocks run one after another; the threads of
// a block are ucontext coroutines on one OS thread, switched at __syncthreads and at warp
// shuffles (a barrier over the warp), so block/warp cooperation runs as written.
// "Device memory" is host memory; every stream operation completes when it is called.
// For the orchestration (ops.cu) the runtime calls it makes are emulated too and counted
// in emu::State (syncs, copies by kind, streams and devices used), with a capture mode
// (emu::st().capturing) that refuses what CUDA-graph capture forbids.
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
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorStreamCaptureUnsupported = 900,
};
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
  }
  return "cudaErrorEmu";
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaErrorStreamCaptureUnsupported
             ? "operation not permitted when stream is capturing (emulated)"
             : "emulated error";
}

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
  // Runtime calls besides launches (for ops.cu, the orchestration).
  long syncs = 0;                           // cudaStreamSynchronize / cudaDeviceSynchronize
  long d2h = 0, h2d = 0, d2d = 0, h2h = 0;  // cudaMemcpyAsync by kind
  long memsets = 0;
  // Emulated CUDA-graph capture: while set, host synchronization and copies between host
  // and device are refused with cudaErrorStreamCaptureUnsupported (counted in refused).
  bool capturing = false;
  long refused = 0;
  // Stream-ordered work enqueued (launches, async alloc/free/memset/memcpy) and its value
  // at the last synchronization: equal means the stream is drained.
  long enqueued = 0, enqueued_at_sync = 0;
  // When check_stream is set, work enqueued on another stream than `stream` is counted.
  bool check_stream = false;
  cudaStream_t stream = nullptr;
  long wrong_stream = 0;
  // The current device (cudaGetDevice/cudaSetDevice) among device_count; when
  // expect_device >= 0, work enqueued while another device is current is counted.
  int device = 0, device_count = 2, expect_device = -1;
  long wrong_device = 0;
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
// Bookkeeping for one piece of stream-ordered work.
inline void enqueue(cudaStream_t stream) {
  State& s = st();
  ++s.enqueued;
  if (s.check_stream && stream != s.stream) ++s.wrong_stream;
  if (s.expect_device >= 0 && s.device != s.expect_device) ++s.wrong_device;
}
inline bool is_stream_drained() {
  return st().enqueued == st().enqueued_at_sync;
}
inline void entry() {
  (*st().body)();
  st().cur->done = true;
  swapcontext(&st().cur->ctx, &st().sched);
}
inline void launch(dim3 grid, dim3 block, size_t, cudaStream_t stream,
                   const std::function<void()>& body) {
  State& s = st();
  ++s.launches;
  enqueue(stream);
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
inline cudaError_t cudaMallocAsync(void** p, size_t n, cudaStream_t s) {
  *p = std::malloc(n);
  if (!*p) return cudaErrorMemoryAllocation;
  std::memset(*p, 0xff, n);  // NaN doubles: a read of an unwritten partial shows
  ++emu::st().mallocs;
  emu::enqueue(s);
  return cudaSuccess;
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t s) {
  ++emu::st().frees;
  emu::enqueue(s);
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = emu::st().device;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  if (d < 0 || d >= emu::st().device_count) return cudaErrorInvalidDevice;
  emu::st().device = d;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t s) {
  ++emu::st().memsets;
  emu::enqueue(s);
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind kind,
                                   cudaStream_t s) {
  emu::State& e = emu::st();
  switch (kind) {
    case cudaMemcpyHostToDevice:
    case cudaMemcpyDeviceToHost:
    case cudaMemcpyHostToHost:
    case cudaMemcpyDefault:  // unified addressing: may be either, refused like them
      if (e.capturing) {
        ++e.refused;
        return cudaErrorStreamCaptureUnsupported;
      }
      if (kind == cudaMemcpyHostToDevice) ++e.h2d;
      if (kind == cudaMemcpyDeviceToHost) ++e.d2h;
      if (kind == cudaMemcpyHostToHost || kind == cudaMemcpyDefault) ++e.h2h;
      break;
    case cudaMemcpyDeviceToDevice: ++e.d2d; break;
    default: return cudaErrorInvalidValue;
  }
  emu::enqueue(s);
  if (n) std::memmove(dst, src, n);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  emu::State& e = emu::st();
  if (e.capturing) {
    ++e.refused;
    return cudaErrorStreamCaptureUnsupported;
  }
  if (e.check_stream && s != e.stream) ++e.wrong_stream;
  ++e.syncs;
  e.enqueued_at_sync = e.enqueued;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() {
  emu::State& e = emu::st();
  if (e.capturing) {
    ++e.refused;
    return cudaErrorStreamCaptureUnsupported;
  }
  ++e.syncs;
  e.enqueued_at_sync = e.enqueued;
  return cudaSuccess;
}
