#include <limits>

#include "../dispatch.h"
#include "kernels.cuh"
#include "reduce.cuh"

namespace syncbn::cuda {
namespace {

// One thread per channel. N is read here, on the device, because the host may not wait
// for the all-reduce: N == 0 (no samples on any rank) writes nothing, as the CPU path;
// N < 2 is the error the host path raises (no host sync here to raise it): like a failed
// call, it leaves both running stats as they were. A buffer that fails the check (the
// host's check_reduced, on the device) poisons the results with NaN instead. The count
// goes to its own `count_out` (one thread writes it): poisoning it inside `buf`, which
// every thread of every block reads, would race with those reads.
template <class RM, class RV>
__global__ void gather_stats_kernel(const double* __restrict__ buf, int64_t C, double momentum,
                                    double eps, bool unbiased, RM* running_mean, int64_t rm_stride,
                                    RV* running_var, int64_t rv_stride, double* __restrict__ mean,
                                    double* __restrict__ invstd, double* __restrict__ var_biased,
                                    fp::DeviceCheck check, double* __restrict__ count_out) {
  const double N = buf[2 * C];
  const bool ok = fp::reduced_ok(buf, C, check);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (count_out && blockIdx.x == 0 && threadIdx.x == 0) *count_out = ok ? N : nan;
  if (ok && !(N > 0)) return;
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += int64_t(gridDim.x) * blockDim.x) {
    if (!ok || !fp::reduced_channel_ok(buf, C, c)) {
      mean[c] = nan;
      invstd[c] = nan;
      if (var_biased) var_biased[c] = nan;
      continue;
    }
    const GlobalMoments gm = finalize_moments(buf[c], buf[C + c], N);
    mean[c] = gm.mean;
    invstd[c] = invstd_of(gm.var_biased, eps);
    if (var_biased) var_biased[c] = gm.var_biased;
    if (running_mean && N >= 2) {
      RM* p = running_mean + c * rm_stride;
      store<double>(p, (1 - momentum) * load<double>(p) + momentum * gm.mean);
    }
    if (running_var && N >= 2) {
      RV* p = running_var + c * rv_stride;
      store<double>(p,
                    (1 - momentum) * load<double>(p) + momentum * (gm.m2 / (unbiased ? N - 1 : N)));
    }
  }
}

}  // namespace

void batch_norm_gather_stats(const double* buf, int64_t C, double momentum, double eps,
                             bool unbiased, RunningStats running, double* mean, double* invstd,
                             double* var_biased, const fp::DeviceCheck& check, double* count_out,
                             cudaStream_t stream) {
  if (C <= 0 && !count_out) return;  // C = 0 still judges the buffer for the count
  const int64_t blocks =
      std::max(std::min(detail::ceil_div(C, detail::kThreads), int64_t(4096)), int64_t(1));
  SYNCBN_DISPATCH_FLOATING(running.mean_dtype, RM, {
    SYNCBN_DISPATCH_FLOATING(running.var_dtype, RV, {
      gather_stats_kernel<RM, RV><<<unsigned(blocks), detail::kThreads, 0, stream>>>(
          buf, C, momentum, eps, unbiased, static_cast<RM*>(running.mean), running.mean_stride,
          static_cast<RV*>(running.var), running.var_stride, mean, invstd, var_biased, check,
          count_out);
    });
  });
  detail::check_launch("batch_norm_gather_stats");
}

}  // namespace syncbn::cuda
