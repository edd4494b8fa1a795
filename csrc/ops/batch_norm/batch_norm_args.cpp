// Argument checks shared by the CPU and CUDA entry points of batch norm.
#include <string>

#include "common/check.h"
#include "ops/batch_norm/batch_norm_ops.h"

namespace fastcv {
namespace {

// Dense [N, C, *spatial] in the given layout: planar (NCHW order) or packed (channels innermost, then
// the spatial dimensions in order, then N). Strides of size-1 dimensions do not matter, as in torch.
bool dense(const TensorView& t, bool packed) {
  if (t.numel() == 0) return true;
  const auto ok = [&](int d, int64_t stride) { return t.size(d) == 1 || t.stride(d) == stride; };
  int64_t expected = packed ? t.size(1) : 1;
  for (int d = t.ndim - 1; d >= 2; --d) {
    if (!ok(d, expected)) return false;
    expected *= t.size(d);
  }
  if (packed) return ok(1, 1) && ok(0, expected);
  return ok(1, expected) && ok(0, expected * t.size(1));
}

void check_like(const TensorView& t, const char* arg, const TensorView& x, bool packed, DeviceType device) {
  check_arg(t.ndim == x.ndim, arg, " must have the shape of input");
  for (int d = 0; d < x.ndim; ++d)
    check_arg(t.size(d) == x.size(d), arg, " must have the shape of input");
  check_dtype(t, arg, x.dtype);
  check_device(t, arg, device);
  check_arg(t.device_index == x.device_index, arg, " must be on the device of input");
  check_arg(dense(t, packed), arg, " must have the memory format of input");
}

}  // namespace

BatchNormShape check_batch_norm_args(const TensorView& x, const TensorView* weight, const TensorView* bias,
                                     const TensorView* mean, const TensorView* var, const TensorView* residual,
                                     const TensorView* y, DeviceType device) {
  check_arg(x.ndim >= 2 && x.ndim <= 5, "input must have rank 2 to 5 ([N, C, *spatial])");
  check_device(x, "input", device);
  BatchNormShape s{x.size(0), x.size(1), 1, false};
  for (int d = 2; d < x.ndim; ++d) s.s *= x.size(d);
  // S == 1 ([N, C] inputs) is packed whatever the strides say; otherwise the channel stride decides.
  s.packed = s.s == 1 || (x.stride(1) == 1 && s.c > 1);
  check_arg(dense(x, s.packed), "input must be contiguous in NCHW or channels_last memory format");
  const DType stats = x.dtype == DType::Float64 ? DType::Float64 : DType::Float32;
  const std::pair<const TensorView*, const char*> per_channel[] = {
      {weight, "weight"}, {bias, "bias"}, {mean, "mean"}, {var, "var"}};
  for (const auto& [t, arg] : per_channel) {
    if (!t) continue;
    check_shape(*t, arg, {s.c});
    check_dtype(*t, arg, stats);
    check_contiguous(*t, arg);
    check_device(*t, arg, device);
    check_arg(t->device_index == x.device_index, arg, " must be on the device of input");
  }
  if (residual) check_like(*residual, "residual", x, s.packed, device);
  if (y) check_like(*y, "output", x, s.packed, device);
  return s;
}

void check_batch_norm_like(const TensorView& t, const char* arg, const TensorView& x, const BatchNormShape& s,
                           DeviceType device) {
  check_like(t, arg, x, s.packed, device);
}

BatchNormShape check_batch_norm_backward_args(const TensorView& grad_y, const TensorView& x, const TensorView* y,
                                              const TensorView& mean, const TensorView& var,
                                              const TensorView* weight, const TensorView* grad_x,
                                              const TensorView* grad_residual, const TensorView* grad_weight,
                                              const TensorView* grad_bias, DeviceType device) {
  const BatchNormShape sh = check_batch_norm_args(x, weight, grad_bias, &mean, &var, nullptr, y, device);
  check_batch_norm_like(grad_y, "grad_output", x, sh, device);
  if (grad_x) check_batch_norm_like(*grad_x, "grad_input", x, sh, device);
  if (grad_residual) check_batch_norm_like(*grad_residual, "grad_residual", x, sh, device);
  if (grad_weight) check_batch_norm_args(x, grad_weight, nullptr, nullptr, nullptr, nullptr, nullptr, device);
  return sh;
}

}  // namespace fastcv
