#pragma once
// Entry points of batch norm, called from batch_norm_bind.cpp. One set per backend (_cpu, _cuda).
//
// Tensors: x, y, residual, grad_y, grad_x, grad_residual are [N, C, *spatial] (rank 2 to 5, seen as
// [N, C, S] with S the product of the spatial sizes) of one shape, dtype (float32, float64, float16,
// bfloat16) and layout: planar (contiguous) or packed (channels innermost: channels_last, or S == 1). Per-channel
// tensors (weight, bias, mean, var, grad_weight, grad_bias) are contiguous [C] in the compute type:
// float32, or float64 for float64 inputs. Optional tensors are null pointers when absent: weight
// absent means 1, bias absent means 0. var is always the biased variance (divided by M = N*S).
#include <cstdint>

#include "common/tensor_view.h"
#include "ops/batch_norm/batch_norm.h"

namespace fastcv {

struct BatchNormShape {
  int64_t n, c, s;
  bool packed;  // channels innermost (channels_last, or S == 1)
};
// Checks the views' shapes, dtypes, layouts and devices against x (batch_norm_args.cpp, shared by the
// backends); raises ArgError naming the offending argument.
BatchNormShape check_batch_norm_args(const TensorView& x, const TensorView* weight, const TensorView* bias,
                                     const TensorView* mean, const TensorView* var, const TensorView* residual,
                                     const TensorView* y, DeviceType device);
// One more [N, C, S] tensor (a gradient) against x: same sizes, dtype, layout and device.
void check_batch_norm_like(const TensorView& t, const char* arg, const TensorView& x, const BatchNormShape& s,
                           DeviceType device);
// Every argument of a backward entry point (below).
BatchNormShape check_batch_norm_backward_args(const TensorView& grad_y, const TensorView& x, const TensorView* y,
                                              const TensorView& mean, const TensorView& var,
                                              const TensorView* weight, const TensorView* grad_x,
                                              const TensorView* grad_residual, const TensorView* grad_weight,
                                              const TensorView* grad_bias, DeviceType device);

// Training forward: the batch's per-channel mean and biased variance into mean, var (outputs), and
// y = bn(x) [+ residual] [ReLU] normalised with them.
void batch_norm_forward_train_cpu(const TensorView& x, const TensorView* weight, const TensorView* bias,
                                  const TensorView* residual, bool relu, double eps, const TensorView& y,
                                  const TensorView& mean, const TensorView& var, int nthreads);
// Evaluation forward: y = bn(x) [+ residual] [ReLU] with the given mean and var (running statistics).
void batch_norm_forward_eval_cpu(const TensorView& x, const TensorView& mean, const TensorView& var,
                                 const TensorView* weight, const TensorView* bias, const TensorView* residual,
                                 bool relu, double eps, const TensorView& y, int nthreads);
// Training's update of the running statistics (nn.BatchNorm's buffers, [C], any floating dtype) from the
// batch's mean and biased var over `count` values a channel: running = (1 - momentum) * running +
// momentum * batch, with the unbiased variance, computed in double and rounded once.
void batch_norm_update_running_cpu(const TensorView& running_mean, const TensorView& running_var,
                                   const TensorView& mean, const TensorView& var, double momentum, int64_t count);
// Backward of either forward. y: the forward's output when a ReLU was fused (its sign is the mask),
// else null. mean, var: the statistics the forward normalised with; training: whether they were the
// batch's own (then the gradient flows through them too). Outputs, each optional: grad_x, grad_residual
// (the ReLU-masked grad_y, for batch_norm_add_relu), grad_weight, grad_bias.
void batch_norm_backward_cpu(const TensorView& grad_y, const TensorView& x, const TensorView* y,
                             const TensorView& mean, const TensorView& var, const TensorView* weight, bool training,
                             double eps, const TensorView* grad_x, const TensorView* grad_residual,
                             const TensorView* grad_weight, const TensorView* grad_bias, int nthreads);

// Batch statistics for another op's epilogue (the convolution's, conv2d_forward_cpu): the moments of
// channels [0, C) over `rows` rows of x (ld values apart), merged into out[0, C). The same two-pass
// blocks as the training forward; T is the storage type (float, double, Half, BFloat16), summed in its
// compute type.
template <class T>
void batch_norm_rows_moments(const T* x, int64_t rows, int64_t ld, int64_t C, batch_norm::Moments<double>* out);

#ifdef FASTCV_WITH_CUDA
// The same three on the GPU, queued on `stream`. No host synchronisation.
void batch_norm_forward_train_cuda(const TensorView& x, const TensorView* weight, const TensorView* bias,
                                   const TensorView* residual, bool relu, double eps, const TensorView& y,
                                   const TensorView& mean, const TensorView& var, uintptr_t stream);
void batch_norm_forward_eval_cuda(const TensorView& x, const TensorView& mean, const TensorView& var,
                                  const TensorView* weight, const TensorView* bias, const TensorView* residual,
                                  bool relu, double eps, const TensorView& y, uintptr_t stream);
void batch_norm_backward_cuda(const TensorView& grad_y, const TensorView& x, const TensorView* y,
                              const TensorView& mean, const TensorView& var, const TensorView* weight, bool training,
                              double eps, const TensorView* grad_x, const TensorView* grad_residual,
                              const TensorView* grad_weight, const TensorView* grad_bias, uintptr_t stream);
#endif

}  // namespace fastcv
