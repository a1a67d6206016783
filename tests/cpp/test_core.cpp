// The installed C++ API end to end, in one process: composed forward/backward and the
// primitives over every dtype and the layouts the kernels special-case (channels-first,
// channels-last, strided, empty), a DLTensor with strides and a byte offset, and the error
// contract (the exception type, the argument named, nothing written on failure). Built
// against the installed package and run under ASan+UBSan by tests/test_cpp_package.py.
// Prints "<N> checks, <F> failures"; exits 1 on a failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "syncbn/build_config.h"
#include "syncbn/communicator.h"
#include "syncbn/dlpack.h"
#include "syncbn/errors.h"
#include "syncbn/ops.h"
#include "syncbn/tensor.h"

namespace {

int g_checks = 0, g_failures = 0;

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

void close(double got, double want, double tol, const std::string& what) {
  check(std::abs(got - want) <= tol * (1 + std::abs(want)),
        what + ": got " + std::to_string(got) + ", want " + std::to_string(want));
}

// Throws E with a message containing `needle`, or records a failure.
template <class E>
void raises(const std::function<void()>& f, const std::string& needle, const std::string& what) {
  try {
    f();
    check(false, what + ": did not throw");
  } catch (const E& e) {
    check(std::string(e.what()).find(needle) != std::string::npos,
          what + ": message '" + e.what() + "' lacks '" + needle + "'");
  } catch (const std::exception& e) {
    check(false, what + ": threw another type: " + e.what());
  }
}

// 16-bit storage of values that are exact in both formats (k/8, |k| < 2^10).
uint16_t to_half(float f) {
  if (f == 0) return 0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u, exp = (u >> 23) & 0xffu, mant = u & 0x7fffffu;
  return uint16_t(sign | ((exp - 127 + 15) << 10) | (mant >> 13));
}
uint16_t to_bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t(u >> 16);
}

// An (N, C, S) batch in float64, held in the memory order `perm` of its logical dims,
// converted to `dtype`: returns the storage and a strided view over it.
struct Batch {
  std::vector<unsigned char> bytes;
  syncbn::TensorView view;
};
Batch make(const std::vector<double>& x, int64_t N, int64_t C, int64_t S, syncbn::DType dtype,
           const char* layout) {
  const int64_t shape[3] = {N, C, S};
  // Memory order of the logical dims (outermost first), and an element gap for "strided".
  int order[3] = {0, 1, 2};
  int64_t gap = 1;
  if (std::string(layout) == "channels_last") order[1] = 2, order[2] = 1;
  if (std::string(layout) == "strided") gap = 2;
  int64_t strides[3], stride = gap;
  for (int k = 2; k >= 0; --k) {
    strides[order[k]] = stride;
    stride *= shape[order[k]];
  }
  const int size = syncbn::dtype_size(dtype);
  Batch b;
  b.bytes.assign(size_t(std::max<int64_t>(stride, 1) * size), 0xAB);  // gaps hold garbage
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s) {
        const double v = x[size_t((n * C + c) * S + s)];
        unsigned char* p =
            b.bytes.data() + (n * strides[0] + c * strides[1] + s * strides[2]) * size;
        switch (dtype) {
          case syncbn::DType::Float64: std::memcpy(p, &v, 8); break;
          case syncbn::DType::Float32: {
            const float f = float(v);
            std::memcpy(p, &f, 4);
            break;
          }
          case syncbn::DType::Float16: {
            const uint16_t h = to_half(float(v));
            std::memcpy(p, &h, 2);
            break;
          }
          case syncbn::DType::BFloat16: {
            const uint16_t h = to_bfloat16(float(v));
            std::memcpy(p, &h, 2);
            break;
          }
        }
      }
  b.view = syncbn::contiguous_view(b.bytes.data(), dtype, syncbn::Device{}, 3, shape);
  std::copy(strides, strides + 3, b.view.strides);
  return b;
}

double load(const syncbn::TensorView& t, int64_t n, int64_t c, int64_t s) {
  const unsigned char* p =
      static_cast<const unsigned char*>(t.data) +
      (n * t.strides[0] + c * t.strides[1] + s * t.strides[2]) * syncbn::dtype_size(t.dtype);
  switch (t.dtype) {
    case syncbn::DType::Float64: {
      double v;
      std::memcpy(&v, p, 8);
      return v;
    }
    case syncbn::DType::Float32: {
      float v;
      std::memcpy(&v, p, 4);
      return v;
    }
    case syncbn::DType::Float16: {  // normal halves only (the outputs here are)
      uint16_t h;
      std::memcpy(&h, p, 2);
      if ((h & 0x7fffu) == 0) return 0.0;
      const int e = (h >> 10) & 0x1f;
      const double m = 1 + double(h & 0x3ffu) / 1024;
      return (h & 0x8000u ? -1 : 1) * std::ldexp(m, e - 15);
    }
    case syncbn::DType::BFloat16: {
      uint16_t h;
      std::memcpy(&h, p, 2);
      const uint32_t u = uint32_t(h) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      return f;
    }
  }
  return NAN;
}

syncbn::TensorView vec(std::vector<double>& v) {
  const int64_t n = int64_t(v.size());
  return syncbn::contiguous_view(v.data(), syncbn::DType::Float64, syncbn::Device{}, 1, &n);
}

// Forward and backward of one (N, C, S) batch in `dtype` and `layout` against float64
// batch norm; the composed ops and the primitives must agree exactly.
void test_equivalence(syncbn::DType dtype, const char* layout) {
  // S = 37: channels-first runs of 37 (>= 16: the kernels' run mode, 8-wide loops with a
  // tail); channels-last rows of C * 1 (row mode); strided goes through a packed copy.
  const int64_t N = 3, C = 3, S = 37;
  const std::string what = std::string(syncbn::dtype_name(dtype)) + " " + layout;
  std::vector<double> x(size_t(N * C * S)), dy(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = double(int(i * 37 % 29) - 14) / 8 + double(i % size_t(C)) * 4;  // exact in 16 bits
    dy[i] = double(int(i * 11 % 17) - 8) / 8;
  }
  Batch xb = make(x, N, C, S, dtype, layout), dyb = make(dy, N, C, S, dtype, layout);
  Batch yb = make(std::vector<double>(x.size()), N, C, S, dtype, layout);
  Batch dxb = make(std::vector<double>(x.size()), N, C, S, dtype, layout);
  std::vector<double> w = {1.5, -0.5, 2}, b = {0.25, 0, -1}, rm(3, 0.0), rv(3, 1.0);
  std::vector<double> mean(3), invstd(3), gw(3), gb(3);
  const auto wv = vec(w), bv = vec(b), rmv = vec(rm), rvv = vec(rv), gwv = vec(gw), gbv = vec(gb);
  syncbn::LocalCommunicator comm;

  const double count = syncbn::forward(xb.view, &wv, &bv, &rmv, &rvv, syncbn::ForwardOptions{},
                                       comm, yb.view, vec(mean), vec(invstd));
  close(count, double(N * S), 0, what + " count");
  syncbn::BackwardOptions bopt;
  bopt.count = count;
  syncbn::backward(dyb.view, xb.view, vec(mean), vec(invstd), &wv, bopt, comm, &dxb.view, &gwv,
                   &gbv);

  const double tol = dtype == syncbn::DType::Float64   ? 1e-12
                     : dtype == syncbn::DType::Float32 ? 1e-5
                                                       : 1e-2;
  for (int64_t c = 0; c < C; ++c) {
    double m = 0, v = 0, sdy = 0, sdyx = 0;
    const double n = double(N * S);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t s = 0; s < S; ++s) m += x[size_t((i * C + c) * S + s)] / n;
    for (int64_t i = 0; i < N; ++i)
      for (int64_t s = 0; s < S; ++s) {
        const double d = x[size_t((i * C + c) * S + s)] - m;
        v += d * d / n;
      }
    const double is = 1 / std::sqrt(v + 1e-5);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t s = 0; s < S; ++s) {
        const size_t k = size_t((i * C + c) * S + s);
        sdy += dy[k];
        sdyx += dy[k] * (x[k] - m) * is;
      }
    close(mean[size_t(c)], m, 1e-12, what + " mean");
    close(invstd[size_t(c)], is, 1e-9, what + " invstd");
    close(rm[size_t(c)], 0.1 * m, 1e-12, what + " running_mean");
    close(rv[size_t(c)], 0.9 + 0.1 * v * n / (n - 1), 1e-12, what + " running_var");
    close(gb[size_t(c)], sdy, 1e-12, what + " grad_bias");
    close(gw[size_t(c)], sdyx, 1e-9, what + " grad_weight");
    for (int64_t i = 0; i < N; ++i)
      for (int64_t s = 0; s < S; ++s) {
        const size_t k = size_t((i * C + c) * S + s);
        const double xh = (x[k] - m) * is;
        close(load(yb.view, i, c, s), xh * w[size_t(c)] + b[size_t(c)], tol, what + " y");
        close(load(dxb.view, i, c, s), w[size_t(c)] * is / n * (n * dy[k] - sdy - xh * sdyx), tol,
              what + " dx");
      }
  }

  // The six primitives give the composed ops' results bit for bit.
  std::vector<double> stats(size_t(syncbn::stats_buffer_size(C)));
  std::vector<double> rm2(3, 0.0), rv2(3, 1.0), mean2(3), invstd2(3), gw2(3), gb2(3);
  std::vector<double> sums(size_t(syncbn::backward_buffer_size(C)));
  const auto rm2v = vec(rm2), rv2v = vec(rv2), gw2v = vec(gw2), gb2v = vec(gb2);
  Batch y2 = make(std::vector<double>(x.size()), N, C, S, dtype, layout);
  Batch dx2 = make(std::vector<double>(x.size()), N, C, S, dtype, layout);
  syncbn::batch_norm_stats(xb.view, 1, vec(stats));
  syncbn::allreduce(vec(stats), comm);
  const double count2 = syncbn::batch_norm_gather_stats(vec(stats), 0.1, 1e-5, &rm2v, &rv2v,
                                                        vec(mean2), vec(invstd2));
  syncbn::batch_norm_elemt(xb.view, 1, vec(mean2), vec(invstd2), &wv, &bv, y2.view);
  syncbn::batch_norm_backward_reduce(dyb.view, xb.view, 1, vec(mean2), vec(invstd2), vec(sums),
                                     &gw2v, &gb2v);
  syncbn::allreduce(vec(sums), comm);
  syncbn::batch_norm_backward_elemt(dyb.view, xb.view, 1, vec(mean2), vec(invstd2), &wv, vec(sums),
                                    count2, dx2.view);
  check(count2 == count && mean2 == mean && invstd2 == invstd && rm2 == rm && rv2 == rv &&
            gw2 == gw && gb2 == gb && y2.bytes == yb.bytes && dx2.bytes == dxb.bytes,
        what + ": primitives differ from forward/backward");
}

// An empty batch: the count is 0 and nothing is written (every rank empty, or a world of
// one with nothing to normalize).
void test_empty() {
  std::vector<double> none;
  const int64_t shape[2] = {0, 4};
  const auto x = syncbn::contiguous_view(none.data(), syncbn::DType::Float64, {}, 2, shape);
  std::vector<double> rm(4, 0.5), rv(4, 2.0), mean(4, -1), invstd(4, -1);
  const auto rmv = vec(rm), rvv = vec(rv);
  syncbn::LocalCommunicator comm;
  const double n =
      syncbn::forward(x, nullptr, nullptr, &rmv, &rvv, {}, comm, x, vec(mean), vec(invstd));
  check(n == 0 && rm == std::vector<double>(4, 0.5) && rv == std::vector<double>(4, 2.0),
        "empty batch: count 0, running stats untouched");
}

// A framework's DLTensor: strided, with a byte offset, NCHW of shape (2, 2, 1, 3).
void test_from_dlpack() {
  std::vector<float> storage(64, 0.0f);
  int64_t shape[4] = {2, 2, 1, 3}, strides[4] = {12, 6, 3, 1};
  DLTensor t{};
  t.data = storage.data();
  t.byte_offset = 4 * sizeof(float);
  t.device = DLDevice{kDLCPU, 0};
  t.ndim = 4;
  t.dtype = DLDataType{kDLFloat, 32, 1};
  t.shape = shape;
  t.strides = strides;
  const syncbn::TensorView v = syncbn::from_dlpack(t, "x");
  check(v.data == storage.data() + 4 && v.dtype == syncbn::DType::Float32 && v.ndim == 4 &&
            v.strides[0] == 12 && v.shape[3] == 3 && !v.read_only,
        "from_dlpack: data + byte_offset, dtype, strides");
  t.dtype = DLDataType{kDLInt, 32, 1};
  raises<syncbn::TypeError>([&] { syncbn::from_dlpack(t, "x"); }, "x: expected a floating dtype",
                            "from_dlpack int32");
}

// Bad arguments: the exception type, the argument named, and nothing written.
void test_errors() {
  std::vector<double> xs(12, 1.0), ys(12), mean(3), invstd(3), rm(3, 0.0), rv(3, 1.0), w(2, 1.0);
  const int64_t shape[2] = {4, 3}, one[2] = {1, 3};
  const auto x = syncbn::contiguous_view(xs.data(), syncbn::DType::Float64, {}, 2, shape);
  const auto y = syncbn::contiguous_view(ys.data(), syncbn::DType::Float64, {}, 2, shape);
  const auto x1 = syncbn::contiguous_view(xs.data(), syncbn::DType::Float64, {}, 2, one);
  const auto rmv = vec(rm), rvv = vec(rv), wv = vec(w);
  syncbn::LocalCommunicator comm;
  raises<syncbn::ValueError>(
      [&] { syncbn::forward(x, &wv, nullptr, &rmv, &rvv, {}, comm, y, vec(mean), vec(invstd)); },
      "weight", "weight of the wrong length");
  syncbn::ForwardOptions bad_axis;
  bad_axis.axis = 2;
  raises<syncbn::ValueError>(
      [&] {
        syncbn::forward(x, nullptr, nullptr, &rmv, &rvv, bad_axis, comm, y, vec(mean), vec(invstd));
      },
      "axis", "axis out of range");
  raises<syncbn::ValueError>(
      [&] {
        syncbn::forward(x1, nullptr, nullptr, &rmv, &rvv, {}, comm, x1, vec(mean), vec(invstd));
      },
      "", "a global count of 1");
  check(rm == std::vector<double>(3, 0.0) && rv == std::vector<double>(3, 1.0),
        "failed calls leave the running stats untouched");
  // Every syncbn exception is a std::exception of one of three kinds.
  static_assert(std::is_base_of<std::invalid_argument, syncbn::TypeError>::value, "");
  static_assert(std::is_base_of<std::invalid_argument, syncbn::ValueError>::value, "");
  static_assert(std::is_base_of<std::runtime_error, syncbn::CommError>::value, "");
}

}  // namespace

int main() {
  using syncbn::DType;
  for (DType dt : {DType::Float64, DType::Float32, DType::Float16, DType::BFloat16})
    for (const char* layout : {"channels_first", "channels_last", "strided"})
      test_equivalence(dt, layout);
  test_empty();
  test_from_dlpack();
  test_errors();
  const syncbn::BuildConfig cfg = syncbn::build_config();
  std::printf("syncbn %s (mpi %d, openmp %d): %d checks, %d failures\n", cfg.version, int(cfg.mpi),
              int(cfg.openmp), g_checks, g_failures);
  return g_failures ? 1 : 0;
}
