// Argument checks shared by the CPU and CUDA entry points of im2col and col2im.
#include "common/check.h"
#include "ops/im2col/im2col_ops.h"

namespace fastcv {

void check_im2col_args(const TensorView& image, const im2col::Geometry& g, const TensorView& columns,
                       DeviceType device) {
  check_shape(image, "image", {-1, g.channels, g.height, g.width});
  check_shape(columns, "columns", {image.size(0), g.channels * g.kh * g.kw, g.out_h * g.out_w});
  check_dtype(columns, "columns", image.dtype);
  for (const TensorView* t : {&image, &columns}) {
    check_contiguous(*t, "tensors");
    check_device(*t, "tensors", device);
  }
  check_arg(image.device_index == columns.device_index, "image and columns must be on one device");
  check_arg(g.kh > 0 && g.kw > 0 && g.dh > 0 && g.dw > 0 && g.sh > 0 && g.sw > 0 && g.ph >= 0 && g.pw >= 0,
            "kernel_size, dilation and stride must be positive, padding non-negative");
  check_arg(g.out_h == im2col::blocks(g.height, g.kh, g.dh, g.ph, g.sh) &&
                g.out_w == im2col::blocks(g.width, g.kw, g.dw, g.pw, g.sw) && g.out_h > 0 && g.out_w > 0,
            "the block counts do not match the image size, kernel, dilation, padding and stride");
}

}  // namespace fastcv
