// Argument checks shared by the CPU and CUDA entry points of the convolution.
#include "common/check.h"
#include "ops/conv2d/conv2d_ops.h"

namespace fastcv {

bool nhwc_layout(const TensorView& t) { return !t.is_contiguous() && t.is_channels_last(); }

void check_conv2d_args(const conv2d::Geometry& g, const TensorView* input, const TensorView& weight,
                       const TensorView* bias, const TensorView* output, DeviceType device) {
  check_arg(g.groups > 0 && g.channels % g.groups == 0 && g.out_channels % g.groups == 0,
            "groups must be positive and divide both channel counts");
  check_arg(g.kh > 0 && g.kw > 0 && g.sh > 0 && g.sw > 0 && g.dh > 0 && g.dw > 0 && g.ph >= 0 && g.pw >= 0,
            "kernel size, stride and dilation must be positive, padding non-negative");
  check_arg(g.out_h == conv2d::out_size(g.height, g.kh, g.sh, g.ph, g.dh) && g.out_h > 0 &&
                g.out_w == conv2d::out_size(g.width, g.kw, g.sw, g.pw, g.dw) && g.out_w > 0,
            "the output size does not match the input size, kernel, stride, padding and dilation");
  check_shape(weight, "weight", {g.out_channels, g.in_per_group(), g.kh, g.kw});
  check_device(weight, "weight", device);
  bool all_nchw = true, all_nhwc = true;
  for (const TensorView* t : {input, output}) {
    if (!t) continue;
    check_dtype(*t, "tensors", weight.dtype);
    check_device(*t, "tensors", device);
    check_arg(t->device_index == weight.device_index, "all tensors must be on one device");
    all_nchw = all_nchw && t->is_contiguous();
    all_nhwc = all_nhwc && t->is_channels_last();
  }
  check_arg(all_nchw || all_nhwc, "the input and output sides must be all contiguous or all channels_last");
  if (input) check_shape(*input, "input", {g.batch, g.channels, g.height, g.width});
  if (output) check_shape(*output, "output", {g.batch, g.out_channels, g.out_h, g.out_w});
  if (bias) {
    check_shape(*bias, "bias", {g.out_channels});
    check_dtype(*bias, "bias", weight.dtype);
    check_device(*bias, "bias", device);
    check_contiguous(*bias, "bias");
  }
}

}  // namespace fastcv
