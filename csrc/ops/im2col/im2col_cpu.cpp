// CPU im2col / col2im. im2col writes each column row (one channel, one kernel offset) as runs: for
// stride 1 a row of the output is a shifted copy of an input row (memcpy-like, vectorised) with zeros
// where it falls into the padding. Threads over (image, channel) planes; col2im likewise owns planes,
// so it needs no atomics and is deterministic.
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/check.h"
#include "common/dtype.h"
#include "common/memory.h"
#include "common/parallel.h"
#include "ops/im2col/im2col_ops.h"

namespace fastcv {
namespace {

using im2col::Geometry;

// The output columns [ow0, ow1) whose input column iw = ow * sw + offset lies in [0, width).
void valid_range(int64_t out_w, int64_t sw, int64_t offset, int64_t width, int64_t& ow0, int64_t& ow1) {
  // iw >= 0  <=>  ow >= ceil(-offset / sw);  iw < width  <=>  ow < ceil((width - offset) / sw)
  const auto ceil_div = [](int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); };
  ow0 = std::clamp<int64_t>(ceil_div(-offset, sw), 0, out_w);
  ow1 = std::clamp<int64_t>(ceil_div(width - offset, sw), ow0, out_w);
}

template <class S>
void im2col_plane(const S* plane, const Geometry& g, S* rows) {  // one (image, channel): kh*kw rows
  const int64_t L = g.out_h * g.out_w;
  const S zero = from_compute<S>(compute_t<S>(0));
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) {
      S* row = rows + (i * g.kw + j) * L;
      const int64_t x_offset = j * g.dw - g.pw;
      int64_t ow0, ow1;
      valid_range(g.out_w, g.sw, x_offset, g.width, ow0, ow1);
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        S* out = row + oh * g.out_w;
        const int64_t ih = oh * g.sh - g.ph + i * g.dh;
        if (ih < 0 || ih >= g.height) {
          std::fill(out, out + g.out_w, zero);
          continue;
        }
        const S* in = plane + ih * g.width + x_offset;
        std::fill(out, out + ow0, zero);
        if (g.sw == 1)
          std::memcpy(out + ow0, in + ow0, size_t(ow1 - ow0) * sizeof(S));
        else
          for (int64_t ow = ow0; ow < ow1; ++ow) out[ow] = in[ow * g.sw];
        std::fill(out + ow1, out + g.out_w, zero);
      }
    }
}

template <class S>
void col2im_plane(const S* rows, const Geometry& g, S* plane, std::vector<compute_t<S>>& acc) {
  using T = compute_t<S>;
  const int64_t L = g.out_h * g.out_w;
  acc.assign(size_t(g.height * g.width), T(0));  // sums in the compute type, rounded once
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) {
      const S* row = rows + (i * g.kw + j) * L;
      const int64_t x_offset = j * g.dw - g.pw;
      int64_t ow0, ow1;
      valid_range(g.out_w, g.sw, x_offset, g.width, ow0, ow1);
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        const int64_t ih = oh * g.sh - g.ph + i * g.dh;
        if (ih < 0 || ih >= g.height) continue;
        const S* in = row + oh * g.out_w;
        T* out = acc.data() + ih * g.width + x_offset;
        for (int64_t ow = ow0; ow < ow1; ++ow) out[ow * g.sw] += to_float(in[ow]);
      }
    }
  for (int64_t p = 0; p < g.height * g.width; ++p) plane[p] = from_compute<S>(acc[size_t(p)]);
}

}  // namespace

void im2col_cpu(const TensorView& image, const Geometry& g, const TensorView& columns, int nthreads) {
  check_im2col_args(image, g, columns, DeviceType::CPU);
  const int64_t planes = image.size(0) * g.channels, plane = g.height * g.width;
  const int64_t rows = g.kh * g.kw * g.out_h * g.out_w;
  advise_huge_pages(columns.data, size_t(columns.numel() * dtype_size(columns.dtype)));  // kh*kw x the input
  nthreads = threads_for(columns.numel(), nthreads);
  dispatch_floating(image.dtype, "input", [&](auto tag) {
    using S = decltype(tag);
    // Each thread one contiguous share of the planes (planes handed out one at a time interleaved the threads'
    // writes: [8,64,56,56] 3x3 7.3 -> 5.9 ms).
    // Streaming (non-temporal) stores were tried: 3.9 -> 1.9 ms into a kept buffer, but 7 -> 10 ms into the
    // fresh pages every call gets (torch.empty of tens of MB maps new memory; the kernel's zeroing leaves
    // its lines in cache for ordinary stores to hit), so ordinary stores stay.
    parallel_for(0, planes, contiguous_share(planes, nthreads), nthreads, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) im2col_plane(image.ptr<S>() + p * plane, g, columns.ptr<S>() + p * rows);
    });
  });
}

void col2im_cpu(const TensorView& columns, const Geometry& g, const TensorView& image, int nthreads) {
  check_im2col_args(image, g, columns, DeviceType::CPU);
  const int64_t planes = image.size(0) * g.channels, plane = g.height * g.width;
  const int64_t rows = g.kh * g.kw * g.out_h * g.out_w;
  nthreads = threads_for(columns.numel(), nthreads);
  dispatch_floating(image.dtype, "input", [&](auto tag) {
    using S = decltype(tag);
    parallel_for(0, planes, 1, nthreads, [&](int64_t p0, int64_t p1) {
      std::vector<compute_t<S>> acc;
      for (int64_t p = p0; p < p1; ++p) col2im_plane(columns.ptr<S>() + p * rows, g, image.ptr<S>() + p * plane, acc);
    });
  });
}

}  // namespace fastcv
