#pragma once
// RoI Align arithmetic shared by the CPU and CUDA kernels, with torchvision's operations in its order:
// the box geometry, the sampling grid, and the bilinear weights of one sampling point.
#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace fastcv {
namespace roi_align {

template <class T>
struct Geometry {
  T start_h, start_w, bin_h, bin_w;
  int64_t grid_h, grid_w;  // sampling points per bin along each axis
  T count;                 // grid_h * grid_w, at least 1: the divisor of each bin's sum
};

// The largest sampling grid per bin and axis we accept: beyond it a box is absurd (or not finite),
// and torchvision would loop for ever or read out of bounds.
constexpr double kMaxGrid = 1 << 16;

// Box (x1, y1, x2, y2) in input coordinates -> bins. Returns false when the adaptive grid is not
// finite or beyond kMaxGrid. Products with the scale happen in double, as in torchvision.
template <class T>
FASTCV_HD bool geometry(T x1, T y1, T x2, T y2, double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                        int64_t sampling_ratio, bool aligned, Geometry<T>& g) {
  const T offset = aligned ? T(0.5) : T(0);
  g.start_w = T(x1 * spatial_scale - offset);
  g.start_h = T(y1 * spatial_scale - offset);
  const T end_w = T(x2 * spatial_scale - offset);
  const T end_h = T(y2 * spatial_scale - offset);
  T roi_w = end_w - g.start_w, roi_h = end_h - g.start_h;
  if (!aligned) {  // legacy behaviour: boxes at least one pixel wide
    roi_w = roi_w > T(1) ? roi_w : T(1);
    roi_h = roi_h > T(1) ? roi_h : T(1);
  }
  g.bin_h = roi_h / T(pooled_h);
  g.bin_w = roi_w / T(pooled_w);
  // torchvision takes ceil of the T quotient; ceil is exact, so doing it in double changes nothing.
  const double grid_h = sampling_ratio > 0 ? double(sampling_ratio) : ::ceil(double(roi_h / T(pooled_h)));
  const double grid_w = sampling_ratio > 0 ? double(sampling_ratio) : ::ceil(double(roi_w / T(pooled_w)));
  if (!(grid_h <= kMaxGrid && grid_w <= kMaxGrid)) return false;  // also NaN
  g.grid_h = int64_t(grid_h);
  g.grid_w = int64_t(grid_w);
  const int64_t count = g.grid_h * g.grid_w;
  g.count = T(count > 1 ? count : 1);
  return true;
}

// Sampling point (iy, ix) of bin (ph, pw).
template <class T>
FASTCV_HD T sample_y(const Geometry<T>& g, int64_t ph, int64_t iy) {
  return g.start_h + T(ph) * g.bin_h + T(iy + 0.5f) * g.bin_h / T(g.grid_h);
}
template <class T>
FASTCV_HD T sample_x(const Geometry<T>& g, int64_t pw, int64_t ix) {
  return g.start_w + T(pw) * g.bin_w + T(ix + 0.5f) * g.bin_w / T(g.grid_w);
}

template <class T>
struct Bilinear {
  int64_t p1, p2, p3, p4;  // offsets y * width + x of the four neighbours
  T w1, w2, w3, w4;        // all zero for a point outside the map
};

// The four neighbours of point (y, x) of a height x width map and their weights. Points more than one
// pixel outside the map contribute nothing; NaN points too (torchvision casts them to int).
template <class T>
FASTCV_HD Bilinear<T> bilinear(T y, T x, int64_t height, int64_t width) {
  Bilinear<T> b{0, 0, 0, 0, T(0), T(0), T(0), T(0)};
  if (!(y >= T(-1.0) && y <= T(height) && x >= T(-1.0) && x <= T(width))) return b;
  if (y <= T(0)) y = T(0);
  if (x <= T(0)) x = T(0);
  int64_t y_low = int64_t(y), x_low = int64_t(x), y_high, x_high;
  if (y_low >= height - 1) {
    y_high = y_low = height - 1;
    y = T(y_low);
  } else {
    y_high = y_low + 1;
  }
  if (x_low >= width - 1) {
    x_high = x_low = width - 1;
    x = T(x_low);
  } else {
    x_high = x_low + 1;
  }
  const T ly = y - T(y_low), lx = x - T(x_low);
  const T hy = T(1.) - ly, hx = T(1.) - lx;
  b.w1 = hy * hx, b.w2 = hy * lx, b.w3 = ly * hx, b.w4 = ly * lx;
  b.p1 = y_low * width + x_low, b.p2 = y_low * width + x_high;
  b.p3 = y_high * width + x_low, b.p4 = y_high * width + x_high;
  return b;
}

// torchvision's MultiScaleRoIAlign level rule (LevelMapper) with its float operations:
// k = floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6), clamped as torch.clamp does
// (to at least k_min, then to at most k_max) to the levels of the first and the last map; the box is
// pooled from the map at list position k - k_min. Returns that position, or -1 when the box pools
// nothing and gets zeros, as in torchvision: a position past the last map (maps that skip levels, p2
// and p4 say, leave level 4 at position 2 of 2) or before the first (k_min > k_max, maps not finest
// first), and an area that is negative or NaN.
template <class T>
FASTCV_HD int64_t box_level(T x1, T y1, T x2, T y2, double canonical_scale, int64_t canonical_level, int64_t k_min,
                            int64_t k_max, int64_t levels) {
#if !defined(__CUDA_ARCH__)
  using std::floor, std::log2, std::sqrt;  // the float overloads on the host (CUDA has its own)
#endif
  const T s = sqrt((x2 - x1) * (y2 - y1));
  T v = floor(T(canonical_level) + log2(s / T(canonical_scale)) + T(1e-6));
  if (!(v == v)) return -1;
  v = v < T(k_min) ? T(k_min) : v;
  v = v > T(k_max) ? T(k_max) : v;
  const int64_t position = int64_t(v) - k_min;
  return position >= 0 && position < levels ? position : -1;
}

}  // namespace roi_align
}  // namespace fastcv
