#pragma once
// im2col / col2im geometry shared by the backends: F.unfold's layout, column row = (c * kh + i) * kw + j,
// column = oh * out_w + ow, reading input[c, oh * sh - ph + i * dh, ow * sw - pw + j * dw].
#include <cstdint>

#include "common/macros.h"

namespace fastcv {
namespace im2col {

struct Geometry {
  int64_t channels, height, width;      // the image side
  int64_t kh, kw, dh, dw, ph, pw, sh, sw;
  int64_t out_h, out_w;                 // blocks per column of the image, per row
};

FASTCV_HD int64_t blocks(int64_t size, int64_t kernel, int64_t dilation, int64_t padding, int64_t stride) {
  return (size + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1;
}

}  // namespace im2col
}  // namespace fastcv
