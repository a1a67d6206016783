// Non-owning tensor views over DLPack memory, and the layout facts the kernels need.
#pragma once

#include <cstdint>
#include <string>

#include "syncbn/dlpack.h"

namespace syncbn {

enum class DType : uint8_t { Float16, BFloat16, Float32, Float64 };
enum class DeviceType : int32_t { CPU = 1, CUDA = 2 };  // DLPack device codes

struct Device {
  DeviceType type = DeviceType::CPU;
  int32_t id = 0;
  bool operator==(const Device& o) const { return type == o.type && id == o.id; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

const char* dtype_name(DType t);
int dtype_size(DType t);
std::string device_name(Device d);

constexpr int kMaxDims = 16;

// Shape and strides in elements (DLPack convention); data already includes byte_offset.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::Float32;
  Device device{};
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};
  bool read_only = false;

  int64_t numel() const;
  bool same_strides(const TensorView& o) const;  // ignores dims of size 1
  std::string shape_str() const;
};

// Builds a view from DLPack; `name` is the argument name used in error messages.
// Rejects non-floating dtypes, vector lanes and more than kMaxDims dimensions.
TensorView from_dlpack(const DLTensor& t, const char* name, bool read_only = false);

// Builds a compact row-major view (strides computed) over `data`.
TensorView contiguous_view(void* data, DType dtype, Device device, int ndim, const int64_t* shape);

// A dense traversal of the tensor as (outer, C, inner) with strides (C*inner, inner, 1):
// covers NCHW-contiguous (inner = H*W), channels-last memory (inner = 1) and any axis of
// a C-contiguous array. `outer` runs over memory order, not logical order, so two
// tensors share a traversal only if their strides are equal.
struct Geometry {
  int64_t outer = 0;
  int64_t channels = 0;
  int64_t inner = 0;
};
bool dense_geometry(const TensorView& t, int axis, Geometry* g);

// The strides every tensor of one op is brought to: x's own when x is dense, else a
// contiguous layout of x's shape (data null); `g` gets its traversal.
TensorView traversal_reference(const TensorView& x, int axis, Geometry* g);

// Element-wise copy between two views of the same shape and dtype, any strides.
void copy_strided(const TensorView& src, const TensorView& dst);

}  // namespace syncbn
