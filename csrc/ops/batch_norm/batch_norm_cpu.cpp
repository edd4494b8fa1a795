// CPU batch norm: statistics, normalisation (with a fused residual add and ReLU) and backward.
//
// Memory traffic decides the speed, so the kernels are arranged to touch DRAM as few times as the
// data allows:
// - planar (NCHW): a channel is N planes of S contiguous values. Threads take whole channels when
//   there are enough of them: the channel's statistics pass reads it from memory and the
//   normalisation pass finds it still in L2 (a [32,64,56,56] channel is 400 KB), so training costs
//   one read and one write per element instead of PyTorch's two reads and a write. With fewer
//   channels than threads can share, plane segments are the unit and partial results are merged.
// - packed (channels_last, [N, C]): rows of C channels. Row ranges reduce into per-channel partials
//   (vectorised along the channels), merged in a fixed order; then a normalisation pass.
// Statistics are computed per block (a plane segment or a block of rows that fits in L1) with two
// passes — mean, then squared deviations from it — and blocks merge with Chan's formula in double
// (batch_norm.h). No E[x^2] - E[x]^2 cancellation anywhere. Results do not depend on the thread count.
// The inner loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time.
#include <algorithm>
#include <vector>

#include "common/check.h"
#include "common/dtype.h"
#include "common/parallel.h"
#include "ops/batch_norm/batch_norm.h"
#include "ops/batch_norm/batch_norm_ops.h"

#define FASTCV_BN_INLINE inline __attribute__((always_inline))

namespace fastcv {
namespace {

using batch_norm::Affine;
using batch_norm::GradCoeffs;
using batch_norm::Moments;

constexpr int64_t kLanes = 16;        // independent partial sums: one AVX-512 register of floats
constexpr int64_t kSegment = 4096;    // values summed in the compute type before a double merge (L1-sized)
constexpr int64_t kBlockBytes = 32 << 10;  // packed: rows of one block, re-read from L1 by the second pass

template <class T>
FASTCV_BN_INLINE compute_t<T> load(const T* p, int64_t i) {
  return to_float(p[i]);
}

// Sum over i < n of f(i), in kLanes independent accumulators so that the loop vectorises without
// reassociating (we compile without -ffast-math).
template <class A, class F>
FASTCV_BN_INLINE A lane_sum(int64_t n, const F& f) {
  A lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] += f(i + j);
  for (int64_t j = 0; i + j < n; ++j) lanes[j] += f(i + j);
  A total = 0;
  for (int64_t j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

// ---------------------------------------------------------------- the inner loops, per storage type

// Moments of p[0, n): each segment by two passes in the compute type, segments merged in double.
template <class T>
FASTCV_BN_INLINE Moments<double> segment_moments(const T* p, int64_t n) {
  using A = compute_t<T>;
  Moments<double> m;
  for (int64_t i0 = 0; i0 < n; i0 += kSegment) {
    const T* q = p + i0;
    const int64_t len = std::min(kSegment, n - i0);
    const A mean0 = lane_sum<A>(len, [&](int64_t i) { return load(q, i); }) / A(len);
    const A d1 = lane_sum<A>(len, [&](int64_t i) { return load(q, i) - mean0; });
    const A d2 = lane_sum<A>(len, [&](int64_t i) {
      const A d = load(q, i) - mean0;
      return d * d;
    });
    // d1 corrects the first pass's rounding of the mean: sum((x - m)^2) = d2 - d1^2 / len.
    const double shift = double(d1) / double(len);
    m = batch_norm::merge(m, Moments<double>{double(len), double(mean0) + shift, double(d2) - double(d1) * shift});
  }
  return m;
}

// Packed: the moments of rows [r0, r1) of x[rows, C], merged into out[C]. Each block of rows is
// summed along the channels (contiguous, so the loops vectorise), then re-read from L1 for the
// squared deviations from the block's mean.
template <class T>
FASTCV_BN_INLINE void rows_moments(const T* x, int64_t r0, int64_t r1, int64_t C, Moments<double>* out) {
  using A = compute_t<T>;
  const int64_t block = std::max<int64_t>(1, kBlockBytes / int64_t(sizeof(A) * C));
  std::vector<A> mean(C), s1(C), s2(C);
  for (int64_t b0 = r0; b0 < r1; b0 += block) {
    const int64_t b1 = std::min(r1, b0 + block);
    const A rows = A(b1 - b0);
    std::fill(mean.begin(), mean.end(), A(0));
    std::fill(s1.begin(), s1.end(), A(0));
    std::fill(s2.begin(), s2.end(), A(0));
    for (int64_t r = b0; r < b1; ++r)
      for (int64_t c = 0; c < C; ++c) mean[c] += load(x, r * C + c);
    for (int64_t c = 0; c < C; ++c) mean[c] /= rows;
    for (int64_t r = b0; r < b1; ++r)
      for (int64_t c = 0; c < C; ++c) {
        const A d = load(x, r * C + c) - mean[c];
        s1[c] += d;
        s2[c] += d * d;
      }
    for (int64_t c = 0; c < C; ++c) {
      const double shift = double(s1[c]) / double(rows);
      out[c] = batch_norm::merge(
          out[c], Moments<double>{double(rows), double(mean[c]) + shift, double(s2[c]) - double(s1[c]) * shift});
    }
  }
}

// y[i] = bn(x[i]) [+ res[i]] [ReLU] for i < n, one channel's coefficients.
template <class T>
FASTCV_BN_INLINE void apply_segment(const T* x, const T* res, T* y, int64_t n, Affine<compute_t<T>> f, bool relu) {
  using A = compute_t<T>;
  for (int64_t i = 0; i < n; ++i) {
    A v = batch_norm::apply(load(x, i), f);
    if (res) v += load(res, i);
    if (relu) v = batch_norm::relu(v);
    y[i] = from_compute<T>(v);
  }
}

// Packed: rows [r0, r1) of x[rows, C] with per-channel coefficients f[C].
template <class T>
FASTCV_BN_INLINE void apply_rows(const T* x, const T* res, T* y, int64_t r0, int64_t r1, int64_t C,
                                 const Affine<compute_t<T>>* f, bool relu) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * C;
    const T* xr = x + o;
    const T* rr = res ? res + o : nullptr;
    T* yr = y + o;
    for (int64_t c = 0; c < C; ++c) {
      auto v = batch_norm::apply(load(xr, c), f[c]);
      if (rr) v += load(rr, c);
      if (relu) v = batch_norm::relu(v);
      yr[c] = from_compute<T>(v);
    }
  }
}

// The gradient that reaches the normalisation: dy, masked by the fused ReLU's output when there is one.
template <class T>
FASTCV_BN_INLINE compute_t<T> masked(const T* dy, const T* y, int64_t i) {
  return y ? batch_norm::relu_mask(load(dy, i), load(y, i)) : load(dy, i);
}

struct GradSums {
  double g = 0, gx = 0;  // sum(g), sum(g * (x - mean))
};

template <class T>
FASTCV_BN_INLINE GradSums segment_grad_sums(const T* dy, const T* x, const T* y, int64_t n, compute_t<T> mean) {
  using A = compute_t<T>;
  GradSums s;
  for (int64_t i0 = 0; i0 < n; i0 += kSegment) {
    const int64_t len = std::min(kSegment, n - i0);
    const T* dq = dy + i0;
    const T* xq = x + i0;
    const T* yq = y ? y + i0 : nullptr;
    s.g += lane_sum<A>(len, [&](int64_t i) { return masked(dq, yq, i); });
    s.gx += lane_sum<A>(len, [&](int64_t i) { return masked(dq, yq, i) * (load(xq, i) - mean); });
  }
  return s;
}

// Packed: sums of rows [r0, r1), added into out[C]; blocks of rows in the compute type, then double.
template <class T>
FASTCV_BN_INLINE void rows_grad_sums(const T* dy, const T* x, const T* y, int64_t r0, int64_t r1, int64_t C,
                                     const compute_t<T>* mean, GradSums* out) {
  using A = compute_t<T>;
  const int64_t block = std::max<int64_t>(1, kSegment / C);
  std::vector<A> sg(C), sgx(C);
  for (int64_t b0 = r0; b0 < r1; b0 += block) {
    const int64_t b1 = std::min(r1, b0 + block);
    std::fill(sg.begin(), sg.end(), A(0));
    std::fill(sgx.begin(), sgx.end(), A(0));
    for (int64_t r = b0; r < b1; ++r) {
      const int64_t o = r * C;
      const T* yr = y ? y + o : nullptr;
      for (int64_t c = 0; c < C; ++c) {
        const A g = masked(dy + o, yr, c);
        sg[c] += g;
        sgx[c] += g * (load(x, o + c) - mean[c]);
      }
    }
    for (int64_t c = 0; c < C; ++c) out[c].g += sg[c], out[c].gx += sgx[c];
  }
}

template <class T>
FASTCV_BN_INLINE void grad_segment(const T* dy, const T* x, const T* y, T* dx, T* dres, int64_t n,
                                   GradCoeffs<compute_t<T>> k) {
  for (int64_t i = 0; i < n; ++i) {
    const auto g = masked(dy, y, i);
    if (dx) dx[i] = from_compute<T>(batch_norm::grad_input(g, load(x, i), k));
    if (dres) dres[i] = from_compute<T>(g);
  }
}

template <class T>
FASTCV_BN_INLINE void grad_rows(const T* dy, const T* x, const T* y, T* dx, T* dres, int64_t r0, int64_t r1,
                                int64_t C, const GradCoeffs<compute_t<T>>* k) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * C;
    const T* yr = y ? y + o : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      const auto g = masked(dy + o, yr, c);
      if (dx) dx[o + c] = from_compute<T>(batch_norm::grad_input(g, load(x, o + c), k[c]));
      if (dres) dres[o + c] = from_compute<T>(g);
    }
  }
}

// One compiled copy per instruction set of each inner loop, for each storage type.
#define FASTCV_BN_CLONES(T)                                                                                      \
  FASTCV_CPU_CLONES Moments<double> segment_moments_isa(const T* p, int64_t n) { return segment_moments(p, n); } \
  FASTCV_CPU_CLONES void rows_moments_isa(const T* x, int64_t r0, int64_t r1, int64_t C, Moments<double>* out) { \
    rows_moments(x, r0, r1, C, out);                                                                             \
  }                                                                                                              \
  FASTCV_CPU_CLONES void apply_segment_isa(const T* x, const T* res, T* y, int64_t n, Affine<compute_t<T>> f,    \
                                           bool relu) {                                                          \
    apply_segment(x, res, y, n, f, relu);                                                                        \
  }                                                                                                              \
  FASTCV_CPU_CLONES void apply_rows_isa(const T* x, const T* res, T* y, int64_t r0, int64_t r1, int64_t C,       \
                                        const Affine<compute_t<T>>* f, bool relu) {                              \
    apply_rows(x, res, y, r0, r1, C, f, relu);                                                                   \
  }                                                                                                              \
  FASTCV_CPU_CLONES GradSums segment_grad_sums_isa(const T* dy, const T* x, const T* y, int64_t n,               \
                                                   compute_t<T> mean) {                                          \
    return segment_grad_sums(dy, x, y, n, mean);                                                                 \
  }                                                                                                              \
  FASTCV_CPU_CLONES void rows_grad_sums_isa(const T* dy, const T* x, const T* y, int64_t r0, int64_t r1,         \
                                            int64_t C, const compute_t<T>* mean, GradSums* out) {                \
    rows_grad_sums(dy, x, y, r0, r1, C, mean, out);                                                              \
  }                                                                                                              \
  FASTCV_CPU_CLONES void grad_segment_isa(const T* dy, const T* x, const T* y, T* dx, T* dres, int64_t n,        \
                                          GradCoeffs<compute_t<T>> k) {                                          \
    grad_segment(dy, x, y, dx, dres, n, k);                                                                      \
  }                                                                                                              \
  FASTCV_CPU_CLONES void grad_rows_isa(const T* dy, const T* x, const T* y, T* dx, T* dres, int64_t r0,          \
                                       int64_t r1, int64_t C, const GradCoeffs<compute_t<T>>* k) {               \
    grad_rows(dy, x, y, dx, dres, r0, r1, C, k);                                                                 \
  }
FASTCV_BN_CLONES(float)
FASTCV_BN_CLONES(double)
FASTCV_BN_CLONES(Half)
FASTCV_BN_CLONES(BFloat16)
#undef FASTCV_BN_CLONES

// ---------------------------------------------------------------- work division

// Planar: a work unit is a segment of one (image, channel) plane; planes longer than kSplit are cut so
// that a few channels still give every thread work.
constexpr int64_t kSplit = 1 << 16;

struct PlanarUnits {
  int64_t n, c, s, per_plane, len;
  int64_t count() const { return n * c * per_plane; }
  // Unit u covers [begin, begin + size) of plane (image, channel); units of one channel are ordered
  // by image, then segment, so folding them in order is the same whichever thread made them.
  void locate(int64_t u, int64_t& image, int64_t& channel, int64_t& begin, int64_t& size) const {
    const int64_t seg = u % per_plane, plane = u / per_plane;
    channel = plane % c, image = plane / c;
    begin = seg * len, size = std::min(len, s - begin);
  }
  int64_t offset(int64_t image, int64_t channel, int64_t begin) const { return (image * c + channel) * s + begin; }
};

PlanarUnits planar_units(const BatchNormShape& sh) {
  const int64_t per_plane = (sh.s + kSplit - 1) / kSplit;
  return {sh.n, sh.c, sh.s, per_plane, (sh.s + per_plane - 1) / per_plane};
}

// Whole channels per thread (statistics and normalisation back to back, the channel still in cache)
// when the channels divide well among the threads; else units and a separate merge.
bool by_channel(const BatchNormShape& sh, int nthreads) {
  return sh.c >= 4 * int64_t(nthreads) && sh.s <= kSplit;
}

// Packed: row ranges of at least this many rows, at most kMaxRanges of them (a fixed division, so the
// merged statistics do not depend on the thread count).
constexpr int64_t kMinRangeRows = 64, kMaxRanges = 64;

int64_t row_ranges(int64_t rows, int64_t C) {
  const int64_t min_rows = std::max<int64_t>(kMinRangeRows, (1 << 14) / std::max<int64_t>(C, 1));
  return std::clamp<int64_t>(rows / min_rows, 1, kMaxRanges);
}

int64_t apply_grain(int64_t C) { return std::max<int64_t>(1, (1 << 14) / C); }  // rows per task

// Per-channel parameters as the compute type, absent ones as 1 (weight) or 0 (bias).
template <class A>
A param(const TensorView* t, int64_t c, A absent) {
  return t ? t->ptr<A>()[c] : absent;
}

template <class T>
const T* opt_ptr(const TensorView* t) {
  return t ? t->ptr<T>() : nullptr;
}

// ---------------------------------------------------------------- forward

template <class T>
struct ForwardArgs {
  using A = compute_t<T>;
  const T* x;
  const T* res;
  T* y;
  const TensorView *weight, *bias;
  bool relu;
  A eps;
};

template <class T>
Affine<compute_t<T>> channel_affine(const ForwardArgs<T>& a, int64_t c, compute_t<T> mean, compute_t<T> var,
                                    compute_t<T> mean_lo = 0) {
  using A = compute_t<T>;
  return batch_norm::affine<A>(mean, var, a.eps, param<A>(a.weight, c, A(1)), param<A>(a.bias, c, A(0)), mean_lo);
}

// The batch statistics of channel c into mean[c], var[c], and its normalisation coefficients (with the
// low part of the double-precision mean).
template <class T>
Affine<compute_t<T>> finish_stats(const ForwardArgs<T>& a, int64_t c, const Moments<double>& m, compute_t<T>* mean,
                                  compute_t<T>* var) {
  using A = compute_t<T>;
  mean[c] = A(m.mean), var[c] = A(m.m2 / m.n);
  return channel_affine(a, c, mean[c], var[c], A(m.mean - double(mean[c])));
}

// Planar normalisation of every unit with per-channel coefficients f[C].
template <class T>
void apply_planar(const ForwardArgs<T>& a, const PlanarUnits& pu, const Affine<compute_t<T>>* f, int nthreads) {
  parallel_for(0, pu.count(), std::max<int64_t>(1, kSplit / pu.len), nthreads, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      int64_t image, channel, begin, size;
      pu.locate(u, image, channel, begin, size);
      const int64_t o = pu.offset(image, channel, begin);
      apply_segment_isa(a.x + o, a.res ? a.res + o : nullptr, a.y + o, size, f[channel], a.relu);
    }
  });
}

template <class T>
void train_planar(const ForwardArgs<T>& a, const BatchNormShape& sh, compute_t<T>* mean, compute_t<T>* var,
                  int nthreads) {
  using A = compute_t<T>;
  const PlanarUnits pu = planar_units(sh);
  if (by_channel(sh, nthreads)) {
    parallel_for(0, sh.c, 1, nthreads, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        Moments<double> m;
        for (int64_t n = 0; n < sh.n; ++n) m = batch_norm::merge(m, segment_moments_isa(a.x + pu.offset(n, c, 0), sh.s));
        const Affine<A> f = finish_stats(a, c, m, mean, var);
        for (int64_t n = 0; n < sh.n; ++n) {
          const int64_t o = pu.offset(n, c, 0);
          apply_segment_isa(a.x + o, a.res ? a.res + o : nullptr, a.y + o, sh.s, f, a.relu);
        }
      }
    });
    return;
  }
  std::vector<Moments<double>> parts(pu.count());
  parallel_for(0, pu.count(), 1, nthreads, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      int64_t image, channel, begin, size;
      pu.locate(u, image, channel, begin, size);
      parts[u] = segment_moments_isa(a.x + pu.offset(image, channel, begin), size);
    }
  });
  std::vector<Affine<A>> f(sh.c);
  for (int64_t c = 0; c < sh.c; ++c) {
    Moments<double> m;
    for (int64_t n = 0; n < sh.n; ++n)
      for (int64_t k = 0; k < pu.per_plane; ++k) m = batch_norm::merge(m, parts[(n * sh.c + c) * pu.per_plane + k]);
    f[c] = finish_stats(a, c, m, mean, var);
  }
  apply_planar(a, pu, f.data(), nthreads);
}

template <class T>
void apply_packed(const ForwardArgs<T>& a, int64_t rows, int64_t C, const Affine<compute_t<T>>* f, int nthreads) {
  parallel_for(0, rows, apply_grain(C), nthreads,
               [&](int64_t r0, int64_t r1) { apply_rows_isa(a.x, a.res, a.y, r0, r1, C, f, a.relu); });
}

template <class T>
void train_packed(const ForwardArgs<T>& a, const BatchNormShape& sh, compute_t<T>* mean, compute_t<T>* var,
                  int nthreads) {
  using A = compute_t<T>;
  const int64_t rows = sh.n * sh.s, C = sh.c, ranges = row_ranges(rows, C);
  std::vector<Moments<double>> parts(ranges * C);
  parallel_for(0, ranges, 1, nthreads, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q)
      rows_moments_isa(a.x, rows * q / ranges, rows * (q + 1) / ranges, C, parts.data() + q * C);
  });
  std::vector<Affine<A>> f(C);
  for (int64_t c = 0; c < C; ++c) {
    Moments<double> m;
    for (int64_t q = 0; q < ranges; ++q) m = batch_norm::merge(m, parts[q * C + c]);
    f[c] = finish_stats(a, c, m, mean, var);
  }
  apply_packed(a, rows, C, f.data(), nthreads);
}

template <class T>
ForwardArgs<T> forward_args(const TensorView& x, const TensorView* weight, const TensorView* bias,
                            const TensorView* residual, bool relu, double eps, const TensorView& y) {
  return {x.ptr<T>(), opt_ptr<T>(residual), y.ptr<T>(), weight, bias, relu, compute_t<T>(eps)};
}

}  // namespace

void batch_norm_forward_train_cpu(const TensorView& x, const TensorView* weight, const TensorView* bias,
                                  const TensorView* residual, bool relu, double eps, const TensorView& y,
                                  const TensorView& mean, const TensorView& var, int nthreads) {
  const BatchNormShape sh = check_batch_norm_args(x, weight, bias, &mean, &var, residual, &y, DeviceType::CPU);
  check_arg(sh.n * sh.s > 0 || sh.c == 0, "batch_norm in training needs at least one value per channel");
  if (x.numel() == 0) return;
  dispatch_floating(x.dtype, "input", [&](auto tag) {
    using T = decltype(tag);
    using A = compute_t<T>;
    const ForwardArgs<T> a = forward_args<T>(x, weight, bias, residual, relu, eps, y);
    if (sh.packed)
      train_packed(a, sh, mean.ptr<A>(), var.ptr<A>(), nthreads);
    else
      train_planar(a, sh, mean.ptr<A>(), var.ptr<A>(), nthreads);
  });
}

void batch_norm_forward_eval_cpu(const TensorView& x, const TensorView& mean, const TensorView& var,
                                 const TensorView* weight, const TensorView* bias, const TensorView* residual,
                                 bool relu, double eps, const TensorView& y, int nthreads) {
  const BatchNormShape sh = check_batch_norm_args(x, weight, bias, &mean, &var, residual, &y, DeviceType::CPU);
  if (x.numel() == 0) return;
  dispatch_floating(x.dtype, "input", [&](auto tag) {
    using T = decltype(tag);
    using A = compute_t<T>;
    const ForwardArgs<T> a = forward_args<T>(x, weight, bias, residual, relu, eps, y);
    std::vector<Affine<A>> f(sh.c);
    for (int64_t c = 0; c < sh.c; ++c) f[c] = channel_affine(a, c, mean.ptr<A>()[c], var.ptr<A>()[c]);
    if (sh.packed)
      apply_packed(a, sh.n * sh.s, sh.c, f.data(), nthreads);
    else
      apply_planar(a, planar_units(sh), f.data(), nthreads);
  });
}

// ---------------------------------------------------------------- backward

namespace {

template <class T>
struct BackwardArgs {
  using A = compute_t<T>;
  const T *dy, *x, *y;  // y: the forward's output when a ReLU was fused, else null
  T *dx, *dres;
  const A *mean, *var;
  const TensorView* weight;
  bool training, reduce;  // reduce: the per-channel sums are needed (training, or weight/bias gradients)
  A eps, count;
  A* grad_weight;
  A* grad_bias;
  bool elementwise() const { return dx || dres; }
};

// A channel's sums -> its parameter gradients and the coefficients of its input gradient.
template <class T>
GradCoeffs<compute_t<T>> finish_channel(const BackwardArgs<T>& a, int64_t c, const GradSums& s) {
  using A = compute_t<T>;
  const A sum_g = A(s.g), sum_gx = A(s.gx);
  if (a.grad_weight) a.grad_weight[c] = sum_gx * batch_norm::inverse_std(a.var[c], a.eps);
  if (a.grad_bias) a.grad_bias[c] = sum_g;
  return batch_norm::grad_coeffs<A>(a.mean[c], a.var[c], a.eps, param<A>(a.weight, c, A(1)), sum_g, sum_gx,
                                    a.count, a.training);
}

GradSums add(GradSums a, const GradSums& b) { return {a.g + b.g, a.gx + b.gx}; }

template <class T>
void grad_planar_units(const BackwardArgs<T>& a, const PlanarUnits& pu, const GradCoeffs<compute_t<T>>* k,
                       int nthreads) {
  parallel_for(0, pu.count(), std::max<int64_t>(1, kSplit / pu.len), nthreads, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      int64_t image, channel, begin, size;
      pu.locate(u, image, channel, begin, size);
      const int64_t o = pu.offset(image, channel, begin);
      grad_segment_isa(a.dy + o, a.x + o, a.y ? a.y + o : nullptr, a.dx ? a.dx + o : nullptr,
                       a.dres ? a.dres + o : nullptr, size, k[channel]);
    }
  });
}

template <class T>
void backward_planar(const BackwardArgs<T>& a, const BatchNormShape& sh, int nthreads) {
  using A = compute_t<T>;
  const PlanarUnits pu = planar_units(sh);
  if (by_channel(sh, nthreads) && a.reduce) {
    parallel_for(0, sh.c, 1, nthreads, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        GradSums s;
        for (int64_t n = 0; n < sh.n; ++n) {
          const int64_t o = pu.offset(n, c, 0);
          s = add(s, segment_grad_sums_isa(a.dy + o, a.x + o, a.y ? a.y + o : nullptr, sh.s, a.mean[c]));
        }
        const GradCoeffs<A> k = finish_channel(a, c, s);
        if (!a.elementwise()) continue;
        for (int64_t n = 0; n < sh.n; ++n) {
          const int64_t o = pu.offset(n, c, 0);
          grad_segment_isa(a.dy + o, a.x + o, a.y ? a.y + o : nullptr, a.dx ? a.dx + o : nullptr,
                           a.dres ? a.dres + o : nullptr, sh.s, k);
        }
      }
    });
    return;
  }
  std::vector<GradSums> parts(a.reduce ? pu.count() : 0);
  if (a.reduce)
    parallel_for(0, pu.count(), 1, nthreads, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        int64_t image, channel, begin, size;
        pu.locate(u, image, channel, begin, size);
        const int64_t o = pu.offset(image, channel, begin);
        parts[u] = segment_grad_sums_isa(a.dy + o, a.x + o, a.y ? a.y + o : nullptr, size, a.mean[channel]);
      }
    });
  std::vector<GradCoeffs<A>> k(sh.c);
  for (int64_t c = 0; c < sh.c; ++c) {
    GradSums s;
    for (int64_t n = 0; a.reduce && n < sh.n; ++n)
      for (int64_t j = 0; j < pu.per_plane; ++j) s = add(s, parts[(n * sh.c + c) * pu.per_plane + j]);
    k[c] = finish_channel(a, c, s);
  }
  if (a.elementwise()) grad_planar_units(a, pu, k.data(), nthreads);
}

template <class T>
void backward_packed(const BackwardArgs<T>& a, const BatchNormShape& sh, int nthreads) {
  using A = compute_t<T>;
  const int64_t rows = sh.n * sh.s, C = sh.c, ranges = row_ranges(rows, C);
  std::vector<GradSums> parts(a.reduce ? ranges * C : 0);
  if (a.reduce)
    parallel_for(0, ranges, 1, nthreads, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q)
        rows_grad_sums_isa(a.dy, a.x, a.y, rows * q / ranges, rows * (q + 1) / ranges, C, a.mean,
                           parts.data() + q * C);
    });
  std::vector<GradCoeffs<A>> k(C);
  for (int64_t c = 0; c < C; ++c) {
    GradSums s;
    for (int64_t q = 0; a.reduce && q < ranges; ++q) s = add(s, parts[q * C + c]);
    k[c] = finish_channel(a, c, s);
  }
  if (a.elementwise())
    parallel_for(0, rows, apply_grain(C), nthreads,
                 [&](int64_t r0, int64_t r1) { grad_rows_isa(a.dy, a.x, a.y, a.dx, a.dres, r0, r1, C, k.data()); });
}

}  // namespace

void batch_norm_backward_cpu(const TensorView& grad_y, const TensorView& x, const TensorView* y,
                             const TensorView& mean, const TensorView& var, const TensorView* weight, bool training,
                             double eps, const TensorView* grad_x, const TensorView* grad_residual,
                             const TensorView* grad_weight, const TensorView* grad_bias, int nthreads) {
  const BatchNormShape sh = check_batch_norm_args(x, weight, grad_bias, &mean, &var, nullptr, y, DeviceType::CPU);
  check_batch_norm_like(grad_y, "grad_output", x, sh, DeviceType::CPU);
  if (grad_x) check_batch_norm_like(*grad_x, "grad_input", x, sh, DeviceType::CPU);
  if (grad_residual) check_batch_norm_like(*grad_residual, "grad_residual", x, sh, DeviceType::CPU);
  if (grad_weight) check_batch_norm_args(x, grad_weight, nullptr, nullptr, nullptr, nullptr, nullptr, DeviceType::CPU);
  dispatch_floating(x.dtype, "input", [&](auto tag) {
    using T = decltype(tag);
    using A = compute_t<T>;
    if (sh.c == 0) return;
    BackwardArgs<T> a{grad_y.ptr<T>(), x.ptr<T>(), opt_ptr<T>(y), grad_x ? grad_x->ptr<T>() : nullptr,
                      grad_residual ? grad_residual->ptr<T>() : nullptr, mean.ptr<A>(), var.ptr<A>(), weight,
                      training, training || grad_weight || grad_bias, A(eps), A(sh.n * sh.s),
                      grad_weight ? grad_weight->ptr<A>() : nullptr, grad_bias ? grad_bias->ptr<A>() : nullptr};
    if (x.numel() == 0) {  // no values: zero parameter gradients (the statistics may be NaN)
      if (a.grad_weight) std::fill(a.grad_weight, a.grad_weight + sh.c, A(0));
      if (a.grad_bias) std::fill(a.grad_bias, a.grad_bias + sh.c, A(0));
      return;
    }
    if (sh.packed)
      backward_packed(a, sh, nthreads);
    else
      backward_planar(a, sh, nthreads);
  });
}

}  // namespace fastcv
