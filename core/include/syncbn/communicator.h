// Communicators: anything with a rank, a size and an in-place SUM all-reduce.
#pragma once

#include <cstdint>
#include <mutex>
#include <unordered_map>

#include "syncbn/tensor.h"

namespace syncbn {

// Each layer's count of synchronized calls through one communicator, per direction
// (forward statistics 0, backward sums 1): the call number in the collective fingerprint
// (ops.h). Kept per communicator so that ranks sharing a process (threads, each with its
// own communicator object) count apart. Thread-safe.
class CallCounts {
 public:
  int64_t next(int64_t layer, int direction) {
    std::lock_guard<std::mutex> lock(mu_);
    return ++n_[direction & 1][layer];
  }
  // Takes a call back (every rank does, when they disagreed on it), if it is the last.
  void forget(int64_t layer, int direction, int64_t call) {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t& n = n_[direction & 1][layer];
    if (n == call) --n;
  }

 private:
  std::mutex mu_;
  std::unordered_map<int64_t, int64_t> n_[2];
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Sums `count` doubles in place across all ranks. `data` lives on `device`; `stream`
  // is the caller's CUDA stream for device buffers (unused for host buffers).
  virtual void allreduce_sum(double* data, int64_t count, Device device, void* stream) = 0;
  // Human-readable kind, for repr and errors ("local", "mpi", "python", ...).
  virtual const char* kind() const = 0;
  // Whether allreduce_sum takes buffers on `device` directly (NCCL, CUDA-aware MPI). When
  // not, device backends stage the buffer through host memory (correct, but a host sync).
  virtual bool accepts(Device device) const { return device.type == DeviceType::CPU; }
  // Whether allreduce_sum is ordered on the caller's stream (NCCL). When not, a device
  // backend synchronizes the stream before handing it a device buffer (CUDA-aware MPI).
  virtual bool stream_ordered() const { return false; }
  // The layers' call counts of the collectives syncbn runs through this communicator.
  CallCounts& call_counts() { return counts_; }

 private:
  CallCounts counts_;
};

// World of one: the all-reduce is the identity.
class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void allreduce_sum(double*, int64_t, Device, void*) override {}
  const char* kind() const override { return "local"; }
  bool accepts(Device) const override { return true; }  // nothing is touched
  bool stream_ordered() const override { return true; }
};

}  // namespace syncbn
