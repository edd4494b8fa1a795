#pragma once
// Per-element arithmetic of the depthwise convolution (groups == channels; output channel o = c * M + m
// of the M = out_channels / channels per input channel reads input channel c only), shared by the CPU
// kernels (borders, and the ranges of their vector loops) and the CUDA kernels (everywhere): the CPU
// tests then exercise the GPU arithmetic too.
//
// Summation order, which every kernel keeps so that results do not depend on the path taken:
//   output pixel:   taps in row-major order (i, then j), taps in the padding skipped; bias added last
//   input gradient: the channel's M output planes in order, then the taps as above
// Planes are addressed through element strides, so one function serves NCHW and NHWC.
#include <cstdint>

#include "common/dtype.h"
#include "common/macros.h"
#include "ops/conv2d/conv2d.h"

namespace fastcv {
namespace depthwise {

using conv2d::Geometry;

// The outputs q in [lo, hi) of an axis of `out` positions whose tap at `offset` (k * dilation -
// padding) reads inside the input: 0 <= q * stride + offset < size. lo == hi when there are none.
FASTCV_HD void tap_outputs(int64_t size, int64_t out, int64_t stride, int64_t offset, int64_t& lo, int64_t& hi) {
  lo = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  hi = size - offset <= 0 ? 0 : (size - 1 - offset) / stride + 1;
  if (hi > out) hi = out;
  if (lo > hi) lo = hi;
}

// The output position that tap k of an axis connects to input position p, or -1 if none:
// p = q * stride - padding + k * dilation with 0 <= q < out.
FASTCV_HD int64_t tap_source(int64_t p, int64_t k, int64_t stride, int64_t padding, int64_t dilation, int64_t out) {
  const int64_t v = p + padding - k * dilation;
  if (v < 0 || v % stride != 0) return -1;
  const int64_t q = v / stride;
  return q < out ? q : -1;
}

// The kernel indices k in [lo, hi) of an axis whose tap reads inside the input, for a window that
// starts at input position `start` (q * stride - padding): 0 <= start + k * dilation < size.
FASTCV_HD void kernel_taps(int64_t start, int64_t size, int64_t dilation, int64_t kernel, int64_t& lo, int64_t& hi) {
  lo = start >= 0 ? 0 : (-start + dilation - 1) / dilation;
  hi = start >= size ? 0 : (size - 1 - start) / dilation + 1;
  if (hi > kernel) hi = kernel;
  if (lo > hi) lo = hi;
}

// Output pixel (oh, ow) of one plane before the bias, in the compute type T. x: the input plane,
// element (h, w) at x[h * xh + w * xw]; wt: the output channel's kernel, tap (i, j) at wt[i * wi + j * wj].
template <class T, class S, class W>
FASTCV_HD T output_pixel(const S* x, int64_t xh, int64_t xw, const W* wt, int64_t wi, int64_t wj, const Geometry& g,
                         int64_t oh, int64_t ow) {
  const int64_t h0 = oh * g.sh - g.ph, w0 = ow * g.sw - g.pw;
  int64_t i0, i1, j0, j1;  // the taps inside the image
  kernel_taps(h0, g.height, g.dh, g.kh, i0, i1);
  kernel_taps(w0, g.width, g.dw, g.kw, j0, j1);
  T acc = T(0);
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t j = j0; j < j1; ++j)
      acc += T(to_float(wt[i * wi + j * wj])) * T(to_float(x[(h0 + i * g.dh) * xh + (w0 + j * g.dw) * xw]));
  return acc;
}

// The input gradient at (h, w) of one input channel, in the compute type T. go: the channel's first
// grad_output plane, element (oh, ow) of plane m at go[m * gm + oh * gh + ow * gw]; wt: the kernel of
// that plane's output channel, tap (i, j) of plane m at wt[m * wm + i * wi + j * wj]; mult: M.
template <class T, class S, class W>
FASTCV_HD T input_grad_pixel(const S* go, int64_t gm, int64_t gh, int64_t gw, const W* wt, int64_t wm, int64_t wi,
                             int64_t wj, int64_t mult, const Geometry& g, int64_t h, int64_t w) {
  T acc = T(0);
  for (int64_t m = 0; m < mult; ++m)
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t oh = tap_source(h, i, g.sh, g.ph, g.dh, g.out_h);
      if (oh < 0) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t ow = tap_source(w, j, g.sw, g.pw, g.dw, g.out_w);
        if (ow < 0) continue;
        acc += T(to_float(wt[m * wm + i * wi + j * wj])) * T(to_float(go[m * gm + oh * gh + ow * gw]));
      }
    }
  return acc;
}

// One term of the weight gradient of tap (i, j): grad_output at (oh, ow) times the input the tap
// reads there (zero in the padding). go, x: one image's planes of the output channel and its input
// channel, addressed as above.
template <class T, class S>
FASTCV_HD T weight_grad_term(const S* go, int64_t gh, int64_t gw, const S* x, int64_t xh, int64_t xw,
                             const Geometry& g, int64_t i, int64_t j, int64_t oh, int64_t ow) {
  const int64_t ih = oh * g.sh - g.ph + i * g.dh, iw = ow * g.sw - g.pw + j * g.dw;
  if (ih < 0 || ih >= g.height || iw < 0 || iw >= g.width) return T(0);
  return T(to_float(go[oh * gh + ow * gw])) * T(to_float(x[ih * xh + iw * xw]));
}

}  // namespace depthwise
}  // namespace fastcv
