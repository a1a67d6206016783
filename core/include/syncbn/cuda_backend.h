// The CUDA backend for C++ programs that link syncbn::cuda (installed only when it is built).
#pragma once

namespace syncbn {

// Makes the functions of ops.h run CUDA tensors through syncbn::cuda's kernels on the
// caller's stream (without it they reject device tensors). Call once, before the first op
// on a device tensor; needs no GPU and is idempotent. The Python package does the same
// when it loads syncbn._cuda.
void register_cuda_backend();

}  // namespace syncbn
