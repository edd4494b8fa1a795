#pragma once
// NMS arithmetic shared by the CPU and CUDA kernels.
#include <cmath>

#include "common/macros.h"

namespace fastcv {
namespace nms {

// std::max / std::min with their argument order, so NaN coordinates behave exactly as in torchvision.
template <class T> FASTCV_HD T max_first(T a, T b) { return a < b ? b : a; }
template <class T> FASTCV_HD T min_first(T a, T b) { return b < a ? b : a; }

// A product that is never fused with a following addition into an FMA (nvcc fuses by default; the host
// build turns contraction off): torchvision rounds the product, so we must too.
template <class T>
FASTCV_HD T mul_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) return __fmul_rn(a, b);
  else return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

template <class T>
FASTCV_HD T box_area(T x1, T y1, T x2, T y2) { return mul_rn(x2 - x1, y2 - y1); }

// IoU of box a (the higher-scoring one) with box b, with torchvision's operations in torchvision's order.
// Areas are not clamped: an inverted box has a negative area, as there.
template <class T>
FASTCV_HD T iou(T ax1, T ay1, T ax2, T ay2, T a_area, T bx1, T by1, T bx2, T by2, T b_area) {
  const T w = max_first(T(0), min_first(ax2, bx2) - max_first(ax1, bx1));
  const T h = max_first(T(0), min_first(ay2, by2) - max_first(ay1, by1));
  const T inter = mul_rn(w, h);
  return inter / (a_area + b_area - inter);
}

// torchvision compares the IoU, in the boxes' type, with the threshold as a double. For float IoUs,
// `iou > threshold_below(t)` is the same test: the result is the largest float not above t.
inline float threshold_below(double t) {
  float f = float(t);
  if (double(f) > t) f = std::nextafter(f, -INFINITY);
  return f;
}
template <class T> inline T compute_threshold(double t);
template <> inline float compute_threshold<float>(double t) { return threshold_below(t); }
template <> inline double compute_threshold<double>(double t) { return t; }

}  // namespace nms
}  // namespace fastcv
