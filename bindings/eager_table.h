// The core's composed forward/backward as a table of C functions that syncbn._core hands
// to the torch module (bindings/torch_eager.cpp, a C++ autograd node): a process then has
// one core (one set of threads, one fingerprint counter per communicator), and no C++
// exception crosses from one shared object into the other. Arrays come as DLTensors and
// are checked here exactly as syncbn._core checks them.
#pragma once

#include <cstdint>
#include <exception>

#include "syncbn/communicator.h"
#include "syncbn/dlpack.h"
#include "syncbn/ops.h"

namespace syncbn::bindings {

// Bumped whenever a signature below changes; the torch module refuses another version.
constexpr int kEagerTableVersion = 1;

struct EagerTable {
  int version;
  // syncbn::forward in training with `opt` (axis, momentum, eps, unbiased, fingerprint;
  // no mask); null for the optional arrays. On success returns 0, stores the global count
  // and, if `batches` (one int64 on the CPU) is given, adds 1 to it. On failure returns
  // nonzero with the exception in `*error` (nothing written): syncbn._core.eager_raise
  // raises it as the Python exception syncbn._core would.
  int (*forward)(const DLTensor* x, const DLTensor* weight, const DLTensor* bias,
                 const DLTensor* running_mean, const DLTensor* running_var, const DLTensor* y,
                 const DLTensor* save_mean, const DLTensor* save_invstd, int64_t* batches,
                 const ForwardOptions* opt, Communicator* comm, double* count,
                 std::exception_ptr* error) noexcept;
  // syncbn::backward in training (any of dx, grad_weight, grad_bias null).
  int (*backward)(const DLTensor* dy, const DLTensor* x, const DLTensor* save_mean,
                  const DLTensor* save_invstd, const DLTensor* weight, const DLTensor* dx,
                  const DLTensor* grad_weight, const DLTensor* grad_bias,
                  const BackwardOptions* opt, Communicator* comm,
                  std::exception_ptr* error) noexcept;
};

}  // namespace syncbn::bindings
