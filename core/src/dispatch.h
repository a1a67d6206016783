// dtype dispatch shared by the CPU and CUDA backends.
#pragma once

#include "syncbn/math.h"
#include "syncbn/tensor.h"

#define SYNCBN_DISPATCH_FLOATING(dtype, T, ...) \
  switch (dtype) {                              \
    case ::syncbn::DType::Float16: {            \
      using T = ::syncbn::half_t;               \
      __VA_ARGS__;                              \
      break;                                    \
    }                                           \
    case ::syncbn::DType::BFloat16: {           \
      using T = ::syncbn::bfloat16_t;           \
      __VA_ARGS__;                              \
      break;                                    \
    }                                           \
    case ::syncbn::DType::Float32: {            \
      using T = float;                          \
      __VA_ARGS__;                              \
      break;                                    \
    }                                           \
    case ::syncbn::DType::Float64: {            \
      using T = double;                         \
      __VA_ARGS__;                              \
      break;                                    \
    }                                           \
  }
