// The DLPack ABI types the core accepts. Uses the official header when one is already
// included or on the include path (a framework's copy keeps the official include guard, as
// libtorch's ATen/dlpack.h does); otherwise declares the same ABI-stable (v0.8+) layout of
// the few types the core reads, so a C++ caller can hand the core any framework's DLTensor.
// Declaring them ourselves conflicts with a DLPack header included *later* under another
// name: include your framework's DLPack header first.
#pragma once

#if defined(DLPACK_DLPACK_H_)
// already declared (dlpack/dlpack.h or a framework's copy of it)
#elif __has_include(<dlpack/dlpack.h>)
#include <dlpack/dlpack.h>
#elif __has_include(<ATen/dlpack.h>)
#include <ATen/dlpack.h>  // libtorch ships DLPack there
#else
#include <cstdint>

extern "C" {
typedef enum {
  kDLCPU = 1,
  kDLCUDA = 2,
  kDLCUDAHost = 3,
  kDLCUDAManaged = 13,
} DLDeviceType;

typedef struct {
  DLDeviceType device_type;
  int32_t device_id;
} DLDevice;

typedef enum {
  kDLInt = 0U,
  kDLUInt = 1U,
  kDLFloat = 2U,
  kDLOpaqueHandle = 3U,
  kDLBfloat = 4U,
  kDLComplex = 5U,
  kDLBool = 6U,
} DLDataTypeCode;

typedef struct {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
} DLDataType;

typedef struct {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; NULL means compact row-major
  uint64_t byte_offset;
} DLTensor;
}
#endif
