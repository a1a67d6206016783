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

// Every all-reduce buffer is [payload (2C) | count (1) | fingerprint (kFingerprintSlots)]:
//   forward:  [P1 (C) | P2 (C) | n | fingerprint]   (see math.h for why these sums)
//   backward: [sum(dy) (C) | sum(dy * (x - mean)) (C) | n | fingerprint]
// Both directions have the same length for the same C, so a forward meeting a backward is
// caught by the fingerprint instead of a transport error. The fingerprint says what this
// rank believes it reduces (operation, C, channel axis, layer, that layer's call count);
// the check runs on the reduced values alone, so every rank reaches the same verdict
// (collective.h). Payload O(C), independent of the world size.
constexpr int64_t kFingerprintSlots = 16;
inline int64_t stats_buffer_size(int64_t channels) {
  return 2 * channels + 1 + kFingerprintSlots;
}
inline int64_t backward_buffer_size(int64_t channels) {
  return 2 * channels + 1 + kFingerprintSlots;
}

// What a rank says about the collectives of one layer.
struct CollectiveKey {
  // The layer's identity, the same on every rank that builds the same model (e.g. its
  // index among the SyncBN layers built by this process); 0 for functional calls. The
  // composed ops count each layer's synchronized calls per direction on the communicator
  // (Communicator::call_counts).
  int64_t layer = 0;
  const char* layer_name = nullptr;  // for error messages (e.g. the module's path)
  // Judge the fingerprint (on by default). The fingerprint is sent either way, so ranks
  // that judge it still stop a rank that disagrees.
  bool verify = true;
  // The primitives only: the call number in the fingerprint (the composed ops and
  // allreduce_checked count each layer's calls on the communicator themselves).
  int64_t call = 0;
};

// 1. Local partial statistics of x along `axis`, packed ready to all-reduce.
void batch_norm_stats(const TensorView& x, int axis, const TensorView& buffer,
                      void* stream = nullptr, const CollectiveKey& key = {});

// 2. In-place sum of a float64 buffer across the communicator (no checks: gather_stats and
//    backward_elemt validate what comes back).
void allreduce(const TensorView& buffer, Communicator& comm, void* stream = nullptr);

// 2'. The checked all-reduce of the composed ops, for a payload the caller computed itself
//     (e.g. an adapter that differentiates a composition of framework ops): `buffer` is a
//     host float64 [payload (2P) | this rank's count (1) | fingerprint (kFingerprintSlots)]
//     whose first 2P + 1 values the caller filled. Writes the fingerprint of (direction,
//     P, axis, key) (`backward`: false for forward statistics), all-reduces, and checks
//     the result as forward()/backward() do (CollectiveMismatchError, CommError).
//     Returns the global count.
double allreduce_checked(const TensorView& buffer, bool backward, int axis, Communicator& comm,
                         const CollectiveKey& key = {});

// 3. Global mean / invstd (and biased variance) from a reduced stats buffer; updates the
//    running stats in place (PyTorch convention: new = (1-m)*old + m*batch, running_var
//    unbiased with the global count). Returns the global count per channel. Throws
//    ValueError when the count is 1; a count of 0 writes nothing. Validates the reduced
//    buffer first (CommError: count not a whole number >= 0, sums not finite although
//    every rank's were; CollectiveMismatchError: the ranks' fingerprints differ, or it is
//    not a forward statistics buffer) and writes nothing then. On a device the count
//    stays in buffer[2C] (no host sync): returns NaN, a count of 1 is not raised (the
//    running stats are left untouched) and a count of 0 writes nothing.
double batch_norm_gather_stats(const TensorView& buffer, double momentum, double eps,
                               const TensorView* running_mean, const TensorView* running_var,
                               const TensorView& mean, const TensorView& invstd,
                               const TensorView* var_biased = nullptr, void* stream = nullptr,
                               const CollectiveKey& key = {});

// 4. y = (x - mean) * invstd * weight + bias.
void batch_norm_elemt(const TensorView& x, int axis, const TensorView& mean,
                      const TensorView& invstd, const TensorView* weight, const TensorView* bias,
                      const TensorView& y, void* stream = nullptr);

// 5. Local sum(dy) and sum(dy * (x - mean)) packed into `sums` (backward_buffer_size(C)
//    float64, with this rank's count and fingerprint), and this
//    rank's grad_weight = sum(dy * (x - mean)) * invstd, grad_bias = sum(dy) if given.
void batch_norm_backward_reduce(const TensorView& dy, const TensorView& x, int axis,
                                const TensorView& mean, const TensorView& invstd,
                                const TensorView& sums, const TensorView* grad_weight,
                                const TensorView* grad_bias, void* stream = nullptr,
                                const CollectiveKey& key = {});

// 6. dx from the globally reduced `sums` and the global `count` (on a device: a float64
//    (1,) view `count_view` on it, e.g. buffer[2C:2C+1] of the stats buffer). Validates
//    `sums` as gather_stats does its buffer (and that its count equals `count`).
void batch_norm_backward_elemt(const TensorView& dy, const TensorView& x, int axis,
                               const TensorView& mean, const TensorView& invstd,
                               const TensorView* weight, const TensorView& sums, double count,
                               const TensorView& dx, const TensorView* count_view = nullptr,
                               void* stream = nullptr, const CollectiveKey& key = {});

struct ForwardOptions {
  int axis = 1;
  bool training = true;
  double momentum = 0.1;
  double eps = 1e-5;
  // PyTorch updates running_var with M2/(N-1), Keras its moving_variance with M2/N.
  bool unbiased_running_var = true;
  void* stream = nullptr;  // CUDA stream for device tensors
  // The collective's fingerprint fields (see CollectiveKey).
  int64_t layer = 0;
  const char* layer_name = nullptr;
  bool verify = true;
  // Masked statistics (training; eval ignores it, as Keras and Flax do): any floating
  // dtype, on the CPU; the batch statistics are those of the elements where it is nonzero,
  // and every element is normalized with them. Two forms:
  // - x's shape with extent 1 at the channel axis (a mask of positions, e.g. padding): the
  //   count is the number of counted positions, all ranks together. The collective is the
  //   unmasked one (an all-ones mask gives the same buffer), so ranks may mix masked and
  //   unmasked calls of a layer.
  // - x's shape (it may differ between channels): each channel has its own count, written
  //   to `counts` (float64 (C,), required); the return value is their sum. The all-reduce
  //   carries the C counts behind the fingerprint, so every rank of the layer must pass
  //   this form (a rank without it sends a shorter buffer).
  // A global count of 0 (every element masked out on every rank; per channel for the
  // second form) normalizes with mean 0 and variance 0 (Keras' result) and leaves the
  // running statistics alone; the forward returns 0 then even though y is written.
  const TensorView* mask = nullptr;
  const TensorView* counts = nullptr;
  CollectiveKey key() const { return {layer, layer_name, verify, 0}; }
};

// Whole forward: stats -> one all-reduce -> checks -> gather (+running stats) -> elemt in
// training; running stats -> elemt in eval (no communication). Writes y and the float64
// save_mean / save_invstd (length C) the backward needs. The checks (fingerprint, then
// the reduced count and sums) throw before anything is written. Returns the global count (0: y is
// empty and nothing else was written). On a device nothing is read back to the host: the count is
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
  int64_t layer = 0;  // as in ForwardOptions
  const char* layer_name = nullptr;
  bool verify = true;
  // The forward's mask and per-channel counts (ForwardOptions::mask, counts): dx is the
  // gradient of the masked statistics; training only. `count` is the forward's return.
  const TensorView* mask = nullptr;
  const TensorView* counts = nullptr;
  CollectiveKey key() const { return {layer, layer_name, verify, 0}; }
};

// Whole backward: local reduce -> (one all-reduce if dx is wanted in training) -> checks
// -> elemt; nothing is written before the checks pass.
// Any of dx, grad_weight, grad_bias may be null. grad_weight/grad_bias are this rank's
// local gradients.
void backward(const TensorView& dy, const TensorView& x, const TensorView& save_mean,
              const TensorView& save_invstd, const TensorView* weight, const BackwardOptions& opt,
              Communicator& comm, const TensorView* dx, const TensorView* grad_weight,
              const TensorView* grad_bias);

// Threads the CPU kernels use (SYNCBN_NUM_THREADS, default: CPUs this process may use).
int num_threads();

}  // namespace syncbn
