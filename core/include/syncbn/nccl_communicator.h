// NCCL communicator: sums device buffers on the caller's CUDA stream (capturable).
#pragma once

#include <nccl.h>

#include <string>

#include "syncbn/communicator.h"

namespace syncbn {

class NcclCommunicator final : public Communicator {
 public:
  // Joins the clique `id` (from nccl_unique_id() on one rank, broadcast to all) as `rank`
  // of `size`, on CUDA device `device`.
  NcclCommunicator(const std::string& id, int rank, int size, int device);
  // Wraps a communicator made by ncclCommSplit (owned from now on).
  NcclCommunicator(ncclComm_t comm, int device);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* kind() const override { return "nccl"; }
  bool accepts(Device d) const override { return d.type == DeviceType::CUDA && d.id == device_; }
  void allreduce_sum(double* data, int64_t count, Device device, void* stream) override;
  bool stream_ordered() const override { return true; }
  int device() const { return device_; }
  // Subgroup of the ranks passing the same color, ordered by key (collective); null for
  // a rank passing NCCL_SPLIT_NOCOLOR (-1).
  NcclCommunicator* split(int color, int key) const;

 private:
  ncclComm_t comm_ = nullptr;
  int rank_ = 0, size_ = 1, device_ = 0;
};

// A fresh ncclUniqueId as bytes (NCCL_UNIQUE_ID_BYTES long).
std::string nccl_unique_id();
std::string nccl_version();

}  // namespace syncbn
