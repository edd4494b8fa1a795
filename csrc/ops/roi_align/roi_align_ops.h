#pragma once
// Entry points of roi_align, called from roi_align_bind.cpp.
#include <vector>

#include "common/tensor_view.h"

namespace fastcv {

// torchvision's MultiScaleRoIAlign level rule: a box of area A goes to level
// floor(canonical_level + log2(sqrt(A) / canonical_scale) + 1e-6), clamped to [k_min, k_max], the
// levels of the first and the last map (a map of stride 2^k is level k), and is pooled from the map at
// list position level - k_min; none (zeros) when there is no map there (see roi_align::box_level).
struct LevelMapping {
  double canonical_scale;
  int64_t canonical_level, k_min, k_max;
};

// The checked shape of a pooling call (roi_align_args.cpp, shared by both backends).
struct PoolShape {
  int64_t n, c, ph, pw;
  bool channels_last;
};
// maps: the inputs (forward) or their gradients (backward), all of one shape but H, W, one memory
// format, on `device`; pooled: the output or its gradient, whose dtype rois must have.
PoolShape check_roi_align_args(const std::vector<TensorView>& maps, const std::vector<double>& scales,
                               const TensorView& rois, const TensorView& pooled, const char* pooled_name,
                               DeviceType device);

// input [N,C,H,W] contiguous in NCHW or channels_last memory (channels_last: the view's strides say
// so), rois [K,5] (batch index, x1, y1, x2, y2) of input's dtype; output [K,C,PH,PW] in input's memory
// format. Raises ArgError for a batch index out of range or a box whose sampling grid is absurd.
void roi_align_forward_cpu(const TensorView& input, const TensorView& rois, double spatial_scale,
                           int64_t sampling_ratio, bool aligned, const TensorView& output, int nthreads);

// grad_output [K,C,PH,PW] (input's dtype and memory format) -> grad_input [N,C,H,W] in the compute
// type (float32, or float64 for float64), zero-filled by the caller, same memory format. Threads own
// disjoint channel blocks: no atomics, and the result is bit-identical for any thread count.
void roi_align_backward_cpu(const TensorView& grad_output, const TensorView& rois, double spatial_scale,
                            int64_t sampling_ratio, bool aligned, const TensorView& grad_input, int nthreads);

// multi_scale_roi_align: inputs are the pyramid's levels [N,C,H_l,W_l] (finest first, one memory
// format) with their spatial scales; each box is pooled from the level the mapping picks for it, in
// one call. Boxes with a negative or NaN area, or mapped past the last map, get zeros, as in torchvision. grad_inputs: one per level,
// compute type, zero-filled by the caller.
void multi_scale_roi_align_forward_cpu(const std::vector<TensorView>& inputs, const std::vector<double>& scales,
                                       const TensorView& rois, const LevelMapping& mapping, int64_t sampling_ratio,
                                       bool aligned, const TensorView& output, int nthreads);
void multi_scale_roi_align_backward_cpu(const TensorView& grad_output, const std::vector<double>& scales,
                                        const TensorView& rois, const LevelMapping& mapping, int64_t sampling_ratio,
                                        bool aligned, const std::vector<TensorView>& grad_inputs, int nthreads);

#ifdef FASTCV_WITH_CUDA
// CUDA, for one map (mapping null) or a pyramid: forward, and a backward into float32/float64
// gradients (zero-filled by the caller): atomicAdd scatter, or, deterministic, threads that own row
// tiles of the gradient and add contributions in a fixed order.
void roi_align_forward_cuda(const std::vector<TensorView>& inputs, const std::vector<double>& scales,
                            const TensorView& rois, const LevelMapping* mapping, int64_t sampling_ratio, bool aligned,
                            const TensorView& output, uintptr_t stream);
void roi_align_backward_cuda(const TensorView& grad_output, const std::vector<double>& scales, const TensorView& rois,
                             const LevelMapping* mapping, int64_t sampling_ratio, bool aligned, bool deterministic,
                             const std::vector<TensorView>& grad_inputs, uintptr_t stream);
#endif

}  // namespace fastcv
