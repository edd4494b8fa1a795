// Direct depthwise convolution on the CPU (groups == channels, M = out_channels / channels output
// channels per input channel). Each output reads kh * kw inputs of one channel, so a GEMM has nothing
// to reuse; these kernels stream the tensors about once, and every output pixel (and input-gradient
// element) adds its taps in the order of depthwise.h's per-pixel functions, so its value does not
// depend on the path that computed it (tests compare the layouts bit for bit).
//   NCHW   rows: a row's interior columns (every tap inside the image) as vectors along the row with
//          the kernel in registers (3x3, 5x5, 7x7 at stride 1 and 2; other kernels one vector pass
//          per tap); the border columns of a plane a column at a time with the rows as the vector
//          dimension (float16 / bfloat16: depthwise::output_pixel per pixel). The input gradient
//          works on the sw column phases of an input row (x = r + sw * t), within which the taps
//          that reach it read contiguous runs of grad_output rows; its borders use
//          depthwise::input_grad_pixel.
//   NHWC   channels: runs of pixels that share their taps (a row's interior; a column phase for the
//          input gradient) in blocks of channel vectors, four pixels at a time; the next rows are
//          prefetched, as this order defeats the hardware prefetcher.
// The weight gradient sums a fixed partition of the work (by channel, image and row block, fixed by
// the geometry, never by the thread count) into per-task partial sums, then adds them in task order:
// the result is bit-identical for any number of threads. Float16 and bfloat16 compute in float and
// round once; float64 computes in double. The float and double loops use GCC vector extensions and are
// compiled for AVX-512, AVX2 and baseline x86-64 (FASTCV_ISA_DISPATCH), the one in use picked per call.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/check.h"
#include "common/cpu_isa.h"
#include "common/dtype.h"
#include "common/memory.h"
#include "common/parallel.h"
#include "ops/conv2d/conv2d_ops.h"
#include "ops/conv2d/depthwise.h"

#define FASTCV_DW_INLINE inline __attribute__((always_inline))

namespace fastcv {
namespace {

using conv2d::Geometry;

template <class S>
FASTCV_DW_INLINE compute_t<S> load(S v) { return compute_t<S>(to_float(v)); }

// A per-thread buffer of at least n values (the pool's threads persist, so it is allocated once).
template <class T>
T* scratch(int64_t n) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < size_t(n)) buffer.resize(size_t(n));
  return buffer.data();
}

// Column phase r of an input row in the NCHW input gradient: columns x = r + sw * t, t < count. Taps
// [first, first + n) of the phase list reach it, tap list entry e reading grad_output column t + base[e];
// [lo, hi) are the t for which every one of them lands inside the output row.
struct Phase {
  int64_t count, lo, hi, first, n;
};

// Everything a kernel reads; each kernel uses its part. Weights (and bias) are packed in the compute
// type: NCHW [Cout][taps]; NHWC [taps][M][C] (bias [M][C]), the order of the per-pixel accumulators.
template <class S>
struct Args {
  using T = compute_t<S>;
  Geometry g;
  int64_t mult = 1, taps = 1;
  const S* a = nullptr;  // forward: input; input grad: grad_output; weight grad: grad_output
  const S* b = nullptr;  // weight grad: input
  S* out = nullptr;      // forward: output; input grad: grad_input
  const T* w = nullptr;
  const T* bias = nullptr;  // forward: never null (zeros without a bias)
  T* partial = nullptr;     // weight grad: per task
  int64_t rows = 1, blocks = 1;  // a task: `rows` rows of one plane / image, `blocks` tasks per plane / image
  int64_t lo = 0, hi = 0;        // forward, weight grad: the interior output columns (every tap inside)
  const int64_t* tap_off = nullptr;  // forward: per kernel column j, j * dw - pw
  const int64_t* tap_lo = nullptr;  // weight grad: per kernel column j, the output columns it reads inside
  const int64_t* tap_hi = nullptr;
  const Phase* phases = nullptr;    // input grad
  const int64_t* phase_j = nullptr;
  const int64_t* phase_base = nullptr;
};

// 64-byte vectors of the compute type (GCC vector extensions: one zmm register on AVX-512, two ymm
// on AVX2, four xmm on baseline x86-64) for the float and double fast paths, whose accumulators must
// stay in registers. Element-wise arithmetic, so sums keep the scalar code's order.
template <class T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int lanes = 64 / sizeof(T);
};
template <class T>
using vec_t = typename Vec<T>::type;
template <class T>
FASTCV_DW_INLINE vec_t<T> vload(const T* p) {
  vec_t<T> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <class T>
FASTCV_DW_INLINE void vstore(T* p, vec_t<T> v) { __builtin_memcpy(p, &v, sizeof(v)); }
// Whether S computes in itself (float, double): the vector paths; float16 and bfloat16 take scalar loops.
template <class S>
constexpr bool kNative = std::is_same<S, compute_t<S>>::value;

// acc[q] += wv * src[q * stride + offset] for q in [lo, hi).
template <class T, class S>
FASTCV_DW_INLINE void madd(T* __restrict acc, const S* __restrict src, int64_t stride, int64_t offset, T wv, int64_t lo,
                           int64_t hi) {
  if (stride == 1)
    for (int64_t q = lo; q < hi; ++q) acc[q] += wv * load(src[q + offset]);
  else
    for (int64_t q = lo; q < hi; ++q) acc[q] += wv * load(src[q * stride + offset]);
}

// Hints [p, p + bytes) into the L2 cache, a line at a time. The NHWC kernels read each row chunk by
// chunk, a pattern the hardware prefetcher does not follow well from memory, so while they compute
// one row they fetch the rows a later one will read for the first time, front to back; the NCHW
// kernels fetch the next task's planes.
inline void prefetch_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, 0, 2);
}

// The rows [first, last] of an NHWC plane of `height` rows of `row` bytes each, into L2.
inline void prefetch_rows(const void* plane, int64_t first, int64_t last, int64_t height, int64_t row) {
  first = std::max<int64_t>(first, 0), last = std::min(last, height - 1);
  if (first <= last) prefetch_l2(static_cast<const char*>(plane) + first * row, (last - first + 1) * row);
}

// Runs are cut into blocks of this many pixels: every channel chunk of a block then finds the block's
// input in L1, and the rows are read front to back.
constexpr int64_t kRunBlock = 16;

// A run of K NHWC pixels (M == 1) whose sums take the same taps: pixel k reads in[src[t] + k * delta + c]
// for its taps t (tap index tap[t]) and stores dst[k * dst_step + c] = sum_t w[tap[t] * C + c] * that
// (+ bias[c]). Channel chunks outermost, so that a chunk of the rows being read stays in L1; four
// pixels at a time, so that four independent sums hide the latency of the additions. Every output
// adds its taps in list order, as the scalar path does.
template <class T>
FASTCV_DW_INLINE void gather_run(const T* __restrict in, const int64_t* tap, const int64_t* src, int64_t taps,
                                 const T* __restrict w, const T* bias, int64_t C, int64_t K, int64_t delta,
                                 T* __restrict dst, int64_t dst_step) {
  constexpr int L = Vec<T>::lanes;
  int64_t c0 = 0;
  for (; c0 + L <= C; c0 += L) {
    const vec_t<T> b = bias ? vload(bias + c0) : vec_t<T>{};
    for (int64_t k = 0; k < K; k += 4) {
      if (K < 4) {  // too short for a group of four
        for (; k < K; ++k) {
          vec_t<T> a{};
          for (int64_t t = 0; t < taps; ++t) a += vload(w + tap[t] * C + c0) * vload(in + src[t] + k * delta + c0);
          if (bias) a += b;
          vstore(dst + k * dst_step + c0, a);
        }
        break;
      }
      if (k + 4 > K) k = K - 4;  // the last group overlaps the one before: recomputes identical values
      vec_t<T> a0{}, a1{}, a2{}, a3{};
      for (int64_t t = 0; t < taps; ++t) {
        const vec_t<T> wv = vload(w + tap[t] * C + c0);
        const T* x = in + src[t] + k * delta + c0;
        a0 += wv * vload(x);
        a1 += wv * vload(x + delta);
        a2 += wv * vload(x + 2 * delta);
        a3 += wv * vload(x + 3 * delta);
      }
      T* d = dst + k * dst_step + c0;
      if (bias) a0 += b, a1 += b, a2 += b, a3 += b;
      vstore(d, a0);
      vstore(d + dst_step, a1);
      vstore(d + 2 * dst_step, a2);
      vstore(d + 3 * dst_step, a3);
    }
  }
  for (; c0 < C; ++c0)
    for (int64_t k = 0; k < K; ++k) {
      T a = T(0);
      for (int64_t t = 0; t < taps; ++t) a += w[tap[t] * C + c0] * in[src[t] + k * delta + c0];
      dst[k * dst_step + c0] = bias ? a + bias[c0] : a;
    }
}

// lanes consecutive values src[0], src[sw], ... for sw 1 or 2 (sw 2 reads src[0 .. 2 * lanes - 1]).
template <class T>
FASTCV_DW_INLINE vec_t<T> vload_stride(const T* src, int sw) {
  constexpr int L = Vec<T>::lanes;
  if (sw == 1) return vload(src);
  const vec_t<T> lo = vload(src), hi = vload(src + L);
  if constexpr (sizeof(T) == 4) {
    typedef int32_t mask_t __attribute__((vector_size(64)));
    return __builtin_shuffle(lo, hi, mask_t{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30});
  } else {
    typedef int64_t mask_t __attribute__((vector_size(64)));
    return __builtin_shuffle(lo, hi, mask_t{0, 2, 4, 6, 8, 10, 12, 14});
  }
}

// One output row of an NCHW plane where all KH kernel rows read inside the image, columns [lo, hi):
// dst[q] = sum_i sum_j w[i * KW + j] * rows[i][q * SW + off[j]] (+ bias), summed in that order (the
// order of the per-pixel functions), float and double, SW 1 or 2. Every tap of these columns must read
// inside its row (of `width` values). The kernel's taps stay in registers; each vector of outputs is
// one chain of additions, and the out-of-order core overlaps neighbouring vectors.
template <int KH, int KW, int SW, class T>
FASTCV_DW_INLINE void row_taps(const T* const* rows, const T* w, const int64_t* off, int64_t width, int64_t lo,
                               int64_t hi, const T* bias, T* dst) {
  constexpr int L = Vec<T>::lanes;
  vec_t<T> wv[KH * KW];
  for (int k = 0; k < KH * KW; ++k) wv[k] = vec_t<T>{} + w[k];
  const vec_t<T> b = vec_t<T>{} + (bias ? *bias : T(0));
  const T* src[KH * KW];  // tap (i, j) of column q reads src[i * KW + j][q * SW]
  int64_t reach = off[0];
  for (int i = 0; i < KH; ++i)
    for (int j = 0; j < KW; ++j) src[i * KW + j] = rows[i] + off[j], reach = std::max(reach, off[j]);
  // A vector at q reads up to q * SW + reach + SW * L - 1: within the row for q < last.
  reach += SW * L - 1;
  const int64_t last = width - 1 - reach < 0 ? lo : std::min(hi - L + 1, (width - 1 - reach) / SW + 1);
  const auto vector_at = [&](int64_t q) __attribute__((always_inline)) {
    vec_t<T> acc{};
    for (int k = 0; k < KH * KW; ++k) acc += wv[k] * vload_stride(src[k] + q * SW, SW);
    vstore(dst + q, bias ? acc + b : acc);
  };
  int64_t q = lo;
  for (; q < last; q += L) vector_at(q);
  // The last few columns: one more vector ending at hi where it stays within the row (it recomputes
  // some columns, identically), else one column at a time.
  if (q < hi && hi - L >= lo && hi - L < last) {
    vector_at(hi - L);
    return;
  }
  for (; q < hi; ++q) {
    T acc = T(0);
    for (int k = 0; k < KH * KW; ++k) acc += w[k] * src[k][q * SW];
    dst[q] = bias ? acc + *bias : acc;
  }
}

// row_taps for the kernel sizes it is compiled for (3x3, 5x5, 7x7, float and double, sw 1 or 2);
// false where the caller must take its general path.
template <class S>
FASTCV_DW_INLINE bool row_taps_any(int64_t kh, int64_t kw, const S* const* rows, const compute_t<S>* w,
                                   const int64_t* off, int64_t sw, int64_t width, int64_t lo, int64_t hi,
                                   const compute_t<S>* bias, S* dst) {
  if constexpr (kNative<S>) {
    if (kh != kw || (sw != 1 && sw != 2) || hi <= lo) return false;
    const bool one = sw == 1;
    switch (kh) {
      case 3: one ? row_taps<3, 3, 1>(rows, w, off, width, lo, hi, bias, dst)
                  : row_taps<3, 3, 2>(rows, w, off, width, lo, hi, bias, dst); return true;
      case 5: one ? row_taps<5, 5, 1>(rows, w, off, width, lo, hi, bias, dst)
                  : row_taps<5, 5, 2>(rows, w, off, width, lo, hi, bias, dst); return true;
      case 7: one ? row_taps<7, 7, 1>(rows, w, off, width, lo, hi, bias, dst)
                  : row_taps<7, 7, 2>(rows, w, off, width, lo, hi, bias, dst); return true;
      default: return false;
    }
  }
  return false;
}

// ------------------------------------------------------------------------------------------- forward

// NCHW forward, float and double: output columns [q0, q1) of rows [oh0, oh1) of one plane, one column
// at a time with the rows as the vector dimension (the border columns, where per-pixel sums would
// each be a serial chain). Each pixel still adds its taps inside the image in (i, j) order.
template <class T>
FASTCV_DW_INLINE void forward_columns(const Args<T>& a, const T* x, const T* wt, T bias, int64_t oh0, int64_t oh1,
                                      int64_t q0, int64_t q1, T* out, T* col) {
  const Geometry& g = a.g;
  const int64_t pitch = g.sh * g.width;  // input values between the rows of consecutive outputs
  for (int64_t q = q0; q < q1; ++q) {
    for (int64_t r = 0; r < oh1 - oh0; ++r) col[r] = T(0);
    for (int64_t i = 0; i < g.kh; ++i) {
      int64_t r0, r1;  // the rows whose kernel row i lies inside the image
      depthwise::tap_outputs(g.height, g.out_h, g.sh, i * g.dh - g.ph, r0, r1);
      r0 = std::max(r0, oh0), r1 = std::min(r1, oh1);
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t iw = q * g.sw - g.pw + j * g.dw;
        if (iw < 0 || iw >= g.width || r0 >= r1) continue;
        const T wv = wt[i * g.kw + j];
        const T* src = x + (r0 * g.sh + i * g.dh - g.ph) * g.width + iw;  // row r0's input
        T* c = col + (r0 - oh0);
        for (int64_t r = 0; r < r1 - r0; ++r) c[r] += wv * src[r * pitch];
      }
    }
    for (int64_t r = 0; r < oh1 - oh0; ++r) out[(oh0 + r) * g.out_w + q] = col[r] + bias;
  }
}

// Tasks [t0, t1): task = (image, output channel, block of output rows).
template <class S>
FASTCV_DW_INLINE void forward_nchw(const Args<S>& a, int64_t t0, int64_t t1) {
  using T = compute_t<S>;
  const Geometry& g = a.g;
  T* acc = scratch<T>(std::max(g.out_w, a.rows));
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t plane = t / a.blocks, oh0 = t % a.blocks * a.rows, oh1 = std::min(g.out_h, oh0 + a.rows);
    const int64_t n = plane / g.out_channels, o = plane % g.out_channels, c = o / a.mult;
    const S* x = a.a + (n * g.channels + c) * g.height * g.width;
    const T* wt = a.w + o * a.taps;
    const T bias = a.bias[o];
    if (t + 1 < t1 && (t + 1) / a.blocks != plane) {  // the next task's input plane, while this one computes
      const int64_t next = (t + 1) / a.blocks;
      prefetch_l2(a.a + (next / g.out_channels * g.channels + next % g.out_channels / a.mult) * g.height * g.width,
                  g.height * g.width * int64_t(sizeof(S)));
    }
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      S* dst = a.out + (plane * g.out_h + oh) * g.out_w;
      const int64_t ih0 = oh * g.sh - g.ph;
      bool done = false;
      if (ih0 >= 0 && ih0 + (g.kh - 1) * g.dh < g.height && g.kh <= 7) {  // every kernel row inside
        const S* rows[7];
        for (int64_t i = 0; i < g.kh; ++i) rows[i] = x + (ih0 + i * g.dh) * g.width;
        done = row_taps_any(g.kh, g.kw, rows, wt, a.tap_off, g.sw, g.width, a.lo, a.hi, &bias, dst);
      }
      if (!done) {
        for (int64_t q = a.lo; q < a.hi; ++q) acc[q] = T(0);
        for (int64_t i = 0; i < g.kh; ++i) {
          const int64_t ih = ih0 + i * g.dh;
          if (ih < 0 || ih >= g.height) continue;
          for (int64_t j = 0; j < g.kw; ++j)
            madd(acc, x + ih * g.width, g.sw, j * g.dw - g.pw, wt[i * g.kw + j], a.lo, a.hi);
        }
        for (int64_t q = a.lo; q < a.hi; ++q) dst[q] = from_compute<S>(acc[q] + bias);
      }
      if constexpr (!kNative<S>) {  // float16, bfloat16: the per-pixel function at the borders
        for (int64_t q = 0; q < a.lo; ++q)
          dst[q] = from_compute<S>(depthwise::output_pixel<T>(x, g.width, 1, wt, g.kw, 1, g, oh, q) + bias);
        for (int64_t q = a.hi; q < g.out_w; ++q)
          dst[q] = from_compute<S>(depthwise::output_pixel<T>(x, g.width, 1, wt, g.kw, 1, g, oh, q) + bias);
      }
    }
    if constexpr (kNative<S>) {  // the border columns of all the task's rows at once (the plane is cached now)
      forward_columns(a, x, wt, bias, oh0, oh1, 0, a.lo, a.out + plane * g.out_h * g.out_w, acc);
      forward_columns(a, x, wt, bias, oh0, oh1, a.hi, g.out_w, a.out + plane * g.out_h * g.out_w, acc);
    }
  }
}

// The taps of NHWC output pixel (oh, ow) that read inside the image, in order: tap[k] the tap index,
// src[k] the offset of its input pixel's first channel in the image. Returns how many.
inline int64_t pixel_taps(const Geometry& g, int64_t oh, int64_t ow, int64_t* tap, int64_t* src) {
  int64_t count = 0;
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t ih = oh * g.sh - g.ph + i * g.dh;
    if (ih < 0 || ih >= g.height) continue;
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t iw = ow * g.sw - g.pw + j * g.dw;
      if (iw < 0 || iw >= g.width) continue;
      tap[count] = i * g.kw + j;
      src[count++] = (ih * g.width + iw) * g.channels;
    }
  }
  return count;
}

// Channels [c0, c0 + CB) of one NHWC output pixel for multiplier index m: the sum over its taps, then
// the bias, stored to dst[(c0 + k) * M] (dst: the pixel's first output channel m). CB is a
// compile-time width so that the accumulators stay in registers across the taps.
template <int CB, class S>
FASTCV_DW_INLINE void forward_nhwc_chunk(const Args<S>& a, const S* image, const int64_t* tap, const int64_t* src,
                                         int64_t taps, int64_t m, int64_t c0, S* dst) {
  using T = compute_t<S>;
  const int64_t C = a.g.channels, M = a.mult;
  T acc[CB];
  for (int k = 0; k < CB; ++k) acc[k] = T(0);
  for (int64_t t = 0; t < taps; ++t) {
    const S* __restrict x = image + src[t] + c0;
    const T* __restrict wp = a.w + (tap[t] * M + m) * C + c0;
    for (int k = 0; k < CB; ++k) acc[k] += wp[k] * load(x[k]);
  }
  const T* b = a.bias + m * C + c0;
  if (M == 1)
    for (int k = 0; k < CB; ++k) dst[c0 + k] = from_compute<S>(acc[k] + b[k]);
  else
    for (int k = 0; k < CB; ++k) dst[(c0 + k) * M] = from_compute<S>(acc[k] + b[k]);
}

// The same for float and double with NV vectors of channels.
template <int NV, class T>
FASTCV_DW_INLINE void forward_nhwc_vec(const Args<T>& a, const T* image, const int64_t* tap, const int64_t* src,
                                       int64_t taps, int64_t m, int64_t c0, T* dst) {
  constexpr int L = Vec<T>::lanes;
  const int64_t C = a.g.channels, M = a.mult;
  vec_t<T> acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = vec_t<T>{};
  for (int64_t t = 0; t < taps; ++t) {
    const T* x = image + src[t] + c0;
    const T* wp = a.w + (tap[t] * M + m) * C + c0;
    for (int v = 0; v < NV; ++v) acc[v] += vload(wp + v * L) * vload(x + v * L);
  }
  const T* b = a.bias + m * C + c0;
  for (int v = 0; v < NV; ++v) {
    const vec_t<T> r = acc[v] + vload(b + v * L);
    if (M == 1)
      vstore(dst + c0 + v * L, r);
    else
      for (int k = 0; k < L; ++k) dst[(c0 + v * L + k) * M] = r[k];
  }
}

// Tasks [t0, t1): task = one output row (image, oh).
template <class S>
FASTCV_DW_INLINE void forward_nhwc(const Args<S>& a, int64_t t0, int64_t t1) {
  const Geometry& g = a.g;
  const int64_t C = g.channels, Cout = g.out_channels, M = a.mult;
  int64_t* tap = scratch<int64_t>(2 * a.taps);
  int64_t* src = tap + a.taps;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / g.out_h, oh = t % g.out_h;
    const S* image = a.a + n * g.height * g.width * C;
    if constexpr (kNative<S>) {
      if (M == 1) {
        // The input rows output row oh + 2 reads that row oh + 1 does not: a share of them before
        // each block of pixels, so that the prefetches do not queue up all at once.
        const int64_t last = (oh + 1) * g.sh - g.ph + (g.kh - 1) * g.dh;
        const int64_t first_new = std::max<int64_t>(last + 1, 0), last_new = std::min(last + g.sh, g.height - 1);
        const int64_t row_bytes = g.width * C * int64_t(sizeof(S));
        const int64_t share = (row_bytes + g.out_w - 1) / g.out_w;  // per output column
        const auto prefetch_ahead = [&](int64_t ow0, int64_t ow1) __attribute__((always_inline)) {
          for (int64_t ih = first_new; ih <= last_new; ++ih)
            prefetch_l2(reinterpret_cast<const char*>(image + ih * g.width * C) + ow0 * share,
                        std::min(ow1 * share, row_bytes) - ow0 * share);
        };
        // The interior columns [lo, hi) share their taps, shifted by sw pixels per column; the
        // border columns each have their own.
        S* row = a.out + (n * g.out_h + oh) * g.out_w * C;
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          const bool interior = ow == a.lo && a.lo < a.hi;
          const int64_t taps = pixel_taps(g, oh, ow, tap, src), count = interior ? a.hi - a.lo : 1;
          for (int64_t k = 0; k < count; k += kRunBlock) {
            const int64_t kb = std::min(kRunBlock, count - k);
            prefetch_ahead(ow + k, ow + k + kb);
            gather_run(image + k * g.sw * C, tap, src, taps, a.w, a.bias, C, kb, g.sw * C, row + (ow + k) * C, C);
          }
          if (interior) ow = a.hi - 1;
        }
        continue;
      }
    }
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      const int64_t taps = pixel_taps(g, oh, ow, tap, src);
      S* dst = a.out + ((n * g.out_h + oh) * g.out_w + ow) * Cout;
      for (int64_t m = 0; m < M; ++m) {
        int64_t c = 0;
        if constexpr (kNative<S>) {
          constexpr int L = Vec<S>::lanes;
          for (; c + 4 * L <= C; c += 4 * L) forward_nhwc_vec<4>(a, image, tap, src, taps, m, c, dst + m);
          for (; c + L <= C; c += L) forward_nhwc_vec<1>(a, image, tap, src, taps, m, c, dst + m);
        }
        for (; c + 32 <= C; c += 32) forward_nhwc_chunk<32>(a, image, tap, src, taps, m, c, dst + m);
        if (c + 16 <= C) forward_nhwc_chunk<16>(a, image, tap, src, taps, m, c, dst + m), c += 16;
        if (c + 8 <= C) forward_nhwc_chunk<8>(a, image, tap, src, taps, m, c, dst + m), c += 8;
        for (; c < C; ++c) forward_nhwc_chunk<1>(a, image, tap, src, taps, m, c, dst + m);
      }
    }
  }
}

// ------------------------------------------------------------------------------------ input gradient

// Tasks [t0, t1): task = (image, input channel, block of input rows). The task owns those rows of
// grad_input: no other task writes them.
template <class S>
FASTCV_DW_INLINE void input_grad_nchw(const Args<S>& a, int64_t t0, int64_t t1) {
  using T = compute_t<S>;
  const Geometry& g = a.g;
  const int64_t M = a.mult, plane_out = g.out_h * g.out_w;
  T* acc = scratch<T>(g.width);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t plane = t / a.blocks, h0 = t % a.blocks * a.rows, h1 = std::min(g.height, h0 + a.rows);
    const int64_t n = plane / g.channels, c = plane % g.channels;
    const S* go = a.a + (n * g.out_channels + c * M) * plane_out;  // the channel's first grad_output plane
    const T* wt = a.w + c * M * a.taps;
    if (t + 1 < t1 && (t + 1) / a.blocks != plane)  // the next task's grad_output planes
      prefetch_l2(a.a + (t + 1) / a.blocks * M * plane_out, M * plane_out * int64_t(sizeof(S)));
    for (int64_t h = h0; h < h1; ++h) {
      S* row = a.out + (plane * g.height + h) * g.width;
      for (int64_t r = 0; r < g.sw; ++r) {
        const Phase& p = a.phases[r];
        if (p.count == 0) continue;
        S* dst = row + r;
        bool done = false;
        const int64_t oh0 = h + g.ph - (g.kh - 1) * g.dh;  // the grad_output row of the last kernel row
        if (g.sw == 1 && g.sh == 1 && M == 1 && p.n == g.kw && oh0 >= 0 && h + g.ph < g.out_h && g.kh <= 7) {
          const S* rows[7];  // every kernel row reaches a grad_output row: h + ph - i * dh for i < kh
          for (int64_t i = 0; i < g.kh; ++i) rows[i] = go + (h + g.ph - i * g.dh) * g.out_w;
          done = row_taps_any(g.kh, g.kw, rows, wt, a.phase_base + p.first, 1, g.out_w, p.lo, p.hi,
                              static_cast<const T*>(nullptr), dst);
        }
        if (!done) {
          for (int64_t q = p.lo; q < p.hi; ++q) acc[q] = T(0);
          for (int64_t m = 0; m < M; ++m)
            for (int64_t i = 0; i < g.kh; ++i) {
              const int64_t oh = depthwise::tap_source(h, i, g.sh, g.ph, g.dh, g.out_h);
              if (oh < 0) continue;
              const S* src = go + m * plane_out + oh * g.out_w;
              for (int64_t e = p.first; e < p.first + p.n; ++e)
                madd(acc, src, 1, a.phase_base[e], wt[m * a.taps + i * g.kw + a.phase_j[e]], p.lo, p.hi);
            }
          for (int64_t q = p.lo; q < p.hi; ++q) dst[q * g.sw] = from_compute<S>(acc[q]);
        }
        for (int64_t q = 0; q < p.count; ++q) {  // the border columns: [0, lo) and [hi, count)
          if (q == p.lo) q = p.hi;
          if (q >= p.count) break;
          dst[q * g.sw] = from_compute<S>(depthwise::input_grad_pixel<T>(go, plane_out, g.out_w, 1, wt, a.taps, g.kw, 1,
                                                                          M, g, h, r + q * g.sw));
        }
      }
    }
  }
}

// The taps that reach NHWC input pixel (h, x), in order: tap[k] the tap index, src[k] the offset of the
// grad_output pixel it comes from (its first channel). Returns how many.
inline int64_t grad_taps(const Geometry& g, int64_t h, int64_t x, int64_t* tap, int64_t* src) {
  int64_t count = 0;
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t oh = depthwise::tap_source(h, i, g.sh, g.ph, g.dh, g.out_h);
    if (oh < 0) continue;
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t ow = depthwise::tap_source(x, j, g.sw, g.pw, g.dw, g.out_w);
      if (ow < 0) continue;
      tap[count] = i * g.kw + j;
      src[count++] = (oh * g.out_w + ow) * g.out_channels;
    }
  }
  return count;
}

// Tasks [t0, t1): task = one grad_input row (image, h).
template <class S>
FASTCV_DW_INLINE void input_grad_nhwc(const Args<S>& a, int64_t t0, int64_t t1) {
  using T = compute_t<S>;
  const Geometry& g = a.g;
  const int64_t C = g.channels, Cout = g.out_channels, M = a.mult;
  T* __restrict acc = scratch<T>(C);
  int64_t* tap = scratch<int64_t>(2 * a.taps);
  int64_t* src = tap + a.taps;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / g.height, h = t % g.height;
    const S* image = a.a + n * g.out_h * g.out_w * Cout;
    if constexpr (kNative<S>) {
      if (M == 1) {
        // The grad_output rows input row h + 1 reads that row h does not (the largest oh it reads).
        const int64_t last = (h + 1 + g.ph) / g.sh;
        prefetch_rows(image, last, last, g.out_h, g.out_w * Cout * int64_t(sizeof(S)));
        // Column phase r (x = r + sw * q): its interior [lo, hi) shares the taps, shifted by one
        // grad_output pixel per step; the border columns each have their own.
        S* row = a.out + (n * g.height + h) * g.width * C;
        for (int64_t r = 0; r < g.sw; ++r) {
          const Phase& p = a.phases[r];
          for (int64_t q = 0; q < p.count; ++q) {
            const bool interior = q == p.lo && p.lo < p.hi;
            const int64_t x = r + q * g.sw, taps = grad_taps(g, h, x, tap, src), count = interior ? p.hi - p.lo : 1;
            for (int64_t k = 0; k < count; k += kRunBlock)
              gather_run(image + k * C, tap, src, taps, a.w, static_cast<const S*>(nullptr), C,
                         std::min(kRunBlock, count - k), C, row + (x + k * g.sw) * C, g.sw * C);
            if (interior) q = p.hi - 1;
          }
        }
        continue;
      }
    }
    for (int64_t x = 0; x < g.width; ++x) {
      for (int64_t c = 0; c < C; ++c) acc[c] = T(0);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t i = 0; i < g.kh; ++i) {
          const int64_t oh = depthwise::tap_source(h, i, g.sh, g.ph, g.dh, g.out_h);
          if (oh < 0) continue;
          for (int64_t j = 0; j < g.kw; ++j) {
            const int64_t ow = depthwise::tap_source(x, j, g.sw, g.pw, g.dw, g.out_w);
            if (ow < 0) continue;
            const S* __restrict src = image + (oh * g.out_w + ow) * Cout + m;
            const T* __restrict wp = a.w + ((i * g.kw + j) * M + m) * C;
            if (M == 1)
              for (int64_t c = 0; c < C; ++c) acc[c] += wp[c] * load(src[c]);
            else
              for (int64_t c = 0; c < C; ++c) acc[c] += wp[c] * load(src[c * M]);
          }
        }
      S* __restrict dst = a.out + ((n * g.height + h) * g.width + x) * C;
      for (int64_t c = 0; c < C; ++c) dst[c] = from_compute<S>(acc[c]);
    }
  }
}

// ----------------------------------------------------------------------------------- weight gradient

// One tap's weight-gradient sum over output rows [r0, r1) and columns [lo, hi) of an NCHW plane pair:
// the sum of g[oh * gw + q] * x[xoff + oh * xrow + q * SW] (xoff: where the tap reads for output pixel
// (0, 0)), float and double, SW 1 or 2. Lane accumulators run down the rows in registers, up to four
// vectors of columns at a time; the last columns take one vector ending at hi whose lanes already
// counted are masked out (a select, so an infinite input there cannot turn them into NaN). The lanes
// are added in a fixed order at the end. With SW 2 a vector reads one value past its last input: the
// caller passes rows whose input row has a successor in the plane.
template <int SW, class T>
FASTCV_DW_INLINE T tap_dot(const T* g, int64_t gw, const T* x, int64_t xoff, int64_t xrow, int64_t r0, int64_t r1,
                           int64_t lo, int64_t hi) {
  constexpr int L = Vec<T>::lanes;
  using index_t = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef index_t ivec_t __attribute__((vector_size(64)));
  T total = T(0);
  int64_t q0 = lo;
  while (q0 + L <= hi) {
    const int nv = int(std::min<int64_t>(4, (hi - q0) / L));
    vec_t<T> acc[4] = {};
    for (int64_t oh = r0; oh < r1; ++oh) {
      const T* gp = g + oh * gw + q0;
      const T* xp = x + xoff + oh * xrow + q0 * SW;
      for (int v = 0; v < 4; ++v)
        if (v < nv) acc[v] += vload(gp + v * L) * vload_stride(xp + v * L * SW, SW);
    }
    for (int v = 0; v < nv; ++v)
      for (int k = 0; k < L; ++k) total += acc[v][k];
    q0 += nv * L;
  }
  if (q0 < hi && hi - lo >= L) {  // one vector at hi - L, its lanes below q0 masked out
    const int64_t qt = hi - L;
    ivec_t lane;
    for (int k = 0; k < L; ++k) lane[k] = index_t(k);
    const ivec_t keep = lane >= index_t(q0 - qt);
    vec_t<T> acc{};
    for (int64_t oh = r0; oh < r1; ++oh) {
      const vec_t<T> p = vload(g + oh * gw + qt) * vload_stride(x + xoff + oh * xrow + qt * SW, SW);
      acc += keep ? p : vec_t<T>{};
    }
    for (int k = 0; k < L; ++k) total += acc[k];
  } else if (q0 < hi) {  // a row narrower than a vector
    T acc[Vec<T>::lanes] = {};
    const int rest = int(hi - q0);
    for (int64_t oh = r0; oh < r1; ++oh)
      for (int k = 0; k < rest; ++k) acc[k] += g[oh * gw + q0 + k] * x[xoff + oh * xrow + (q0 + k) * SW];
    for (int k = 0; k < rest; ++k) total += acc[k];
  }
  return total;
}

// Tasks [t0, t1): task = (output channel, image, block of output rows) -> partial[task][taps].
template <class S>
FASTCV_DW_INLINE void weight_grad_nchw(const Args<S>& a, int64_t t0, int64_t t1) {
  using T = compute_t<S>;
  const Geometry& g = a.g;
  const int64_t ow_n = g.out_w;
  T* acc = scratch<T>(a.taps * ow_n);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t blk = t % a.blocks, n = t / a.blocks % g.batch, o = t / (a.blocks * g.batch), c = o / a.mult;
    const int64_t oh0 = blk * a.rows, oh1 = std::min(g.out_h, oh0 + a.rows);
    const S* go = a.a + (n * g.out_channels + o) * g.out_h * ow_n;
    const S* x = a.b + (n * g.channels + c) * g.height * g.width;
    if (t + 1 < t1 && blk + 1 == a.blocks) {  // the next task's planes
      const int64_t n1 = (t + 1) / a.blocks % g.batch, o1 = (t + 1) / (a.blocks * g.batch);
      prefetch_l2(a.a + (n1 * g.out_channels + o1) * g.out_h * ow_n, g.out_h * ow_n * int64_t(sizeof(S)));
      prefetch_l2(a.b + (n1 * g.channels + o1 / a.mult) * g.height * g.width, g.height * g.width * int64_t(sizeof(S)));
    }
    T* part = a.partial + t * a.taps;
    if constexpr (kNative<S>) {
      if (g.sw <= 2) {  // tap by tap, rows in registers
        for (int64_t i = 0; i < g.kh; ++i) {
          int64_t r0, r1;  // the rows of the block whose tap row i lies inside the image
          depthwise::tap_outputs(g.height, g.out_h, g.sh, i * g.dh - g.ph, r0, r1);
          r0 = std::max(r0, oh0), r1 = std::min(r1, oh1);
          // With sw 2, rows whose input row is the plane's last take the scalar path (see tap_dot).
          int64_t rv = r1;
          if (g.sw == 2) {  // rows with oh * sh + i * dh - ph <= H - 2
            const int64_t room = g.height - 2 - i * g.dh + g.ph;
            rv = room < 0 ? r0 : std::max(r0, std::min(r1, room / g.sh + 1));
          }
          for (int64_t j = 0; j < g.kw; ++j) {
            const int64_t lo = a.tap_lo[j], hi = a.tap_hi[j];
            T sum = T(0);
            if (r0 < r1 && lo < hi) {
              const int64_t xoff = (i * g.dh - g.ph) * g.width + j * g.dw - g.pw, xrow = g.sh * g.width;
              sum = g.sw == 1 ? tap_dot<1>(go, ow_n, x, xoff, xrow, r0, rv, lo, hi)
                              : tap_dot<2>(go, ow_n, x, xoff, xrow, r0, rv, lo, hi);
              for (int64_t oh = rv; oh < r1; ++oh)
                for (int64_t q = lo; q < hi; ++q) sum += go[oh * ow_n + q] * x[xoff + oh * xrow + q * g.sw];
            }
            part[i * g.kw + j] = sum;
          }
        }
        continue;
      }
    }
    std::fill(acc, acc + a.taps * ow_n, T(0));
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      const S* __restrict grow = go + oh * ow_n;
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t ih = oh * g.sh - g.ph + i * g.dh;
        if (ih < 0 || ih >= g.height) continue;
        const S* __restrict xrow = x + ih * g.width;
        for (int64_t j = 0; j < g.kw; ++j) {
          T* __restrict at = acc + (i * g.kw + j) * ow_n;
          const int64_t off = j * g.dw - g.pw, lo = a.tap_lo[j], hi = a.tap_hi[j];
          if (g.sw == 1)
            for (int64_t q = lo; q < hi; ++q) at[q] += load(grow[q]) * load(xrow[q + off]);
          else
            for (int64_t q = lo; q < hi; ++q) at[q] += load(grow[q]) * load(xrow[q * g.sw + off]);
        }
      }
    }
    for (int64_t k = 0; k < a.taps; ++k) {
      const T* at = acc + k * ow_n;
      T s = T(0);
      for (int64_t q = a.tap_lo[k % g.kw]; q < a.tap_hi[k % g.kw]; ++q) s += at[q];
      part[k] = s;
    }
  }
}

// Channels [c0, c0 + NV * lanes) of tap (i, j)'s partial sum over output row oh, columns [lo, hi) (M == 1,
// float and double): the accumulators stay in registers along the row.
template <int NV, class T>
FASTCV_DW_INLINE void weight_grad_nhwc_vec(const Args<T>& a, const T* go_row, const T* x_row, int64_t lo, int64_t hi,
                                           int64_t c0, T* acc) {
  constexpr int L = Vec<T>::lanes;
  const int64_t C = a.g.channels, step = a.g.sw * C;
  vec_t<T> s[NV];
  for (int v = 0; v < NV; ++v) s[v] = vload(acc + c0 + v * L);
  const T* gp = go_row + lo * C + c0;
  const T* xp = x_row + lo * step + c0;
  for (int64_t q = lo; q < hi; ++q, gp += C, xp += step)
    for (int v = 0; v < NV; ++v) s[v] += vload(gp + v * L) * vload(xp + v * L);
  for (int v = 0; v < NV; ++v) vstore(acc + c0 + v * L, s[v]);
}

// NHWC weight gradient (M == 1, float and double) of output row oh for a KH x KW kernel: for each
// vector of channels, the accumulators of all taps stay in registers along the row, and each
// grad_output vector is loaded once for all the taps it meets. acc: [taps][C], added to. Every (tap,
// channel) sums its terms in (oh, ow) order.
template <int KH, int KW, class T>
FASTCV_DW_INLINE void weight_grad_nhwc_row(const Args<T>& a, const T* go, const T* image, int64_t oh, T* acc) {
  constexpr int L = Vec<T>::lanes, K = KH * KW;
  const Geometry& g = a.g;
  const int64_t C = g.channels, ih0 = oh * g.sh - g.ph;
  const bool rows_inside = ih0 >= 0 && ih0 + (KH - 1) * g.dh < g.height;
  int64_t off[K];  // tap k's input pixel relative to the window's corner, in values
  for (int i = 0; i < KH; ++i)
    for (int j = 0; j < KW; ++j) off[i * KW + j] = (i * g.dh * g.width + j * g.dw) * C;
  const T* grow = go + oh * g.out_w * C;
  int64_t c0 = 0;
  for (; c0 + L <= C; c0 += L) {
    vec_t<T> s[K];
    for (int k = 0; k < K; ++k) s[k] = vload(acc + k * C + c0);
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      const vec_t<T> gv = vload(grow + ow * C + c0);
      const int64_t iw0 = ow * g.sw - g.pw;
      if (rows_inside && ow >= a.lo && ow < a.hi) {
        const T* base = image + (ih0 * g.width + iw0) * C + c0;
        for (int k = 0; k < K; ++k) s[k] += gv * vload(base + off[k]);
      } else {
        for (int i = 0; i < KH; ++i) {
          const int64_t ih = ih0 + i * g.dh;
          if (ih < 0 || ih >= g.height) continue;
          for (int j = 0; j < KW; ++j) {
            const int64_t iw = iw0 + j * g.dw;
            if (iw >= 0 && iw < g.width) s[i * KW + j] += gv * vload(image + (ih * g.width + iw) * C + c0);
          }
        }
      }
    }
    for (int k = 0; k < K; ++k) vstore(acc + k * C + c0, s[k]);
  }
  for (; c0 < C; ++c0)  // the last channels, one at a time
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      const T gv = grow[ow * C + c0];
      const int64_t iw0 = ow * g.sw - g.pw;
      for (int i = 0; i < KH; ++i) {
        const int64_t ih = ih0 + i * g.dh;
        if (ih < 0 || ih >= g.height) continue;
        for (int j = 0; j < KW; ++j) {
          const int64_t iw = iw0 + j * g.dw;
          if (iw >= 0 && iw < g.width) acc[(i * KW + j) * C + c0] += gv * image[(ih * g.width + iw) * C + c0];
        }
      }
    }
}

// Tasks [t0, t1): task = (image, block of output rows) -> partial[task][taps][M][C].
template <class S>
FASTCV_DW_INLINE void weight_grad_nhwc(const Args<S>& a, int64_t t0, int64_t t1) {
  using T = compute_t<S>;
  const Geometry& g = a.g;
  const int64_t C = g.channels, Cout = g.out_channels, M = a.mult;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / a.blocks, oh0 = t % a.blocks * a.rows, oh1 = std::min(g.out_h, oh0 + a.rows);
    const S* go = a.a + n * g.out_h * g.out_w * Cout;
    const S* image = a.b + n * g.height * g.width * C;
    T* acc = a.partial + t * a.taps * Cout;
    std::fill(acc, acc + a.taps * Cout, T(0));
    if constexpr (kNative<S>) {
      if (M == 1 && g.kh == g.kw && (g.kh == 3 || g.kh == 5)) {
        for (int64_t oh = oh0; oh < oh1; ++oh) {
          // The rows output row oh + 2 reads that row oh + 1 does not, and its grad_output row.
          const int64_t last = (oh + 1) * g.sh - g.ph + (g.kh - 1) * g.dh;
          prefetch_rows(image, last + 1, last + g.sh, g.height, g.width * C * int64_t(sizeof(S)));
          prefetch_rows(go, oh + 2, oh + 2, g.out_h, g.out_w * C * int64_t(sizeof(S)));
          if (g.kh == 3)
            weight_grad_nhwc_row<3, 3>(a, go, image, oh, acc);
          else
            weight_grad_nhwc_row<5, 5>(a, go, image, oh, acc);
        }
        continue;
      }
      if (M == 1) {  // tap by tap along each row: every (tap, channel) sums its terms in (oh, ow) order
        constexpr int L = Vec<S>::lanes;
        for (int64_t oh = oh0; oh < oh1; ++oh)
          for (int64_t i = 0; i < g.kh; ++i) {
            const int64_t ih = oh * g.sh - g.ph + i * g.dh;
            if (ih < 0 || ih >= g.height) continue;
            for (int64_t j = 0; j < g.kw; ++j) {
              const int64_t lo = a.tap_lo[j], hi = a.tap_hi[j];
              const S* go_row = go + oh * g.out_w * C;
              const S* x_row = image + (ih * g.width + j * g.dw - g.pw) * C;  // read from column lo * sw on
              T* at = acc + (i * g.kw + j) * C;
              int64_t c = 0;
              for (; c + 4 * L <= C; c += 4 * L) weight_grad_nhwc_vec<4>(a, go_row, x_row, lo, hi, c, at);
              for (; c + L <= C; c += L) weight_grad_nhwc_vec<1>(a, go_row, x_row, lo, hi, c, at);
              for (; c < C; ++c)
                for (int64_t q = lo; q < hi; ++q) at[c] += go_row[q * C + c] * x_row[q * g.sw * C + c];
            }
          }
        continue;
      }
    }
    for (int64_t oh = oh0; oh < oh1; ++oh)
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        const S* __restrict gp = go + (oh * g.out_w + ow) * Cout;
        for (int64_t i = 0; i < g.kh; ++i) {
          const int64_t ih = oh * g.sh - g.ph + i * g.dh;
          if (ih < 0 || ih >= g.height) continue;
          for (int64_t j = 0; j < g.kw; ++j) {
            const int64_t iw = ow * g.sw - g.pw + j * g.dw;
            if (iw < 0 || iw >= g.width) continue;
            const S* __restrict xp = image + (ih * g.width + iw) * C;
            T* __restrict at = acc + (i * g.kw + j) * Cout;
            if (M == 1) {
              for (int64_t c = 0; c < C; ++c) at[c] += load(gp[c]) * load(xp[c]);
            } else {
              for (int64_t m = 0; m < M; ++m)
                for (int64_t c = 0; c < C; ++c) at[m * C + c] += load(gp[c * M + m]) * load(xp[c]);
            }
          }
        }
      }
  }
}

// The kernels for float and double, compiled per instruction set; float16 and bfloat16 run the
// templates as they are.
#define FASTCV_DW_CLONES(kernel)                                                                          \
  FASTCV_ISA_DISPATCH(void, kernel##_isa, kernel<float>, (const Args<float>& a, int64_t t0, int64_t t1), (a, t0, t1)) \
  FASTCV_ISA_DISPATCH(void, kernel##_isa, kernel<double>, (const Args<double>& a, int64_t t0, int64_t t1), (a, t0, t1))
FASTCV_DW_CLONES(forward_nchw)
FASTCV_DW_CLONES(forward_nhwc)
FASTCV_DW_CLONES(input_grad_nchw)
FASTCV_DW_CLONES(input_grad_nhwc)
FASTCV_DW_CLONES(weight_grad_nchw)
FASTCV_DW_CLONES(weight_grad_nhwc)
#undef FASTCV_DW_CLONES

template <class S>
constexpr bool kCloned = std::is_same<S, float>::value || std::is_same<S, double>::value;

#define FASTCV_DW_RUN(kernel, S, args, t0, t1) \
  do {                                         \
    if constexpr (kCloned<S>)                  \
      kernel##_isa(args, t0, t1);              \
    else                                       \
      kernel<S>(args, t0, t1);                 \
  } while (0)

// ----------------------------------------------------------------------------------------- set-up

// Weights in the compute type: NCHW [Cout][taps]; NHWC [taps][M][C] (tap_major).
template <class S>
std::vector<compute_t<S>> pack_weights(const TensorView& w, const Geometry& g, bool tap_major) {
  const int64_t taps = g.taps(), C = g.channels, M = g.out_channels / g.channels;
  std::vector<compute_t<S>> packed(size_t(g.out_channels * taps));
  const S* src = w.ptr<S>();
  for (int64_t o = 0; o < g.out_channels; ++o)
    for (int64_t k = 0; k < taps; ++k) {
      const auto v = load(src[o * w.stride(0) + k / g.kw * w.stride(2) + k % g.kw * w.stride(3)]);
      packed[size_t(tap_major ? (k * M + o % M) * C + o / M : o * taps + k)] = v;
    }
  return packed;
}

// The bias (zeros without one) in the order of the accumulators: output channels, or [M][C] (tap_major).
template <class S>
std::vector<compute_t<S>> pack_bias(const TensorView* bias, const Geometry& g, bool tap_major) {
  const int64_t C = g.channels, M = g.out_channels / g.channels;
  std::vector<compute_t<S>> packed(size_t(g.out_channels), compute_t<S>(0));
  if (bias)
    for (int64_t o = 0; o < g.out_channels; ++o)
      packed[size_t(tap_major ? o % M * C + o / M : o)] = load(bias->ptr<S>()[o]);
  return packed;
}

// Rows of a plane per task so that there are at least 4 tasks per thread (whole planes when the
// planes alone give that many): sets a.rows and a.blocks.
template <class S>
void split_rows(Args<S>& a, int64_t planes, int64_t rows, int64_t min_tasks) {
  const int64_t want = planes >= min_tasks ? 1 : std::min(rows, (min_tasks + planes - 1) / planes);
  a.rows = (rows + want - 1) / want;
  a.blocks = (rows + a.rows - 1) / a.rows;
}

// Tasks handed to a thread at a time: runs of neighbouring tasks (so that a task can prefetch the
// next one's data), still 8 runs per thread to even out the load.
int64_t grain(int64_t tasks, int nthreads) { return std::max<int64_t>(1, tasks / (8 * int64_t(nthreads))); }

// The threads of a forward or input-gradient pass over `rows` rows of `batch` x `planes` planes: NHWC
// takes whole image rows (all channels) as tasks, NCHW blocks of rows of one plane.
template <class S, class Nhwc, class Nchw>
void run_by_layout(Args<S>& a, bool nhwc, int64_t batch, int64_t planes, int64_t rows, int nthreads,
                   const Nhwc& run_nhwc, const Nchw& run_nchw) {
  if (nhwc) {
    parallel_for(0, batch * rows, grain(batch * rows, nthreads), nthreads, run_nhwc);
    return;
  }
  split_rows(a, batch * planes, rows, 4 * int64_t(nthreads));
  const int64_t tasks = batch * planes * a.blocks;
  parallel_for(0, tasks, grain(tasks, nthreads), nthreads, run_nchw);
}

// The column phases of the NCHW input gradient (see Phase).
void make_phases(const Geometry& g, std::vector<Phase>& phases, std::vector<int64_t>& js, std::vector<int64_t>& bases) {
  for (int64_t r = 0; r < g.sw; ++r) {
    Phase p{r < g.width ? (g.width - r + g.sw - 1) / g.sw : 0, 0, 0, int64_t(js.size()), 0};
    p.hi = p.count;
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t v = r + g.pw - j * g.dw;
      if (((v % g.sw) + g.sw) % g.sw != 0) continue;
      int64_t lo, hi;  // t with 0 <= t + base < out_w
      depthwise::tap_outputs(g.out_w, p.count, 1, v / g.sw, lo, hi);
      p.lo = std::max(p.lo, lo);
      p.hi = std::min(p.hi, hi);
      js.push_back(j);
      bases.push_back(v / g.sw);
      ++p.n;
    }
    if (p.lo >= p.hi) p.lo = p.hi = 0;  // no interior: every column takes the per-pixel path
    phases.push_back(p);
  }
}

template <class S>
void forward(const TensorView& input, const TensorView& weight, const TensorView* bias, const TensorView& output,
             const Geometry& g, bool nhwc, int nthreads) {
  Args<S> a;
  a.g = g, a.mult = g.out_channels / g.channels, a.taps = g.taps();
  a.a = input.ptr<S>(), a.out = output.ptr<S>();
  const auto w = pack_weights<S>(weight, g, nhwc);
  const auto b = pack_bias<S>(bias, g, nhwc);
  a.w = w.data(), a.bias = b.data();
  advise_huge_pages(output.data, size_t(output.numel() * dtype_size(output.dtype)));
  // Interior columns: every tap of the row inside the image.
  a.lo = 0, a.hi = g.out_w;
  for (int64_t j = 0; j < g.kw; ++j) {
    int64_t lo, hi;
    depthwise::tap_outputs(g.width, g.out_w, g.sw, j * g.dw - g.pw, lo, hi);
    a.lo = std::max(a.lo, lo), a.hi = std::min(a.hi, hi);
  }
  if (a.lo >= a.hi) a.lo = a.hi = 0;
  std::vector<int64_t> tap_off(size_t(g.kw));
  for (int64_t j = 0; j < g.kw; ++j) tap_off[size_t(j)] = j * g.dw - g.pw;
  a.tap_off = tap_off.data();
  run_by_layout(a, nhwc, g.batch, g.out_channels, g.out_h, nthreads,
                [&](int64_t t0, int64_t t1) { FASTCV_DW_RUN(forward_nhwc, S, a, t0, t1); },
                [&](int64_t t0, int64_t t1) { FASTCV_DW_RUN(forward_nchw, S, a, t0, t1); });
}

template <class S>
void input_grad(const TensorView& grad_output, const TensorView& weight, const TensorView& grad_input,
                const Geometry& g, bool nhwc, int nthreads) {
  Args<S> a;
  a.g = g, a.mult = g.out_channels / g.channels, a.taps = g.taps();
  a.a = grad_output.ptr<S>(), a.out = grad_input.ptr<S>();
  const auto w = pack_weights<S>(weight, g, nhwc);
  a.w = w.data();
  advise_huge_pages(grad_input.data, size_t(grad_input.numel() * dtype_size(grad_input.dtype)));
  std::vector<Phase> phases;
  std::vector<int64_t> js, bases;
  make_phases(g, phases, js, bases);
  a.phases = phases.data(), a.phase_j = js.data(), a.phase_base = bases.data();
  run_by_layout(a, nhwc, g.batch, g.channels, g.height, nthreads,
                [&](int64_t t0, int64_t t1) { FASTCV_DW_RUN(input_grad_nhwc, S, a, t0, t1); },
                [&](int64_t t0, int64_t t1) { FASTCV_DW_RUN(input_grad_nchw, S, a, t0, t1); });
}

template <class S>
void weight_grad(const TensorView& grad_output, const TensorView& input, const TensorView& grad_weight,
                 const Geometry& g, bool nhwc, int nthreads) {
  using T = compute_t<S>;
  Args<S> a;
  a.g = g, a.mult = g.out_channels / g.channels, a.taps = g.taps();
  a.a = grad_output.ptr<S>(), a.b = input.ptr<S>();
  const int64_t C = g.channels, M = a.mult, taps = a.taps;
  // The partition is fixed by the geometry alone (at least 64 tasks where rows allow), so the sums
  // are the same whatever the thread count.
  constexpr int64_t kTasks = 64;
  std::vector<T> partial;
  int64_t tasks;
  std::vector<int64_t> tap_lo(size_t(g.kw)), tap_hi(size_t(g.kw));
  for (int64_t j = 0; j < g.kw; ++j)
    depthwise::tap_outputs(g.width, g.out_w, g.sw, j * g.dw - g.pw, tap_lo[size_t(j)], tap_hi[size_t(j)]);
  a.tap_lo = tap_lo.data(), a.tap_hi = tap_hi.data();
  a.lo = *std::max_element(tap_lo.begin(), tap_lo.end()), a.hi = *std::min_element(tap_hi.begin(), tap_hi.end());
  if (nhwc) {
    split_rows(a, g.batch, g.out_h, kTasks);
    tasks = g.batch * a.blocks;
    partial.resize(size_t(tasks * taps * g.out_channels));
    a.partial = partial.data();
    parallel_for(0, tasks, 1, nthreads, [&](int64_t t0, int64_t t1) { FASTCV_DW_RUN(weight_grad_nhwc, S, a, t0, t1); });
  } else {
    split_rows(a, g.batch * g.out_channels, g.out_h, kTasks);
    tasks = g.out_channels * g.batch * a.blocks;
    partial.resize(size_t(tasks * taps));
    a.partial = partial.data();
    parallel_for(0, tasks, grain(tasks, nthreads), nthreads,
                 [&](int64_t t0, int64_t t1) { FASTCV_DW_RUN(weight_grad_nchw, S, a, t0, t1); });
  }
  // Partial sums added in task order.
  S* gw = grad_weight.ptr<S>();
  for (int64_t o = 0; o < g.out_channels; ++o)
    for (int64_t k = 0; k < taps; ++k) {
      T s = T(0);
      if (nhwc) {
        const int64_t e = k * g.out_channels + o % M * C + o / M;
        for (int64_t t = 0; t < tasks; ++t) s += partial[size_t(t * taps * g.out_channels + e)];
      } else {
        const int64_t per = g.batch * a.blocks;
        for (int64_t t = o * per; t < (o + 1) * per; ++t) s += partial[size_t(t * taps + k)];
      }
      gw[o * grad_weight.stride(0) + k / g.kw * grad_weight.stride(2) + k % g.kw * grad_weight.stride(3)] =
          from_compute<S>(s);
    }
}

}  // namespace

bool is_depthwise(const Geometry& g) {
  return g.channels > 0 && g.groups == g.channels && g.out_channels >= g.channels && g.out_channels % g.channels == 0;
}

void depthwise_forward_cpu(const TensorView& input, const TensorView& weight, const TensorView* bias,
                           const TensorView& output, const Geometry& g, int nthreads) {
  check_conv2d_args(g, &input, weight, bias, &output, DeviceType::CPU);
  check_arg(is_depthwise(g), "depthwise_forward_cpu: groups must equal the input channels");
  if (output.numel() == 0) return;
  const bool nhwc = nhwc_layout(input) || nhwc_layout(output);
  dispatch_floating(input.dtype, "input", [&](auto tag) {
    forward<decltype(tag)>(input, weight, bias, output, g, nhwc, nthreads);
  });
}

void depthwise_input_grad_cpu(const TensorView& grad_output, const TensorView& weight, const TensorView& grad_input,
                              const Geometry& g, int nthreads) {
  check_conv2d_args(g, &grad_input, weight, nullptr, &grad_output, DeviceType::CPU);
  check_arg(is_depthwise(g), "depthwise_input_grad_cpu: groups must equal the input channels");
  if (grad_input.numel() == 0) return;
  const bool nhwc = nhwc_layout(grad_input) || nhwc_layout(grad_output);
  dispatch_floating(grad_output.dtype, "grad_output", [&](auto tag) {
    input_grad<decltype(tag)>(grad_output, weight, grad_input, g, nhwc, nthreads);
  });
}

void depthwise_weight_grad_cpu(const TensorView& grad_output, const TensorView& input, const TensorView& grad_weight,
                               const Geometry& g, int nthreads) {
  check_conv2d_args(g, &input, grad_weight, nullptr, &grad_output, DeviceType::CPU);
  check_arg(is_depthwise(g), "depthwise_weight_grad_cpu: groups must equal the input channels");
  const bool nhwc = nhwc_layout(input) || nhwc_layout(grad_output);
  dispatch_floating(grad_output.dtype, "grad_output", [&](auto tag) {
    using S = decltype(tag);
    if (input.numel() == 0 || grad_output.numel() == 0) {
      for (int64_t o = 0; o < g.out_channels; ++o)
        for (int64_t k = 0; k < g.taps(); ++k)
          grad_weight.ptr<S>()[o * grad_weight.stride(0) + k / g.kw * grad_weight.stride(2) +
                               k % g.kw * grad_weight.stride(3)] = from_compute<S>(compute_t<S>(0));
      return;
    }
    weight_grad<S>(grad_output, input, grad_weight, g, nhwc, nthreads);
  });
}

}  // namespace fastcv
