// Communicators: anything with a rank, a size and an in-place SUM all-reduce.
#pragma once

#include <cstdint>

#include "syncbn/tensor.h"

namespace syncbn {

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
