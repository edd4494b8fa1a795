// Argument checks shared by the CPU and CUDA entry points of batch norm.
#include <string>

#include "common/check.h"
#include "ops/batch_norm/batch_norm_ops.h"

namespace fastcv {
namespace {

// Dense [N, C, S] in the given layout (strides of size-1 dimensions do not matter, as in torch).
bool dense(const TensorView& t, bool packed) {
  if (t.numel() == 0) return true;
  const int64_t n = t.size(0), c = t.size(1), s = t.size(2);
  const auto ok = [&](int d, int64_t stride) { return t.size(d) == 1 || t.stride(d) == stride; };
  return packed ? ok(0, s * c) && ok(1, 1) && ok(2, c) : ok(0, c * s) && ok(1, s) && ok(2, 1);
}

void check_like(const TensorView& t, const char* arg, const TensorView& x, bool packed, DeviceType device) {
  check_shape(t, arg, {x.size(0), x.size(1), x.size(2)});
  check_dtype(t, arg, x.dtype);
  check_device(t, arg, device);
  check_arg(t.device_index == x.device_index, std::string(arg) + " must be on the device of input");
  check_arg(dense(t, packed), std::string(arg) + " must have the memory format of input");
}

}  // namespace

BatchNormShape check_batch_norm_args(const TensorView& x, const TensorView* weight, const TensorView* bias,
                                     const TensorView* mean, const TensorView* var, const TensorView* residual,
                                     const TensorView* y, DeviceType device) {
  check_arg(x.ndim == 3, "input must be viewed as [N, C, S] by the caller");
  check_device(x, "input", device);
  BatchNormShape s{x.size(0), x.size(1), x.size(2), false};
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
    check_arg(t->device_index == x.device_index, std::string(arg) + " must be on the device of input");
  }
  if (residual) check_like(*residual, "residual", x, s.packed, device);
  if (y) check_like(*y, "output", x, s.packed, device);
  return s;
}

void check_batch_norm_like(const TensorView& t, const char* arg, const TensorView& x, const BatchNormShape& s,
                           DeviceType device) {
  check_like(t, arg, x, s.packed, device);
}

}  // namespace fastcv
