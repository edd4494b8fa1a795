#pragma once
// Entry points of im2col and col2im, called from im2col_bind.cpp.
#include "common/tensor_view.h"
#include "ops/im2col/im2col.h"

namespace fastcv {

// Shapes, dtypes, layout, device and geometry of a call (im2col_args.cpp, shared by both backends).
void check_im2col_args(const TensorView& image, const im2col::Geometry& g, const TensorView& columns,
                       DeviceType device);

// image [N, C, H, W] contiguous -> columns [N, C*kh*kw, out_h*out_w] contiguous (F.unfold).
void im2col_cpu(const TensorView& image, const im2col::Geometry& g, const TensorView& columns, int nthreads);

// columns [N, C*kh*kw, out_h*out_w] contiguous -> image [N, C, H, W] contiguous, summing overlaps
// (F.fold). Threads own whole image planes: no atomics, the same sums in the same order every time.
void col2im_cpu(const TensorView& columns, const im2col::Geometry& g, const TensorView& image, int nthreads);

#ifdef FASTCV_WITH_CUDA
// The same on CUDA, the whole batch in one launch; col2im gathers per image element (deterministic).
void im2col_cuda(const TensorView& image, const im2col::Geometry& g, const TensorView& columns, uintptr_t stream);
void col2im_cuda(const TensorView& columns, const im2col::Geometry& g, const TensorView& image, uintptr_t stream);
#endif

}  // namespace fastcv
