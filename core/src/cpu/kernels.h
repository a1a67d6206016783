// CPU kernels over the dense (outer, C, inner) traversal (see Geometry). Inputs that are
// not dense, or whose strides differ from x's, are packed by the caller (ops.cpp).
// Per-channel parameters are float64 arrays of length C.
#pragma once

#include <cstdint>

#include "syncbn/tensor.h"

namespace syncbn::cpu {

// Local shifted sums: t1 = sum(x - shift), t2 = sum((x - shift)^2) per channel.
void batch_norm_stats(const void* x, DType dt, const Geometry& g, const double* shift, double* t1,
                      double* t2);

// y = (x - mean) * scale + bias.
void batch_norm_elemt(const void* x, void* y, DType dt, const Geometry& g, const double* mean,
                      const double* scale, const double* bias);

// sum_dy = sum(dy), sum_dy_xmu = sum(dy * (x - mean)) per channel.
void batch_norm_backward_reduce(const void* dy, const void* x, DType dt, const Geometry& g,
                                const double* mean, double* sum_dy, double* sum_dy_xmu);

// dx = (dy - mean_dy - (x - mean) * k) * gain.
void batch_norm_backward_elemt(const void* dy, const void* x, void* dx, DType dt, const Geometry& g,
                               const double* mean, const double* mean_dy, const double* k,
                               const double* gain);

// Masks (one uint8 per element, nonzero: the element counts): out = x where the mask is
// set, else fill[c]; and dx = dy * gain[c] where it is not.
void select_masked(const void* x, const uint8_t* mask, void* out, DType dt, const Geometry& g,
                   const double* fill);
void scale_masked_out(const void* dy, const uint8_t* mask, void* dx, DType dt, const Geometry& g,
                      const double* gain);

}  // namespace syncbn::cpu
