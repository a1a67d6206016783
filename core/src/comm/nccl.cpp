#include <cuda_runtime.h>

#include <cstring>

#include "syncbn/errors.h"
#include "syncbn/nccl_communicator.h"

namespace syncbn {

static void check_nccl(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) fail<CommError>(what, " failed: ", ncclGetErrorString(r));
}

static void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail<CommError>(what, " failed: ", cudaGetErrorString(e));
}

namespace {
class DeviceGuard {
 public:
  explicit DeviceGuard(int d) {
    check_cuda(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != d) check_cuda(cudaSetDevice(d), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(prev_); }

 private:
  int prev_ = 0;
};
}  // namespace

NcclCommunicator::NcclCommunicator(const std::string& id, int rank, int size, int device)
    : rank_(rank), size_(size), device_(device) {
  if (id.size() != sizeof(ncclUniqueId))
    fail("id: expected ", sizeof(ncclUniqueId), " bytes from nccl_unique_id(), got ", id.size());
  if (size < 1 || rank < 0 || rank >= size)
    fail("rank: expected 0 <= rank < size, got rank=", rank, ", size=", size);
  ncclUniqueId uid;
  std::memcpy(&uid, id.data(), sizeof(uid));
  DeviceGuard guard(device);
  check_nccl(ncclCommInitRank(&comm_, size, uid, rank), "ncclCommInitRank");
}

NcclCommunicator::NcclCommunicator(ncclComm_t comm, int device) : comm_(comm), device_(device) {
  check_nccl(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank");
  check_nccl(ncclCommCount(comm_, &size_), "ncclCommCount");
}

NcclCommunicator::~NcclCommunicator() {
  if (comm_) ncclCommDestroy(comm_);
}

void NcclCommunicator::allreduce_sum(double* data, int64_t count, Device device, void* stream) {
  if (!accepts(device))
    fail("buffer: the NCCL communicator of cuda:", device_, " takes buffers on that device, got ",
         device_name(device));
  DeviceGuard guard(device_);
  check_nccl(ncclAllReduce(data, data, size_t(count), ncclFloat64, ncclSum, comm_,
                           static_cast<cudaStream_t>(stream)),
             "ncclAllReduce");
}

NcclCommunicator* NcclCommunicator::split(int color, int key) const {
  if (color < 0 && color != NCCL_SPLIT_NOCOLOR)
    fail("color: expected an int >= 0 or NCCL_SPLIT_NOCOLOR, got ", color);
  ncclComm_t out = nullptr;
  DeviceGuard guard(device_);
  check_nccl(ncclCommSplit(comm_, color, key, &out, nullptr), "ncclCommSplit");
  if (!out) return nullptr;  // NCCL_SPLIT_NOCOLOR: in no subgroup
  return new NcclCommunicator(out, device_);
}

std::string nccl_unique_id() {
  ncclUniqueId uid;
  check_nccl(ncclGetUniqueId(&uid), "ncclGetUniqueId");
  return std::string(reinterpret_cast<const char*>(&uid), sizeof(uid));
}

std::string nccl_version() {
  int v = 0;
  ncclGetVersion(&v);
  return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." +
         std::to_string(v % 100);
}

}  // namespace syncbn
