// MPI communicator over a caller-owned MPI_Comm (not freed here).
#pragma once

#include <mpi.h>

#include <string>

#include "syncbn/communicator.h"

namespace syncbn {

class MpiCommunicator final : public Communicator {
 public:
  // timeout > 0: an all-reduce that has not completed after `timeout` seconds (a rank
  // exited, hangs, or runs fewer collectives) throws CommError instead of waiting forever;
  // it then runs as MPI_Iallreduce polled with MPI_Test. <= 0: a plain MPI_Allreduce.
  explicit MpiCommunicator(MPI_Comm comm, double timeout = 0);
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void allreduce_sum(double* data, int64_t count, Device device, void* stream) override;
  const char* kind() const override { return "mpi"; }
  // Device buffers go straight to MPI when the library reports CUDA support at run time
  // (MPIX_GPU_query_support / MPIX_Query_cuda_support); otherwise they are staged.
  bool accepts(Device d) const override {
    return d.type == DeviceType::CPU || (d.type == DeviceType::CUDA && cuda_aware_);
  }
  bool cuda_aware() const { return cuda_aware_; }
  MPI_Comm comm() const { return comm_; }
  double timeout() const { return timeout_; }

 private:
  MPI_Comm comm_;
  double timeout_ = 0;
  bool cuda_aware_ = false;
  int rank_ = 0;
  int size_ = 1;
};

// MPI_Get_library_version of the MPI this core was linked with (callable before init).
std::string mpi_library_version();

}  // namespace syncbn
