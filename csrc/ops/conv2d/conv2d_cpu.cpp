// CPU convolution as GEMMs on packed panels (common/gemm.h), with the im2col done while packing: the
// column matrix only ever exists one cache-sized panel at a time, never as a buffer of kh*kw times
// the input. Weights are packed once per call. Per image and group:
//   NCHW forward       out[o, p]      = W[o, k] . col[k, p]           (rows: output channels)
//   NHWC forward       out[p, o]      = col'[p, k'] . W'[k', o]       (rows: pixels; k' = tap-major)
//   NCHW input grad    gcol[k, p]     = W[o, k]^T . gout[o, p], then a col2im scatter of each block
//   NCHW weight grad   gW[o, k]      += gout[o, p] . col[k, p]^T      (summed over the batch)
// with k = (c * kh + i) * kw + j and p = oh * out_w + ow. Reduced precision packs into float and
// rounds once at the end; float64 runs the same code in double.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/check.h"
#include "common/dtype.h"
#include "common/gemm.h"
#include "common/memory.h"
#include "common/parallel.h"
#include "ops/conv2d/conv2d_ops.h"

namespace fastcv {
namespace {

using conv2d::Geometry;

template <class S>
compute_t<S> load(S v) { return compute_t<S>(to_float(v)); }

// The output pixels [p0, p0 + n) of one image cut at output-row ends: pixels in a run share oh.
struct Run {
  int64_t offset, oh, ow, length;  // offset: of the run's first pixel from p0
};

void pixel_runs(const Geometry& g, int64_t p0, int64_t n, std::vector<Run>& runs) {
  runs.clear();
  for (int64_t p = p0, end = p0 + n; p < end;) {
    const int64_t oh = p / g.out_w, ow = p % g.out_w, length = std::min(g.out_w - ow, end - p);
    runs.push_back({p - p0, oh, ow, length});
    p += length;
  }
}

// Within a run starting at input column x0 = ow * sw - pw + j * dw, the run positions [a, b) whose
// input column lies in [0, width).
void valid_span(int64_t x0, int64_t sw, int64_t width, int64_t length, int64_t& a, int64_t& b) {
  if (sw == 1) {
    a = std::clamp<int64_t>(-x0, 0, length);
    b = std::clamp<int64_t>(width - x0, a, length);
    return;
  }
  const auto ceil_div = [](int64_t v, int64_t d) { return v >= 0 ? (v + d - 1) / d : -((-v) / d); };
  a = std::clamp<int64_t>(ceil_div(-x0, sw), 0, length);
  b = std::clamp<int64_t>(ceil_div(width - x0, sw), a, length);
}

// The column matrix col[k, p] of one image and group in NCHW, for the pixels `runs` cover (from p0):
// dst[kk * ld + jj] = col[k0 + kk][p0 + jj] for kk < nk, jj < ld, zero past the n_valid pixels.
template <class S>
void gather_columns(const S* image, const Geometry& g, int64_t k0, int64_t nk, const std::vector<Run>& runs,
                    int64_t n_valid, compute_t<S>* dst, int64_t ld) {
  using T = compute_t<S>;
  const int64_t taps = g.taps(), plane = g.height * g.width;
  for (int64_t kk = 0; kk < nk; ++kk) {
    const int64_t k = k0 + kk, c = k / taps, i = (k % taps) / g.kw, j = k % g.kw;
    const S* src = image + c * plane;
    T* row = dst + kk * ld;
    for (const Run& r : runs) {
      T* out = row + r.offset;
      const int64_t ih = r.oh * g.sh - g.ph + i * g.dh;
      if (ih < 0 || ih >= g.height) {
        std::fill(out, out + r.length, T(0));
        continue;
      }
      const int64_t x0 = r.ow * g.sw - g.pw + j * g.dw;
      int64_t a, b;
      valid_span(x0, g.sw, g.width, r.length, a, b);
      const S* in = src + ih * g.width + x0;
      std::fill(out, out + a, T(0));
      if (g.sw == 1)
        for (int64_t t = a; t < b; ++t) out[t] = load(in[t]);
      else
        for (int64_t t = a; t < b; ++t) out[t] = load(in[t * g.sw]);
      std::fill(out + b, out + r.length, T(0));
    }
    std::fill(row + n_valid, row + ld, T(0));
  }
}

// Packing reads a block's rows from many input planes at once, too many streams for the hardware
// prefetcher: a 1x1 convolution with 256 channels spent most of its packing time waiting on memory.
// So while the micro-kernels run on one block, the next block's plane rows are hinted into the cache.
template <class S>
void prefetch_planes(const S* image, const Geometry& g, int64_t c0, int64_t c1, const std::vector<Run>& runs) {
  if (runs.empty()) return;
  const int64_t first = std::clamp<int64_t>(runs.front().oh * g.sh - g.ph, 0, g.height - 1);
  const int64_t last = std::clamp<int64_t>(runs.back().oh * g.sh - g.ph + (g.kh - 1) * g.dh, 0, g.height - 1);
  for (int64_t c = c0; c < c1; ++c) {
    const char* begin = reinterpret_cast<const char*>(image + c * g.height * g.width + first * g.width);
    const char* end = reinterpret_cast<const char*>(image + c * g.height * g.width + (last + 1) * g.width);
    for (const char* p = begin; p < end; p += 64) __builtin_prefetch(p);
  }
}

// n values at src in the compute type: src itself when it already is, else converted into buf.
template <class S>
const compute_t<S>* as_compute(const S* src, int64_t n, compute_t<S>* buf) {
  if constexpr (std::is_same<S, compute_t<S>>::value) {
    return src;
  } else {
    for (int64_t q = 0; q < n; ++q) buf[q] = load(src[q]);
    return buf;
  }
}

// Rows [k0, k0 + kc) of a matrix whose row kk (n_valid values) row_of(kk, buf) returns, either
// gathered into buf or pointing at the source, cut into kc x NR panels with zeros past n_valid:
// dst[jp * NR * kc + kk * NR + jj] = row[jp * NR + jj].
template <class T, class RowOf>
void pack_rows(int64_t kc, int64_t n_valid, int64_t nr, T* dst, std::vector<T>& buf, const RowOf& row_of) {
  buf.resize(size_t(gemm::round_up(n_valid, nr)));
  const int64_t full = n_valid / nr, rest = n_valid - full * nr;
  for (int64_t kk = 0; kk < kc; ++kk) {
    const T* row = row_of(kk, buf.data());
    T* out = dst + kk * nr;
    for (int64_t jp = 0; jp < full; ++jp) std::memcpy(out + jp * nr * kc, row + jp * nr, size_t(nr) * sizeof(T));
    if (rest) {
      std::memcpy(out + full * nr * kc, row + full * nr, size_t(rest) * sizeof(T));
      std::fill(out + full * nr * kc + rest, out + full * nr * kc + nr, T(0));
    }
  }
}

// Weight element offsets: row o (output channel within the group) and k = (c, i, j) of the group.
std::vector<int64_t> channel_offsets(int64_t first, int64_t count, int64_t stride) {
  std::vector<int64_t> v(static_cast<size_t>(count));
  for (int64_t r = 0; r < count; ++r) v[size_t(r)] = (first + r) * stride;
  return v;
}
std::vector<int64_t> tap_offsets(const TensorView& w, const Geometry& g, bool tap_major) {
  std::vector<int64_t> v;
  v.reserve(size_t(g.in_per_group() * g.taps()));
  if (tap_major)  // k' = (i * kw + j) * C_g + c: channels contiguous in NHWC images
    for (int64_t t = 0; t < g.taps(); ++t)
      for (int64_t c = 0; c < g.in_per_group(); ++c) v.push_back(c * w.stride(1) + t / g.kw * w.stride(2) + t % g.kw * w.stride(3));
  else
    for (int64_t c = 0; c < g.in_per_group(); ++c)
      for (int64_t t = 0; t < g.taps(); ++t) v.push_back(c * w.stride(1) + t / g.kw * w.stride(2) + t % g.kw * w.stride(3));
  return v;
}

// Packs each group's weights once: `as_rows` puts output channels on the panel side (A of the NCHW
// forward, B of the NHWC forward); `transposed` puts the (c, i, j) side on it (A of the input grad).
template <class S>
std::vector<gemm::Packed<compute_t<S>>> pack_weights(const TensorView& w, const Geometry& g, int width,
                                                     bool tap_major, bool transposed) {
  std::vector<gemm::Packed<compute_t<S>>> packed(size_t(g.groups));
  const auto taps = tap_offsets(w, g, tap_major);
  for (int64_t gi = 0; gi < g.groups; ++gi) {
    const auto outs = channel_offsets(gi * g.out_per_group(), g.out_per_group(), w.stride(0));
    packed[size_t(gi)].pack(w.ptr<S>(), transposed ? taps : outs, transposed ? outs : taps, width,
                            [](S v) { return load(v); });
  }
  return packed;
}

// How many rows or columns a task takes: whole panels, and enough tasks to keep every thread busy.
int64_t chunk(int64_t total, int64_t panel, int64_t preferred, int64_t other_tasks, int nthreads) {
  int64_t size = gemm::round_up(std::min(total, preferred), panel);
  while (size > panel && other_tasks * ((total + size - 1) / size) < 4 * nthreads) size = gemm::round_up(size / 2, panel);
  return std::max<int64_t>(size, panel);
}

// ------------------------------------------------------------------------------------------- forward

// Stride-1 convolutions compute "virtual" output pixels on the zero-padded image's grid: out_h rows of
// wp = W + 2 pw pixels, pixel v reading padded[c][v + i * dh * wp + j * dw]. Every column row of a block
// is then one contiguous run of the padded image, with no per-output-row bookkeeping; the 2 pw extra
// pixels per row are computed and dropped (3.6% more arithmetic at 56x56, 14% at 14x14).
template <class T>
struct Shifted {
  const T* base = nullptr;  // plane (n * C + c) starts at base + (n * C + c) * plane
  int64_t wp = 0, plane = 0, pixels = 0;
  std::vector<T> storage;   // the padded copy, in the compute type (none when the input serves as is)
};

template <class S>
void make_shifted(const TensorView& x, const Geometry& g, Shifted<compute_t<S>>& sh, int nthreads) {
  using T = compute_t<S>;
  const int64_t hp = g.height + 2 * g.ph, slack = (g.kw - 1) * g.dw;  // the last row's dropped pixels read past it
  sh.wp = g.width + 2 * g.pw;
  sh.pixels = g.out_h * sh.wp;
  if (std::is_same<S, T>::value && g.ph == 0 && g.pw == 0 && slack == 0) {  // a 1x1 (or kx1) convolution
    sh.base = reinterpret_cast<const T*>(x.ptr<S>());
    sh.plane = g.height * g.width;
    return;
  }
  sh.plane = hp * sh.wp + slack;
  sh.storage.resize(size_t(g.batch * g.channels * sh.plane));
  parallel_for(0, g.batch * g.channels, 16, nthreads, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const S* src = x.ptr<S>() + p * g.height * g.width;
      T* dst = sh.storage.data() + p * sh.plane;
      std::fill(dst, dst + g.ph * sh.wp, T(0));
      for (int64_t h = 0; h < g.height; ++h) {
        T* row = dst + (g.ph + h) * sh.wp;
        std::fill(row, row + g.pw, T(0));
        for (int64_t w = 0; w < g.width; ++w) row[g.pw + w] = load(src[h * g.width + w]);
        std::fill(row + g.pw + g.width, row + sh.wp, T(0));
      }
      std::fill(dst + (g.ph + g.height) * sh.wp, dst + sh.plane, T(0));
    }
  });
  sh.base = sh.storage.data();
}

template <class S>
void forward_nchw(const TensorView& x, const TensorView& w, const TensorView* bias, const TensorView& out,
                  const Geometry& g, int nthreads) {
  using T = compute_t<S>;
  const auto& kern = gemm::kernel(T{});
  const int64_t M = g.out_per_group(), K = g.in_per_group() * g.taps(), cg = g.in_per_group();
  const auto weights = pack_weights<S>(w, g, kern.mr, false, false);
  advise_huge_pages(out.data, size_t(out.numel() * dtype_size(out.dtype)));
  Shifted<T> sh;
  const bool shifted = g.sh == 1 && g.sw == 1;
  if (shifted) make_shifted<S>(x, g, sh, nthreads);
  const int64_t P = shifted ? sh.pixels : g.pixels();  // the GEMM's columns: virtual or real pixels
  // A pixel block's C block (M x cols) stays near 64 KB, so it and the B panels sit in L2.
  const int64_t cols = chunk(P, kern.nr, std::max<int64_t>(4 * kern.nr, 16384 / std::max<int64_t>(M, 1)), g.batch * g.groups, nthreads);
  const int64_t rows = chunk(M, kern.mr, M, g.batch * g.groups * ((P + cols - 1) / cols), nthreads);
  const int64_t col_tasks = (P + cols - 1) / cols, row_tasks = (M + rows - 1) / rows;
  const int64_t tasks = g.batch * g.groups * col_tasks * row_tasks;
  const int64_t reach = (g.kh - 1) * g.dh * sh.wp + (g.kw - 1) * g.dw;  // a shifted row's extent past its block
  parallel_for(0, tasks, 1, nthreads, [&](int64_t t0, int64_t t1) {
    auto& ws = gemm::workspace<T>();
    std::vector<Run> runs, next_runs;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t rt = t % row_tasks, ct = t / row_tasks % col_tasks, gi = t / (row_tasks * col_tasks) % g.groups;
      const int64_t n = t / (row_tasks * col_tasks * g.groups);
      const int64_t r0 = rt * rows, m = std::min(rows, M - r0), q0 = ct * cols, q1 = std::min(P, q0 + cols);
      const int64_t next_q1 = std::min(P, q1 + cols);
      const S* image = x.ptr<S>() + n * x.stride(0) + gi * cg * x.stride(1);
      const T* planes = shifted ? sh.base + (n * g.channels + gi * cg) * sh.plane : nullptr;
      const auto& a = weights[size_t(gi)];
      const int64_t ldc = gemm::round_up(q1 - q0, kern.nr);
      ws.c.resize(size_t(gemm::round_up(m, kern.mr) * ldc));
      if (!shifted) {
        pixel_runs(g, q0, q1 - q0, runs);
        pixel_runs(g, q1, next_q1 - q1, next_runs);
      }
      const auto row_of = [&](int64_t k, T* buf) -> const T* {
        const int64_t c = k / g.taps(), i = k % g.taps() / g.kw, j = k % g.kw;
        if (shifted) return planes + c * sh.plane + q0 + i * g.dh * sh.wp + j * g.dw;
        gather_columns(image, g, k, 1, runs, q1 - q0, buf, ldc);
        return buf;
      };
      // While the micro-kernels run, hint the next depth block of these pixels (or the first of the
      // next pixel block) into the cache: its rows come from many planes, too many streams for the
      // hardware prefetcher.
      const auto prefetch = [&](int64_t k0, int64_t ip, int64_t m_panels) {
        const bool next_depth = k0 + gemm::kKC < K;
        if (!next_depth && (ct + 1 == col_tasks || rt + 1 < row_tasks)) return;
        const int64_t k_lo = next_depth ? k0 + gemm::kKC : 0, k_hi = std::min(K, k_lo + gemm::kKC);
        const int64_t c_lo = k_lo / g.taps(), span = (k_hi - 1) / g.taps() + 1 - c_lo;
        const int64_t c0 = c_lo + span * ip / m_panels, c1 = c_lo + span * (ip + 1) / m_panels;
        if (!shifted) return prefetch_planes(image, g, c0, c1, next_depth ? runs : next_runs);
        const int64_t v0 = next_depth ? q0 : q1, v1 = (next_depth ? q1 : next_q1) + reach;
        for (int64_t c = c0; c < c1; ++c)
          for (const T* p = planes + c * sh.plane + v0; p < planes + c * sh.plane + v1; p += 64 / sizeof(T)) __builtin_prefetch(p);
      };
      gemm::multiply(kern, m, q1 - q0, K,
          [&](int64_t i, int64_t k0, int64_t kc, T*) { return a.panel(r0 + i, k0, kc); },
          [&](int64_t k0, int64_t kc, T* dst) {
            pack_rows(kc, q1 - q0, kern.nr, dst, ws.row, [&](int64_t kk, T* buf) { return row_of(k0 + kk, buf); });
            return static_cast<const T*>(dst);
          },
          ws, ws.c.data(), ldc, false, prefetch);
      for (int64_t i = 0; i < m; ++i) {
        const int64_t o = gi * M + r0 + i;
        const T b = bias ? load(bias->ptr<S>()[o]) : T(0);
        const T* c = ws.c.data() + i * ldc;
        S* dst = out.ptr<S>() + n * out.stride(0) + o * out.stride(1);
        if (!shifted) {
          for (int64_t q = q0; q < q1; ++q) dst[q] = from_compute<S>(c[q - q0] + b);
          continue;
        }
        for (int64_t v = q0; v < q1;) {  // virtual pixels row by row, dropping those past out_w
          const int64_t oh = v / sh.wp, ow = v % sh.wp, length = std::min(sh.wp - ow, q1 - v);
          for (int64_t x = ow; x < std::min(ow + length, g.out_w); ++x) dst[oh * g.out_w + x] = from_compute<S>(c[v - q0 + x - ow] + b);
          v += length;
        }
      }
    }
  });
}

// NHWC: dst[kk * MR + ii] = col'[p0 + ii][k0 + kk], k' = (i * kw + j) * C_g + c (runs of channels).
template <class S>
void gather_rows_nhwc(const S* image, const Geometry& g, int64_t channel0, int64_t p0, int64_t p_end,
                      int64_t k0, int64_t kc, compute_t<S>* dst, int64_t mr) {
  using T = compute_t<S>;
  const int64_t cg = g.in_per_group(), C = g.channels;
  for (int64_t ii = 0; ii < mr; ++ii) {
    const int64_t p = p0 + ii;
    T* col = dst + ii;
    if (p >= p_end) {
      for (int64_t kk = 0; kk < kc; ++kk) col[kk * mr] = T(0);
      continue;
    }
    const int64_t oh = p / g.out_w, ow = p % g.out_w;
    for (int64_t kk = 0; kk < kc;) {
      const int64_t k = k0 + kk, tap = k / cg, c = k % cg, run = std::min(cg - c, kc - kk);
      const int64_t ih = oh * g.sh - g.ph + tap / g.kw * g.dh, iw = ow * g.sw - g.pw + tap % g.kw * g.dw;
      if (ih < 0 || ih >= g.height || iw < 0 || iw >= g.width) {
        for (int64_t t = 0; t < run; ++t) col[(kk + t) * mr] = T(0);
      } else {
        const S* src = image + (ih * g.width + iw) * C + channel0 + c;
        for (int64_t t = 0; t < run; ++t) col[(kk + t) * mr] = load(src[t]);
      }
      kk += run;
    }
  }
}

template <class S>
void forward_nhwc(const TensorView& x, const TensorView& w, const TensorView* bias, const TensorView& out,
                  const Geometry& g, int nthreads) {
  using T = compute_t<S>;
  const auto& kern = gemm::kernel(T{});
  const int64_t M = g.pixels(), N = g.out_per_group(), K = g.in_per_group() * g.taps();
  const auto weights = pack_weights<S>(w, g, kern.nr, true, false);
  const int64_t rows = chunk(M, kern.mr, std::max<int64_t>(kern.mr, 16384 / std::max<int64_t>(N, 1)), g.batch * g.groups, nthreads);
  const int64_t row_tasks = (M + rows - 1) / rows, tasks = g.batch * g.groups * row_tasks;
  parallel_for(0, tasks, 1, nthreads, [&](int64_t t0, int64_t t1) {
    auto& ws = gemm::workspace<T>();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t rt = t % row_tasks, gi = t / row_tasks % g.groups, n = t / (row_tasks * g.groups);
      const int64_t p0 = rt * rows, p1 = std::min(M, p0 + rows);
      const S* image = x.ptr<S>() + n * x.stride(0);
      const auto& b = weights[size_t(gi)];
      const int64_t ldc = gemm::round_up(N, kern.nr);
      ws.c.resize(size_t(gemm::round_up(p1 - p0, kern.mr) * ldc));
      gemm::multiply(kern, p1 - p0, N, K,
          [&](int64_t i, int64_t k0, int64_t kc, T* dst) {
            gather_rows_nhwc(image, g, gi * g.in_per_group(), p0 + i, p1, k0, kc, dst, kern.mr);
            return static_cast<const T*>(dst);
          },
          [&](int64_t k0, int64_t kc, T*) { return b.panel(0, k0, kc); },
          ws, ws.c.data(), ldc);
      for (int64_t p = p0; p < p1; ++p) {
        const T* c = ws.c.data() + (p - p0) * ldc;
        S* dst = out.ptr<S>() + n * out.stride(0) + p * g.out_channels + gi * N;
        for (int64_t o = 0; o < N; ++o) dst[o] = from_compute<S>(c[o] + (bias ? load(bias->ptr<S>()[gi * N + o]) : T(0)));
      }
    }
  });
}

// ------------------------------------------------------------------------------------ input gradient

// Adds the block gcol[k, p] (rows k = [k0, k0 + nk) of the group, pixels [p0, p0 + np)) into the image
// planes acc (channel k / taps - c_first): col2im restricted to one block.
template <class T>
void scatter_columns(const T* block, int64_t ld, const Geometry& g, int64_t k0, int64_t nk, int64_t c_first,
                     int64_t p0, int64_t np, T* acc, std::vector<Run>& runs) {
  pixel_runs(g, p0, np, runs);
  const int64_t taps = g.taps(), plane = g.height * g.width;
  for (int64_t kk = 0; kk < nk; ++kk) {
    const int64_t k = k0 + kk, c = k / taps - c_first, i = (k % taps) / g.kw, j = k % g.kw;
    const T* row = block + kk * ld;
    T* dst_plane = acc + c * plane;
    for (const Run& r : runs) {
      const int64_t ih = r.oh * g.sh - g.ph + i * g.dh;
      if (ih < 0 || ih >= g.height) continue;
      const int64_t x0 = r.ow * g.sw - g.pw + j * g.dw;
      int64_t a, b;
      valid_span(x0, g.sw, g.width, r.length, a, b);
      T* dst = dst_plane + ih * g.width + x0;
      const T* src = row + r.offset;
      if (g.sw == 1)
        for (int64_t t = a; t < b; ++t) dst[t] += src[t];
      else
        for (int64_t t = a; t < b; ++t) dst[t * g.sw] += src[t];
    }
  }
}

template <class S>
void input_grad_nchw(const TensorView& gout, const TensorView& w, const TensorView& gin, const Geometry& g,
                     int nthreads) {
  using T = compute_t<S>;
  const auto& kern = gemm::kernel(T{});
  const int64_t Kd = g.out_per_group(), cg = g.in_per_group(), taps = g.taps(), P = g.pixels();
  const int64_t plane = g.height * g.width;
  const auto weights = pack_weights<S>(w, g, kern.mr, false, true);
  // A task owns whole input channels of one image (so its scatter needs no atomics) whose rows start
  // on a panel boundary: channel counts are multiples of MR / gcd(MR, taps).
  int64_t step = kern.mr;
  for (int64_t a = kern.mr, b = taps; b;) { const int64_t r = a % b; a = b; b = r; step = kern.mr / a; }
  const int64_t chans = std::min(cg, chunk(cg, step, std::max<int64_t>(step, 256 / taps), g.batch * g.groups, nthreads));
  const int64_t chan_tasks = (cg + chans - 1) / chans, tasks = g.batch * g.groups * chan_tasks;
  const int64_t cols = std::max<int64_t>(kern.nr, gemm::round_up(std::min<int64_t>(P, 16384 / std::max<int64_t>(chans * taps, 1)), kern.nr));
  parallel_for(0, tasks, 1, nthreads, [&](int64_t t0, int64_t t1) {
    auto& ws = gemm::workspace<T>();
    std::vector<Run> runs;
    std::vector<T> acc;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t ct = t % chan_tasks, gi = t / chan_tasks % g.groups, n = t / (chan_tasks * g.groups);
      const int64_t c0 = ct * chans, c1 = std::min(cg, c0 + chans), m = (c1 - c0) * taps;
      const S* grad = gout.ptr<S>() + n * gout.stride(0) + gi * Kd * gout.stride(1);
      const auto& a = weights[size_t(gi)];
      acc.assign(size_t((c1 - c0) * plane), T(0));
      for (int64_t q0 = 0; q0 < P; q0 += cols) {
        const int64_t q1 = std::min(P, q0 + cols), ldc = gemm::round_up(q1 - q0, kern.nr);
        ws.c.resize(size_t(gemm::round_up(m, kern.mr) * ldc));
        gemm::multiply(kern, m, q1 - q0, Kd,
            [&](int64_t i, int64_t k0, int64_t kc, T*) { return a.panel(c0 * taps + i, k0, kc); },
            [&](int64_t k0, int64_t kc, T* dst) {
              pack_rows(kc, q1 - q0, kern.nr, dst, ws.row, [&](int64_t kk, T* buf) {
                return as_compute(grad + (k0 + kk) * P + q0, q1 - q0, buf);
              });
              return static_cast<const T*>(dst);
            },
            ws, ws.c.data(), ldc);
        scatter_columns(ws.c.data(), ldc, g, c0 * taps, m, c0, q0, q1 - q0, acc.data(), runs);
      }
      S* dst = gin.ptr<S>() + n * gin.stride(0) + (gi * cg + c0) * plane;
      for (int64_t e = 0; e < (c1 - c0) * plane; ++e) dst[e] = from_compute<S>(acc[size_t(e)]);
    }
  });
}

// ----------------------------------------------------------------------------------- weight gradient

template <class S>
void weight_grad_nchw(const TensorView& gout, const TensorView& x, const TensorView& gw, const Geometry& g,
                      int nthreads) {
  using T = compute_t<S>;
  const auto& kern = gemm::kernel(T{});
  const int64_t M = g.out_per_group(), K = g.in_per_group() * g.taps(), P = g.pixels();
  // A task owns a block of gW's columns for all output channels of a group and sums over the whole
  // batch itself: no reduction across threads, the same order every run.
  const int64_t cols = chunk(K, kern.nr, K, g.groups, nthreads);
  const int64_t col_tasks = (K + cols - 1) / cols, tasks = g.groups * col_tasks;
  parallel_for(0, tasks, 1, nthreads, [&](int64_t t0, int64_t t1) {
    auto& ws = gemm::workspace<T>();
    std::vector<Run> runs;
    std::vector<T> tmp;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t ct = t % col_tasks, gi = t / col_tasks, j0 = ct * cols, j1 = std::min(K, j0 + cols);
      const int64_t ldc = gemm::round_up(j1 - j0, kern.nr);
      ws.c.assign(size_t(gemm::round_up(M, kern.mr) * ldc), T(0));
      for (int64_t n = 0; n < g.batch; ++n) {
        const S* grad = gout.ptr<S>() + n * gout.stride(0) + gi * M * gout.stride(1);
        const S* image = x.ptr<S>() + n * x.stride(0) + gi * g.in_per_group() * x.stride(1);
        gemm::multiply(kern, M, j1 - j0, P,
            [&](int64_t i, int64_t k0, int64_t kc, T* dst) {  // gout rows, transposed into the panel
              for (int64_t ii = 0; ii < kern.mr; ++ii) {
                if (i + ii >= M) {
                  for (int64_t kk = 0; kk < kc; ++kk) dst[kk * kern.mr + ii] = T(0);
                  continue;
                }
                const S* src = grad + (i + ii) * P + k0;
                for (int64_t kk = 0; kk < kc; ++kk) dst[kk * kern.mr + ii] = load(src[kk]);
              }
              return static_cast<const T*>(dst);
            },
            [&](int64_t k0, int64_t kc, T* dst) {  // the block's column rows, transposed into panels
              pixel_runs(g, k0, kc, runs);
              tmp.resize(size_t(ldc * kc));
              gather_columns(image, g, j0, j1 - j0, runs, kc, tmp.data(), kc);
              std::fill(tmp.begin() + (j1 - j0) * kc, tmp.end(), T(0));
              for (int64_t jp = 0; jp < ldc / kern.nr; ++jp)
                for (int64_t kk = 0; kk < kc; ++kk)
                  for (int64_t jj = 0; jj < kern.nr; ++jj)
                    dst[(jp * kc + kk) * kern.nr + jj] = tmp[size_t((jp * kern.nr + jj) * kc + kk)];
              return static_cast<const T*>(dst);
            },
            ws, ws.c.data(), ldc, /*accumulate=*/true);
      }
      for (int64_t i = 0; i < M; ++i) {
        S* dst = gw.ptr<S>() + (gi * M + i) * K + j0;
        for (int64_t j = 0; j < j1 - j0; ++j) dst[j] = from_compute<S>(ws.c[size_t(i * ldc + j)]);
      }
    }
  });
}

}  // namespace

void conv2d_forward_cpu(const TensorView& input, const TensorView& weight, const TensorView* bias,
                        const TensorView& output, const Geometry& g, int nthreads) {
  check_conv2d_args(g, &input, weight, bias, &output, DeviceType::CPU);
  if (output.numel() == 0) return;
  const bool nhwc = nhwc_layout(input) || nhwc_layout(output);
  dispatch_floating(input.dtype, "input", [&](auto tag) {
    using S = decltype(tag);
    if (nhwc)
      forward_nhwc<S>(input, weight, bias, output, g, nthreads);
    else
      forward_nchw<S>(input, weight, bias, output, g, nthreads);
  });
}

void conv2d_input_grad_cpu(const TensorView& grad_output, const TensorView& weight, const TensorView& grad_input,
                           const Geometry& g, int nthreads) {
  check_conv2d_args(g, &grad_input, weight, nullptr, &grad_output, DeviceType::CPU);
  check_arg(!(nhwc_layout(grad_input) || nhwc_layout(grad_output)), "conv2d_input_grad_cpu takes NCHW tensors");
  if (grad_input.numel() == 0) return;
  dispatch_floating(grad_output.dtype, "grad_output", [&](auto tag) {
    input_grad_nchw<decltype(tag)>(grad_output, weight, grad_input, g, nthreads);
  });
}

void conv2d_weight_grad_cpu(const TensorView& grad_output, const TensorView& input, const TensorView& grad_weight,
                            const Geometry& g, int nthreads) {
  check_conv2d_args(g, &input, grad_weight, nullptr, &grad_output, DeviceType::CPU);
  check_arg(grad_weight.is_contiguous(), "grad_weight must be contiguous");
  check_arg(!(nhwc_layout(input) || nhwc_layout(grad_output)), "conv2d_weight_grad_cpu takes NCHW tensors");
  dispatch_floating(grad_output.dtype, "grad_output", [&](auto tag) {
    using S = decltype(tag);
    if (input.numel() == 0 || grad_output.numel() == 0) {
      for (int64_t e = 0; e < grad_weight.numel(); ++e) grad_weight.ptr<S>()[e] = from_compute<S>(compute_t<S>(0));
      return;
    }
    weight_grad_nchw<S>(grad_output, input, grad_weight, g, nthreads);
  });
}

}  // namespace fastcv
