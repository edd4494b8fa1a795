#pragma once
// Entry points of the 2-D convolution, called from conv2d_bind.cpp. Each takes the input side
// ([N, C, H, W]) and output side ([N, Cout, out_h, out_w]) in one memory format, NCHW-contiguous or
// channels_last (NHWC); the weight [Cout, C/groups, kh, kw] may have any strides.
#include <cstdint>

#include "common/tensor_view.h"
#include "ops/conv2d/conv2d.h"

namespace fastcv {

// Shapes, dtypes, devices, layouts and geometry of a call (conv2d_args.cpp, shared by the backends).
// Any of bias / input / output may be null where the entry point has none.
void check_conv2d_args(const conv2d::Geometry& g, const TensorView* input, const TensorView& weight,
                       const TensorView* bias, const TensorView* output, DeviceType device);
// Whether a call runs its NHWC kernels: its tensors are channels_last and not also plain-contiguous
// (a tensor that is both, as with H = W = 1, suits either kernel).
bool nhwc_layout(const TensorView& t);

// What the forward adds before storing, in the compute type with a single rounding (ResNet's junction
// relu(conv + identity) in one pass): output = relu?(conv2d(input, weight) + bias[o] + residual).
// residual has the output's shape and strides. mean and var (both or neither; [out_channels], float32, or
// float64 for float64 outputs) receive the output's per-channel batch statistics, what a following batch
// norm normalises with (var biased), taken from each output tile while it is in cache: channels_last
// outputs of the GEMM kernels only (not depthwise).
struct Epilogue {
  const TensorView* bias = nullptr;
  const TensorView* residual = nullptr;
  bool relu = false;
  const TensorView* mean = nullptr;
  const TensorView* var = nullptr;
};

void conv2d_forward_cpu(const TensorView& input, const TensorView& weight, const Epilogue& epilogue,
                        const TensorView& output, const conv2d::Geometry& g, int nthreads);
// grad_input = the input gradient of conv2d for grad_output (conv_transpose2d's forward)
void conv2d_input_grad_cpu(const TensorView& grad_output, const TensorView& weight,
                           const TensorView& grad_input, const conv2d::Geometry& g, int nthreads);
// grad_weight [Cout, C/groups, kh, kw] contiguous = the weight gradient, summed over the batch
void conv2d_weight_grad_cpu(const TensorView& grad_output, const TensorView& input,
                            const TensorView& grad_weight, const conv2d::Geometry& g, int nthreads);

// Depthwise convolution (groups == channels; out_channels a multiple of channels): direct kernels
// (depthwise_cpu.cpp, depthwise_cuda.cu), which the conv2d entry points above hand it to. Same
// tensors and layouts as those.
bool is_depthwise(const conv2d::Geometry& g);
void depthwise_forward_cpu(const TensorView& input, const TensorView& weight, const TensorView* bias,
                           const TensorView& output, const conv2d::Geometry& g, int nthreads);
void depthwise_input_grad_cpu(const TensorView& grad_output, const TensorView& weight,
                              const TensorView& grad_input, const conv2d::Geometry& g, int nthreads);
void depthwise_weight_grad_cpu(const TensorView& grad_output, const TensorView& input,
                               const TensorView& grad_weight, const conv2d::Geometry& g, int nthreads);
#ifdef FASTCV_WITH_CUDA
// The same on the GPU, one launch each for the whole batch, on `stream` (a cudaStream_t).
void depthwise_forward_cuda(const TensorView& input, const TensorView& weight, const TensorView* bias,
                            const TensorView& output, const conv2d::Geometry& g, uintptr_t stream);
void depthwise_input_grad_cuda(const TensorView& grad_output, const TensorView& weight,
                               const TensorView& grad_input, const conv2d::Geometry& g, uintptr_t stream);
void depthwise_weight_grad_cuda(const TensorView& grad_output, const TensorView& input,
                                const TensorView& grad_weight, const conv2d::Geometry& g, uintptr_t stream);
#endif

}  // namespace fastcv
