// The CUDA device backend: the orchestration of ops.cpp for device tensors. Arguments
// arrive validated (ops.cpp); everything here is stream-ordered on the caller's stream
// and reads nothing back to the host, except when a communicator cannot take device
// buffers (then the buffer is staged through host memory: correct, but a host sync).
#include <cuda_runtime.h>

#include <cmath>
#include <memory>
#include <vector>

#include "../collective.h"
#include "../layout.h"
#include "kernels.cuh"
#include "syncbn/device_backend.h"
#include "syncbn/errors.h"

namespace syncbn::cuda {
namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail<CommError>(what, " failed: ", cudaGetErrorString(e));
}

cudaStream_t as_stream(void* s) {
  return static_cast<cudaStream_t>(s);
}

// Makes x's device current for the duration of one call.
class DeviceGuard {
 public:
  explicit DeviceGuard(Device d) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != d.id) check(cudaSetDevice(d.id), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev_) cudaSetDevice(prev_);
  }

 private:
  int prev_ = 0;
};

// Stream-ordered scratch memory (capturable in a CUDA graph), freed on the same stream.
class Scratch {
 public:
  explicit Scratch(cudaStream_t s) : s_(s) {}
  ~Scratch() {
    for (void* p : ptrs_) cudaFreeAsync(p, s_);
  }
  void* bytes(size_t n) {
    void* p = nullptr;
    check(cudaMallocAsync(&p, n ? n : 1, s_), "cudaMallocAsync");
    ptrs_.push_back(p);
    return p;
  }
  // n doubles the caller's kernels will write in full (uninitialized until then).
  double* doubles(int64_t n) { return static_cast<double*>(bytes(size_t(n) * sizeof(double))); }
  // n doubles the kernels may leave alone (empty inputs): zeroed first.
  double* sums(int64_t n, bool empty) { return empty ? zeros(n) : doubles(n); }
  double* zeros(int64_t n) {
    auto* p = static_cast<double*>(bytes(size_t(n) * sizeof(double)));
    check(cudaMemsetAsync(p, 0, size_t(n) * sizeof(double), s_), "cudaMemsetAsync");
    return p;
  }
  // A float64 contiguous copy of a per-channel view (or the view itself when it already is
  // one); null for a null view.
  const double* f64(const TensorView* v) {
    if (!v) return nullptr;
    if (v->dtype == DType::Float64 && (v->shape[0] <= 1 || v->strides[0] == 1))
      return static_cast<const double*>(v->data);
    auto* p = static_cast<double*>(bytes(size_t(v->shape[0]) * sizeof(double)));
    vector_to_double(v->data, v->dtype, v->strides[0], v->shape[0], p, s_);
    return p;
  }
  // Where a kernel writes a per-channel float64 result meant for `v`: v itself when it is
  // a contiguous float64 array, else a float64 copy of its current values, to be written
  // back (write_vec) when the pointer is not v.data. Either way an output the kernel
  // leaves alone (a reduced count of 0) keeps its values.
  double* f64_out(const TensorView& v) { return const_cast<double*>(f64(&v)); }
  cudaStream_t stream() const { return s_; }

 private:
  cudaStream_t s_;
  std::vector<void*> ptrs_;
};

void write_vec(const TensorView& dst, const double* src, cudaStream_t s) {
  vector_from_double(src, dst.data, dst.dtype, dst.strides[0], dst.shape[0], s);
}

__global__ void fill_kernel(double* p, int64_t n, double v) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    p[i] = v;
}

void fill(double* p, int64_t n, double v, cudaStream_t s) {
  if (n <= 0) return;
  fill_kernel<<<int((n + 255) / 256 < 1024 ? (n + 255) / 256 : 1024), 256, 0, s>>>(p, n, v);
  check(cudaGetLastError(), "fill_kernel");
}

// Device scratch for Layout (see layout.h): stream-ordered, freed with the op's Scratch.
struct DeviceMemory {
  Scratch* scratch;
  void* bytes(size_t n) { return scratch->bytes(n); }
  void copy(const TensorView& src, const TensorView& dst) {
    copy_strided(src, dst, scratch->stream());
  }
};

Layout<DeviceMemory> device_layout(const TensorView& x, int axis, Scratch& sc) {
  return Layout<DeviceMemory>(x, axis, DeviceMemory{&sc});
}

RunningStats running_stats(const TensorView* rm, const TensorView* rv) {
  RunningStats r;
  if (rm) r.mean = rm->data, r.mean_dtype = rm->dtype, r.mean_stride = rm->strides[0];
  if (rv) r.var = rv->data, r.var_dtype = rv->dtype, r.var_stride = rv->strides[0];
  return r;
}

// Whether the host sees what an all-reduce of a device buffer returns (and so checks it):
// every communicator but one that takes device buffers in stream order.
bool host_checks(Device dev, const Communicator& comm) {
  return !(comm.accepts(dev) && comm.stream_ordered());
}

// The all-reduce of a device buffer [payload | count | fingerprint]: on the stream when
// the communicator takes device buffers (NCCL, local), else staged through host memory.
// Where the host holds the reduced values anyway (staged, or a CUDA-aware MPI that needed
// a sync) it checks them against `e` (check_reduced: throws before anything is written);
// on the stream, the kernels that consume the buffer check it (fp::DeviceCheck).
// `forward_count`: buf[n] holds the forward's global count (not reduced), read with the
// buffer by the host check (one copy, one sync), which then requires the reduced count to
// equal it, as the host path and the device check do.
void allreduce_device(double* buf, int64_t n, Device dev, Communicator& comm, cudaStream_t s,
                      const Expected* e, bool forward_count = false) {
  std::vector<double> host;
  const int64_t m = n + (e && forward_count ? 1 : 0);  // what the host check reads
  auto checked = [&] {
    Expected k = *e;
    if (forward_count) k.count = host[size_t(n)];
    check_reduced(host.data(), k);
  };
  if (comm.accepts(dev)) {
    const bool ordered = comm.stream_ordered();
    // A CUDA-aware MPI reads the buffer outside the stream: let the stream finish first.
    if (!ordered) check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    comm.allreduce_sum(buf, n, dev, s);
    if (ordered || !e) return;
    host.resize(size_t(m));
    check(cudaMemcpyAsync(host.data(), buf, size_t(m) * sizeof(double), cudaMemcpyDeviceToHost, s),
          "cudaMemcpyAsync");
    check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    checked();
    return;
  }
  host.resize(size_t(m));
  check(cudaMemcpyAsync(host.data(), buf, size_t(m) * sizeof(double), cudaMemcpyDeviceToHost, s),
        "cudaMemcpyAsync");
  check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
  comm.allreduce_sum(host.data(), n, Device{DeviceType::CPU, 0}, nullptr);
  if (e) checked();
  check(cudaMemcpyAsync(buf, host.data(), size_t(n) * sizeof(double), cudaMemcpyHostToDevice, s),
        "cudaMemcpyAsync");
  check(cudaStreamSynchronize(s), "cudaStreamSynchronize");  // `host` goes out of scope
}

int64_t count_per_channel(const TensorView& x, int axis) {
  const int64_t C = x.shape[axis];
  return C > 0 ? x.numel() / C : 0;
}

Expected expected(CollectiveOp op, const TensorView& x, int axis, const Fingerprint& f,
                  const Communicator& comm) {
  Expected e;
  e.op = op;
  e.channels = x.shape[axis];
  e.mine = &f;
  e.comm = &comm;
  e.local_count = double(count_per_channel(x, axis));
  return e;
}

fp::DeviceCheck device_check(CollectiveOp op, double ranks, double local_count, bool verify) {
  fp::DeviceCheck k;
  k.op = int(op);
  k.ranks = ranks;
  k.local_count = local_count;
  k.verify = verify;
  return k;
}

void stats_into(const TensorView& x, int axis, double* buf, Scratch& sc) {
  const int64_t C = x.shape[axis];
  if (x.numel() == 0) {
    check(cudaMemsetAsync(buf, 0, size_t(2 * C + 1) * sizeof(double), sc.stream()),
          "cudaMemsetAsync");
    return;
  }
  auto lay = device_layout(x, axis, sc);
  batch_norm_stats(lay.input(x), x.dtype, lay.geometry(), buf, sc.stream());
}

// ---- the table's entries ----------------------------------------------------------------

void op_stats(const TensorView& x, int axis, const TensorView& buffer, const Fingerprint& f,
              void* stream) {
  DeviceGuard guard(x.device);
  Scratch sc(as_stream(stream));
  const int64_t n = buffer.shape[0];
  double* buf =
      (buffer.strides[0] == 1 || n <= 1) ? static_cast<double*>(buffer.data) : sc.doubles(n);
  stats_into(x, axis, buf, sc);
  write_fingerprint(buf, x.shape[axis], -1, f, sc.stream());
  if (buf != buffer.data) write_vec(buffer, buf, sc.stream());
}

void op_allreduce(const TensorView& buffer, Communicator& comm, void* stream) {
  DeviceGuard guard(buffer.device);
  allreduce_device(static_cast<double*>(buffer.data), buffer.shape[0], buffer.device, comm,
                   as_stream(stream), nullptr);
}

void op_gather(const TensorView& buffer, double momentum, double eps, bool unbiased,
               const TensorView* rm, const TensorView* rv, const TensorView& mean,
               const TensorView& invstd, const TensorView* var, const CollectiveKey& key,
               void* stream) {
  DeviceGuard guard(buffer.device);
  Scratch sc(as_stream(stream));
  const int64_t C = (buffer.shape[0] - stats_buffer_size(0)) / 2;
  const double* buf = sc.f64(&buffer);
  // A reduced count of 0 writes nothing (ops.h), so neither may the copy back.
  double* m = sc.f64_out(mean);
  double* s = sc.f64_out(invstd);
  double* v = var ? sc.f64_out(*var) : nullptr;
  batch_norm_gather_stats(buf, C, momentum, eps, unbiased, running_stats(rm, rv), m, s, v,
                          device_check(CollectiveOp::Forward, 0, -1, key.verify), nullptr,
                          sc.stream());
  if (m != mean.data) write_vec(mean, m, sc.stream());
  if (s != invstd.data) write_vec(invstd, s, sc.stream());
  if (var && v != var->data) write_vec(*var, v, sc.stream());
}

void op_elemt(const TensorView& x, int axis, const TensorView& mean, const TensorView& invstd,
              const TensorView* weight, const TensorView* bias, const TensorView& y, void* stream) {
  if (x.numel() == 0) return;
  DeviceGuard guard(x.device);
  Scratch sc(as_stream(stream));
  auto lay = device_layout(x, axis, sc);
  const void* xp = lay.input(x);
  void* yp = lay.output(y);
  batch_norm_elemt(xp, yp, x.dtype, lay.geometry(), sc.f64(&mean), sc.f64(&invstd), sc.f64(weight),
                   sc.f64(bias), sc.stream());
  lay.finish();
}

void reduce_into(const TensorView& dy, const TensorView& x, int axis, const double* mean,
                 const double* invstd, double* sums, double* gw, double* gb, Scratch& sc) {
  if (x.numel() == 0) return;  // sums, gw, gb are zeros already
  auto lay = device_layout(x, axis, sc);
  const void* xp = lay.input(x);
  const void* dyp = lay.input(dy);
  batch_norm_backward_reduce(dyp, xp, x.dtype, lay.geometry(), mean, invstd, sums, gw, gb,
                             sc.stream());
}

void op_backward_reduce(const TensorView& dy, const TensorView& x, int axis, const TensorView& mean,
                        const TensorView& invstd, const TensorView& sums,
                        const TensorView* grad_weight, const TensorView* grad_bias,
                        const Fingerprint& f, void* stream) {
  DeviceGuard guard(x.device);
  Scratch sc(as_stream(stream));
  const int64_t C = x.shape[axis];
  const bool empty = x.numel() == 0;  // then the reduction writes nothing
  double* s = sc.sums(backward_buffer_size(C), empty);
  double* gw = grad_weight ? sc.sums(C, empty) : nullptr;
  double* gb = grad_bias ? sc.sums(C, empty) : nullptr;
  reduce_into(dy, x, axis, sc.f64(&mean), sc.f64(&invstd), s, gw, gb, sc);
  write_fingerprint(s, C, double(count_per_channel(x, axis)), f, sc.stream());
  write_vec(sums, s, sc.stream());
  if (grad_weight) write_vec(*grad_weight, gw, sc.stream());
  if (grad_bias) write_vec(*grad_bias, gb, sc.stream());
}

void elemt_backward(const TensorView& dy, const TensorView& x, int axis, const double* mean,
                    const double* invstd, const double* weight, const double* sums,
                    const double* count, const fp::DeviceCheck& k, const TensorView& dx,
                    Scratch& sc) {
  if (x.numel() == 0) return;
  auto lay = device_layout(x, axis, sc);
  const void* xp = sums ? lay.input(x) : nullptr;  // eval does not read x (not even to pack it)
  const void* dyp = lay.input(dy);
  void* dxp = lay.output(dx);
  batch_norm_backward_elemt(dyp, xp, dxp, x.dtype, lay.geometry(), mean, invstd, weight, sums,
                            count, k, sc.stream());
  lay.finish();
}

void op_backward_elemt(const TensorView& dy, const TensorView& x, int axis, const TensorView& mean,
                       const TensorView& invstd, const TensorView* weight, const TensorView& sums,
                       const TensorView& count, const TensorView& dx, const CollectiveKey& key,
                       void* stream) {
  DeviceGuard guard(x.device);
  Scratch sc(as_stream(stream));
  const auto k =
      device_check(CollectiveOp::Backward, 0, double(count_per_channel(x, axis)), key.verify);
  elemt_backward(dy, x, axis, sc.f64(&mean), sc.f64(&invstd), sc.f64(weight), sc.f64(&sums),
                 sc.f64(&count), k, dx, sc);
}

void op_forward(const TensorView& x, int axis, const TensorView* weight, const TensorView* bias,
                const TensorView* rm, const TensorView* rv, const ForwardOptions& opt,
                Communicator& comm, const TensorView& y, const TensorView& save_mean,
                const TensorView& save_invstd, const TensorView& save_count, const Fingerprint* f) {
  DeviceGuard guard(x.device);
  Scratch sc(as_stream(opt.stream));
  const int64_t C = x.shape[axis];
  // As on the host, a global count of 0 leaves save_mean/save_invstd as they were.
  double* mean = sc.f64_out(save_mean);
  double* invstd = sc.f64_out(save_invstd);
  if (opt.training) {
    const int64_t len = stats_buffer_size(C);
    double* buf = sc.doubles(len);  // stats_into and write_fingerprint write all of it
    stats_into(x, axis, buf, sc);
    write_fingerprint(buf, C, -1, *f, sc.stream());
    const Expected e = expected(CollectiveOp::Forward, x, axis, *f, comm);
    allreduce_device(buf, len, x.device, comm, sc.stream(), &e);
    // save_count (float64 (1,), validated) gets the count, or NaN when the device check
    // fails, so the backward gives NaN too.
    batch_norm_gather_stats(
        buf, C, opt.momentum, opt.eps, opt.unbiased_running_var, running_stats(rm, rv), mean,
        invstd, nullptr, device_check(CollectiveOp::Forward, comm.size(), e.local_count, f->verify),
        static_cast<double*>(save_count.data), sc.stream());
  } else {
    check(cudaMemcpyAsync(mean, sc.f64(rm), size_t(C) * sizeof(double), cudaMemcpyDeviceToDevice,
                          sc.stream()),
          "cudaMemcpyAsync");
    invstd_from_var(sc.f64(rv), C, opt.eps, invstd, sc.stream());
    const int64_t n = C > 0 ? x.numel() / C : 0;
    double* cnt = sc.doubles(1);
    fill(cnt, 1, double(n), sc.stream());
    write_vec(save_count, cnt, sc.stream());
  }
  if (x.numel() > 0) {
    auto lay = device_layout(x, axis, sc);
    const void* xp = lay.input(x);
    void* yp = lay.output(y);
    batch_norm_elemt(xp, yp, x.dtype, lay.geometry(), mean, invstd, sc.f64(weight), sc.f64(bias),
                     sc.stream());
    lay.finish();
  }
  if (mean != save_mean.data) write_vec(save_mean, mean, sc.stream());
  if (invstd != save_invstd.data) write_vec(save_invstd, invstd, sc.stream());
}

void op_backward(const TensorView& dy, const TensorView& x, int axis, const TensorView& save_mean,
                 const TensorView& save_invstd, const TensorView* weight,
                 const BackwardOptions& opt, Communicator& comm, const TensorView* dx,
                 const TensorView* grad_weight, const TensorView* grad_bias, const Fingerprint* f) {
  DeviceGuard guard(x.device);
  Scratch sc(as_stream(opt.stream));
  const int64_t C = x.shape[axis];
  const bool sync = dx && opt.training;
  const double* mean = sc.f64(&save_mean);
  const double* invstd = sc.f64(&save_invstd);
  const bool empty = x.numel() == 0;  // then the reduction writes nothing
  const int64_t len = backward_buffer_size(C);
  // Where the host checks the reduced sums, the forward's count rides behind them (sums[len]).
  const bool host_check = sync && host_checks(x.device, comm);
  double* sums = sc.sums(len + (host_check ? 1 : 0), empty);
  double* gw = grad_weight ? sc.sums(C, empty) : nullptr;
  double* gb = grad_bias ? sc.sums(C, empty) : nullptr;
  if (grad_weight || grad_bias || sync) reduce_into(dy, x, axis, mean, invstd, sums, gw, gb, sc);
  // Unlike the host path, every rank all-reduces even when the global count is 0: the
  // count lives on the device, and all ranks must agree without reading it.
  const double n = double(count_per_channel(x, axis));
  if (sync) {
    write_fingerprint(sums, C, n, *f, sc.stream());
    if (host_check)
      check(cudaMemcpyAsync(sums + len, sc.f64(opt.count_view), sizeof(double),
                            cudaMemcpyDeviceToDevice, sc.stream()),
            "cudaMemcpyAsync");
    const Expected e = expected(CollectiveOp::Backward, x, axis, *f, comm);
    allreduce_device(sums, len, x.device, comm, sc.stream(), &e, host_check);
  }
  // This rank's gradients (from the local sums, in their own scratch) are written only
  // now: a staged check that throws leaves them alone too.
  if (grad_weight) write_vec(*grad_weight, gw, sc.stream());
  if (grad_bias) write_vec(*grad_bias, gb, sc.stream());
  if (!dx) return;
  elemt_backward(dy, x, axis, mean, invstd, sc.f64(weight), sync ? sums : nullptr,
                 sync ? sc.f64(opt.count_view) : nullptr,
                 device_check(CollectiveOp::Backward, comm.size(), n, f ? f->verify : true), *dx,
                 sc);
}

}  // namespace

const DeviceBackend* backend_table() {
  static const DeviceBackend table = [] {
    DeviceBackend t;
    t.device = DeviceType::CUDA;
    t.batch_norm_stats = op_stats;
    t.allreduce = op_allreduce;
    t.batch_norm_gather_stats = op_gather;
    t.batch_norm_elemt = op_elemt;
    t.batch_norm_backward_reduce = op_backward_reduce;
    t.batch_norm_backward_elemt = op_backward_elemt;
    t.forward = op_forward;
    t.backward = op_backward;
    return t;
  }();
  return &table;
}

}  // namespace syncbn::cuda
