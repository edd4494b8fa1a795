#pragma once
// 2-D convolution geometry shared by the backends (F.conv2d's semantics). Output pixel (oh, ow) of
// output channel o in group g = o / (out_channels / groups) reads input channel g * in_per_group + c at
// (oh * sh - ph + i * dh, ow * sw - pw + j * dw) for kernel tap (i, j); taps in the padding read zero.
#include <cstdint>

#include "common/macros.h"

namespace fastcv {
namespace conv2d {

struct Geometry {
  int64_t batch, channels, height, width;  // input
  int64_t out_channels, groups;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t out_h, out_w;

  FASTCV_HD int64_t in_per_group() const { return channels / groups; }
  FASTCV_HD int64_t out_per_group() const { return out_channels / groups; }
  FASTCV_HD int64_t taps() const { return kh * kw; }
  FASTCV_HD int64_t pixels() const { return out_h * out_w; }
};

FASTCV_HD int64_t out_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  return (size + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1;
}

}  // namespace conv2d
}  // namespace fastcv
