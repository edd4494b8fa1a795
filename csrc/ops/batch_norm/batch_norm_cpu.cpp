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
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/check.h"
#include "common/cpu_isa.h"
#include "common/dtype.h"
#include "common/memory.h"
#include "common/parallel.h"
#include "ops/batch_norm/batch_norm.h"
#include "ops/batch_norm/batch_norm_ops.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define FASTCV_BN_INLINE inline __attribute__((always_inline))

namespace fastcv {
namespace {

using batch_norm::Affine;
using batch_norm::GradCoeffs;
using batch_norm::Moments;

constexpr int64_t kLanes = 16;           // independent partial sums: one AVX-512 register of floats
constexpr int64_t kSegment = 4096;       // values per block: summed in the compute type, re-read from L1
constexpr int64_t kRowBlockBytes = 128 << 10;  // packed: bytes of a block of rows, re-read from L2

template <class T>
FASTCV_BN_INLINE compute_t<T> load(const T* p, int64_t i) {
  return to_float(p[i]);
}

// `count` runs of `len` values, `stride` apart, from element `offset`: a block of one channel.
struct Block {
  int64_t offset, count, stride, len;
  double size() const { return double(count) * double(len); }
};

// Sums f(i) for i < len into kLanes independent accumulators, so that the loop vectorises without
// reassociating (we compile without -ffast-math); the remainder goes to a scalar accumulator, which
// keeps the compiler from vectorising the tail into shuffles.
template <class A>
struct LaneSum {
  A lanes[kLanes] = {};
  A rest = 0;
  template <class F>
  FASTCV_BN_INLINE void add(int64_t len, const F& f) {
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) lanes[j] += f(i + j);
    for (; i < len; ++i) rest += f(i);
  }
  FASTCV_BN_INLINE A total() const {
    A t = rest;
    for (int64_t j = 0; j < kLanes; ++j) t += lanes[j];
    return t;
  }
};

// ---------------------------------------------------------------- the inner loops, per storage type

// A block's moments by two passes in the compute type: the mean, then deviations from it (the second
// pass finds the block in L1). The sum of deviations corrects the first pass's rounding of the mean:
// sum((x - m)^2) = sum(d^2) - sum(d)^2 / n for d = x - m0.
template <class T>
FASTCV_BN_INLINE Moments<double> block_moments(const T* x, Block b) {
  using A = compute_t<T>;
  LaneSum<A> s, d1, d2;
  for (int64_t q = 0; q < b.count; ++q) {
    const T* r = x + b.offset + q * b.stride;
    s.add(b.len, [&](int64_t i) { return load(r, i); });
  }
  const A m0 = s.total() / A(b.size());
  for (int64_t q = 0; q < b.count; ++q) {
    const T* r = x + b.offset + q * b.stride;
    d1.add(b.len, [&](int64_t i) { return load(r, i) - m0; });
    d2.add(b.len, [&](int64_t i) {
      const A d = load(r, i) - m0;
      return d * d;
    });
  }
  const double n = b.size(), sum_d = double(d1.total()), shift = sum_d / n;
  return {n, double(m0) + shift, double(d2.total()) - sum_d * shift};
}

// Planar: the moments of whole planes [p0, p1) of S values, into out[p] (one call for many small planes).
template <class T>
FASTCV_BN_INLINE void plane_moments(const T* x, int64_t p0, int64_t p1, int64_t S, Moments<double>* out) {
  for (int64_t p = p0; p < p1; ++p) out[p] = block_moments(x, Block{p * S, 1, 0, S});
}

// Packed: channels are taken kTile at a time (128 bytes: their accumulators stay in registers while
// the loop walks down the rows), then one at a time for the rest.
template <class A>
constexpr int64_t kTile = 128 / int64_t(sizeof(A));

// The moments of channels [c0, c0 + W) over rows [b0, b1) of x (rows ld values apart; a block that
// fits in L2), by two passes, merged into out[0, W).
template <int64_t W, class T>
FASTCV_BN_INLINE void tile_moments(const T* x, int64_t b0, int64_t b1, int64_t ld, int64_t c0,
                                   Moments<double>* out) {
  using A = compute_t<T>;
  A m[W] = {}, d1[W] = {}, d2[W] = {};
  for (int64_t r = b0; r < b1; ++r)
    for (int64_t j = 0; j < W; ++j) m[j] += load(x, r * ld + c0 + j);
  const A rows = A(b1 - b0);
  for (int64_t j = 0; j < W; ++j) m[j] /= rows;
  for (int64_t r = b0; r < b1; ++r)
    for (int64_t j = 0; j < W; ++j) {
      const A d = load(x, r * ld + c0 + j) - m[j];
      d1[j] += d;
      d2[j] += d * d;
    }
  for (int64_t j = 0; j < W; ++j) {
    const double shift = double(d1[j]) / double(rows);
    out[j] = batch_norm::merge(
        out[j], Moments<double>{double(rows), double(m[j]) + shift, double(d2[j]) - double(d1[j]) * shift});
  }
}

// Packed: the moments of channels [0, C) of rows [r0, r1) of x (rows ld values apart: C, or more for
// a slice of the channels), merged into out[C], block of rows by block.
template <class T>
FASTCV_BN_INLINE void rows_moments(const T* x, int64_t r0, int64_t r1, int64_t ld, int64_t C, Moments<double>* out) {
  constexpr int64_t W = kTile<compute_t<T>>;
  const int64_t block = std::max<int64_t>(16, kRowBlockBytes / int64_t(sizeof(T) * C));
  for (int64_t b0 = r0; b0 < r1; b0 += block) {
    const int64_t b1 = std::min(r1, b0 + block);
    int64_t c0 = 0;
    for (; c0 + W <= C; c0 += W) tile_moments<W>(x, b0, b1, ld, c0, out + c0);
    for (; c0 < C; ++c0) tile_moments<1>(x, b0, b1, ld, c0, out + c0);
  }
}

// Outputs larger than this are written with non-temporal (streaming) stores: they would not stay in
// the cache anyway, and ordinary stores first read every line they write (a third more memory
// traffic for a normalisation pass). Measured on [32,64,56,56] float32: training forward 4.8 -> 3.2 ms.
constexpr int64_t kStreamBytes = 16 << 20;

// y[i] = value(i) for i < n, in the storage type; streamed (float32 on x86-64) when asked.
template <class T, class F>
FASTCV_BN_INLINE void store_run(T* __restrict y, int64_t n, bool stream, const F& value) {
  int64_t i = 0;
#if defined(__x86_64__)
  if constexpr (std::is_same<T, float>::value) {
    if (stream) {
      for (; i < n && (reinterpret_cast<uintptr_t>(y + i) & 15); ++i) y[i] = value(i);
      for (; i + 16 <= n; i += 16) {
        alignas(16) float v[16];
        for (int64_t j = 0; j < 16; ++j) v[j] = value(i + j);
        for (int64_t j = 0; j < 16; j += 4) _mm_stream_ps(y + i + j, _mm_load_ps(v + j));
      }
    }
  }
#endif
  for (; i < n; ++i) y[i] = from_compute<T>(value(i));
}

// Streamed stores are weakly ordered: each function that streams fences once, when it is done, so that
// they are visible before the threads join (a fence per run or row would stall on every one).
FASTCV_BN_INLINE void stream_fence(bool stream) {
#if defined(__x86_64__)
  if (stream) _mm_sfence();
#endif
}

// y = bn(x) [+ res] [ReLU] over a run of n values of one channel (restrict-qualified: see grad_run).
template <class T>
FASTCV_BN_INLINE void apply_run(const T* __restrict x, const T* __restrict res, T* __restrict y, int64_t n,
                                Affine<compute_t<T>> f, bool relu, bool stream) {
  store_run(y, n, stream, [&](int64_t i) {
    auto v = batch_norm::apply(load(x, i), f);
    if (res) v += load(res, i);
    return relu ? batch_norm::relu(v) : v;
  });
}

template <class T>
FASTCV_BN_INLINE void apply_block(const T* x, const T* res, T* y, Block b, Affine<compute_t<T>> f, bool relu,
                                  bool stream) {
  for (int64_t q = 0; q < b.count; ++q) {
    const int64_t o = b.offset + q * b.stride;
    apply_run(x + o, res ? res + o : nullptr, y + o, b.len, f, relu, stream);
  }
  stream_fence(stream);
}

// Per-channel coefficients as separate arrays, so that loops along the channels load them as vectors.
template <class A>
struct AffineColumns {
  std::vector<A> mean, scale, shift;
  explicit AffineColumns(int64_t C) : mean(C), scale(C), shift(C) {}
  void set(int64_t c, const Affine<A>& f) { mean[c] = f.mean, scale[c] = f.scale, shift[c] = f.shift; }
  Affine<A> get(int64_t c) const { return {mean[c], scale[c], shift[c]}; }
};

// Planar: whole planes [p0, p1) of S values (plane p is channel p % C of image p / C), in one call. Small
// planes one call each (through the instruction-set dispatch) cost as much as their arithmetic: ResNet's
// 14x14 maps, 196 values a plane.
template <class T>
FASTCV_BN_INLINE void apply_planes(const T* x, const T* res, T* y, int64_t p0, int64_t p1, int64_t S, int64_t C,
                                   const AffineColumns<compute_t<T>>& f, bool relu, bool stream) {
  for (int64_t p = p0, c = p0 % C; p < p1; ++p, c = c + 1 == C ? 0 : c + 1) {
    const int64_t o = p * S;
    apply_run(x + o, res ? res + o : nullptr, y + o, S, f.get(c), relu, stream);
  }
  stream_fence(stream);
}

// Packed: one row of C channels, the coefficients as restrict-qualified columns.
template <class T>
FASTCV_BN_INLINE void apply_row(const T* __restrict x, const T* __restrict res, T* __restrict y, int64_t C,
                                const compute_t<T>* __restrict mean, const compute_t<T>* __restrict scale,
                                const compute_t<T>* __restrict shift, bool relu, bool stream) {
  using A = compute_t<T>;
  store_run(y, C, stream, [&](int64_t c) {
    A v = batch_norm::apply(load(x, c), Affine<A>{mean[c], scale[c], shift[c]});
    if (res) v += load(res, c);
    return relu ? batch_norm::relu(v) : v;
  });
}

// Packed: rows [r0, r1) of x[rows, C].
template <class T>
FASTCV_BN_INLINE void apply_rows(const T* x, const T* res, T* y, int64_t r0, int64_t r1, int64_t C,
                                 const AffineColumns<compute_t<T>>& f, bool relu, bool stream) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * C;
    apply_row(x + o, res ? res + o : nullptr, y + o, C, f.mean.data(), f.scale.data(), f.shift.data(), relu, stream);
  }
  stream_fence(stream);
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
FASTCV_BN_INLINE GradSums block_grad_sums(const T* dy, const T* x, const T* y, Block b, compute_t<T> mean) {
  using A = compute_t<T>;
  LaneSum<A> sg, sgx;
  for (int64_t q = 0; q < b.count; ++q) {
    const int64_t o = b.offset + q * b.stride;
    const T *dq = dy + o, *xq = x + o, *yq = y ? y + o : nullptr;
    sg.add(b.len, [&](int64_t i) { return masked(dq, yq, i); });
    sgx.add(b.len, [&](int64_t i) { return masked(dq, yq, i) * (load(xq, i) - mean); });
  }
  return {double(sg.total()), double(sgx.total())};
}

// Packed: the sums of channels [c0, c0 + W) over rows [b0, b1), added into out[0, W).
template <int64_t W, class T>
FASTCV_BN_INLINE void tile_grad_sums(const T* dy, const T* x, const T* y, int64_t b0, int64_t b1, int64_t C,
                                     int64_t c0, const compute_t<T>* mean, GradSums* out) {
  using A = compute_t<T>;
  A sg[W] = {}, sgx[W] = {}, m[W];
  for (int64_t j = 0; j < W; ++j) m[j] = mean[c0 + j];
  for (int64_t r = b0; r < b1; ++r) {
    const int64_t o = r * C + c0;
    const T* yr = y ? y + o : nullptr;
    for (int64_t j = 0; j < W; ++j) {
      const A g = masked(dy + o, yr, j);
      sg[j] += g;
      sgx[j] += g * (load(x, o + j) - m[j]);
    }
  }
  for (int64_t j = 0; j < W; ++j) out[j].g += sg[j], out[j].gx += sgx[j];
}

// Packed: sums of rows [r0, r1), added into out[C]; blocks of rows in the compute type, then double.
template <class T>
FASTCV_BN_INLINE void rows_grad_sums(const T* dy, const T* x, const T* y, int64_t r0, int64_t r1, int64_t C,
                                     const compute_t<T>* mean, GradSums* out) {
  constexpr int64_t W = kTile<compute_t<T>>;
  const int64_t block = std::max<int64_t>(16, kSegment / C);
  for (int64_t b0 = r0; b0 < r1; b0 += block) {
    const int64_t b1 = std::min(r1, b0 + block);
    int64_t c0 = 0;
    for (; c0 + W <= C; c0 += W) tile_grad_sums<W>(dy, x, y, b0, b1, C, c0, mean, out + c0);
    for (; c0 < C; ++c0) tile_grad_sums<1>(dy, x, y, b0, b1, C, c0, mean, out + c0);
  }
}

// One run of n values of a channel. The outputs are restrict-qualified and written by separate
// loops, so that each loop vectorises (with two possibly aliasing outputs, the compiler gives up).
template <class T>
FASTCV_BN_INLINE void grad_run(const T* __restrict dy, const T* __restrict x, const T* __restrict y,
                               T* __restrict dx, T* __restrict dres, int64_t n, GradCoeffs<compute_t<T>> k,
                               bool stream) {
  if (dx)
    store_run(dx, n, stream,
              [&](int64_t i) { return batch_norm::grad_input(masked(dy, y, i), load(x, i), k); });
  if (dres) store_run(dres, n, stream, [&](int64_t i) { return masked(dy, y, i); });
}

template <class T>
FASTCV_BN_INLINE void grad_block(const T* dy, const T* x, const T* y, T* dx, T* dres, Block b,
                                 GradCoeffs<compute_t<T>> k, bool stream) {
  for (int64_t q = 0; q < b.count; ++q) {
    const int64_t o = b.offset + q * b.stride;
    grad_run(dy + o, x + o, y ? y + o : nullptr, dx ? dx + o : nullptr, dres ? dres + o : nullptr, b.len, k,
             stream);
  }
  stream_fence(stream);
}

template <class A>
struct GradColumns {
  std::vector<A> mean, k, cx, c0;
  explicit GradColumns(int64_t C) : mean(C), k(C), cx(C), c0(C) {}
  void set(int64_t c, const GradCoeffs<A>& g) { mean[c] = g.mean, k[c] = g.k, cx[c] = g.cx, c0[c] = g.c0; }
  GradCoeffs<A> get(int64_t c) const { return {mean[c], k[c], cx[c], c0[c]}; }
};

// One row of C channels, with the coefficients as restrict-qualified columns (see grad_run).
template <class T>
FASTCV_BN_INLINE void grad_row(const T* __restrict dy, const T* __restrict x, const T* __restrict y,
                               T* __restrict dx, T* __restrict dres, int64_t C, const compute_t<T>* __restrict mean,
                               const compute_t<T>* __restrict k, const compute_t<T>* __restrict cx,
                               const compute_t<T>* __restrict c0, bool stream) {
  if (dx)
    store_run(dx, C, stream, [&](int64_t c) {
      return batch_norm::grad_input(masked(dy, y, c), load(x, c), {mean[c], k[c], cx[c], c0[c]});
    });
  if (dres) store_run(dres, C, stream, [&](int64_t c) { return masked(dy, y, c); });
}

template <class T>
FASTCV_BN_INLINE void grad_rows(const T* dy, const T* x, const T* y, T* dx, T* dres, int64_t r0, int64_t r1,
                                int64_t C, const GradColumns<compute_t<T>>& k, bool stream) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * C;
    grad_row(dy + o, x + o, y ? y + o : nullptr, dx ? dx + o : nullptr, dres ? dres + o : nullptr, C,
             k.mean.data(), k.k.data(), k.cx.data(), k.c0.data(), stream);
  }
  stream_fence(stream);
}

// One compiled copy per instruction set of each inner loop, for each storage type (the one in use picked
// at each call).
#define FASTCV_BN_CLONES(T)                                                                                     \
  FASTCV_ISA_DISPATCH(Moments<double>, block_moments_isa, block_moments, (const T* x, Block b), (x, b))         \
  FASTCV_ISA_DISPATCH(void, plane_moments_isa, plane_moments,                                                   \
                      (const T* x, int64_t p0, int64_t p1, int64_t S, Moments<double>* out), (x, p0, p1, S, out)) \
  FASTCV_ISA_DISPATCH(void, rows_moments_isa, rows_moments,                                                     \
                      (const T* x, int64_t r0, int64_t r1, int64_t ld, int64_t C, Moments<double>* out),        \
                      (x, r0, r1, ld, C, out))                                                                  \
  FASTCV_ISA_DISPATCH(void, apply_block_isa, apply_block,                                                       \
                      (const T* x, const T* res, T* y, Block b, Affine<compute_t<T>> f, bool relu, bool stream), \
                      (x, res, y, b, f, relu, stream))                                                          \
  FASTCV_ISA_DISPATCH(void, apply_planes_isa, apply_planes,                                                     \
                      (const T* x, const T* res, T* y, int64_t p0, int64_t p1, int64_t S, int64_t C,            \
                       const AffineColumns<compute_t<T>>& f, bool relu, bool stream),                           \
                      (x, res, y, p0, p1, S, C, f, relu, stream))                                               \
  FASTCV_ISA_DISPATCH(void, apply_rows_isa, apply_rows,                                                         \
                      (const T* x, const T* res, T* y, int64_t r0, int64_t r1, int64_t C,                       \
                       const AffineColumns<compute_t<T>>& f, bool relu, bool stream),                           \
                      (x, res, y, r0, r1, C, f, relu, stream))                                                  \
  FASTCV_ISA_DISPATCH(GradSums, block_grad_sums_isa, block_grad_sums,                                           \
                      (const T* dy, const T* x, const T* y, Block b, compute_t<T> mean), (dy, x, y, b, mean))   \
  FASTCV_ISA_DISPATCH(void, rows_grad_sums_isa, rows_grad_sums,                                                 \
                      (const T* dy, const T* x, const T* y, int64_t r0, int64_t r1, int64_t C,                  \
                       const compute_t<T>* mean, GradSums* out),                                                \
                      (dy, x, y, r0, r1, C, mean, out))                                                         \
  FASTCV_ISA_DISPATCH(void, grad_block_isa, grad_block,                                                         \
                      (const T* dy, const T* x, const T* y, T* dx, T* dres, Block b, GradCoeffs<compute_t<T>> k, \
                       bool stream),                                                                            \
                      (dy, x, y, dx, dres, b, k, stream))                                                       \
  FASTCV_ISA_DISPATCH(void, grad_rows_isa, grad_rows,                                                           \
                      (const T* dy, const T* x, const T* y, T* dx, T* dres, int64_t r0, int64_t r1, int64_t C,  \
                       const GradColumns<compute_t<T>>& k, bool stream),                                        \
                      (dy, x, y, dx, dres, r0, r1, C, k, stream))
FASTCV_BN_CLONES(float)
FASTCV_BN_CLONES(double)
FASTCV_BN_CLONES(Half)
FASTCV_BN_CLONES(BFloat16)
#undef FASTCV_BN_CLONES

// ---------------------------------------------------------------- work division

// Planar: every channel's values are cut into the same sequence of blocks, and partial results fold
// in block order whichever thread made them, so results do not depend on the thread count.
// - Small planes (fewer than kSmallPlane values, e.g. 14x14): a block is one plane, and blocks are
//   visited image by image, so that threads stream through memory, in ranges of planes that are one
//   call each (for_each_plane_range). Visiting a channel's 784-byte planes 200 KB apart would defeat
//   the hardware prefetcher at every plane.
// - Larger planes: blocks of about kSegment values (a few planes, or a segment of one); whole
//   channels go to threads when there are enough (statistics and normalisation back to back, the
//   channel still in L2), else blocks do.
constexpr int64_t kSmallPlane = 1024;

struct PlanarPlan {
  int64_t n, c, s;
  bool image_major;  // small planes: block b of channel c is plane (b, c)
  int64_t group;     // planes per block (planes shorter than kSegment), else 0
  int64_t segments;  // segments per plane (planes of kSegment values or more), else 0
  int64_t blocks;    // per channel

  explicit PlanarPlan(const BatchNormShape& sh) : n(sh.n), c(sh.c), s(sh.s), image_major(sh.s < kSmallPlane) {
    if (s >= kSegment) {
      group = 0, segments = (s + kSegment - 1) / kSegment, blocks = n * segments;
    } else {
      group = image_major ? 1 : std::max<int64_t>(1, kSegment / s), segments = 0;
      blocks = (n + group - 1) / group;
    }
  }
  Block block(int64_t channel, int64_t b) const {
    if (segments) {
      const int64_t plane = b / segments, len = (s + segments - 1) / segments, begin = (b % segments) * len;
      return {(plane * c + channel) * s + begin, 1, 0, std::min(len, s - begin)};
    }
    const int64_t first = b * group;
    return {(first * c + channel) * s, std::min(group, n - first), c * s, s};
  }
  // A whole channel, planes last to first: the pass after a reduction over the channel starts with
  // the planes the reduction read last, which are still in L2.
  Block channel_backwards(int64_t channel) const { return {((n - 1) * c + channel) * s, n, -c * s, s}; }
  // Work item u -> (channel, block), in memory order for small planes.
  void item(int64_t u, int64_t& channel, int64_t& b) const {
    if (image_major)
      channel = u % c, b = u / c;
    else
      channel = u / blocks, b = u % blocks;
  }
  void next(int64_t& channel, int64_t& b) const {
    if (image_major) {
      if (++channel == c) channel = 0, ++b;
    } else if (++b == blocks) {
      b = 0, ++channel;
    }
  }
  bool by_channel(int nthreads) const { return !image_major && c >= 4 * int64_t(nthreads); }
};

// Packed: rows are cut into ranges of at least kRangeValues values (at most kMaxRanges ranges),
// each reduced by one task into per-channel partials. The division depends on the shape alone, so the
// merged statistics do not depend on the thread count; few ranges keep the serial merge short.
constexpr int64_t kRangeValues = 1 << 18, kMaxRanges = 64;

int64_t row_ranges(int64_t rows, int64_t C) {
  return std::clamp<int64_t>(rows * C / kRangeValues, 1, std::min(kMaxRanges, rows));
}

// Per-channel work after a reduction (merging partials, coefficients), spread over the threads when
// there are many channels.
template <class F>
void for_each_channel(int64_t C, int nthreads, const F& f) {
  parallel_for(0, C, 256, nthreads, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) f(c);
  });
}

bool streamed(const TensorView& out) { return out.numel() * dtype_size(out.dtype) >= kStreamBytes; }

int64_t apply_grain(int64_t C) { return std::max<int64_t>(1, (1 << 14) / C); }  // rows per task

// Per-channel parameters as the compute type, absent ones as 1 (weight) or 0 (bias).
template <class A>
A param(const TensorView* t, int64_t c, A absent) {
  return t ? t->ptr<A>()[c] : absent;
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
  bool stream;  // streaming stores for y (kStreamBytes)
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

// Planar passes over uniform items (blocks, segments, planes) give each thread one contiguous share
// (contiguous_share, common/parallel.h).
// Runs job(channel, block) for every block of every channel, blocks of a channel in order when
// whole channels go to threads.
template <class F>
void for_each_block(const PlanarPlan& plan, int nthreads, const F& job) {
  const int64_t items = plan.c * plan.blocks;
  const int64_t grain = std::max(contiguous_share(items, nthreads), plan.image_major ? kSegment / plan.s : int64_t(1));
  parallel_for(0, items, grain, nthreads, [&](int64_t u0, int64_t u1) {
    int64_t c, b;
    plan.item(u0, c, b);
    for (int64_t u = u0; u < u1; ++u) {
      job(c, b);
      plan.next(c, b);  // no division per item: small planes make items short
    }
  });
}

// Planar passes that need no per-channel order (normalisation, input gradient, evaluation's
// backward) go through memory in order: planes image by image, each cut into segments of at most
// kSegment values, so that threads stream. Segment i of a channel is (image, segment) = divmod(i, per_plane).
struct Segments {
  int64_t n, c, s, per_plane, len;
  explicit Segments(const BatchNormShape& sh)
      : n(sh.n), c(sh.c), s(sh.s), per_plane(std::max<int64_t>(1, (sh.s + kSegment - 1) / kSegment)),
        len((sh.s + per_plane - 1) / per_plane) {}
  int64_t per_channel() const { return n * per_plane; }
};

// job(channel, index of the segment within its channel, block), for every segment.
template <class F>
void for_each_segment(const Segments& sg, int nthreads, const F& job) {
  const int64_t count = sg.n * sg.c * sg.per_plane;
  parallel_for(0, count, std::max(contiguous_share(count, nthreads), kSegment / sg.len), nthreads,
               [&](int64_t u0, int64_t u1) {
    int64_t seg = u0 % sg.per_plane, plane = u0 / sg.per_plane, c = plane % sg.c, n = plane / sg.c;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t begin = seg * sg.len;
      job(c, n * sg.per_plane + seg, Block{(n * sg.c + c) * sg.s + begin, 1, 0, std::min(sg.len, sg.s - begin)});
      if (++seg == sg.per_plane) {  // the next plane: advance without a division per item
        seg = 0;
        if (++c == sg.c) c = 0, ++n;
      }
    }
  });
}

// Planes of one segment each: job(p0, p1) over ranges of whole planes, in memory order, so that each range
// is one call through the instruction-set dispatch (see apply_planes).
template <class F>
void for_each_plane_range(const BatchNormShape& sh, int nthreads, const F& job) {
  const int64_t planes = sh.n * sh.c;
  parallel_for(0, planes, std::max(contiguous_share(planes, nthreads), kSegment / std::max<int64_t>(sh.s, 1)),
               nthreads, job);
}

template <class T>
void apply_planar(const ForwardArgs<T>& a, const BatchNormShape& sh, const AffineColumns<compute_t<T>>& f,
                  int nthreads) {
  const Segments sg(sh);
  if (sg.per_plane == 1) {
    for_each_plane_range(sh, nthreads, [&](int64_t p0, int64_t p1) {
      apply_planes_isa(a.x, a.res, a.y, p0, p1, sh.s, sh.c, f, a.relu, a.stream);
    });
    return;
  }
  for_each_segment(sg, nthreads, [&](int64_t c, int64_t, Block blk) {
    apply_block_isa(a.x, a.res, a.y, blk, f.get(c), a.relu, a.stream);
  });
}

template <class T>
void train_planar(const ForwardArgs<T>& a, const BatchNormShape& sh, compute_t<T>* mean, compute_t<T>* var,
                  int nthreads) {
  using A = compute_t<T>;
  const PlanarPlan plan(sh);
  if (plan.by_channel(nthreads)) {
    parallel_for(0, sh.c, 1, nthreads, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        Moments<double> m;
        for (int64_t b = 0; b < plan.blocks; ++b) m = batch_norm::merge(m, block_moments_isa(a.x, plan.block(c, b)));
        apply_block_isa(a.x, a.res, a.y, plan.channel_backwards(c), finish_stats(a, c, m, mean, var), a.relu,
                        a.stream);
      }
    });
    return;
  }
  // Block b of channel c at parts[at(c, b)]: small planes (one block each) leave their moments in plane
  // order, from ranges of whole planes in memory order.
  std::vector<Moments<double>> parts(sh.c * plan.blocks);
  const auto at = [&](int64_t c, int64_t b) { return plan.image_major ? b * sh.c + c : c * plan.blocks + b; };
  if (plan.image_major)
    for_each_plane_range(sh, nthreads,
                         [&](int64_t p0, int64_t p1) { plane_moments_isa(a.x, p0, p1, sh.s, parts.data()); });
  else
    for_each_block(plan, nthreads, [&](int64_t c, int64_t b) { parts[at(c, b)] = block_moments_isa(a.x, plan.block(c, b)); });
  AffineColumns<A> f(sh.c);
  for_each_channel(sh.c, nthreads, [&](int64_t c) {
    Moments<double> m;
    for (int64_t b = 0; b < plan.blocks; ++b) m = batch_norm::merge(m, parts[at(c, b)]);
    f.set(c, finish_stats(a, c, m, mean, var));
  });
  apply_planar(a, sh, f, nthreads);
}

template <class T>
void apply_packed(const ForwardArgs<T>& a, int64_t rows, int64_t C, const AffineColumns<compute_t<T>>& f,
                  int nthreads) {
  parallel_for(0, rows, apply_grain(C), nthreads,
               [&](int64_t r0, int64_t r1) { apply_rows_isa(a.x, a.res, a.y, r0, r1, C, f, a.relu, a.stream); });
}

template <class T>
void train_packed(const ForwardArgs<T>& a, const BatchNormShape& sh, compute_t<T>* mean, compute_t<T>* var,
                  int nthreads) {
  using A = compute_t<T>;
  const int64_t rows = sh.n * sh.s, C = sh.c, ranges = row_ranges(rows, C);
  std::vector<Moments<double>> parts(ranges * C);
  parallel_for(0, ranges, 1, nthreads, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q)
      rows_moments_isa(a.x, rows * q / ranges, rows * (q + 1) / ranges, C, C, parts.data() + q * C);
  });
  AffineColumns<A> f(C);
  for_each_channel(C, nthreads, [&](int64_t c) {
    Moments<double> m;
    for (int64_t q = 0; q < ranges; ++q) m = batch_norm::merge(m, parts[q * C + c]);
    f.set(c, finish_stats(a, c, m, mean, var));
  });
  apply_packed(a, rows, C, f, nthreads);
}

template <class T>
ForwardArgs<T> forward_args(const TensorView& x, const TensorView* weight, const TensorView* bias,
                            const TensorView* residual, bool relu, double eps, const TensorView& y) {
  return {x.ptr<T>(), optional_ptr<T>(residual), y.ptr<T>(), weight, bias, relu, compute_t<T>(eps), streamed(y)};
}

}  // namespace

void batch_norm_forward_train_cpu(const TensorView& x, const TensorView* weight, const TensorView* bias,
                                  const TensorView* residual, bool relu, double eps, const TensorView& y,
                                  const TensorView& mean, const TensorView& var, int nthreads) {
  const BatchNormShape sh = check_batch_norm_args(x, weight, bias, &mean, &var, residual, &y, DeviceType::CPU);
  check_arg(sh.n * sh.s > 0 || sh.c == 0, "batch_norm in training needs at least one value per channel");
  if (x.numel() == 0) return;
  nthreads = threads_for(x.numel(), nthreads);
  dispatch_floating(x.dtype, "input", [&](auto tag) {
    using T = decltype(tag);
    using A = compute_t<T>;
    const ForwardArgs<T> a = forward_args<T>(x, weight, bias, residual, relu, eps, y);
    advise_huge_pages(y.data, size_t(y.numel()) * sizeof(T));  // fresh output: fewer page faults
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
  nthreads = threads_for(x.numel(), nthreads);
  dispatch_floating(x.dtype, "input", [&](auto tag) {
    using T = decltype(tag);
    using A = compute_t<T>;
    const ForwardArgs<T> a = forward_args<T>(x, weight, bias, residual, relu, eps, y);
    advise_huge_pages(y.data, size_t(y.numel()) * sizeof(T));
    AffineColumns<A> f(sh.c);
    for (int64_t c = 0; c < sh.c; ++c) f.set(c, channel_affine(a, c, mean.ptr<A>()[c], var.ptr<A>()[c]));
    if (sh.packed)
      apply_packed(a, sh.n * sh.s, sh.c, f, nthreads);
    else
      apply_planar(a, sh, f, nthreads);
  });
}

void batch_norm_update_running_cpu(const TensorView& running_mean, const TensorView& running_var,
                                   const TensorView& mean, const TensorView& var, double momentum, int64_t count) {
  const int64_t c = mean.numel();
  for (const auto& [t, arg] : {std::pair{&running_mean, "running_mean"}, std::pair{&running_var, "running_var"},
                               std::pair{&mean, "mean"}, std::pair{&var, "var"}}) {
    check_shape(*t, arg, {c});
    check_device(*t, arg, DeviceType::CPU);
  }
  check_contiguous(mean, "mean");
  check_contiguous(var, "var");
  check_dtype(var, "var", mean.dtype);
  check_dtype(running_var, "running_var", running_mean.dtype);
  const double unbiased = count > 1 ? double(count) / double(count - 1) : 1.0;
  const int64_t sm = running_mean.stride(0), sv = running_var.stride(0);  // buffers may be strided views
  dispatch_floating(mean.dtype, "mean", [&](auto stats_tag) {
    using A = decltype(stats_tag);
    dispatch_floating(running_mean.dtype, "running_mean", [&](auto tag) {
      using R = decltype(tag);
      const auto blend = [&](R& running, double batch) {
        running = from_compute<R>(compute_t<R>(momentum * batch + (1 - momentum) * double(to_float(running))));
      };
      for (int64_t k = 0; k < c; ++k) {
        blend(running_mean.ptr<R>()[k * sm], double(to_float(mean.ptr<A>()[k])));
        blend(running_var.ptr<R>()[k * sv], double(to_float(var.ptr<A>()[k])) * unbiased);
      }
    });
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
  bool stream;  // streaming stores for dx, dres (kStreamBytes)
  bool elementwise() const { return dx || dres; }
};

// A channel's sums -> its parameter gradients, and the coefficients of its input gradient (in
// evaluation mode these do not depend on the sums).
template <class T>
void param_grads(const BackwardArgs<T>& a, int64_t c, const GradSums& s) {
  using A = compute_t<T>;
  if (a.grad_weight) a.grad_weight[c] = A(s.gx) * batch_norm::inverse_std(a.var[c], a.eps);
  if (a.grad_bias) a.grad_bias[c] = A(s.g);
}

template <class T>
GradCoeffs<compute_t<T>> coeffs(const BackwardArgs<T>& a, int64_t c, const GradSums& s) {
  using A = compute_t<T>;
  return batch_norm::grad_coeffs<A>(a.mean[c], a.var[c], a.eps, param<A>(a.weight, c, A(1)), A(s.g), A(s.gx),
                                    a.count, a.training);
}

GradSums add(GradSums a, const GradSums& b) { return {a.g + b.g, a.gx + b.gx}; }

// Training: every block's sums, then the input gradient (two passes; the second finds a channel in
// cache when whole channels go to threads). Evaluation: one pass, each block's sums and gradient
// back to back while the block is in L1.
template <class T>
void backward_planar(const BackwardArgs<T>& a, const BatchNormShape& sh, int nthreads) {
  using A = compute_t<T>;
  const PlanarPlan plan(sh);
  const auto sums = [&](int64_t c, Block blk) { return block_grad_sums_isa(a.dy, a.x, a.y, blk, a.mean[c]); };
  const auto grad = [&](Block blk, const GradCoeffs<A>& k) {
    grad_block_isa(a.dy, a.x, a.y, a.dx, a.dres, blk, k, a.stream);
  };
  std::vector<GradSums> parts(a.reduce ? sh.c * plan.blocks : 0);
  const auto fold = [&](int64_t c) {
    GradSums s;
    for (int64_t b = 0; a.reduce && b < plan.blocks; ++b) s = add(s, parts[c * plan.blocks + b]);
    param_grads(a, c, s);
    return s;
  };
  if (!a.training) {  // one pass in memory order: each segment's sums, then its gradient from L1
    const Segments sg(sh);
    std::vector<GradCoeffs<A>> k(sh.c);
    for (int64_t c = 0; c < sh.c; ++c) k[c] = coeffs(a, c, GradSums{});
    std::vector<GradSums> seg_parts(a.reduce ? sh.c * sg.per_channel() : 0);
    for_each_segment(sg, nthreads, [&](int64_t c, int64_t i, Block blk) {
      if (a.reduce) seg_parts[c * sg.per_channel() + i] = sums(c, blk);
      if (a.elementwise()) grad(blk, k[c]);
    });
    for_each_channel(sh.c, nthreads, [&](int64_t c) {
      GradSums s;
      for (int64_t i = 0; a.reduce && i < sg.per_channel(); ++i) s = add(s, seg_parts[c * sg.per_channel() + i]);
      param_grads(a, c, s);
    });
    return;
  }
  if (plan.by_channel(nthreads)) {
    parallel_for(0, sh.c, 1, nthreads, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t b = 0; b < plan.blocks; ++b) parts[c * plan.blocks + b] = sums(c, plan.block(c, b));
        const GradCoeffs<A> k = coeffs(a, c, fold(c));
        if (a.elementwise()) grad(plan.channel_backwards(c), k);
      }
    });
    return;
  }
  for_each_block(plan, nthreads, [&](int64_t c, int64_t b) { parts[c * plan.blocks + b] = sums(c, plan.block(c, b)); });
  std::vector<GradCoeffs<A>> k(sh.c);
  for_each_channel(sh.c, nthreads, [&](int64_t c) { k[c] = coeffs(a, c, fold(c)); });
  if (a.elementwise())
    for_each_segment(Segments(sh), nthreads, [&](int64_t c, int64_t, Block blk) { grad(blk, k[c]); });
}

template <class T>
void backward_packed(const BackwardArgs<T>& a, const BatchNormShape& sh, int nthreads) {
  using A = compute_t<T>;
  const int64_t rows = sh.n * sh.s, C = sh.c, ranges = row_ranges(rows, C);
  const int64_t chunk = std::max<int64_t>(16, kRowBlockBytes / int64_t(sizeof(T) * C));
  std::vector<GradSums> parts(a.reduce ? ranges * C : 0);
  GradColumns<A> k(C);
  if (!a.training) {  // evaluation: per chunk of rows, the sums and the gradient while it is in L2
    for (int64_t c = 0; c < C; ++c) k.set(c, coeffs(a, c, GradSums{}));
    parallel_for(0, ranges, 1, nthreads, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q)
        for (int64_t r0 = rows * q / ranges, end = rows * (q + 1) / ranges; r0 < end; r0 += chunk) {
          const int64_t r1 = std::min(end, r0 + chunk);
          if (a.reduce) rows_grad_sums_isa(a.dy, a.x, a.y, r0, r1, C, a.mean, parts.data() + q * C);
          if (a.elementwise()) grad_rows_isa(a.dy, a.x, a.y, a.dx, a.dres, r0, r1, C, k, a.stream);
        }
    });
  } else {
    parallel_for(0, ranges, 1, nthreads, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q)
        rows_grad_sums_isa(a.dy, a.x, a.y, rows * q / ranges, rows * (q + 1) / ranges, C, a.mean,
                           parts.data() + q * C);
    });
  }
  for_each_channel(C, nthreads, [&](int64_t c) {
    GradSums s;
    for (int64_t q = 0; a.reduce && q < ranges; ++q) s = add(s, parts[q * C + c]);
    param_grads(a, c, s);
    if (a.training) k.set(c, coeffs(a, c, s));
  });
  if (a.training && a.elementwise())
    parallel_for(0, rows, apply_grain(C), nthreads,
                 [&](int64_t r0, int64_t r1) { grad_rows_isa(a.dy, a.x, a.y, a.dx, a.dres, r0, r1, C, k, a.stream); });
}

}  // namespace

void batch_norm_backward_cpu(const TensorView& grad_y, const TensorView& x, const TensorView* y,
                             const TensorView& mean, const TensorView& var, const TensorView* weight, bool training,
                             double eps, const TensorView* grad_x, const TensorView* grad_residual,
                             const TensorView* grad_weight, const TensorView* grad_bias, int nthreads) {
  const BatchNormShape sh = check_batch_norm_backward_args(grad_y, x, y, mean, var, weight, grad_x, grad_residual,
                                                           grad_weight, grad_bias, DeviceType::CPU);
  nthreads = threads_for(x.numel(), nthreads);
  dispatch_floating(x.dtype, "input", [&](auto tag) {
    using T = decltype(tag);
    using A = compute_t<T>;
    if (sh.c == 0) return;
    BackwardArgs<T> a{grad_y.ptr<T>(), x.ptr<T>(), optional_ptr<T>(y), optional_ptr<T>(grad_x),
                      optional_ptr<T>(grad_residual), mean.ptr<A>(), var.ptr<A>(), weight, training,
                      training || grad_weight || grad_bias, A(eps), A(sh.n * sh.s), optional_ptr<A>(grad_weight),
                      optional_ptr<A>(grad_bias), streamed(grad_y)};
    if (x.numel() == 0) {  // no values: zero parameter gradients (the statistics may be NaN)
      if (a.grad_weight) std::fill(a.grad_weight, a.grad_weight + sh.c, A(0));
      if (a.grad_bias) std::fill(a.grad_bias, a.grad_bias + sh.c, A(0));
      return;
    }
    for (const TensorView* out : {grad_x, grad_residual})
      if (out) advise_huge_pages(out->data, size_t(out->numel()) * sizeof(T));
    if (sh.packed)
      backward_packed(a, sh, nthreads);
    else
      backward_planar(a, sh, nthreads);
  });
}

template <class T>
void batch_norm_rows_moments(const T* x, int64_t rows, int64_t ld, int64_t C, Moments<double>* out) {
  rows_moments_isa(x, 0, rows, ld, C, out);
}

#define FASTCV_BN_MOMENTS(T)                                                                          \
  template void batch_norm_rows_moments<T>(const T* x, int64_t rows, int64_t ld, int64_t C, Moments<double>* out);
FASTCV_BN_MOMENTS(float)
FASTCV_BN_MOMENTS(double)
FASTCV_BN_MOMENTS(Half)
FASTCV_BN_MOMENTS(BFloat16)
#undef FASTCV_BN_MOMENTS

}  // namespace fastcv
