// A small multilayer perceptron in float64 with its own SGD, shared by the C++ examples:
//
//   x -> Linear -> BatchNorm -> ReLU -> Linear -> BatchNorm -> ReLU -> Linear -> squared error
//
// The batch-norm layers are pluggable: `PlainBatchNorm` is ordinary batch norm over the rows
// this process holds (the one-process reference); the examples plug in syncbn layers. In
// data-parallel training every rank calls train_step on its slice of the global batch with
// the global batch size, and `sum` adds the gradients of all ranks before the SGD update:
// with SyncBN that is exactly one process training on the whole batch.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <vector>

#include "syncbn/tensor.h"

namespace mlp {

using Vec = std::vector<double>;

// Row-major (rows, cols).
struct Mat {
  int64_t rows = 0, cols = 0;
  Vec v;
  Mat() = default;
  Mat(int64_t r, int64_t c) : rows(r), cols(c), v(size_t(r * c), 0.0) {}
  double& operator()(int64_t i, int64_t j) { return v[size_t(i * cols + j)]; }
  double operator()(int64_t i, int64_t j) const { return v[size_t(i * cols + j)]; }
};

// Rows [begin, begin + count) of m.
inline Mat rows(const Mat& m, int64_t begin, int64_t count) {
  Mat r(count, m.cols);
  std::copy(m.v.begin() + begin * m.cols, m.v.begin() + (begin + count) * m.cols, r.v.begin());
  return r;
}

// ---- syncbn views of this memory (non-owning: the Mat or Vec must outlive the call) -----
inline syncbn::TensorView view(const Mat& m) {
  const int64_t shape[2] = {m.rows, m.cols};
  syncbn::TensorView t = syncbn::contiguous_view(
      const_cast<double*>(m.v.data()), syncbn::DType::Float64, syncbn::Device{}, 2, shape);
  t.read_only = true;
  return t;
}
inline syncbn::TensorView view(Mat& m) {
  const int64_t shape[2] = {m.rows, m.cols};
  return syncbn::contiguous_view(m.v.data(), syncbn::DType::Float64, syncbn::Device{}, 2, shape);
}
inline syncbn::TensorView view(const Vec& v) {
  const int64_t n = int64_t(v.size());
  syncbn::TensorView t = syncbn::contiguous_view(const_cast<double*>(v.data()),
                                                 syncbn::DType::Float64, syncbn::Device{}, 1, &n);
  t.read_only = true;
  return t;
}
inline syncbn::TensorView view(Vec& v) {
  const int64_t n = int64_t(v.size());
  return syncbn::contiguous_view(v.data(), syncbn::DType::Float64, syncbn::Device{}, 1, &n);
}

// ---- batch norm over the rows of (n, C) activations, training mode ------------------------
class BatchNorm {
 public:
  static constexpr double kMomentum = 0.1, kEps = 1e-5;  // PyTorch's defaults
  explicit BatchNorm(int64_t C)
      : weight(size_t(C), 1.0),
        bias(size_t(C), 0.0),
        running_mean(size_t(C), 0.0),
        running_var(size_t(C), 1.0),
        grad_weight(size_t(C)),
        grad_bias(size_t(C)) {}
  virtual ~BatchNorm() = default;
  // y = (x - mean) / sqrt(var + eps) * weight + bias; updates the running statistics.
  virtual void forward(const Mat& x, Mat& y) = 0;
  // dx for the dy of the last forward; sets this rank's grad_weight and grad_bias.
  virtual void backward(const Mat& dy, Mat& dx) = 0;

  Vec weight, bias, running_mean, running_var, grad_weight, grad_bias;
};

// Ordinary batch norm on the rows it is given, straight from the formulas.
class PlainBatchNorm final : public BatchNorm {
 public:
  using BatchNorm::BatchNorm;
  void forward(const Mat& x, Mat& y) override {
    const int64_t n = x.rows, C = x.cols;
    xhat_ = Mat(n, C);
    invstd_.assign(size_t(C), 0.0);
    for (int64_t c = 0; c < C; ++c) {
      double mean = 0, var = 0;
      for (int64_t i = 0; i < n; ++i) mean += x(i, c) / double(n);
      for (int64_t i = 0; i < n; ++i) var += (x(i, c) - mean) * (x(i, c) - mean) / double(n);
      invstd_[size_t(c)] = 1 / std::sqrt(var + kEps);
      for (int64_t i = 0; i < n; ++i) {
        xhat_(i, c) = (x(i, c) - mean) * invstd_[size_t(c)];
        y(i, c) = xhat_(i, c) * weight[size_t(c)] + bias[size_t(c)];
      }
      running_mean[size_t(c)] = (1 - kMomentum) * running_mean[size_t(c)] + kMomentum * mean;
      running_var[size_t(c)] = (1 - kMomentum) * running_var[size_t(c)] +
                               kMomentum * var * double(n) / double(n - 1);  // unbiased
    }
  }
  void backward(const Mat& dy, Mat& dx) override {
    const int64_t n = dy.rows, C = dy.cols;
    for (int64_t c = 0; c < C; ++c) {
      double sum_dy = 0, sum_dy_xhat = 0;
      for (int64_t i = 0; i < n; ++i) {
        sum_dy += dy(i, c);
        sum_dy_xhat += dy(i, c) * xhat_(i, c);
      }
      grad_bias[size_t(c)] = sum_dy;
      grad_weight[size_t(c)] = sum_dy_xhat;
      const double k = weight[size_t(c)] * invstd_[size_t(c)] / double(n);
      for (int64_t i = 0; i < n; ++i)
        dx(i, c) = k * (double(n) * dy(i, c) - sum_dy - xhat_(i, c) * sum_dy_xhat);
    }
  }

 private:
  Mat xhat_;
  Vec invstd_;
};

// ---- the network -------------------------------------------------------------------------
struct Linear {
  Mat w, gw;  // (out, in)
  Vec b, gb;
  Mat x;  // input of the last forward
  Linear(int64_t in, int64_t out, std::mt19937_64& rng)
      : w(out, in), gw(out, in), b(size_t(out)), gb(size_t(out)) {
    std::normal_distribution<double> normal(0.0, 1.0 / std::sqrt(double(in)));
    for (double& e : w.v) e = normal(rng);
    for (double& e : b) e = normal(rng);
  }
  Mat forward(const Mat& in) {
    x = in;
    Mat y(in.rows, w.rows);
    for (int64_t i = 0; i < in.rows; ++i)
      for (int64_t o = 0; o < w.rows; ++o) {
        double s = b[size_t(o)];
        for (int64_t k = 0; k < w.cols; ++k) s += in(i, k) * w(o, k);
        y(i, o) = s;
      }
    return y;
  }
  Mat backward(const Mat& dy) {
    Mat dx(dy.rows, w.cols);
    std::fill(gw.v.begin(), gw.v.end(), 0.0);
    std::fill(gb.begin(), gb.end(), 0.0);
    for (int64_t i = 0; i < dy.rows; ++i)
      for (int64_t o = 0; o < w.rows; ++o) {
        gb[size_t(o)] += dy(i, o);
        for (int64_t k = 0; k < w.cols; ++k) {
          gw(o, k) += dy(i, o) * x(i, k);
          dx(i, k) += dy(i, o) * w(o, k);
        }
      }
    return dx;
  }
};

// Makes the batch-norm layer number `layer` (1, 2) for `channels` channels.
using BatchNormFactory = std::function<std::unique_ptr<BatchNorm>(int64_t channels, int layer)>;
// Sums a vector across the ranks of data-parallel training, in place.
using SumAcrossRanks = std::function<void(Vec&)>;

class Net {
 public:
  // The same seed gives every rank, and the reference, the same initial parameters.
  Net(int64_t in, int64_t hidden, const BatchNormFactory& make_bn, uint64_t seed = 7)
      : rng_(seed),
        l1_(in, hidden, rng_),
        l2_(hidden, hidden, rng_),
        l3_(hidden, 1, rng_),
        bn1_(make_bn(hidden, 1)),
        bn2_(make_bn(hidden, 2)) {}

  // One SGD step on this rank's rows (x, target) of a global batch of `global_n` rows:
  // the loss is the mean over the global batch, gradients are summed over ranks by `sum`.
  // Returns the global loss.
  double train_step(const Mat& x, const Mat& target, int64_t global_n, const SumAcrossRanks& sum,
                    double lr) {
    Mat h1 = l1_.forward(x), b1(h1.rows, h1.cols);
    bn1_->forward(h1, b1);
    Mat r1 = relu(b1);
    Mat h2 = l2_.forward(r1), b2(h2.rows, h2.cols);
    bn2_->forward(h2, b2);
    Mat r2 = relu(b2);
    Mat out = l3_.forward(r2);

    double loss = 0;
    Mat dout(out.rows, 1);
    for (int64_t i = 0; i < out.rows; ++i) {
      const double e = out(i, 0) - target(i, 0);
      loss += e * e / double(global_n);
      dout(i, 0) = 2 * e / double(global_n);
    }
    Mat dr2 = l3_.backward(dout);
    Mat db2 = relu_backward(dr2, b2), dh2(db2.rows, db2.cols);
    bn2_->backward(db2, dh2);
    Mat dr1 = l2_.backward(dh2);
    Mat db1 = relu_backward(dr1, b1), dh1(db1.rows, db1.cols);
    bn1_->backward(db1, dh1);
    l1_.backward(dh1);

    // Every gradient (and the loss) in one vector: one sum across ranks per step.
    Vec g = flatten(true);
    g.push_back(loss);
    sum(g);
    loss = g.back();
    g.pop_back();
    Vec p = flatten(false);
    for (size_t i = 0; i < p.size(); ++i) p[i] -= lr * g[i];
    unflatten(p);
    return loss;
  }

  // Parameters, then the running statistics: what must match the reference.
  Vec state() const {
    Vec s = flatten(false);
    for (const BatchNorm* bn : {bn1_.get(), bn2_.get()}) {
      s.insert(s.end(), bn->running_mean.begin(), bn->running_mean.end());
      s.insert(s.end(), bn->running_var.begin(), bn->running_var.end());
    }
    return s;
  }

 private:
  static Mat relu(const Mat& x) {
    Mat y = x;
    for (double& e : y.v) e = std::max(e, 0.0);
    return y;
  }
  static Mat relu_backward(const Mat& dy, const Mat& pre) {
    Mat dx = dy;
    for (size_t i = 0; i < dx.v.size(); ++i)
      if (pre.v[i] <= 0) dx.v[i] = 0;
    return dx;
  }
  // All parameters (grads = false) or their gradients, in one fixed order.
  Vec flatten(bool grads) const {
    Vec out;
    auto add = [&](const Vec& v) { out.insert(out.end(), v.begin(), v.end()); };
    for (const Linear* l : {&l1_, &l2_, &l3_}) {
      add(grads ? l->gw.v : l->w.v);
      add(grads ? l->gb : l->b);
    }
    for (const BatchNorm* bn : {bn1_.get(), bn2_.get()}) {
      add(grads ? bn->grad_weight : bn->weight);
      add(grads ? bn->grad_bias : bn->bias);
    }
    return out;
  }
  void unflatten(const Vec& p) {
    auto it = p.begin();
    auto take = [&](Vec& v) {
      std::copy(it, it + std::ptrdiff_t(v.size()), v.begin());
      it += std::ptrdiff_t(v.size());
    };
    for (Linear* l : {&l1_, &l2_, &l3_}) {
      take(l->w.v);
      take(l->b);
    }
    for (BatchNorm* bn : {bn1_.get(), bn2_.get()}) {
      take(bn->weight);
      take(bn->bias);
    }
  }

  std::mt19937_64 rng_;
  Linear l1_, l2_, l3_;
  std::unique_ptr<BatchNorm> bn1_, bn2_;
};

// ---- synthetic data and the split across ranks ---------------------------------------------
constexpr int64_t kInputs = 6, kHidden = 16, kSteps = 20;
constexpr double kLearningRate = 0.05;

// The global batch of step `step`, the same on every rank: inputs and a smooth target.
inline void make_batch(int step, int64_t n, Mat& x, Mat& target) {
  std::mt19937_64 rng(1000 + uint64_t(step));
  std::normal_distribution<double> normal(0.0, 1.0);
  x = Mat(n, kInputs);
  target = Mat(n, 1);
  for (int64_t i = 0; i < n; ++i) {
    double s = 0;
    for (int64_t k = 0; k < kInputs; ++k) {
      x(i, k) = 2 * normal(rng) + double(k);  // offsets, so normalizing matters
      s += x(i, k) * double(k % 3 - 1);
    }
    target(i, 0) = std::sin(0.5 * s);
  }
}

// Rows of the global batch each rank holds: uneven, and with three or more ranks rank 1
// holds none at all (it still takes part in every collective).
inline int64_t rows_of_rank(int rank, int size) {
  return size >= 3 && rank == 1 ? 0 : 3 + 2 * int64_t(rank);
}

inline double max_abs_diff(const Vec& a, const Vec& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return a.size() == b.size() ? m : INFINITY;
}

}  // namespace mlp
