// CPU convolution as GEMMs on packed panels (compute/gemm.h), with the im2col done while packing: the
// column matrix only ever exists one cache-sized panel at a time, never as a buffer of kh*kw times
// the input. Weights are packed once per call. Per image and group:
//   NCHW forward       out[o, p]      = W[o, k] . col[k, p]           (rows: output channels)
//   NHWC forward       out[p, o]      = col'[p, k'] . W'[k', o]       (rows: pixels; k' = tap-major)
//   NCHW input grad    gcol[k, p]     = W[o, k]^T . gout[o, p], then a col2im scatter of each block
//   NCHW weight grad   gW[o, k]      += gout[o, p] . col[k, p]^T      (summed over the batch)
//   and the channels_last gradients with pixels as rows (see their section)
// with k = (c * kh + i) * kw + j and p = oh * out_w + ow. Reduced precision packs into float and
// rounds once at the end; float64 runs the same code in double.
#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/check.h"
#include "common/dtype.h"
#include "common/memory.h"
#include "common/parallel.h"
#include "compute/gemm.h"
#include "compute/transpose.h"
#include "ops/batch_norm/batch_norm_ops.h"
#include "ops/conv2d/conv2d_ops.h"

namespace fastcv {
namespace {

using conv2d::Geometry;

template <class S>
compute_t<S> load(S v) { return compute_t<S>(to_float(v)); }

// Stores outputs: sums plus the epilogue's bias, residual (at the output's offset) and ReLU (which keeps NaN,
// as torch.relu does), rounded once.
template <class S>
struct Store {
  const Epilogue& e;
  const S* residual;  // at the output's first element, or null

  explicit Store(const Epilogue& epilogue)
      : e(epilogue), residual(epilogue.residual ? epilogue.residual->ptr<S>() : nullptr) {}
  compute_t<S> bias(int64_t o) const { return e.bias ? load(e.bias->ptr<S>()[o]) : compute_t<S>(0); }
  bool plain() const { return !e.bias && !residual && !e.relu; }  // stores the sums as they are
  // The residual and ReLU on n outputs from offset that already hold conv + bias (in place).
  void finish_in_place(S* out, int64_t offset, int64_t n) const { apply(out + offset, out + offset, offset, n, NoBias{}); }
  // n consecutive outputs from offset, sums[q] + bias each.
  void run(S* out, int64_t offset, const compute_t<S>* sums, int64_t n, compute_t<S> bias) const {
    apply(out + offset, sums, offset, n, [bias](int64_t) { return bias; });
  }
  // n consecutive channels o0.. of one pixel (channels_last), sums[q] + bias[o0 + q] each.
  void run_channels(S* out, int64_t offset, const compute_t<S>* sums, int64_t n, int64_t o0) const {
    if (!e.bias) return apply(out + offset, sums, offset, n, NoBias{});
    const S* b = e.bias->ptr<S>() + o0;
    apply(out + offset, sums, offset, n, [b](int64_t q) { return load(b[q]); });
  }

 private:
  // One loop per combination of residual and ReLU, so each vectorises: with the tests inside the loop
  // the epilogue ran element by element, and a folded channels_last layer with bias and ReLU took
  // 1.7-4x its plain time (64->256 1x1 at 56x56: 13.6 against 3.4 ms).
  // Sums in the compute type, or the output's own values (finish_in_place); without a bias nothing is added.
  struct NoBias {};
  template <bool kResidual, bool kRelu, class Sum, class BiasAt>
  static void apply_as(S* dst, const Sum* sums, const S* res, int64_t n, const BiasAt& bias_at) {
    using T = compute_t<S>;
    for (int64_t q = 0; q < n; ++q) {
      T v = T(load(sums[q]));
      if constexpr (!std::is_same<BiasAt, NoBias>::value) v += bias_at(q);
      if (kResidual) v += load(res[q]);
      if (kRelu) v = v < T(0) ? T(0) : v;  // keeps NaN
      dst[q] = from_compute<S>(v);
    }
  }
  template <class Sum, class BiasAt>
  void apply(S* dst, const Sum* sums, int64_t offset, int64_t n, const BiasAt& bias_at) const {
    const S* res = residual ? residual + offset : nullptr;
    if (res)
      e.relu ? apply_as<true, true>(dst, sums, res, n, bias_at) : apply_as<true, false>(dst, sums, res, n, bias_at);
    else
      e.relu ? apply_as<false, true>(dst, sums, res, n, bias_at) : apply_as<false, false>(dst, sums, res, n, bias_at);
  }
};

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

// Zero-padded copies of image planes in the compute type. Reading the padding as data removes every
// bounds test from packing and scattering. How a plane is laid out (PlaneLayout):
//  - stride 1: rows of `row` values [pw zeros][W values][zeros]. Neighbouring rows share their padding
//    (a read up to pw past a row's end lands in the next row's leading zeros), so row = W + pw is
//    enough; on the virtual grid (below) row is at least out_w. `plane` leaves slack after the last row.
//  - stride sw > 1: each row of W + 2 pw columns is stored as sw phases (the columns X with X % sw = q,
//    in order, wq of them), so the columns X = ow * sw + j * dw that a run of output pixels reads are
//    contiguous too. Except a strided 1x1 convolution without padding: copying the whole input for
//    the 1 / sw^2 of it that it reads cost more than strided reads (0.57x PyTorch).
struct PlaneLayout {
  int64_t row = 0, wq = 0, phases = 1, plane = 0;

  int64_t at(int64_t r, int64_t x) const { return r * row + x % phases * wq + x / phases; }
};

PlaneLayout plane_layout(const Geometry& g, bool virtual_pixels) {
  PlaneLayout l;
  const int64_t hp = g.height + 2 * g.ph;
  if (g.sw == 1 || (g.kw == 1 && g.pw == 0)) {  // a strided 1x1 reads the unpadded input with a stride
    l.row = l.wq = std::max(g.width + g.pw, virtual_pixels ? g.out_w : int64_t(0));
    l.plane = hp * l.row + g.pw + (g.kw - 1) * g.dw;  // the last row lends no zeros; virtual pixels read on
  } else {
    l.phases = g.sw;
    l.wq = (g.width + 2 * g.pw + g.sw - 1) / g.sw;
    l.row = l.phases * l.wq;
    l.plane = hp * l.row;
  }
  return l;
}

// The scratch slots (common/memory.h) of one convolution call: padded input planes, the second
// operand's work copy (widened grad_output rows, or the weight gradient's relaid input), the weight
// gradient's packed grad_output panels, and the forward's per-tile output statistics.
constexpr int kPaddedSlot = 0, kOperandSlot = 1, kPanelSlot = 2, kStatsSlot = 3;

template <class T>
struct Padded {
  const T* base = nullptr;  // plane p at base + p * layout.plane: the input itself, or thread scratch
  PlaneLayout layout;

  const T* at(int64_t p) const { return base + p * layout.plane; }
};

template <class S>
void make_padded(const S* src, int64_t planes, const Geometry& g, const PlaneLayout& layout,
                 Padded<compute_t<S>>& pad, int nthreads) {
  using T = compute_t<S>;
  pad.layout = layout;
  if (std::is_same<S, T>::value && layout.phases == 1 && layout.row == g.width && layout.plane == g.height * g.width) {
    pad.base = reinterpret_cast<const T*>(src);  // no padding (a 1x1 convolution)
    return;
  }
  T* storage = scratch<T>(kPaddedSlot, size_t(planes * layout.plane));
  parallel_for(0, planes, 16, nthreads, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const S* in = src + p * g.height * g.width;
      T* dst = storage + p * layout.plane;
      std::fill(dst, dst + layout.plane, T(0));
      for (int64_t h = 0; h < g.height; ++h) {
        const S* src = in + h * g.width;
        T* row = dst + (h + g.ph) * layout.row;
        for (int64_t q = 0; q < layout.phases; ++q) {  // input column w lands in phase (w + pw) % phases
          const int64_t w0 = ((q - g.pw) % layout.phases + layout.phases) % layout.phases;
          T* out = row + layout.at(0, w0 + g.pw);
          for (int64_t w = w0, t = 0; w < g.width; w += layout.phases, ++t) out[t] = load(src[w]);
        }
      }
    }
  });
  pad.base = storage;
}

// Where column row k = (c, i, j) of output run r starts in padded planes (c from the first plane).
inline int64_t tap_offset(const Geometry& g, const PlaneLayout& l, int64_t k, const Run& r) {
  const int64_t taps = g.taps(), c = k / taps, i = k % taps / g.kw, j = k % g.kw;
  return c * l.plane + l.at(r.oh * g.sh + i * g.dh, r.ow * g.sw + j * g.dw);
}

// Column row k over the pixels of `runs`: dst[jj] = col[k][p0 + jj] (the runs' pixels only).
template <class T>
void gather_row(const T* planes, const PlaneLayout& l, const Geometry& g, int64_t k, const std::vector<Run>& runs,
                T* dst) {
  for (const Run& r : runs) {
    const T* src = planes + tap_offset(g, l, k, r);
    if (l.phases == g.sw)
      std::memcpy(dst + r.offset, src, size_t(r.length) * sizeof(T));
    else  // a strided 1x1 convolution on the unpadded input
      for (int64_t t = 0; t < r.length; ++t) dst[r.offset + t] = src[t * g.sw];
  }
}

// Stride-1 layers compute "virtual" pixels on the padded grid: out_h rows of `row` pixels, pixel v
// reading padded[c][v + i * dh * row + j * dw], so a block's column row is one contiguous run (no
// copy at all: the packing reads it in place). The row - out_w extra pixels per row (pw for a 'same'
// convolution) are computed and dropped. Measured on the ResNet-50 3x3 layers, this beat cutting
// every row into out_w-long runs even at 14x14 (89 against 85 GFLOP/s on one core, with 2 pw extra
// pixels per row then; pw now), and by more at 56x56.
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

// A dense tensor's memory in the compute type: the tensor itself, or (reduced precision) a converted copy
// in buf with the same layout, so one packing path serves every dtype.
template <class S>
const compute_t<S>* compute_copy(const TensorView& t, std::vector<compute_t<S>>& buf, int nthreads) {
  if constexpr (std::is_same<S, compute_t<S>>::value) {
    return t.ptr<S>();
  } else {
    buf.resize(size_t(t.numel()));
    parallel_for(0, t.numel(), 1 << 16, nthreads, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) buf[size_t(i)] = load(t.ptr<S>()[i]);
    });
    return buf.data();
  }
}

// Rows [k0, k0 + kc) of a matrix whose row kk (n_valid values) row_of(kk, buf) returns, either
// gathered into buf or pointing at the source, cut into kc x NR panels with zeros past n_valid:
// dst[jp * NR * kc + kk * NR + jj] = row[jp * NR + jj].
template <class T, class RowOf>
void pack_rows(const gemm::Kernel<T>& kern, int64_t kc, int64_t n_valid, T* dst, std::vector<T>& buf,
               const RowOf& row_of) {
  buf.resize(size_t(gemm::round_up(n_valid, kern.nr)));
  for (int64_t kk = 0; kk < kc; ++kk) kern.pack_b_row(row_of(kk, buf.data()), n_valid, kc, dst + kk * kern.nr);
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

// How many rows or columns a task takes: whole panels, and at least per_thread tasks per thread (fewer,
// larger tasks where each task repeats work, as the weight gradients' pass over the whole batch).
int64_t chunk(int64_t total, int64_t panel, int64_t preferred, int64_t other_tasks, int nthreads, int per_thread = 4) {
  int64_t size = gemm::round_up(std::min(total, preferred), panel);
  while (size > panel && other_tasks * ((total + size - 1) / size) < per_thread * nthreads)
    size = gemm::round_up(size / 2, panel);
  return std::max<int64_t>(size, panel);
}

// ------------------------------------------------------------------------------------------- forward

// The output's per-channel batch statistics (Epilogue::mean, var), taken from each task's tile while it
// is in cache: every (image, pixel block) leaves its channels' moments in `parts`, and they merge in
// image and block order. The pixel blocks are cut as for kStatsThreads threads whatever the thread count,
// so the statistics do not depend on it. Only the channels_last forward takes them: a planar batch norm
// already reads each channel once (its statistics pass leaves the channel in L2 for the normalisation),
// so tile statistics saved nothing there and cost 3-9% of the forward (measured, conv then batch norm).
constexpr int kStatsThreads = 8;

struct OutputMoments {
  using Moments = batch_norm::Moments<double>;
  int64_t channels = 0, blocks = 0, count = 0;  // blocks: pixel blocks an image; count: parts a channel
  Moments* parts = nullptr;                     // [image][block][channel], in the calling thread's scratch

  // Room for `blocks_per_image` pixel blocks an image (each task clears the parts it writes).
  void start(const Geometry& g, int64_t blocks_per_image) {
    channels = g.out_channels, blocks = blocks_per_image, count = g.batch * blocks;
    parts = scratch<Moments>(kStatsSlot, size_t(count * channels));
  }
  // The moments of C channels from channel0 over `rows` rows of x, ld apart: image n's block `block`.
  template <class S>
  void add_rows(int64_t n, int64_t block, int64_t channel0, const S* x, int64_t rows, int64_t ld, int64_t C) {
    Moments* out = parts + (n * blocks + block) * channels + channel0;
    std::fill(out, out + C, Moments{});
    batch_norm_rows_moments(x, rows, ld, C, out);
  }
  // Merges the parts into mean and var (the biased variance): the total mean first, then each part's M2
  // plus its count times its mean's squared distance from it (Chan's formula without a division per part:
  // tens of thousands of parts made pairwise merging cost up to 1 ms). Parts are read in memory order,
  // each thread over its slice of the channels.
  void finish(const TensorView& mean, const TensorView& var, int nthreads) const {
    const bool f64 = mean.dtype == DType::Float64;  // else float32 (check_stats)
    parallel_for(0, channels, 64, nthreads, [&](int64_t c0, int64_t c1) {
      std::vector<double> n(size_t(c1 - c0)), sum(n.size()), m2(n.size());
      for (int64_t u = 0; u < count; ++u)
        for (int64_t c = c0; c < c1; ++c) {
          const Moments& p = parts[u * channels + c];
          n[size_t(c - c0)] += p.n, sum[size_t(c - c0)] += p.n * p.mean;
        }
      for (int64_t c = c0; c < c1; ++c) sum[size_t(c - c0)] /= n[size_t(c - c0)];  // the mean
      for (int64_t u = 0; u < count; ++u)
        for (int64_t c = c0; c < c1; ++c) {
          const Moments& p = parts[u * channels + c];
          const double d = p.mean - sum[size_t(c - c0)];
          m2[size_t(c - c0)] += p.m2 + p.n * d * d;
        }
      for (int64_t c = c0; c < c1; ++c) {
        const double mu = sum[size_t(c - c0)], v = m2[size_t(c - c0)] / n[size_t(c - c0)];
        if (f64)
          mean.ptr<double>()[c] = mu, var.ptr<double>()[c] = v;
        else
          mean.ptr<float>()[c] = float(mu), var.ptr<float>()[c] = float(v);
      }
    });
  }
};

// The source span of pixel block [v0, v1) of a `row_width`-wide grid in a padded plane: where it
// starts and how many values it covers, for the prefetch.
void block_span(const Geometry& g, const PlaneLayout& l, int64_t row_width, bool virtual_pixels, int64_t v0,
                int64_t v1, int64_t& first, int64_t& length) {
  if (virtual_pixels) {
    first = v0;
    length = v1 - v0 + (g.kh - 1) * g.dh * l.row + (g.kw - 1) * g.dw;
    return;
  }
  const int64_t oh0 = v0 / row_width, oh1 = (v1 - 1) / row_width;
  first = oh0 * g.sh * l.row;
  length = ((oh1 - oh0) * g.sh + (g.kh - 1) * g.dh + 1) * l.row;
}

template <class S>
void forward_nchw(const TensorView& x, const TensorView& w, const Epilogue& epilogue, const TensorView& out,
                  const Geometry& g, int nthreads) {
  using T = compute_t<S>;
  const auto& kern = gemm::kernel(T{});
  const int64_t M = g.out_per_group(), K = g.in_per_group() * g.taps(), cg = g.in_per_group();
  const auto weights = pack_weights<S>(w, g, kern.mr, false, false);
  const Store<S> store(epilogue);
  advise_huge_pages(out.data, size_t(out.numel() * dtype_size(out.dtype)));
  const bool virt = use_virtual_pixels(g);
  Padded<T> pad;
  make_padded<S>(x.ptr<S>(), g.batch * g.channels, g, plane_layout(g, virt), pad, nthreads);
  const PlaneLayout& l = pad.layout;
  const int64_t row_width = virt ? l.row : g.out_w, P = g.out_h * row_width;  // the GEMM's pixel grid
  // The tiles write the output in place when its planes are the pixel grid itself (no virtual pixels to
  // drop), it holds the compute type and there is no epilogue; else they go through a C block that the
  // store copies out, applying the epilogue on the way (applying it in place, a second pass over the
  // output, cost ResNet-50's folded inference 5-7%: 0.43-0.44 against 0.46 s, alternating in one process).
  const bool direct = std::is_same<S, T>::value && row_width == g.out_w && out.stride(1) == P && store.plain();
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
      const int64_t first = n * out.stride(0) + (gi * M + r0) * out.stride(1);  // output of row r0, pixel 0
      T* c = direct ? reinterpret_cast<T*>(out.ptr<S>()) + first + q0 : nullptr;
      const int64_t ldc = direct ? out.stride(1) : gemm::round_up(q1 - q0, kern.nr);
      if (!direct) {
        ws.c.resize(size_t(gemm::round_up(m, kern.mr) * ldc));
        c = ws.c.data();
      }
      if (!virt) pixel_runs(g, q0, q1 - q0, runs);
      const auto row_of = [&](int64_t k, T* buf) -> const T* {
        if (virt) return planes + k / g.taps() * l.plane + q0 + k % g.taps() / g.kw * g.dh * l.row + k % g.kw * g.dw;
        gather_row(planes, l, g, k, runs, buf);
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
        block_span(g, l, row_width, virt, next_depth ? q0 : q1, next_depth ? q1 : std::min(P, q1 + cols), first, length);
        prefetch_planes(planes, l.plane, c_lo + span * ip / m_panels, c_lo + span * (ip + 1) / m_panels, first, length);
      };
      gemm::multiply(kern, m, q1 - q0, K,
          [&](int64_t i, int64_t k0, int64_t kc, T*) { return a.panel(r0 + i, k0, kc); },
          [&](int64_t k0, int64_t kc, T* dst) {
            pack_rows(kern, kc, q1 - q0, dst, ws.row, [&](int64_t kk, T* buf) { return row_of(k0 + kk, buf); });
            return static_cast<const T*>(dst);
          },
          ws, c, ldc, false, prefetch, /*a_stored=*/true, /*exact=*/direct);
      if (direct) continue;
      for (int64_t i = 0; i < m; ++i) {
        const int64_t o = gi * M + r0 + i, base = first + i * out.stride(1);
        const T b = store.bias(o);
        const T* sums = c + i * ldc;
        for (int64_t v = q0; v < q1;) {  // grid row by grid row, dropping virtual pixels past out_w
          const int64_t oh = v / row_width, ow = v % row_width, length = std::min(row_width - ow, q1 - v);
          if (ow < g.out_w) store.run(out.ptr<S>(), base + oh * g.out_w + ow, sums + v - q0, std::min(ow + length, g.out_w) - ow, b);
          v += length;
        }
      }
    }
  });
}

// Where each of a task's output pixels reads its receptive field: the image's first channel of the group and
// the top-left input position (ih0, iw0) of its kernel window (may lie in the padding). Pixels past the
// task's end get an ih0 no tap brings inside, so their rows read zeros.
template <class T>
struct PixelOrigins {
  std::vector<const T*> image;
  std::vector<int64_t> ih0, iw0;

  void set(const Geometry& g, const T* input, int64_t image_stride, int64_t channel0, int64_t p0, int64_t p1, int64_t count) {
    image.resize(size_t(count)), ih0.resize(size_t(count)), iw0.resize(size_t(count));
    int64_t n = p0 / g.pixels(), oh = p0 % g.pixels() / g.out_w, ow = p0 % g.out_w;
    for (int64_t q = 0; q < count; ++q) {
      const bool real = p0 + q < p1;
      image[size_t(q)] = input + n * image_stride + channel0;
      ih0[size_t(q)] = real ? oh * g.sh - g.ph : std::numeric_limits<int32_t>::min();
      iw0[size_t(q)] = ow * g.sw - g.pw;
      if (++ow == g.out_w) ow = 0, n += ++oh == g.out_h, oh %= g.out_h;
    }
  }
};

// The tile_rows segments of MR pixels (origins o from pixel q) over depth [k0, k0 + kc) of the group. Each is a
// run of k' = tap * C_g + c that lies contiguous in the image for every pixel: one tap's channels, or, without
// groups or dilation along w, the rest of a kernel row where every pixel has that stretch inside the image
// or none of it (the stem's 3 channels would make runs of 3). Rows point at the pixel's channels or at
// zeros; a segment whose rows are all zeros (a kernel row above or below every pixel) is left out, so
// the padding costs no arithmetic there. Returns the count of segments.
template <class T>
int64_t pixel_segments(const Geometry& g, const PixelOrigins<T>& o, int64_t q, const T* zeros, int64_t k0, int64_t kc,
                       int mr, const T** rows, int64_t* span) {
  const T* const* image = o.image.data() + q;
  const int64_t *ih0 = o.ih0.data() + q, *iw0 = o.iw0.data() + q;
  const int64_t cg = g.in_per_group();
  const bool row_runs = cg == g.channels && g.dw == 1;
  int64_t segments = 0;
  for (int64_t kk = 0; kk < kc;) {
    const int64_t k = k0 + kk, tap = k / cg, c = k % cg, i = tap / g.kw, j = tap % g.kw;
    const int64_t dy = i * g.dh, dx = j * g.dw;
    int64_t run = std::min(cg - c, kc - kk), last = dx;  // last: the run's last tap's column offset
    if (row_runs) {
      const int64_t long_run = std::min((g.kw - j) * cg - c, kc - kk), long_last = dx + (c + long_run - 1) / cg;
      bool whole = true;
      for (int ii = 0; ii < mr; ++ii) {
        const int64_t ih = ih0[ii] + dy, iw = iw0[ii] + dx;
        whole &= ih < 0 || ih >= g.height || (iw >= 0 && iw0[ii] + long_last < g.width);
      }
      if (whole) run = long_run, last = long_last;
    }
    const T** r = rows + segments * mr;
    bool any = false;
    for (int ii = 0; ii < mr; ++ii) {
      const int64_t ih = ih0[ii] + dy, iw = iw0[ii] + dx;
      const bool inside = ih >= 0 && ih < g.height && iw >= 0 && iw0[ii] + last < g.width;
      r[ii] = inside ? image[ii] + (ih * g.width + iw) * g.channels + c : zeros;
      any |= inside;
    }
    if (any) span[2 * segments] = kk, span[2 * segments + 1] = run, ++segments;
    kk += run;
  }
  return segments;
}

// NHWC: out[p, o] = col'[p, k'] . W'[k', o] over the batch's pixels as one matrix (k' = tap * C_g + c), rows
// being pixels: a tile's A rows are read where they lie in the image (tile_rows), nothing packed but the
// weights. Against packing A panels through an in-register transpose this measured 0.73-0.79x -> 0.83-0.86x
// oneDNN on the 3x3 layers at 56x56 and 28x28, and rows spanning images made the 1x1 512->2048 layer at 7x7
// 0.47x -> 0.75x (each task read every weight once per 49-pixel image before).
// Per task (a block of pixels and of output channels), depth block by depth block: the block's weight panels
// stay in L2 and each in L1 while the task's pixel panels pass it; the pixel panels' segments are found once
// per depth block.
template <class S>
void forward_nhwc(const TensorView& x, const TensorView& w, const Epilogue& epilogue, const TensorView& out,
                  const Geometry& g, int nthreads, OutputMoments* stats = nullptr) {
  const Store<S> store(epilogue);
  using T = compute_t<S>;
  const auto& kern = gemm::kernel(T{});
  const int64_t MR = kern.mr, NR = kern.nr;
  const int64_t M = g.batch * g.pixels(), N = g.out_per_group(), K = g.in_per_group() * g.taps();
  const auto weights = pack_weights<S>(w, g, kern.nr, true, false);
  std::vector<T> converted;
  const T* input = compute_copy<S>(x, converted, nthreads);
  const int64_t kc_max = std::min(gemm::kKC, std::max<int64_t>(K, 1));
  // Output channels a task: a depth block of their weights stays under 512 KB (L2).
  const int64_t nb = std::min(gemm::round_up(N, NR), std::max(NR, 131072 / kc_max / NR * NR));
  const int64_t n_blocks = (N + nb - 1) / nb;
  // Pixels a task: a C block of ~64 KB. Where a thread's share of the pixels is fewer than the output
  // channels (7x7 layers), reading the weights once per task costs more than the work, so each thread
  // takes its share as one task (1x1 512->2048 at 7x7: 0.76x -> 0.82x oneDNN, 3x3 512: 0.55x -> 0.61x;
  // the same on larger images lost 2-25%). With statistics the blocks stay inside images, cut as for
  // kStatsThreads threads whatever the thread count.
  const bool few_pixels = N > M / nthreads;
  const int64_t preferred = few_pixels ? (M + nthreads - 1) / nthreads : std::max<int64_t>(MR, 16384 / std::min(N, nb));
  const int64_t rows = stats ? chunk(g.pixels(), MR, preferred, g.batch * g.groups, kStatsThreads)
                             : chunk(M, MR, preferred, g.groups * n_blocks, nthreads, few_pixels ? 1 : 4);
  const int64_t per_image = (g.pixels() + rows - 1) / rows, row_tasks = stats ? g.batch * per_image : (M + rows - 1) / rows;
  const int64_t tasks = g.groups * row_tasks * n_blocks;
  if (stats) stats->start(g, per_image);
  const bool direct = std::is_same<S, T>::value && store.plain();  // the output in place (see forward_nchw)
  const int64_t ldo = g.out_channels;
  parallel_for(0, tasks, 1, nthreads, [&](int64_t t0, int64_t t1) {
    auto& ws = gemm::workspace<T>();
    thread_local std::vector<T> zeros(size_t(gemm::kKC), T(0));
    thread_local PixelOrigins<T> origins;
    thread_local std::vector<const T*> seg_rows;
    thread_local std::vector<int64_t> seg_span, seg_count;
    ws.edge.assign(size_t(MR * NR), T(0));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bt = t % n_blocks, rt = t / n_blocks % row_tasks, gi = t / (n_blocks * row_tasks);
      const int64_t p0 = stats ? rt / per_image * g.pixels() + rt % per_image * rows : rt * rows;
      const int64_t p1 = stats ? std::min(p0 - rt % per_image * rows + g.pixels(), p0 + rows) : std::min(M, p0 + rows);
      const int64_t j0 = bt * nb, nj = std::min(nb, N - j0), m = p1 - p0, m_panels = (m + MR - 1) / MR;
      origins.set(g, input, x.stride(0), gi * g.in_per_group(), p0, p1, m_panels * MR);
      const int64_t first = p0 * ldo + gi * N + j0;  // output of pixel p0, the task's first channel
      T* c = direct ? reinterpret_cast<T*>(out.ptr<S>()) + first : nullptr;
      const int64_t ldc = direct ? ldo : gemm::round_up(nj, NR);
      if (!direct) {
        ws.c.resize(size_t(m_panels * MR * ldc));
        c = ws.c.data();
      }
      const int64_t most = kc_max;  // segments a panel at most (each at least one value deep)
      if (seg_rows.size() < size_t(m_panels * most * MR)) {  // grown only: resizing would clear them
        seg_rows.resize(size_t(m_panels * most * MR));
        seg_span.resize(size_t(m_panels * most * 2));
      }
      seg_count.resize(size_t(m_panels));
      for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
        const int64_t kc = std::min(kc_max, K - k0);
        const T* panels = weights[size_t(gi)].panel(0, k0, kc) + j0 * kc;
        for (int64_t ip = 0; ip < m_panels; ++ip)
          seg_count[size_t(ip)] = pixel_segments(g, origins, ip * MR, zeros.data(), k0, kc, int(MR),
                                                 seg_rows.data() + ip * most * MR, seg_span.data() + ip * most * 2);
        for (int64_t jp = 0; jp < nj; jp += NR)
          for (int64_t ip = 0; ip < m_panels; ++ip) {
            const auto tile = [&](T* dst, int64_t ld) {
              kern.tile_rows(seg_count[size_t(ip)], seg_rows.data() + ip * most * MR, seg_span.data() + ip * most * 2,
                             panels + jp * kc, dst, ld, k0 > 0);
            };
            gemm::edge_tile(c + ip * MR * ldc + jp, ldc, direct ? std::min(MR, m - ip * MR) : MR,
                            direct ? std::min(NR, nj - jp) : NR, MR, NR, k0 > 0, ws.edge.data(), tile);
          }
      }
      for (int64_t p = 0; p < m && !direct; ++p)
        store.run_channels(out.ptr<S>(), first + p * ldo, c + p * ldc, nj, gi * N + j0);
      if (stats) stats->add_rows(p0 / g.pixels(), rt % per_image, gi * N + j0, out.ptr<S>() + first, m, ldo, nj);
    }
  });
}

// ------------------------------------------------------------------------------------ input gradient

// Adds the block gcol[k, p] (rows [k0, k0 + nk) of the group, pixels [q0, q1) of the grid) into padded
// accumulator planes (channel k / taps - c_first): col2im restricted to one block. On the virtual grid
// each row is one contiguous add (its extra pixels carry zeros: grad_output was widened with zeros).
template <class T>
void scatter_block(const T* block, int64_t ld, const Geometry& g, int64_t k0, int64_t nk, int64_t c_first, int64_t q0,
                   int64_t q1, bool virtual_pixels, const std::vector<Run>& runs, T* acc, const PlaneLayout& l) {
  for (int64_t kk = 0; kk < nk; ++kk) {
    const int64_t k = k0 + kk - c_first * g.taps();
    const T* row = block + kk * ld;
    if (virtual_pixels) {
      T* dst = acc + k / g.taps() * l.plane + q0 + k % g.taps() / g.kw * g.dh * l.row + k % g.kw * g.dw;
      for (int64_t v = 0; v < q1 - q0; ++v) dst[v] += row[v];
      continue;
    }
    for (const Run& r : runs) {
      T* dst = acc + tap_offset(g, l, k, r);
      const T* src = row + r.offset;
      const int64_t step = l.phases == g.sw ? 1 : g.sw;
      for (int64_t t = 0; t < r.length; ++t) dst[t * step] += src[t];
    }
  }
}

// grad_output planes on the virtual grid: rows widened from out_w to wp with zeros (in thread scratch).
template <class S>
const compute_t<S>* widen_rows(const S* src, int64_t planes, const Geometry& g, int64_t wp, int nthreads) {
  using T = compute_t<S>;
  T* dst = scratch<T>(kOperandSlot, size_t(planes * g.out_h * wp));
  parallel_for(0, planes * g.out_h, 64, nthreads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* row = dst + r * wp;
      for (int64_t x = 0; x < g.out_w; ++x) row[x] = load(src[r * g.out_w + x]);
      std::fill(row + g.out_w, row + wp, T(0));
    }
  });
  return dst;
}

template <class S>
void input_grad_nchw(const TensorView& gout, const TensorView& w, const TensorView& gin, const Geometry& g,
                     int nthreads) {
  using T = compute_t<S>;
  const auto& kern = gemm::kernel(T{});
  const int64_t Kd = g.out_per_group(), cg = g.in_per_group(), taps = g.taps();
  const auto weights = pack_weights<S>(w, g, kern.mr, false, true);
  const bool virt = use_virtual_pixels(g);
  const PlaneLayout l = plane_layout(g, virt);
  const int64_t row_width = virt ? l.row : g.out_w, P = g.out_h * row_width;
  const T* widened = virt ? widen_rows(gout.ptr<S>(), g.batch * g.out_channels, g, l.row, nthreads) : nullptr;
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
      acc.assign(size_t((c1 - c0) * l.plane), T(0));
      for (int64_t q0 = 0; q0 < P; q0 += cols) {
        const int64_t q1 = std::min(P, q0 + cols), ldc = gemm::round_up(q1 - q0, kern.nr);
        ws.c.resize(size_t(gemm::round_up(m, kern.mr) * ldc));
        gemm::multiply(kern, m, q1 - q0, Kd,
            [&](int64_t i, int64_t k0, int64_t kc, T*) { return a.panel(c0 * taps + i, k0, kc); },
            [&](int64_t k0, int64_t kc, T* dst) {
              pack_rows(kern, kc, q1 - q0, dst, ws.row, [&](int64_t kk, T* buf) -> const T* {
                const int64_t p = first_plane + k0 + kk;
                if (virt) return widened + p * P + q0;
                return as_compute(gout.ptr<S>() + p * P + q0, q1 - q0, buf);
              });
              return static_cast<const T*>(dst);
            },
            ws, ws.c.data(), ldc);
        if (!virt) pixel_runs(g, q0, q1 - q0, runs);
        scatter_block(ws.c.data(), ldc, g, c0 * taps, m, c0, q0, q1, virt, runs, acc.data(), l);
      }
      for (int64_t c = c0; c < c1; ++c) {  // the interior of each padded plane
        S* dst = gin.ptr<S>() + n * gin.stride(0) + (gi * cg + c) * g.height * g.width;
        const T* src = acc.data() + (c - c0) * l.plane;
        for (int64_t h = 0; h < g.height; ++h)
          for (int64_t x = 0; x < g.width; ++x) dst[h * g.width + x] = from_compute<S>(src[l.at(h + g.ph, x + g.pw)]);
      }
    }
  });
}

// The input gradient of a stride-1 convolution is itself a forward convolution of grad_output:
//   gin[c, h, w] = sum_{o, i, j} gout[o, h + ph - i dh, w + pw - j dw] W[o, c, i, j]
//                = conv2d(gout, W', padding (kh - 1) dh - ph, (kw - 1) dw - pw)
// with W'[c, o, i, j] = W[o, c, kh - 1 - i, kw - 1 - j], the kernel transposed and flipped. The forward
// keeps each gin element's whole sum in one tile's registers and stores it once: no zeroed padded
// accumulator, no scatter-add of kh * kw column rows, no copy out (measured on the ResNet-50 layers: the
// 1x1 256->64 NCHW input gradient 13.1 -> 4 ms, channels_last 5.6 -> 3.6 ms, on 2 cores). Needs the
// new padding to be non-negative, which every 'same' or 'valid' convolution gives.
bool input_grad_as_forward(const Geometry& g) {
  return g.sh == 1 && g.sw == 1 && g.ph <= (g.kh - 1) * g.dh && g.pw <= (g.kw - 1) * g.dw;
}

Geometry transposed_geometry(const Geometry& g) {
  Geometry f = g;
  f.channels = g.out_channels, f.out_channels = g.channels, f.height = g.out_h, f.width = g.out_w;
  f.ph = (g.kh - 1) * g.dh - g.ph, f.pw = (g.kw - 1) * g.dw - g.pw, f.out_h = g.height, f.out_w = g.width;
  return f;
}

template <class S>
void input_grad_by_forward(const TensorView& gout, const TensorView& w, const TensorView& gin, const Geometry& g,
                           bool nhwc, int nthreads) {
  const Geometry f = transposed_geometry(g);
  const int64_t cg = g.in_per_group(), mg = g.out_per_group(), kh = g.kh, kw = g.kw;
  TensorView wt = w;  // W' as [C, Cout / groups, kh, kw]
  wt.sizes[0] = g.channels, wt.sizes[1] = mg;
  std::vector<S> copy;
  if (g.groups == 1) {  // a strided view of W itself: axes 0 and 1 swapped, taps read backwards
    wt.strides[0] = w.stride(1), wt.strides[1] = w.stride(0), wt.strides[2] = -w.stride(2), wt.strides[3] = -w.stride(3);
    wt.data = const_cast<S*>(w.ptr<S>() + (kh - 1) * w.stride(2) + (kw - 1) * w.stride(3));
  } else {  // group gi's rows of W' come from rows gi * mg.. of W: no single stride, so a copy
    copy.resize(size_t(g.channels * mg * kh * kw));
    for (int64_t c = 0; c < g.channels; ++c)
      for (int64_t o = 0; o < mg; ++o)
        for (int64_t t = 0; t < kh * kw; ++t)
          copy[size_t(((c * mg + o) * kh * kw) + t)] =
              w.ptr<S>()[(c / cg * mg + o) * w.stride(0) + c % cg * w.stride(1) + (kh - 1 - t / kw) * w.stride(2) +
                         (kw - 1 - t % kw) * w.stride(3)];
    wt.data = copy.data();
    wt.strides[0] = mg * kh * kw, wt.strides[1] = kh * kw, wt.strides[2] = kw, wt.strides[3] = 1;
  }
  if (nhwc)
    forward_nhwc<S>(gout, wt, Epilogue{}, gin, f, nthreads);
  else
    forward_nchw<S>(gout, wt, Epilogue{}, gin, f, nthreads);
}

// ----------------------------------------------------------------------------------- weight gradient

// gW[o, k] = sum over images and pixels of gout[o, p] * col[k, p]: both operands are contiguous along
// the sum, so the dot-product kernel reads them in place, gout rows (widened with zeros on the virtual
// grid) and column rows (runs of the padded image, or gathered on strided layers). No panel, no
// transpose. A task owns a block of gW's columns for all output channels of a group and sums over the
// whole batch itself: no reduction across threads, the same order every run.
template <class S>
void weight_grad_nchw(const TensorView& gout, const TensorView& x, const TensorView& gw, const Geometry& g,
                      int nthreads) {
  using T = compute_t<S>;
  const auto& kern = gemm::kernel(T{});
  const int64_t M = g.out_per_group(), K = g.in_per_group() * g.taps(), cg = g.in_per_group(), taps = g.taps();
  const bool virt = use_virtual_pixels(g);
  Padded<T> pad;
  make_padded<S>(x.ptr<S>(), g.batch * g.channels, g, plane_layout(g, virt), pad, nthreads);
  const PlaneLayout& l = pad.layout;
  const int64_t row_width = virt ? l.row : g.out_w, P = g.out_h * row_width;
  // gout on the GEMM's grid in the compute type (unless it already is)
  const T* grad = reinterpret_cast<const T*>(gout.ptr<S>());
  if (virt || !std::is_same<S, T>::value) grad = widen_rows(gout.ptr<S>(), g.batch * g.out_channels, g, row_width, nthreads);
  // Pixels per dot call (summed over several images when images are small): long enough that the lane
  // reductions cost little, short enough that the rows in use stay in L1 and L2.
  constexpr int64_t kLen = 2048;
  const int64_t len_max = std::min(P, kLen), images = std::max<int64_t>(1, std::min(g.batch, kLen / len_max));
  const std::vector<T> zeros(size_t(len_max), T(0));  // stands in for rows past the matrix edge
  const int64_t cols = chunk(K, kern.dn, K, g.groups, nthreads, 1);
  const int64_t col_tasks = (K + cols - 1) / cols, tasks = g.groups * col_tasks;
  parallel_for(0, tasks, 1, nthreads, [&](int64_t t0, int64_t t1) {
    std::vector<Run> runs;
    std::vector<T> c, gathered;
    std::vector<const T*> a_rows(size_t(images * kern.dm)), b_rows(size_t(images * kern.dn));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t ct = t % col_tasks, gi = t / col_tasks, j0 = ct * cols, j1 = std::min(K, j0 + cols);
      const int64_t ldc = gemm::round_up(j1 - j0, kern.dn);
      c.assign(size_t(gemm::round_up(M, kern.dm) * ldc), T(0));
      for (int64_t n0 = 0; n0 < g.batch; n0 += images) {
        const int64_t segments = std::min(images, g.batch - n0);
        for (int64_t v0 = 0; v0 < P; v0 += kLen) {
          const int64_t len = std::min(kLen, P - v0);
          if (!virt) pixel_runs(g, v0, len, runs);
          for (int64_t k = j0; k < j1; k += kern.dn) {
            for (int64_t s = 0; s < segments; ++s) {
              const T* planes = pad.at((n0 + s) * g.channels + gi * cg);
              for (int64_t jj = 0; jj < kern.dn; ++jj) {
                const int64_t kj = k + jj;
                const T*& row = b_rows[size_t(s * kern.dn + jj)];
                if (kj >= j1) {
                  row = zeros.data();
                } else if (virt) {
                  row = planes + kj / taps * l.plane + v0 + kj % taps / g.kw * g.dh * l.row + kj % g.kw * g.dw;
                } else {
                  gathered.resize(size_t(images * kern.dn * len_max));
                  T* dst = gathered.data() + (s * kern.dn + jj) * len_max;
                  gather_row(planes, l, g, kj, runs, dst);
                  row = dst;
                }
              }
            }
            for (int64_t o = 0; o < M; o += kern.dm) {
              for (int64_t s = 0; s < segments; ++s)
                for (int64_t ii = 0; ii < kern.dm; ++ii)
                  a_rows[size_t(s * kern.dm + ii)] =
                      o + ii < M ? grad + ((n0 + s) * g.out_channels + gi * M + o + ii) * P + v0 : zeros.data();
              kern.dot(segments, len, a_rows.data(), b_rows.data(), c.data() + o * ldc + (k - j0), ldc);
            }
          }
        }
      }
      for (int64_t o = 0; o < M; ++o) {
        S* dst = gw.ptr<S>() + (gi * M + o) * K + j0;
        for (int64_t j = 0; j < j1 - j0; ++j) dst[j] = from_compute<S>(c[size_t(o * ldc + j)]);
      }
    }
  });
}

// The 1x1 weight gradients' GEMM over the pixels, both layouts: the operand with more channels is A (the
// product's rows, split among row tasks), the smaller B (packed again by each row task). C[i, j] is
// gW[o, c] with (o, c) = (row, column) when A is grad_output, else (column, row).
template <class S>
struct OneByOneGemm {
  using T = compute_t<S>;
  std::vector<T> grad_copy, input_copy;  // reduced precision: converted once
  const T* grad;
  const T* input;
  bool grad_is_a;
  int64_t M, N, rows, row_tasks, tasks;

  OneByOneGemm(const TensorView& gout, const TensorView& x, const Geometry& g, int64_t mr, int nthreads)
      : grad(compute_copy<S>(gout, grad_copy, nthreads)), input(compute_copy<S>(x, input_copy, nthreads)),
        grad_is_a(g.out_per_group() >= g.in_per_group()),
        M(grad_is_a ? g.out_per_group() : g.in_per_group()), N(grad_is_a ? g.in_per_group() : g.out_per_group()),
        rows(chunk(M, mr, M, g.groups, nthreads, 1)), row_tasks((M + rows - 1) / rows), tasks(g.groups * row_tasks) {}

  struct Task {
    int64_t gi, r0, m;  // group, first GEMM row, rows
  };
  Task task(int64_t t) const {
    const int64_t r0 = t % row_tasks * rows;
    return {t / row_tasks, r0, std::min(rows, M - r0)};
  }

  void store(const TensorView& gw, const Geometry& g, int64_t gi, int64_t r0, int64_t m, const T* c, int64_t ldc) const {
    const int64_t cg = g.in_per_group(), mg = g.out_per_group();
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < N; ++j) {
        const int64_t o = grad_is_a ? r0 + i : j, ch = grad_is_a ? j : r0 + i;
        gw.ptr<S>()[(gi * mg + o) * cg + ch] = from_compute<S>(c[size_t(i * ldc + j)]);
      }
  }
};

// The NCHW weight gradient of a 1x1 stride-1 convolution as a GEMM over the pixels: gW[o, c] = sum over images
// and pixels of gout[o, p] x[c, p], both operands rows contiguous along the sum. The operand with more
// channels is A (its MR-row panels transposed in registers by pack_a_rows), the other B (NR-row panels
// through the 8 x 8 transpose): each row task packs B again, so B is the smaller. The dot-product kernel
// this replaces re-read every row for each tile of dot products (ResNet-50's 1x1 64->256 at 56x56: 8.5 ms,
// oneDNN 4.0).
template <class S>
void weight_grad_nchw_1x1(const TensorView& gout, const TensorView& x, const TensorView& gw, const Geometry& g,
                          int nthreads) {
  using T = compute_t<S>;
  const auto& kern = gemm::kernel(T{});
  const OneByOneGemm<S> plan(gout, x, g, kern.mr, nthreads);
  const int64_t P = g.pixels(), cg = g.in_per_group(), mg = g.out_per_group(), M = plan.M, N = plan.N;
  parallel_for(0, plan.tasks, 1, nthreads, [&](int64_t t0, int64_t t1) {
    auto& ws = gemm::workspace<T>();
    thread_local std::vector<T> zeros(size_t(gemm::kKC), T(0));
    for (int64_t t = t0; t < t1; ++t) {
      const auto task = plan.task(t);  // named fields: lambdas below capture them (no structured bindings)
      const int64_t gi = task.gi, r0 = task.r0, m = task.m;
      const int64_t ldc = gemm::round_up(N, kern.nr);
      ws.c.assign(size_t(gemm::round_up(m, kern.mr) * ldc), T(0));
      for (int64_t n = 0; n < g.batch; ++n) {
        const T* grads = plan.grad + (n * g.out_channels + gi * mg) * P;
        const T* image = plan.input + (n * g.channels + gi * cg) * P;
        const T* a_rows = plan.grad_is_a ? grads : image;
        const T* b_rows = plan.grad_is_a ? image : grads;
        gemm::multiply(kern, m, N, P,
            [&](int64_t i, int64_t k0, int64_t kc, T* dst) {
              const T* panel_rows[16];
              for (int64_t ii = 0; ii < kern.mr; ++ii)
                panel_rows[ii] = r0 + i + ii < M ? a_rows + (r0 + i + ii) * P + k0 : zeros.data();
              kern.pack_a_rows(panel_rows, kc, dst);
              return static_cast<const T*>(dst);
            },
            [&](int64_t k0, int64_t kc, T* dst) {
              for (int64_t j0 = 0; j0 < N; j0 += kern.nr) {
                const int64_t len = std::min<int64_t>(kern.nr, N - j0);
                T* panel = dst + j0 * kc;
                transpose(b_rows + j0 * P + k0, P, len, kc, panel, kern.nr);
                if (len < kern.nr)
                  for (int64_t kk = 0; kk < kc; ++kk) std::fill(panel + kk * kern.nr + len, panel + (kk + 1) * kern.nr, T(0));
              }
              return static_cast<const T*>(dst);
            },
            ws, ws.c.data(), ldc, /*accumulate=*/true);
      }
      plan.store(gw, g, gi, r0, m, ws.c.data(), ldc);
    }
  });
}

// ------------------------------------------------------------------------- gradients, channels_last
// The same GEMMs with pixels as rows (NHWC keeps channels contiguous, so the panels pack channel runs):
//   input grad    gcol'[p, k'] = gout[p, o] . W'[k', o]^T, scattered into a padded NHWC accumulator
//   weight grad   gW'[k', o]  += col'[p, k']^T . gout[p, o]                  (k' = tap-major)

template <class S>
void input_grad_nhwc(const TensorView& gout, const TensorView& w, const TensorView& gin, const Geometry& g,
                     int nthreads) {
  using T = compute_t<S>;
  const auto& kern = gemm::kernel(T{});
  const int64_t Kd = g.out_per_group(), cg = g.in_per_group(), N = cg * g.taps(), P = g.pixels();
  const int64_t wp = g.width + 2 * g.pw, hp = g.height + 2 * g.ph;
  const auto weights = pack_weights<S>(w, g, kern.nr, true, true);
  std::vector<T> converted;
  const T* grads = compute_copy<S>(gout, converted, nthreads);
  const int64_t rows = std::max<int64_t>(kern.mr, gemm::round_up(std::min<int64_t>(P, 16384 / std::max<int64_t>(N, 1)), kern.mr));
  // A task owns one image and group: its scatter then needs no atomics.
  parallel_for(0, g.batch * g.groups, 1, nthreads, [&](int64_t t0, int64_t t1) {
    auto& ws = gemm::workspace<T>();
    std::vector<T> acc;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t gi = t % g.groups, n = t / g.groups;
      const T* grad = grads + n * gout.stride(0) + gi * Kd;
      acc.assign(size_t(hp * wp * cg), T(0));
      for (int64_t p0 = 0; p0 < P; p0 += rows) {
        const int64_t p1 = std::min(P, p0 + rows), ldc = gemm::round_up(N, kern.nr);
        ws.c.resize(size_t(gemm::round_up(p1 - p0, kern.mr) * ldc));
        gemm::multiply(kern, p1 - p0, N, Kd,
            [&](int64_t i, int64_t k0, int64_t kc, T* dst) {  // gout pixel rows, transposed into the panel
              thread_local std::vector<T> zeros(size_t(gemm::kKC), T(0));
              const T* pixel_rows[16];
              for (int64_t ii = 0; ii < kern.mr; ++ii)
                pixel_rows[ii] = p0 + i + ii < p1 ? grad + (p0 + i + ii) * g.out_channels + k0 : zeros.data();
              kern.pack_a_rows(pixel_rows, kc, dst);
              return static_cast<const T*>(dst);
            },
            [&](int64_t k0, int64_t kc, T*) { return weights[size_t(gi)].panel(0, k0, kc); },
            ws, ws.c.data(), ldc);
        for (int64_t p = p0; p < p1; ++p) {  // col2im of the block: one channel run per tap
          const int64_t oh = p / g.out_w, ow = p % g.out_w;
          const T* row = ws.c.data() + (p - p0) * ldc;
          for (int64_t tap = 0; tap < g.taps(); ++tap) {
            T* dst = acc.data() + ((oh * g.sh + tap / g.kw * g.dh) * wp + ow * g.sw + tap % g.kw * g.dw) * cg;
            const T* src = row + tap * cg;
            for (int64_t c = 0; c < cg; ++c) dst[c] += src[c];
          }
        }
      }
      for (int64_t h = 0; h < g.height; ++h)
        for (int64_t x = 0; x < g.width; ++x) {
          S* dst = gin.ptr<S>() + n * gin.stride(0) + (h * g.width + x) * g.channels + gi * cg;
          const T* src = acc.data() + ((h + g.ph) * wp + x + g.pw) * cg;
          for (int64_t c = 0; c < cg; ++c) dst[c] = from_compute<S>(src[c]);
        }
    }
  });
}

// A panel of the channels_last weight gradient: rows k' = tap * cg + c in [k, k + mr) (zeros past M) of the
// column matrix, for pixels [p0, p0 + kc): dst[kk * mr + ii] = image[ih, iw, c] or 0 in the padding. The
// rows split into runs of channels of one tap, found once per panel; pixels step through (oh, ow) without
// a division, so a pixel costs a bounds test and a copy of its run per tap.
template <class S>
void pack_column_panel(const S* image, const Geometry& g, int64_t k, int64_t M, int64_t mr, int64_t p0, int64_t kc,
                       compute_t<S>* dst) {
  using T = compute_t<S>;
  struct Segment { int64_t ii, dy, dx, c, run; };
  Segment segments[32];
  int count = 0;
  const int64_t cg = g.in_per_group();
  for (int64_t ii = 0; ii < mr && k + ii < M;) {
    const int64_t kk = k + ii, tap = kk / cg, c = kk % cg, run = std::min<int64_t>(mr - ii, cg - c);
    segments[count++] = {ii, tap / g.kw * g.dh - g.ph, tap % g.kw * g.dw - g.pw, c, std::min(run, M - kk)};
    ii += run;
  }
  const int64_t valid = count ? segments[count - 1].ii + segments[count - 1].run : 0;
  int64_t oh = p0 / g.out_w, ow = p0 % g.out_w;
  for (int64_t kk = 0; kk < kc; ++kk) {
    T* a = dst + kk * mr;
    for (int q = 0; q < count; ++q) {
      const Segment& s = segments[q];
      const int64_t ih = oh * g.sh + s.dy, iw = ow * g.sw + s.dx;
      if (ih < 0 || ih >= g.height || iw < 0 || iw >= g.width) {
        std::fill(a + s.ii, a + s.ii + s.run, T(0));
      } else {
        const S* src = image + (ih * g.width + iw) * g.channels + s.c;
        for (int64_t r = 0; r < s.run; ++r) a[s.ii + r] = load(src[r]);
      }
    }
    std::fill(a + valid, a + mr, T(0));
    if (++ow == g.out_w) ow = 0, ++oh;
  }
}

// The channels_last weight gradient of a 1x1 stride-1 convolution, the same GEMM over the pixels on pixel
// rows: the A side (the operand with more channels) is read in place by the micro-kernel (tile_strided: MR
// channels of each pixel row), the B side packed per depth block, so nothing is laid out first (the
// relayout of weight_grad_stride1 cost ResNet-50's 1x1 256->64 about 2 of its 5.5 ms). A last, partial
// panel of A rows is packed with zeros so no read passes the tensor's end.
template <class S>
void weight_grad_nhwc_1x1(const TensorView& gout, const TensorView& x, const TensorView& gw, const Geometry& g,
                          int nthreads) {
  using T = compute_t<S>;
  const auto& kern = gemm::kernel(T{});
  const OneByOneGemm<S> plan(gout, x, g, kern.mr, nthreads);
  const int64_t P = g.pixels(), cg = g.in_per_group(), mg = g.out_per_group(), mr = kern.mr, nr = kern.nr, N = plan.N;
  const int64_t lda = plan.grad_is_a ? g.out_channels : g.channels, ldb = plan.grad_is_a ? g.channels : g.out_channels;
  parallel_for(0, plan.tasks, 1, nthreads, [&](int64_t t0, int64_t t1) {
    auto& ws = gemm::workspace<T>();
    for (int64_t t = t0; t < t1; ++t) {
      const auto task = plan.task(t);
      const int64_t gi = task.gi, r0 = task.r0, m = task.m;
      const int64_t ldc = gemm::round_up(N, nr), n_panels = ldc / nr, full = m / mr * mr;
      ws.c.assign(size_t(gemm::round_up(m, mr) * ldc), T(0));
      ws.b.resize(size_t(ldc * gemm::kKC));
      ws.a.resize(size_t(mr * gemm::kKC));
      for (int64_t n = 0; n < g.batch; ++n) {
        const T* grads = plan.grad + n * P * g.out_channels + gi * mg;
        const T* image = plan.input + n * P * g.channels + gi * cg;
        const T* a_rows = (plan.grad_is_a ? grads : image) + r0;
        const T* b_rows = plan.grad_is_a ? image : grads;
        for (int64_t k0 = 0; k0 < P; k0 += gemm::kKC) {
          const int64_t kc = std::min(gemm::kKC, P - k0);
          pack_rows(kern, kc, N, ws.b.data(), ws.row, [&](int64_t kk, T*) { return b_rows + (k0 + kk) * ldb; });
          for (int64_t kk = 0; full < m && kk < kc; ++kk)  // the partial panel, zero-padded
            for (int64_t ii = 0; ii < mr; ++ii)
              ws.a[size_t(kk * mr + ii)] = full + ii < m ? a_rows[(k0 + kk) * lda + full + ii] : T(0);
          for (int64_t jp = 0; jp < n_panels; ++jp) {  // each B panel stays in L1 while A streams past it
            const T* b = ws.b.data() + jp * nr * kc;
            for (int64_t i = 0; i < full; i += mr)
              kern.tile_strided(kc, a_rows + k0 * lda + i, lda, 1, b, nr, ws.c.data() + i * ldc + jp * nr, ldc, true);
            if (full < m) kern.tile(kc, ws.a.data(), b, ws.c.data() + full * ldc + jp * nr, ldc, true);
          }
        }
      }
      plan.store(gw, g, gi, r0, m, ws.c.data(), ldc);
    }
  });
}

template <class S>
void weight_grad_nhwc(const TensorView& gout, const TensorView& x, const TensorView& gw, const Geometry& g,
                      int nthreads) {
  using T = compute_t<S>;
  const auto& kern = gemm::kernel(T{});
  const int64_t M = g.in_per_group() * g.taps(), N = g.out_per_group(), P = g.pixels(), cg = g.in_per_group();
  // A task owns a block of gW' rows (k') of a group and sums over the whole batch itself: no reduction
  // across threads, the same order every run.
  const int64_t rows = chunk(M, kern.mr, M, g.groups, nthreads, 1);
  const int64_t row_tasks = (M + rows - 1) / rows, tasks = g.groups * row_tasks;
  parallel_for(0, tasks, 1, nthreads, [&](int64_t t0, int64_t t1) {
    auto& ws = gemm::workspace<T>();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t rt = t % row_tasks, gi = t / row_tasks, r0 = rt * rows, m = std::min(rows, M - r0);
      const int64_t ldc = gemm::round_up(N, kern.nr);
      ws.c.assign(size_t(gemm::round_up(m, kern.mr) * ldc), T(0));
      for (int64_t n = 0; n < g.batch; ++n) {
        const S* image = x.ptr<S>() + n * x.stride(0) + gi * cg;
        const S* grad = gout.ptr<S>() + n * gout.stride(0) + gi * N;
        gemm::multiply(kern, m, N, P,
            [&](int64_t i, int64_t k0, int64_t kc, T* dst) {  // MR column entries k' per pixel
              pack_column_panel(image, g, r0 + i, M, kern.mr, k0, kc, dst);
              return static_cast<const T*>(dst);
            },
            [&](int64_t k0, int64_t kc, T* dst) {  // gout pixel rows: NR channels at a time
              pack_rows(kern, kc, N, dst, ws.row,
                        [&](int64_t kk, T* buf) { return as_compute(grad + (k0 + kk) * g.out_channels, N, buf); });
              return static_cast<const T*>(dst);
            },
            ws, ws.c.data(), ldc, /*accumulate=*/true);
      }
      for (int64_t i = 0; i < m; ++i) {  // gW'[k', o] -> gW[o, c, tap]
        const int64_t k = r0 + i, tap = k / cg, c = k % cg;
        for (int64_t o = 0; o < N; ++o)
          gw.ptr<S>()[((gi * N + o) * cg + c) * g.taps() + tap] = from_compute<S>(ws.c[size_t(i * ldc + o)]);
      }
    }
  });
}

// The weight gradient of a stride-1 convolution, without an im2col, for either layout (element (pixel,
// channel) of x and gout at pixel * pix + channel * ch). The input of each image and group is laid out once
// as A panels over the padded pixel grid: relaid[q][pixel][ii] = x[pixel][q * MR
// + ii] (channel block q, zeros in the padding and past the last channel). On the virtual grid (out_h rows
// of wp pixels, as the NCHW kernels use) tap (i, j) of pixel v reads padded pixel v + i dh wp + j dw, so the
// A panel of GEMM rows (tap, q) for pixels [k0, k0 + kc) is the contiguous slice of channel block q from
// that offset: nothing is packed per tap (packing the kh kw times larger column matrix cost the im2col's
// copy, about half of this gradient's time). gout rows are packed as B, zeros for the virtual pixels, so
// those add nothing. GEMM rows are tap * cgp + c with cg padded to cgp, a multiple of MR (rows past cg
// compute zeros and are dropped).
// Where weight_grad_stride1 runs: stride 1 (1x1 layers without padding take weight_grad_nchw_1x1 or _nhwc_1x1).
bool weight_grad_without_im2col(const Geometry& g) { return g.sh == 1 && g.sw == 1; }

template <class S>
void weight_grad_stride1(const TensorView& gout, const TensorView& x, const TensorView& gw, const Geometry& g,
                         bool nhwc, int nthreads) {
  using T = compute_t<S>;
  const int64_t x_pix = nhwc ? g.channels : 1, x_ch = nhwc ? 1 : g.height * g.width;
  const int64_t g_pix = nhwc ? g.out_channels : 1, g_ch = nhwc ? 1 : g.pixels();
  const auto& kern = gemm::kernel(T{});
  const int64_t mr = kern.mr, cg = g.in_per_group(), cgp = gemm::round_up(cg, mr), blocks = cgp / mr;
  const int64_t N = g.out_per_group(), taps = g.taps(), M = taps * cgp;
  const int64_t wp = g.width + 2 * g.pw, P = g.out_h * wp;
  // Padded pixels, and the (kw - 1) dw that the last virtual pixels read past the last row.
  const int64_t span = (g.height + 2 * g.ph) * wp + (g.kw - 1) * g.dw;
  T* const relaid = scratch<T>(kOperandSlot, size_t(g.batch * g.groups * blocks * span * mr));
  const int64_t hp = g.height + 2 * g.ph;
  // One padded row of one image and group at a time, each pixel's channels read once, in order.
  parallel_for(0, g.batch * g.groups * hp, 8, nthreads, [&](int64_t r0, int64_t r1) {
    for (int64_t rr = r0; rr < r1; ++rr) {
      const int64_t r = rr % hp, ng = rr / hp, n = ng / g.groups, gi = ng % g.groups, h = r - g.ph;
      T* base = relaid + ng * blocks * span * mr + r * wp * mr;
      const int64_t end = r + 1 == hp ? span - r * wp : wp;  // the last row also zeroes the slack after it
      for (int64_t q = 0; q < blocks; ++q) {
        T* row = base + q * span * mr;
        if (h < 0 || h >= g.height) {
          std::fill(row, row + end * mr, T(0));
        } else {
          std::fill(row, row + g.pw * mr, T(0));
          std::fill(row + (g.pw + g.width) * mr, row + end * mr, T(0));
        }
      }
      if (h < 0 || h >= g.height) continue;
      const S* src = x.ptr<S>() + n * x.stride(0) + h * g.width * x_pix + gi * cg * x_ch;
      for (int64_t w = 0; w < g.width; ++w, src += x_pix) {
        T* dst = base + (g.pw + w) * mr;
        for (int64_t q = 0; q < blocks; ++q, dst += span * mr) {
          const int64_t c0 = q * mr;
          if (c0 + mr <= cg) {
            for (int64_t ii = 0; ii < mr; ++ii) dst[ii] = load(src[(c0 + ii) * x_ch]);
          } else {
            for (int64_t ii = 0; ii < mr; ++ii) dst[ii] = c0 + ii < cg ? load(src[(c0 + ii) * x_ch]) : T(0);
          }
        }
      }
    }
  });
  // gout as B panels, packed once for every row task: pixel rows of each image and group, zeros for the
  // virtual pixels; depth block k0 of image-group ng at ng * P * ldc + k0 * ldc.
  const int64_t ldc = gemm::round_up(N, kern.nr), kblocks = (P + gemm::kKC - 1) / gemm::kKC;
  T* const panels = scratch<T>(kPanelSlot, size_t(g.batch * g.groups * P * ldc));
  parallel_for(0, g.batch * g.groups * kblocks, 1, nthreads, [&](int64_t u0, int64_t u1) {
    auto& ws = gemm::workspace<T>();
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t ng = u / kblocks, k0 = u % kblocks * gemm::kKC, kc = std::min(gemm::kKC, P - k0);
      const S* grad = gout.ptr<S>() + ng / g.groups * gout.stride(0) + ng % g.groups * N * g_ch;
      pack_rows(kern, kc, N, panels + (ng * P + k0) * ldc, ws.row, [&](int64_t kk, T* buf) -> const T* {
        const int64_t oh = (k0 + kk) / wp, ow = (k0 + kk) % wp;
        if (ow >= g.out_w) {
          std::fill_n(buf, N, T(0));
          return buf;
        }
        const S* src = grad + (oh * g.out_w + ow) * g_pix;
        if (g_ch == 1) return as_compute(src, N, buf);
        for (int64_t j = 0; j < N; ++j) buf[j] = load(src[j * g_ch]);
        return buf;
      });
    }
  });
  // A task owns a block of GEMM rows of a group and sums over the whole batch itself (as weight_grad_nhwc),
  // image after image into its C block. On small images (under 128 pixels of products each, as 7x7 maps
  // and the stride phases of 14x14 ones) each image's pass over C costs more than its products, so C is
  // cut to ~512 KB a task, which L2 keeps across the batch (measured on ResNet-50's 3x3/2 at 14x14: 35-41
  // -> 20-22 ms); larger images keep one C block of all of a thread's rows (smaller blocks re-read the
  // other operands more: 14x14's 3x3, 10 -> 11-13 ms).
  const int64_t cap = P < 128 ? 131072 : M * ldc;
  const int64_t rounds = std::max<int64_t>(1, (M * ldc + nthreads * cap - 1) / (nthreads * cap));
  const int64_t rows = chunk(M, mr, (M + nthreads * rounds - 1) / (nthreads * rounds), g.groups, nthreads, 1);
  const int64_t row_tasks = (M + rows - 1) / rows, tasks = g.groups * row_tasks;
  parallel_for(0, tasks, 1, nthreads, [&](int64_t t0, int64_t t1) {
    auto& ws = gemm::workspace<T>();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t rt = t % row_tasks, gi = t / row_tasks, r0 = rt * rows, m = std::min(rows, M - r0);
      ws.c.assign(size_t(m * ldc), T(0));
      for (int64_t n = 0; n < g.batch; ++n) {
        const T* image = relaid + (n * g.groups + gi) * blocks * span * mr;
        const T* grad_panels = panels + (n * g.groups + gi) * P * ldc;
        gemm::multiply(kern, m, N, P,
            [&](int64_t i, int64_t k0, int64_t, T*) {
              const int64_t r = r0 + i, tap = r / cgp;
              return image + (r % cgp / mr * span + k0 + tap / g.kw * g.dh * wp + tap % g.kw * g.dw) * mr;
            },
            [&](int64_t k0, int64_t, T*) { return grad_panels + k0 * ldc; },
            ws, ws.c.data(), ldc, /*accumulate=*/true, gemm::NoHook{}, /*a_stored=*/true);
      }
      for (int64_t i = 0; i < m; ++i) {  // GEMM row (tap, c) -> gW[o, c, tap]
        const int64_t r = r0 + i, tap = r / cgp, c = r % cgp;
        if (c >= cg) continue;
        for (int64_t o = 0; o < N; ++o)
          gw.ptr<S>()[((gi * N + o) * cg + c) * taps + tap] = from_compute<S>(ws.c[size_t(i * ldc + o)]);
      }
    }
  });
}

// The epilogue's residual and ReLU after a kernel that stores conv + bias itself (the depthwise one):
// a second pass and a second rounding, where the GEMM path fuses them.
void apply_residual_relu(const TensorView& out, const Epilogue& e, int nthreads) {
  dispatch_floating(out.dtype, "output", [&](auto tag) {
    using S = decltype(tag);
    const Store<S> store(e);
    parallel_for(0, out.numel(), 1 << 16, nthreads,
                 [&](int64_t i0, int64_t i1) { store.finish_in_place(out.ptr<S>(), i0, i1 - i0); });
  });
}

void check_stats(const Epilogue& e, const TensorView& out, const Geometry& g, bool nhwc) {
  check_arg(e.mean && e.var, "mean and var must be given together");
  check_arg((nhwc || out.numel() == 0) && !is_depthwise(g),
            "mean and var: the statistics come from the channels_last GEMM's tiles only");
  const DType stats = out.dtype == DType::Float64 ? DType::Float64 : DType::Float32;
  for (const auto& [t, name] : {std::pair{e.mean, "mean"}, std::pair{e.var, "var"}}) {
    check_shape(*t, name, {g.out_channels});
    check_dtype(*t, name, stats);
    check_device(*t, name, DeviceType::CPU);
    check_contiguous(*t, name);
  }
}

// Multiply-adds of the convolution (each pass, forward or gradient, does as many): what decides how
// many threads are worth waking.
int64_t conv_macs(const Geometry& g) {
  return g.batch * g.out_channels * g.pixels() * g.in_per_group() * g.taps();
}

}  // namespace

void conv2d_forward_cpu(const TensorView& input, const TensorView& weight, const Epilogue& epilogue,
                        const TensorView& output, const Geometry& g, int nthreads) {
  check_conv2d_args(g, &input, weight, epilogue.bias, &output, DeviceType::CPU);
  nthreads = threads_for(conv_macs(g), nthreads);
  if (epilogue.residual) {
    const TensorView& r = *epilogue.residual;
    check_shape(r, "residual", {g.batch, g.out_channels, g.out_h, g.out_w});
    check_dtype(r, "residual", output.dtype);
    check_device(r, "residual", DeviceType::CPU);
    for (int d = 0; d < 4; ++d)
      check_arg(r.size(d) == 1 || r.stride(d) == output.stride(d), "residual must have the output's memory format");
  }
  const bool nhwc = nhwc_layout(input) || nhwc_layout(output);
  if (epilogue.mean || epilogue.var) check_stats(epilogue, output, g, nhwc);
  if (is_depthwise(g)) {
    depthwise_forward_cpu(input, weight, epilogue.bias, output, g, nthreads);
    if (epilogue.residual || epilogue.relu) apply_residual_relu(output, epilogue, nthreads);
    return;
  }
  OutputMoments moments;
  if (output.numel())
    dispatch_floating(input.dtype, "input", [&](auto tag) {
      using S = decltype(tag);
      if (nhwc)
        forward_nhwc<S>(input, weight, epilogue, output, g, nthreads, epilogue.mean ? &moments : nullptr);
      else
        forward_nchw<S>(input, weight, epilogue, output, g, nthreads);
    });
  if (epilogue.mean && output.numel()) moments.finish(*epilogue.mean, *epilogue.var, nthreads);
  if (epilogue.mean && !output.numel())  // no values: undefined statistics, as batch norm's
    for (const TensorView* t : {epilogue.mean, epilogue.var})
      for (int64_t c = 0; c < g.out_channels; ++c) {
        if (t->dtype == DType::Float64)
          t->ptr<double>()[c] = std::numeric_limits<double>::quiet_NaN();
        else
          t->ptr<float>()[c] = std::numeric_limits<float>::quiet_NaN();
      }
}

void conv2d_input_grad_cpu(const TensorView& grad_output, const TensorView& weight, const TensorView& grad_input,
                           const Geometry& g, int nthreads) {
  check_conv2d_args(g, &grad_input, weight, nullptr, &grad_output, DeviceType::CPU);
  nthreads = threads_for(conv_macs(g), nthreads);
  if (is_depthwise(g)) {  // either layout
    depthwise_input_grad_cpu(grad_output, weight, grad_input, g, nthreads);
    return;
  }
  if (grad_input.numel() == 0) return;
  const bool nhwc = nhwc_layout(grad_input) || nhwc_layout(grad_output);
  dispatch_floating(grad_output.dtype, "grad_output", [&](auto tag) {
    using S = decltype(tag);
    if (input_grad_as_forward(g))
      input_grad_by_forward<S>(grad_output, weight, grad_input, g, nhwc, nthreads);
    else if (nhwc)
      input_grad_nhwc<S>(grad_output, weight, grad_input, g, nthreads);
    else
      input_grad_nchw<S>(grad_output, weight, grad_input, g, nthreads);
  });
}

void conv2d_weight_grad_cpu(const TensorView& grad_output, const TensorView& input, const TensorView& grad_weight,
                            const Geometry& g, int nthreads) {
  check_conv2d_args(g, &input, grad_weight, nullptr, &grad_output, DeviceType::CPU);
  nthreads = threads_for(conv_macs(g), nthreads);
  check_arg(grad_weight.is_contiguous(), "grad_weight must be contiguous");
  if (is_depthwise(g)) {  // either layout
    depthwise_weight_grad_cpu(grad_output, input, grad_weight, g, nthreads);
    return;
  }
  const bool nhwc = nhwc_layout(input) || nhwc_layout(grad_output);
  dispatch_floating(grad_output.dtype, "grad_output", [&](auto tag) {
    using S = decltype(tag);
    if (input.numel() == 0 || grad_output.numel() == 0) {
      for (int64_t e = 0; e < grad_weight.numel(); ++e) grad_weight.ptr<S>()[e] = from_compute<S>(compute_t<S>(0));
      return;
    }
    const bool plain_1x1 = g.taps() == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0;
    if (plain_1x1 && nhwc)
      weight_grad_nhwc_1x1<S>(grad_output, input, grad_weight, g, nthreads);
    else if (plain_1x1)
      weight_grad_nchw_1x1<S>(grad_output, input, grad_weight, g, nthreads);
    else if (weight_grad_without_im2col(g))
      weight_grad_stride1<S>(grad_output, input, grad_weight, g, nhwc, nthreads);
    else if (nhwc)
      weight_grad_nhwc<S>(grad_output, input, grad_weight, g, nthreads);
    else
      weight_grad_nchw<S>(grad_output, input, grad_weight, g, nthreads);
  });
}

}  // namespace fastcv
