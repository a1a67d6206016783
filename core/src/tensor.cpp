#include "syncbn/tensor.h"

#include <algorithm>
#include <cstring>
#include <sstream>
#include <utility>

#include "syncbn/errors.h"

namespace syncbn {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
  }
  return "?";
}

int dtype_size(DType t) {
  switch (t) {
    case DType::Float16:
    case DType::BFloat16: return 2;
    case DType::Float32: return 4;
    case DType::Float64: return 8;
  }
  return 0;
}

std::string device_name(Device d) {
  switch (d.type) {
    case DeviceType::CPU: return "cpu";
    case DeviceType::CUDA: return "cuda:" + std::to_string(d.id);
  }
  return "device(" + std::to_string(int(d.type)) + ")";
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

bool TensorView::same_strides(const TensorView& o) const {
  if (ndim != o.ndim) return false;
  for (int i = 0; i < ndim; ++i)
    if (shape[i] != o.shape[i] || (shape[i] > 1 && strides[i] != o.strides[i])) return false;
  return true;
}

std::string TensorView::shape_str() const {
  std::ostringstream os;
  os << "(";
  for (int i = 0; i < ndim; ++i) os << (i ? ", " : "") << shape[i];
  os << (ndim == 1 ? ",)" : ")");
  return os.str();
}

static const char* dl_code_name(uint8_t code) {
  switch (code) {
    case kDLInt: return "int";
    case kDLUInt: return "uint";
    case kDLFloat: return "float";
    case kDLBfloat: return "bfloat";
    case kDLComplex: return "complex";
    case kDLBool: return "bool";
    default: return "opaque";
  }
}

TensorView from_dlpack(const DLTensor& t, const char* name, bool read_only) {
  TensorView v;
  const DLDataType dt = t.dtype;
  if (dt.lanes != 1) fail<TypeError>(name, ": expected scalar elements, got ", dt.lanes, " lanes");
  if (dt.code == kDLFloat && dt.bits == 16)
    v.dtype = DType::Float16;
  else if (dt.code == kDLFloat && dt.bits == 32)
    v.dtype = DType::Float32;
  else if (dt.code == kDLFloat && dt.bits == 64)
    v.dtype = DType::Float64;
  else if (dt.code == kDLBfloat && dt.bits == 16)
    v.dtype = DType::BFloat16;
  else
    fail<TypeError>(name, ": expected a floating dtype (float16, bfloat16, float32, float64), got ",
                    dl_code_name(dt.code), int(dt.bits));
  if (t.ndim < 0 || t.ndim > kMaxDims)
    fail(name, ": expected at most ", kMaxDims, " dimensions, got ", t.ndim);
  if (t.device.device_type == kDLCPU || t.device.device_type == kDLCUDAHost)
    v.device = Device{DeviceType::CPU, 0};
  else if (t.device.device_type == kDLCUDA || t.device.device_type == kDLCUDAManaged)
    v.device = Device{DeviceType::CUDA, t.device.device_id};
  else
    fail<TypeError>(name, ": unsupported DLPack device type ", int(t.device.device_type),
                    " (expected CPU or CUDA)");
  v.ndim = t.ndim;
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  int64_t stride = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    v.shape[i] = t.shape[i];
    v.strides[i] = t.strides ? t.strides[i] : stride;
    stride *= t.shape[i];
  }
  v.read_only = read_only;
  return v;
}

TensorView contiguous_view(void* data, DType dtype, Device device, int ndim, const int64_t* shape) {
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.device = device;
  v.ndim = ndim;
  int64_t stride = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    v.shape[i] = shape[i];
    v.strides[i] = stride;
    stride *= shape[i];
  }
  return v;
}

bool dense_geometry(const TensorView& t, int axis, Geometry* g) {
  // Non-channel dims that matter (size > 1), split by whether they sit inside or outside
  // the channel stride in memory, each group sorted innermost first.
  std::pair<int64_t, int64_t> inner[kMaxDims], outer[kMaxDims];  // (stride, size)
  int ni = 0, no = 0;
  const int64_t C = t.shape[axis];
  const int64_t cs = C > 1 ? t.strides[axis] : 0;
  for (int d = 0; d < t.ndim; ++d) {
    if (d == axis || t.shape[d] == 1) continue;
    if (t.strides[d] <= 0) return false;
    if (C > 1 && t.strides[d] > cs)
      outer[no++] = {t.strides[d], t.shape[d]};
    else
      inner[ni++] = {t.strides[d], t.shape[d]};
  }
  std::sort(inner, inner + ni);
  std::sort(outer, outer + no);
  int64_t expect = 1;
  for (int k = 0; k < ni; ++k) {
    if (inner[k].first != expect) return false;
    expect *= inner[k].second;
  }
  const int64_t inner_n = expect;
  if (C > 1 && cs != expect) return false;
  expect *= C;
  for (int k = 0; k < no; ++k) {
    if (outer[k].first != expect) return false;
    expect *= outer[k].second;
  }
  // With one channel every element lies "inside" it: the whole tensor is one run.
  g->channels = C;
  g->inner = inner_n;
  g->outer = (C > 0 && inner_n > 0) ? t.numel() / (C * inner_n) : 0;
  return true;
}

TensorView traversal_reference(const TensorView& x, int axis, Geometry* g) {
  if (dense_geometry(x, axis, g)) return x;
  TensorView ref = contiguous_view(nullptr, x.dtype, x.device, x.ndim, x.shape);
  dense_geometry(ref, axis, g);
  return ref;
}

namespace {

// One row of copy_strided: `len` elements of N bytes, `ss` / `ds` bytes apart (a memcpy
// of a constant size compiles to one load and store, with no alignment or aliasing rule).
template <int N>
void copy_row(const char* sp, char* dp, int64_t len, int64_t ss, int64_t ds) {
  for (int64_t j = 0; j < len; ++j) std::memcpy(dp + j * ds, sp + j * ss, N);
}

}  // namespace

void copy_strided(const TensorView& src, const TensorView& dst) {
  const int64_t n = src.numel();
  if (n == 0) return;
  const int es = dtype_size(src.dtype);
  const int nd = src.ndim;
  int64_t idx[kMaxDims] = {};
  const char* s = static_cast<const char*>(src.data);
  char* d = static_cast<char*>(dst.data);
  const int last = nd - 1;
  const int64_t len = src.shape[last];
  const int64_t ss = src.strides[last] * es, ds = dst.strides[last] * es;
  for (int64_t done = 0; done < n; done += len) {
    int64_t so = 0, doff = 0;
    for (int k = 0; k < last; ++k) {
      so += idx[k] * src.strides[k];
      doff += idx[k] * dst.strides[k];
    }
    const char* sp = s + so * es;
    char* dp = d + doff * es;
    // Typed copies: a memcpy call per element made this the slowest step of a masked call.
    switch (es) {
      case 2: copy_row<2>(sp, dp, len, ss, ds); break;
      case 4: copy_row<4>(sp, dp, len, ss, ds); break;
      case 8: copy_row<8>(sp, dp, len, ss, ds); break;
      default:
        for (int64_t j = 0; j < len; ++j) std::memcpy(dp + j * ds, sp + j * ss, es);
    }
    for (int k = last - 1; k >= 0; --k) {
      if (++idx[k] < src.shape[k]) break;
      idx[k] = 0;
    }
  }
}

}  // namespace syncbn
