#include <chrono>
#include <climits>
#include <thread>
#if __has_include(<mpi-ext.h>)
#include <mpi-ext.h>  // Open MPI's MPIX_CUDA_AWARE_SUPPORT
#endif

#include "syncbn/errors.h"
#include "syncbn/mpi_communicator.h"

namespace syncbn {

static void check_mpi(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  fail<CommError>(what, " failed: ", msg);
}

MpiCommunicator::MpiCommunicator(MPI_Comm comm, double timeout) : comm_(comm), timeout_(timeout) {
  if (!(timeout >= 0) || timeout > 1e9)
    fail("timeout: expected seconds >= 0 (0: wait forever), got ", timeout);
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized)
    fail<CommError>(
        "comm: MPI is not initialized (or already finalized); initialize it first "
        "(e.g. `from mpi4py import MPI`)");
  if (comm == MPI_COMM_NULL) fail("comm: expected a valid MPI communicator, got MPI_COMM_NULL");
  check_mpi(MPI_Comm_rank(comm, &rank_), "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(comm, &size_), "MPI_Comm_size");
#if defined(MPIX_GPU_SUPPORT_CUDA)  // MPICH >= 4
  int supported = 0;
  if (MPIX_GPU_query_support(MPIX_GPU_SUPPORT_CUDA, &supported) == MPI_SUCCESS)
    cuda_aware_ = supported != 0;
#elif defined(MPIX_CUDA_AWARE_SUPPORT) && MPIX_CUDA_AWARE_SUPPORT
  cuda_aware_ = MPIX_Query_cuda_support() != 0;
#endif
}

void MpiCommunicator::allreduce_sum(double* data, int64_t count, Device device, void*) {
  if (!accepts(device))
    fail(
        "buffer: this MPI library is not CUDA-aware, so the MPI communicator takes host "
        "buffers (device backends stage them), got ",
        device_name(device));
  if (count > INT_MAX) fail("buffer: expected at most ", INT_MAX, " values, got ", count);
  if (timeout_ <= 0) {
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, data, int(count), MPI_DOUBLE, MPI_SUM, comm_),
              "MPI_Allreduce");
    return;
  }
  MPI_Request req;
  check_mpi(MPI_Iallreduce(MPI_IN_PLACE, data, int(count), MPI_DOUBLE, MPI_SUM, comm_, &req),
            "MPI_Iallreduce");
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  const auto limit = std::chrono::duration<double>(timeout_);
  for (int polls = 0;; ++polls) {
    int done = 0;
    check_mpi(MPI_Test(&req, &done, MPI_STATUS_IGNORE), "MPI_Test");
    if (done) return;
    // Spin first (a small all-reduce completes within microseconds), then yield the core.
    if (polls > 2000)
      std::this_thread::sleep_for(std::chrono::microseconds(polls > 20000 ? 500 : 20));
    if (clock::now() - start > limit)
      fail<CommError>(
          "comm <mpi rank ", rank_, " of ", size_, ">: the all-reduce did not complete within ",
          timeout_,
          " s (the communicator's timeout): another rank did not reach this "
          "collective (it exited, hangs, or runs fewer SyncBN collectives); the request "
          "is left pending, so end the job (python -m mpi4py aborts it on this error)");
  }
}

std::string mpi_library_version() {
  char buf[MPI_MAX_LIBRARY_VERSION_STRING] = {};
  int len = 0;
  MPI_Get_library_version(buf, &len);
  return std::string(buf, size_t(len));
}

}  // namespace syncbn
