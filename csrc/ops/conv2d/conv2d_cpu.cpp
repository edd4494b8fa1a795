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

// Zero-padded copies of image planes in the compute type: plane p at base + p * plane, rows of wp
// values laid out [pw zeros][W values][wp - W - pw zeros], so input (h, w) sits at (h + ph) * wp + pw +
// w. Neighbouring rows share their padding: a read up to pw past a row's end lands in the next row's
// leading zeros, so wp = W + pw is enough (padded_width). Reading the padding as data removes every
// bounds test from packing and scattering. `slack` zeros follow each plane (plane_slack). With no
// padding, and the storage type the compute type, the input itself serves.
int64_t padded_width(const Geometry& g, bool virtual_pixels) {
  return std::max(g.width + g.pw, virtual_pixels ? g.out_w : int64_t(0));
}
// The last row has no next row to lend its zeros: up to pw reads past it, and a virtual pixel's
// (kw - 1) * dw more.
int64_t plane_slack(const Geometry& g) { return g.pw + (g.kw - 1) * g.dw; }

template <class T>
struct Padded {
  const T* base = nullptr;
  int64_t hp = 0, wp = 0, plane = 0;
  std::vector<T> storage;

  const T* at(int64_t p) const { return base + p * plane; }
};

template <class S>
void make_padded(const S* src, int64_t planes, const Geometry& g, int64_t wp, int64_t slack,
                 Padded<compute_t<S>>& pad, int nthreads) {
  using T = compute_t<S>;
  pad.hp = g.height + 2 * g.ph;
  pad.wp = wp;
  if (std::is_same<S, T>::value && g.ph == 0 && g.pw == 0 && slack == 0 && wp == g.width) {
    pad.base = reinterpret_cast<const T*>(src);
    pad.plane = g.height * g.width;
    return;
  }
  pad.plane = pad.hp * pad.wp + slack;
  pad.storage.resize(size_t(planes * pad.plane));
  parallel_for(0, planes, 16, nthreads, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const S* in = src + p * g.height * g.width;
      T* dst = pad.storage.data() + p * pad.plane;
      std::fill(dst, dst + g.ph * pad.wp, T(0));
      for (int64_t h = 0; h < g.height; ++h) {
        T* row = dst + (g.ph + h) * pad.wp;
        std::fill(row, row + g.pw, T(0));
        for (int64_t w = 0; w < g.width; ++w) row[g.pw + w] = load(in[h * g.width + w]);
        std::fill(row + g.pw + g.width, row + pad.wp, T(0));
      }
      std::fill(dst + (g.ph + g.height) * pad.wp, dst + pad.plane, T(0));
    }
  });
  pad.base = pad.storage.data();
}

// Where column row k = (c, i, j) of output run r starts in padded planes (c from `planes`).
inline int64_t tap_offset(const Geometry& g, int64_t plane, int64_t wp, int64_t k, const Run& r) {
  const int64_t taps = g.taps(), c = k / taps, i = k % taps / g.kw, j = k % g.kw;
  return c * plane + (r.oh * g.sh + i * g.dh) * wp + r.ow * g.sw + j * g.dw;
}

// Column row k over the pixels of `runs`: dst[jj] = col[k][p0 + jj] (the runs' pixels only).
template <class T>
void gather_row(const T* planes, int64_t plane, int64_t wp, const Geometry& g, int64_t k, const std::vector<Run>& runs,
                T* dst) {
  for (const Run& r : runs) {
    const T* src = planes + tap_offset(g, plane, wp, k, r);
    T* out = dst + r.offset;
    if (g.sw == 1)
      std::memcpy(out, src, size_t(r.length) * sizeof(T));
    else
      for (int64_t t = 0; t < r.length; ++t) out[t] = src[t * g.sw];
  }
}

// Stride-1 layers compute "virtual" pixels on the padded grid instead: out_h rows of wp pixels, pixel
// v reading padded[c][v + i * dh * wp + j * dw], so a block's column row is one contiguous run. The
// wp - out_w extra pixels per row (pw for a 'same' convolution) are computed and dropped. Measured on the ResNet-50 3x3 layers, this beat
// cutting every row into out_w-long runs even at 14x14, where it adds 14% arithmetic (89 against 85
// GFLOP/s on one core; then with 2 pw extra pixels per row, now pw), and by more at 56x56.
bool use_virtual_pixels(const Geometry& g) { return g.sh == 1 && g.sw == 1; }

// Packing reads a block's rows from many planes at once, too many streams for the hardware
// prefetcher (a 1x1 convolution with 256 channels spent most of its packing time waiting on memory),
// so while the micro-kernels run on one block the next block's source is hinted into the cache:
// planes [c0, c1), each from `first` for `length` values.
template <class T>
void prefetch_planes(const T* planes, int64_t plane, int64_t c0, int64_t c1, int64_t first, int64_t length) {
  for (int64_t c = c0; c < c1; ++c)
    for (const T* p = planes + c * plane + first; p < planes + c * plane + first + length; p += 64 / sizeof(T))
      __builtin_prefetch(p);
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

// The source span of pixel block [v0, v1) of a `row_width`-wide grid in a padded plane: where it
// starts and how many values it covers, for the prefetch.
void block_span(const Geometry& g, int64_t wp, int64_t row_width, bool virtual_pixels, int64_t v0, int64_t v1,
                int64_t& first, int64_t& length) {
  if (virtual_pixels) {
    first = v0;
    length = v1 - v0 + (g.kh - 1) * g.dh * wp + (g.kw - 1) * g.dw;
    return;
  }
  const int64_t oh0 = v0 / row_width, oh1 = (v1 - 1) / row_width;
  first = oh0 * g.sh * wp;
  length = ((oh1 - oh0) * g.sh + (g.kh - 1) * g.dh + 1) * wp;
}

template <class S>
void forward_nchw(const TensorView& x, const TensorView& w, const TensorView* bias, const TensorView& out,
                  const Geometry& g, int nthreads) {
  using T = compute_t<S>;
  const auto& kern = gemm::kernel(T{});
  const int64_t M = g.out_per_group(), K = g.in_per_group() * g.taps(), cg = g.in_per_group();
  const auto weights = pack_weights<S>(w, g, kern.mr, false, false);
  advise_huge_pages(out.data, size_t(out.numel() * dtype_size(out.dtype)));
  const bool virt = use_virtual_pixels(g);
  const int64_t wp = padded_width(g, virt);
  Padded<T> pad;
  make_padded<S>(x.ptr<S>(), g.batch * g.channels, g, wp, plane_slack(g), pad, nthreads);
  const int64_t row_width = virt ? wp : g.out_w, P = g.out_h * row_width;  // the GEMM's pixel grid
  // The pixel block's C block (M x cols) stays near 64 KB (measured best between 32 and 256 KB).
  const int64_t cols = chunk(P, kern.nr, std::max<int64_t>(4 * kern.nr, 16384 / std::max<int64_t>(M, 1)), g.batch * g.groups, nthreads);
  const int64_t rows = chunk(M, kern.mr, M, g.batch * g.groups * ((P + cols - 1) / cols), nthreads);
  const int64_t col_tasks = (P + cols - 1) / cols, row_tasks = (M + rows - 1) / rows;
  const int64_t tasks = g.batch * g.groups * col_tasks * row_tasks;
  parallel_for(0, tasks, 1, nthreads, [&](int64_t t0, int64_t t1) {
    auto& ws = gemm::workspace<T>();
    std::vector<Run> runs;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t rt = t % row_tasks, ct = t / row_tasks % col_tasks, gi = t / (row_tasks * col_tasks) % g.groups;
      const int64_t n = t / (row_tasks * col_tasks * g.groups);
      const int64_t r0 = rt * rows, m = std::min(rows, M - r0), q0 = ct * cols, q1 = std::min(P, q0 + cols);
      const T* planes = pad.at(n * g.channels + gi * cg);
      const auto& a = weights[size_t(gi)];
      const int64_t ldc = gemm::round_up(q1 - q0, kern.nr);
      ws.c.resize(size_t(gemm::round_up(m, kern.mr) * ldc));
      if (!virt) pixel_runs(g, q0, q1 - q0, runs);
      const auto row_of = [&](int64_t k, T* buf) -> const T* {
        if (virt) return planes + k / g.taps() * pad.plane + q0 + k % g.taps() / g.kw * g.dh * wp + k % g.kw * g.dw;
        gather_row(planes, pad.plane, wp, g, k, runs, buf);
        return buf;
      };
      // While the micro-kernels run: the next depth block of these pixels, or the first of the next
      // pixel block (of this image; row-split tasks reuse the same pixels).
      const auto prefetch = [&](int64_t k0, int64_t ip, int64_t m_panels) {
        const bool next_depth = k0 + gemm::kKC < K;
        if (!next_depth && (ct + 1 == col_tasks || rt + 1 < row_tasks)) return;
        const int64_t k_lo = next_depth ? k0 + gemm::kKC : 0, k_hi = std::min(K, k_lo + gemm::kKC);
        const int64_t c_lo = k_lo / g.taps(), span = (k_hi - 1) / g.taps() + 1 - c_lo;
        int64_t first, length;
        block_span(g, wp, row_width, virt, next_depth ? q0 : q1, next_depth ? q1 : std::min(P, q1 + cols), first, length);
        prefetch_planes(planes, pad.plane, c_lo + span * ip / m_panels, c_lo + span * (ip + 1) / m_panels, first, length);
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
        for (int64_t v = q0; v < q1;) {  // grid row by grid row, dropping virtual pixels past out_w
          const int64_t oh = v / row_width, ow = v % row_width, length = std::min(row_width - ow, q1 - v);
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

// Adds the block gcol[k, p] (rows [k0, k0 + nk) of the group, pixels [q0, q1) of the grid) into padded
// accumulator planes (channel k / taps - c_first): col2im restricted to one block. On the virtual grid
// each row is one contiguous add (its extra pixels carry zeros: grad_output was widened with zeros).
template <class T>
void scatter_block(const T* block, int64_t ld, const Geometry& g, int64_t k0, int64_t nk, int64_t c_first, int64_t q0,
                   int64_t q1, bool virtual_pixels, const std::vector<Run>& runs, T* acc, int64_t plane, int64_t wp) {
  for (int64_t kk = 0; kk < nk; ++kk) {
    const int64_t k = k0 + kk - c_first * g.taps();
    const T* row = block + kk * ld;
    if (virtual_pixels) {
      T* dst = acc + k / g.taps() * plane + q0 + k % g.taps() / g.kw * g.dh * wp + k % g.kw * g.dw;
      for (int64_t v = 0; v < q1 - q0; ++v) dst[v] += row[v];
      continue;
    }
    for (const Run& r : runs) {
      T* dst = acc + tap_offset(g, plane, wp, k, r);
      const T* src = row + r.offset;
      if (g.sw == 1)
        for (int64_t t = 0; t < r.length; ++t) dst[t] += src[t];
      else
        for (int64_t t = 0; t < r.length; ++t) dst[t * g.sw] += src[t];
    }
  }
}

// grad_output planes on the virtual grid: rows widened from out_w to wp with zeros.
template <class S>
void widen_rows(const S* src, int64_t planes, const Geometry& g, int64_t wp, std::vector<compute_t<S>>& dst,
                int nthreads) {
  using T = compute_t<S>;
  const int64_t plane = g.out_h * wp;
  dst.resize(size_t(planes * plane));
  parallel_for(0, planes * g.out_h, 64, nthreads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* row = dst.data() + r * wp;
      for (int64_t x = 0; x < g.out_w; ++x) row[x] = load(src[r * g.out_w + x]);
      std::fill(row + g.out_w, row + wp, T(0));
    }
  });
}

template <class S>
void input_grad_nchw(const TensorView& gout, const TensorView& w, const TensorView& gin, const Geometry& g,
                     int nthreads) {
  using T = compute_t<S>;
  const auto& kern = gemm::kernel(T{});
  const int64_t Kd = g.out_per_group(), cg = g.in_per_group(), taps = g.taps();
  const auto weights = pack_weights<S>(w, g, kern.mr, false, true);
  const bool virt = use_virtual_pixels(g);
  const int64_t wp = padded_width(g, virt), hp = g.height + 2 * g.ph;
  const int64_t row_width = virt ? wp : g.out_w, P = g.out_h * row_width;
  const int64_t acc_plane = hp * wp + plane_slack(g);
  std::vector<T> widened;
  if (virt) widen_rows(gout.ptr<S>(), g.batch * g.out_channels, g, wp, widened, nthreads);
  // A task owns whole input channels of one image (so its scatter needs no atomics) whose rows start
  // on a panel boundary: channel counts are multiples of MR / gcd(MR, taps).
  int64_t step = kern.mr;
  for (int64_t a = kern.mr, b = taps; b;) { const int64_t r = a % b; a = b; b = r; step = kern.mr / a; }
  const int64_t chans = std::min(cg, chunk(cg, step, std::max<int64_t>(step, 256 / taps), g.batch * g.groups, nthreads));
  const int64_t chan_tasks = (cg + chans - 1) / chans, tasks = g.batch * g.groups * chan_tasks;
  const int64_t cols = std::max<int64_t>(kern.nr, gemm::round_up(std::min<int64_t>(P, 65536 / std::max<int64_t>(chans * taps, 1)), kern.nr));
  parallel_for(0, tasks, 1, nthreads, [&](int64_t t0, int64_t t1) {
    auto& ws = gemm::workspace<T>();
    std::vector<Run> runs;
    std::vector<T> acc;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t ct = t % chan_tasks, gi = t / chan_tasks % g.groups, n = t / (chan_tasks * g.groups);
      const int64_t c0 = ct * chans, c1 = std::min(cg, c0 + chans), m = (c1 - c0) * taps;
      const int64_t first_plane = n * g.out_channels + gi * Kd;
      const auto& a = weights[size_t(gi)];
      acc.assign(size_t((c1 - c0) * acc_plane), T(0));
      for (int64_t q0 = 0; q0 < P; q0 += cols) {
        const int64_t q1 = std::min(P, q0 + cols), ldc = gemm::round_up(q1 - q0, kern.nr);
        ws.c.resize(size_t(gemm::round_up(m, kern.mr) * ldc));
        gemm::multiply(kern, m, q1 - q0, Kd,
            [&](int64_t i, int64_t k0, int64_t kc, T*) { return a.panel(c0 * taps + i, k0, kc); },
            [&](int64_t k0, int64_t kc, T* dst) {
              pack_rows(kc, q1 - q0, kern.nr, dst, ws.row, [&](int64_t kk, T* buf) -> const T* {
                const int64_t p = first_plane + k0 + kk;
                if (virt) return widened.data() + p * P + q0;
                return as_compute(gout.ptr<S>() + p * P + q0, q1 - q0, buf);
              });
              return static_cast<const T*>(dst);
            },
            ws, ws.c.data(), ldc);
        if (!virt) pixel_runs(g, q0, q1 - q0, runs);
        scatter_block(ws.c.data(), ldc, g, c0 * taps, m, c0, q0, q1, virt, runs, acc.data(), acc_plane, wp);
      }
      for (int64_t c = c0; c < c1; ++c) {  // the interior of each padded plane
        S* dst = gin.ptr<S>() + n * gin.stride(0) + (gi * cg + c) * g.height * g.width;
        const T* src = acc.data() + (c - c0) * acc_plane + g.ph * wp + g.pw;
        for (int64_t h = 0; h < g.height; ++h)
          for (int64_t x = 0; x < g.width; ++x) dst[h * g.width + x] = from_compute<S>(src[h * wp + x]);
      }
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
  Padded<T> pad;
  make_padded<S>(x.ptr<S>(), g.batch * g.channels, g, padded_width(g, false), plane_slack(g), pad, nthreads);
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
        const T* planes = pad.at(n * g.channels + gi * g.in_per_group());
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
              for (int64_t k = j0; k < j1; ++k) gather_row(planes, pad.plane, pad.wp, g, k, runs, tmp.data() + (k - j0) * kc);
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
  if (is_depthwise(g)) {
    depthwise_forward_cpu(input, weight, bias, output, g, nthreads);
    return;
  }
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
  if (is_depthwise(g)) {  // either layout
    depthwise_input_grad_cpu(grad_output, weight, grad_input, g, nthreads);
    return;
  }
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
  if (is_depthwise(g)) {  // either layout
    depthwise_weight_grad_cpu(grad_output, input, grad_weight, g, nthreads);
    return;
  }
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
