// The SyncBN primitives (names after ATen's set) and the composed forward/backward.
//
// Per-channel vectors (weight, bias, running stats, mean, invstd, grads) are 1-D views of
// length C in any floating dtype; buffers handed to the communicator are float64.
// Every function validates all of its arguments before touching any output or
// communicating, and throws syncbn::TypeError / ValueError naming the argument.
#pragma once

#include <cstdint>

#include "syncbn/communicator.h"
#include "syncbn/tensor.h"

namespace syncbn {

// Stats buffer layout: [P1 (C) | P2 (C) | count]; see math.h for why these sums.
inline int64_t stats_buffer_size(int64_t channels) {
  return 2 * channels + 1;
}
// Backward buffer layout: [sum(dy) (C) | sum(dy * (x - mean)) (C)].
inline int64_t backward_buffer_size(int64_t channels) {
  return 2 * channels;
}

// 1. Local partial statistics of x along `axis`, packed ready to all-reduce.
void batch_norm_stats(const TensorView& x, int axis, const TensorView& buffer,
                      void* stream = nullptr);

// 2. In-place sum of a float64 buffer across the communicator.
void allreduce(const TensorView& buffer, Communicator& comm, void* stream = nullptr);

// 3. Global mean / invstd (and biased variance) from a reduced stats buffer; updates the
//    running stats in place (PyTorch convention: new = (1-m)*old + m*batch, running_var
//    unbiased with the global count). Returns the global count per channel. Throws
//    ValueError when the count is 1; a count of 0 writes nothing. On a device the count
//    stays in buffer[2C] (no host sync): returns NaN, a count of 1 is not raised (the
//    running stats are left untouched) and a count of 0 writes nothing.
double batch_norm_gather_stats(const TensorView& buffer, double momentum, double eps,
                               const TensorView* running_mean, const TensorView* running_var,
                               const TensorView& mean, const TensorView& invstd,
                               const TensorView* var_biased = nullptr, void* stream = nullptr);

// 4. y = (x - mean) * invstd * weight + bias.
void batch_norm_elemt(const TensorView& x, int axis, const TensorView& mean,
                      const TensorView& invstd, const TensorView* weight, const TensorView* bias,
                      const TensorView& y, void* stream = nullptr);

// 5. Local sum(dy) and sum(dy * (x - mean)) packed into `sums` (2C float64), and this
//    rank's grad_weight = sum(dy * (x - mean)) * invstd, grad_bias = sum(dy) if given.
void batch_norm_backward_reduce(const TensorView& dy, const TensorView& x, int axis,
                                const TensorView& mean, const TensorView& invstd,
                                const TensorView& sums, const TensorView* grad_weight,
                                const TensorView* grad_bias, void* stream = nullptr);

// 6. dx from the globally reduced `sums` and the global `count` (on a device: a float64
//    (1,) view `count_view` on it, e.g. buffer[2C:] of the stats buffer).
void batch_norm_backward_elemt(const TensorView& dy, const TensorView& x, int axis,
                               const TensorView& mean, const TensorView& invstd,
                               const TensorView* weight, const TensorView& sums, double count,
                               const TensorView& dx, const TensorView* count_view = nullptr,
                               void* stream = nullptr);

struct ForwardOptions {
  int axis = 1;
  bool training = true;
  double momentum = 0.1;
  double eps = 1e-5;
  // PyTorch updates running_var with M2/(N-1), Keras its moving_variance with M2/N.
  bool unbiased_running_var = true;
  void* stream = nullptr;  // CUDA stream for device tensors
};

// Whole forward: stats -> one all-reduce -> gather (+running stats) -> elemt in training;
// running stats -> elemt in eval (no communication). Writes y and the float64 save_mean /
// save_invstd (length C) the backward needs. Returns the global count (0: y is empty and
// nothing else was written). On a device nothing is read back to the host: the count is
// written to `save_count` (float64 (1,) on x's device, required there) and NaN returned.
double forward(const TensorView& x, const TensorView* weight, const TensorView* bias,
               const TensorView* running_mean, const TensorView* running_var,
               const ForwardOptions& opt, Communicator& comm, const TensorView& y,
               const TensorView& save_mean, const TensorView& save_invstd,
               const TensorView* save_count = nullptr);

struct BackwardOptions {
  int axis = 1;
  bool training = true;  // false: mean/invstd were constants (eval); no communication
  double count = 0;      // global count returned by forward (training only)
  const TensorView* count_view = nullptr;  // on a device: forward's save_count instead
  void* stream = nullptr;
};

// Whole backward: local reduce -> (one all-reduce if dx is wanted in training) -> elemt.
// Any of dx, grad_weight, grad_bias may be null. grad_weight/grad_bias are this rank's
// local gradients.
void backward(const TensorView& dy, const TensorView& x, const TensorView& save_mean,
              const TensorView& save_invstd, const TensorView* weight, const BackwardOptions& opt,
              Communicator& comm, const TensorView* dx, const TensorView* grad_weight,
              const TensorView* grad_bias);

// Threads the CPU kernels use (SYNCBN_NUM_THREADS, default: CPUs this process may use).
int num_threads();

}  // namespace syncbn
