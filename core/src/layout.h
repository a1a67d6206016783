// Gives every tensor of one op the same dense traversal (traversal_reference: x's own
// layout when dense, else a contiguous one); tensors with other strides go through packed
// temporaries. Shared by the host and device paths, which differ only in `Memory`:
//   void* bytes(size_t n);                                   // scratch owned by Memory
//   void copy(const TensorView& src, const TensorView& dst); // strided element copy
#pragma once

#include <utility>
#include <vector>

#include "syncbn/tensor.h"

namespace syncbn {

template <class Memory>
class Layout {
 public:
  Layout(const TensorView& x, int axis, Memory mem = Memory())
      : ref_(traversal_reference(x, axis, &g_)), mem_(std::move(mem)) {}
  const Geometry& geometry() const { return g_; }

  const void* input(const TensorView& t) {
    if (t.same_strides(ref_)) return t.data;
    TensorView tmp = temp_like(t);
    mem_.copy(t, tmp);
    return tmp.data;
  }
  void* output(const TensorView& t) {
    if (t.same_strides(ref_)) return t.data;
    TensorView tmp = temp_like(t);
    pending_.push_back({tmp, t});
    return tmp.data;
  }
  // Copies outputs that went through a temporary to their destination.
  void finish() {
    for (auto& p : pending_) mem_.copy(p.first, p.second);
    pending_.clear();
  }

 private:
  TensorView temp_like(const TensorView& t) {
    TensorView v = ref_;
    v.data = mem_.bytes(size_t(t.numel()) * size_t(dtype_size(t.dtype)));
    v.dtype = t.dtype;
    return v;
  }
  Geometry g_;  // before ref_: ref_'s initializer fills it
  TensorView ref_;
  Memory mem_;
  std::vector<std::pair<TensorView, TensorView>> pending_;
};

}  // namespace syncbn
