// CUDA RoI Align over one map or the levels of a feature pyramid: one thread per output element (in
// the output's memory order, so writes coalesce), the box's level and sampling points computed by the
// thread with the arithmetic the CPU kernels use. Backward: the same threads scatter with atomicAdd
// into a float32/float64 gradient; or, deterministic, threads own row tiles of the gradient (below). A box that cannot be pooled (batch index out of range, non-finite
// or absurd box) gives zeros here: the GPU cannot raise without a host sync, and never reads outside.
#include <cuda_runtime.h>

#include <vector>

#include "common/cuda_utils.cuh"
#include "common/dtype.h"
#include "ops/roi_align/roi_align.h"
#include "ops/roi_align/roi_align_ops.h"

namespace fastcv {
namespace {

constexpr int kMaxLevels = 8;
constexpr int kThreads = 256;

struct LevelsArg {
  const void* data[kMaxLevels];  // the maps (forward) or their gradients (backward)
  int64_t h[kMaxLevels], w[kMaxLevels];
  double scale[kMaxLevels];
  int levels;
  int64_t n, c, ph, pw;
  bool channels_last, multi;
  double canonical_scale;
  int64_t canonical_level, k_min, k_max;
  int64_t tile_base[kMaxLevels + 1];  // deterministic backward: first work item of each level
};

constexpr int64_t kTileRows = 8;  // deterministic backward: rows of a plane one thread owns

// Output element idx -> (box, channel, bin), in the output's memory order.
__device__ inline void decompose(int64_t idx, const LevelsArg& a, int64_t& k, int64_t& c, int64_t& ph, int64_t& pw) {
  if (a.channels_last) {
    c = idx % a.c, idx /= a.c;
    pw = idx % a.pw, idx /= a.pw;
    ph = idx % a.ph, k = idx / a.ph;
  } else {
    pw = idx % a.pw, idx /= a.pw;
    ph = idx % a.ph, idx /= a.ph;
    c = idx % a.c, k = idx / a.c;
  }
}

// Element p of the (level, image, channel) plane of `map` is at plane[p * step].
template <class P>
__device__ inline P* plane_of(P* map, const LevelsArg& a, int level, int64_t image, int64_t c, int64_t& step) {
  const int64_t hw = a.h[level] * a.w[level];
  step = a.channels_last ? a.c : 1;
  return a.channels_last ? map + image * hw * a.c + c : map + (image * a.c + c) * hw;
}

// The box's level, image and geometry; false when it pools nothing.
template <class T, class S>
__device__ bool box_setup(const S* roi, const LevelsArg& a, int64_t sampling_ratio, bool aligned, int& level,
                          int64_t& image, roi_align::Geometry<T>& g) {
  const T index = to_float(roi[0]);
  if (!(index >= T(0) && index < T(a.n))) return false;
  const T x1 = to_float(roi[1]), y1 = to_float(roi[2]), x2 = to_float(roi[3]), y2 = to_float(roi[4]);
  const int64_t l = a.multi ? roi_align::box_level(x1, y1, x2, y2, a.canonical_scale, a.canonical_level, a.k_min,
                                                   a.k_max, int64_t(a.levels))
                            : 0;
  if (l < 0) return false;
  level = int(l);
  image = int64_t(index);
  if (a.h[level] == 0 || a.w[level] == 0) return false;
  return roi_align::geometry(x1, y1, x2, y2, a.scale[level], a.ph, a.pw, sampling_ratio, aligned, g);
}

template <class S>
__global__ void forward_kernel(LevelsArg a, const S* __restrict__ rois, int64_t total, int64_t sampling_ratio,
                               bool aligned, S* __restrict__ out) {
  using T = compute_t<S>;
  for (const int64_t idx : grid_stride(total)) {
    int64_t k, c, ph, pw, image;
    decompose(idx, a, k, c, ph, pw);
    int level;
    roi_align::Geometry<T> g;
    T sum = T(0), count = T(1);
    if (box_setup<T>(rois + k * 5, a, sampling_ratio, aligned, level, image, g)) {
      const int64_t h = a.h[level], w = a.w[level];
      int64_t step;
      const S* x = plane_of(static_cast<const S*>(a.data[level]), a, level, image, c, step);
      for (int64_t iy = 0; iy < g.grid_h; ++iy) {
        const T y = roi_align::sample_y(g, ph, iy);
        for (int64_t ix = 0; ix < g.grid_w; ++ix) {
          const auto b = roi_align::bilinear(y, roi_align::sample_x(g, pw, ix), h, w);
          sum += b.w1 * to_float(x[b.p1 * step]) + b.w2 * to_float(x[b.p2 * step]) + b.w3 * to_float(x[b.p3 * step]) +
                 b.w4 * to_float(x[b.p4 * step]);
        }
      }
      count = g.count;
    }
    out[idx] = from_compute<S>(sum / count);
  }
}

template <class S>
__global__ void backward_kernel(LevelsArg a, const S* __restrict__ rois, const S* __restrict__ grad, int64_t total,
                                int64_t sampling_ratio, bool aligned) {
  using T = compute_t<S>;
  for (const int64_t idx : grid_stride(total)) {
    int64_t k, c, ph, pw, image;
    decompose(idx, a, k, c, ph, pw);
    int level;
    roi_align::Geometry<T> g;
    if (!box_setup<T>(rois + k * 5, a, sampling_ratio, aligned, level, image, g)) continue;
    const int64_t h = a.h[level], w = a.w[level];
    int64_t step;
    T* x = plane_of(static_cast<T*>(const_cast<void*>(a.data[level])), a, level, image, c, step);
    const T gb = to_float(grad[idx]) / g.count;  // as the CPU kernel: one division per bin
    for (int64_t iy = 0; iy < g.grid_h; ++iy) {
      const T y = roi_align::sample_y(g, ph, iy);
      for (int64_t ix = 0; ix < g.grid_w; ++ix) {
        const auto b = roi_align::bilinear(y, roi_align::sample_x(g, pw, ix), h, w);
        if (b.w1 == T(0) && b.w2 == T(0) && b.w3 == T(0) && b.w4 == T(0)) continue;
        atomicAdd(x + b.p1 * step, gb * b.w1);
        atomicAdd(x + b.p2 * step, gb * b.w2);
        atomicAdd(x + b.p3 * step, gb * b.w3);
        atomicAdd(x + b.p4 * step, gb * b.w4);
      }
    }
  }
}

// Deterministic backward: work item = (level, image, channel, tile of kTileRows rows). The thread owns
// those gradient elements, walks every box in index order (then bins and sampling points in order)
// and adds the contributions that land in its rows: one writer per element, a fixed order, no atomics
// and no memory beyond the gradient itself.
template <class S>
__global__ void backward_deterministic_kernel(LevelsArg a, const S* __restrict__ rois, int64_t boxes,
                                              const S* __restrict__ grad, int64_t sampling_ratio, bool aligned) {
  using T = compute_t<S>;
  const int64_t total = a.tile_base[a.levels];
  for (const int64_t item : grid_stride(total)) {
    int level = 0;
    while (item >= a.tile_base[level + 1]) ++level;
    const int64_t h = a.h[level], w = a.w[level], tiles = (h + kTileRows - 1) / kTileRows;
    int64_t rest = item - a.tile_base[level];
    const int64_t tile = rest % tiles;
    rest /= tiles;
    const int64_t c = rest % a.c, image = rest / a.c;
    const int64_t row0 = tile * kTileRows, row1 = row0 + kTileRows < h ? row0 + kTileRows : h;
    int64_t step;
    T* x = plane_of(static_cast<T*>(const_cast<void*>(a.data[level])), a, level, image, c, step);
    for (int64_t k = 0; k < boxes; ++k) {
      int box_level;
      int64_t box_image;
      roi_align::Geometry<T> g;
      if (!box_setup<T>(rois + k * 5, a, sampling_ratio, aligned, box_level, box_image, g)) continue;
      if (box_level != level || box_image != image) continue;
      // Samples lie between start_h and start_h + PH * bin_h (bin_h < 0 for an inverted aligned box);
      // their rows within one of that (clamping included).
      const T y_end = g.start_h + T(a.ph) * g.bin_h;
      const T y_lo = g.start_h < y_end ? g.start_h : y_end, y_hi = g.start_h < y_end ? y_end : g.start_h;
      if (y_hi < T(row0 - 2) || y_lo > T(row1 + 1)) continue;
      for (int64_t ph = 0; ph < a.ph; ++ph)
        for (int64_t iy = 0; iy < g.grid_h; ++iy) {
          const T y = roi_align::sample_y(g, ph, iy);
          if (!(y >= T(row0 - 2) && y <= T(row1 + 1))) continue;
          for (int64_t pw = 0; pw < a.pw; ++pw) {
            const T gb = to_float(grad[a.channels_last ? ((k * a.ph + ph) * a.pw + pw) * a.c + c
                                                       : ((k * a.c + c) * a.ph + ph) * a.pw + pw]) / g.count;
            for (int64_t ix = 0; ix < g.grid_w; ++ix) {
              const auto b = roi_align::bilinear(y, roi_align::sample_x(g, pw, ix), h, w);
              const int64_t top = b.p1 / w, bottom = b.p3 / w;
              if (top >= row0 && top < row1) {
                x[b.p1 * step] += gb * b.w1;
                x[b.p2 * step] += gb * b.w2;
              }
              if (bottom >= row0 && bottom < row1) {
                x[b.p3 * step] += gb * b.w3;
                x[b.p4 * step] += gb * b.w4;
              }
            }
          }
        }
    }
  }
}

LevelsArg make_args(const std::vector<TensorView>& maps, const std::vector<double>& scales, const TensorView& rois,
                    const TensorView& pooled, const LevelMapping* mapping) {
  check_arg(maps.size() <= size_t(kMaxLevels), "at most 8 feature maps");
  const PoolShape shape = check_roi_align_args(maps, scales, rois, pooled, "output", DeviceType::CUDA);
  LevelsArg a{};
  a.n = shape.n, a.c = shape.c, a.ph = shape.ph, a.pw = shape.pw, a.channels_last = shape.channels_last;
  a.levels = int(maps.size());
  a.tile_base[0] = 0;
  for (int l = 0; l < a.levels; ++l) {
    const TensorView& m = maps[size_t(l)];
    a.data[l] = m.data, a.h[l] = m.size(2), a.w[l] = m.size(3), a.scale[l] = scales[size_t(l)];
    a.tile_base[l + 1] = a.tile_base[l] + a.n * a.c * ((a.h[l] + kTileRows - 1) / kTileRows);
  }
  a.multi = mapping != nullptr;
  if (mapping) {
    a.canonical_scale = mapping->canonical_scale, a.canonical_level = mapping->canonical_level;
    a.k_min = mapping->k_min, a.k_max = mapping->k_max;
  }
  return a;
}

}  // namespace

void roi_align_forward_cuda(const std::vector<TensorView>& inputs, const std::vector<double>& scales,
                            const TensorView& rois, const LevelMapping* mapping, int64_t sampling_ratio, bool aligned,
                            const TensorView& output, uintptr_t stream) {
  const LevelsArg a = make_args(inputs, scales, rois, output, mapping);
  for (const TensorView& m : inputs) check_dtype(m, "input", output.dtype);
  const int64_t total = output.numel();
  if (total == 0) return;
  DeviceGuard guard(output);
  dispatch_floating(output.dtype, "input", [&](auto tag) {
    using S = decltype(tag);
    forward_kernel<S><<<blocks_for(total, kThreads), kThreads, 0, as_stream(stream)>>>(
        a, rois.ptr<S>(), total, sampling_ratio, aligned, output.ptr<S>());
  });
  FASTCV_CUDA_CHECK_LAUNCH("roi_align forward_kernel");
}

void roi_align_backward_cuda(const TensorView& grad_output, const std::vector<double>& scales, const TensorView& rois,
                             const LevelMapping* mapping, int64_t sampling_ratio, bool aligned, bool deterministic,
                             const std::vector<TensorView>& grad_inputs, uintptr_t stream) {
  const LevelsArg a = make_args(grad_inputs, scales, rois, grad_output, mapping);
  const DType acc = grad_output.dtype == DType::Float64 ? DType::Float64 : DType::Float32;
  for (const TensorView& g : grad_inputs) check_dtype(g, "grad_input", acc);
  const int64_t total = grad_output.numel();
  if (total == 0) return;
  DeviceGuard guard(grad_output);
  dispatch_floating(grad_output.dtype, "grad_output", [&](auto tag) {
    using S = decltype(tag);
    if (deterministic) {
      const int64_t items = a.tile_base[a.levels];
      // The grid is sized for kThreads a block and launched with 128: each thread takes about two items.
      if (items > 0)
        backward_deterministic_kernel<S><<<blocks_for(items, kThreads), 128, 0, as_stream(stream)>>>(
            a, rois.ptr<S>(), rois.size(0), grad_output.ptr<S>(), sampling_ratio, aligned);
    } else {
      backward_kernel<S><<<blocks_for(total, kThreads), kThreads, 0, as_stream(stream)>>>(
          a, rois.ptr<S>(), grad_output.ptr<S>(), total, sampling_ratio, aligned);
    }
  });
  FASTCV_CUDA_CHECK_LAUNCH("roi_align backward_kernel");
}

}  // namespace fastcv
