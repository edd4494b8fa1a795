// Argument checks shared by the CPU and CUDA entry points of roi_align and multi_scale_roi_align.
#include <string>

#include "common/check.h"
#include "ops/roi_align/roi_align_ops.h"

namespace fastcv {

PoolShape check_roi_align_args(const std::vector<TensorView>& maps, const std::vector<double>& scales,
                               const TensorView& rois, const TensorView& pooled, const char* pooled_name,
                               DeviceType device) {
  check_arg(!maps.empty() && maps.size() == scales.size(), "one spatial scale per feature map is required");
  const TensorView& first = maps[0];
  check_shape(first, "input", {-1, -1, -1, -1});
  PoolShape s{first.size(0), first.size(1), 0, 0, false};
  check_shape(rois, "rois", {-1, 5});
  check_dtype(rois, "rois", pooled.dtype);  // the data's dtype: input forward, grad_output backward
  check_contiguous(rois, "rois");
  check_shape(pooled, pooled_name, {rois.size(0), s.c, -1, -1});
  s.ph = pooled.size(2), s.pw = pooled.size(3);
  check_arg(s.ph > 0 && s.pw > 0, "output_size must be positive");
  // The first map decides the layout (a tensor with C == 1 or 1x1 planes counts as NCHW).
  s.channels_last = !first.is_contiguous() && first.is_channels_last();
  check_arg(s.channels_last ? pooled.is_channels_last() : pooled.is_contiguous(),
            pooled_name, " must have the memory format of the input (contiguous NCHW or channels_last)");
  for (const TensorView* t : {&rois, &pooled}) {
    check_device(*t, "tensors", device);
    check_arg(t->device_index == first.device_index, "all tensors must be on one device");
  }
  for (const TensorView& m : maps) {
    check_shape(m, "input", {s.n, s.c, -1, -1});
    check_dtype(m, "input", first.dtype);
    check_device(m, "input", device);
    check_arg(m.device_index == first.device_index, "all tensors must be on one device");
    check_arg(s.channels_last ? m.is_channels_last() : m.is_contiguous(),
              "every feature map must have one memory format (contiguous NCHW or channels_last)");
  }
  return s;
}

}  // namespace fastcv
