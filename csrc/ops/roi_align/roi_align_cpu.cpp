// CPU RoI Align over one feature map (roi_align) or several FPN levels (multi_scale_roi_align, each
// box pooled from the level its size selects, decided here). Per box, the bilinear weights of every
// sampling point are computed once and reused across channels. NCHW runs channels outermost, four at a
// time, so each plane stays in cache while every box reads (or, backward, writes) it; channels_last
// keeps the contiguous channel loop innermost, where the compiler vectorises it. The backward gives
// threads disjoint channels: no atomics, and bit-identical results for any thread count.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common/check.h"
#include "common/dtype.h"
#include "common/parallel.h"
#include "ops/roi_align/roi_align.h"
#include "ops/roi_align/roi_align_ops.h"

namespace fastcv {
namespace {

using roi_align::Bilinear;
using roi_align::Geometry;

// The maps boxes are pooled from: one, or the levels of a feature pyramid.
struct Levels {
  std::vector<const TensorView*> maps;  // [N, C, H_l, W_l]
  std::vector<double> scales;
  int64_t n = 0, c = 0, ph = 0, pw = 0;
  bool channels_last = false;
  const LevelMapping* mapping = nullptr;  // null: a single map

  int64_t h(int64_t l) const { return maps[size_t(l)]->size(2); }
  int64_t w(int64_t l) const { return maps[size_t(l)]->size(3); }
};

// One box: its level (-1: none), image, bin divisor, and the sampling points of every bin, bin-major.
template <class T>
struct BoxSamples {
  int64_t level = 0, image = 0;
  T count = T(1);
  int64_t per_bin = 0;
  std::vector<Bilinear<T>> points;
};

template <class S>
void box_samples(const S* roi, int64_t k, const Levels& lv, int64_t sampling_ratio, bool aligned,
                 BoxSamples<compute_t<S>>& out) {
  using T = compute_t<S>;
  const T index = to_float(roi[0]);
  if (!(index >= T(0) && index < T(lv.n)))
    throw ArgError("rois[" + std::to_string(k) + ", 0] (the batch index) is " + std::to_string(double(index)) +
                   ", outside [0, " + std::to_string(lv.n) + ")");
  const T x1 = to_float(roi[1]), y1 = to_float(roi[2]), x2 = to_float(roi[3]), y2 = to_float(roi[4]);
  out.image = int64_t(index);
  out.level = lv.mapping ? roi_align::box_level(x1, y1, x2, y2, lv.mapping->canonical_scale,
                                                  lv.mapping->canonical_level, lv.mapping->k_min,
                                                  lv.mapping->k_max, int64_t(lv.maps.size()))
                        : 0;
  out.count = T(1);
  out.per_bin = 0;
  out.points.clear();
  if (out.level < 0) return;
  Geometry<T> g;
  if (!roi_align::geometry(x1, y1, x2, y2, lv.scales[size_t(out.level)], lv.ph, lv.pw, sampling_ratio, aligned, g))
    throw ArgError("rois[" + std::to_string(k) + "] is not finite or too large for adaptive sampling "
                   "(more than 65,536 points per bin side); pass a sampling_ratio > 0 or fix the box");
  const int64_t h = lv.h(out.level), w = lv.w(out.level);
  out.count = g.count;
  if (h == 0 || w == 0) return;  // an empty map: nothing to sample
  out.per_bin = g.grid_h * g.grid_w;
  out.points.resize(size_t(lv.ph * lv.pw * out.per_bin));
  Bilinear<T>* p = out.points.data();
  for (int64_t ph = 0; ph < lv.ph; ++ph)
    for (int64_t pw = 0; pw < lv.pw; ++pw)
      for (int64_t iy = 0; iy < g.grid_h; ++iy) {
        const T y = roi_align::sample_y(g, ph, iy);
        for (int64_t ix = 0; ix < g.grid_w; ++ix) *p++ = roi_align::bilinear(y, roi_align::sample_x(g, pw, ix), h, w);
      }
}

// The sampling points of boxes [k0, k1), computed once (in parallel) and shared by every channel.
// Groups are cut so that the points stay within kGroupPoints (a few tens of MB).
constexpr int64_t kGroupPoints = int64_t(1) << 19;

template <class S>
int64_t sample_group(const TensorView& rois, int64_t k0, const Levels& lv, int64_t sampling_ratio, bool aligned,
                     std::vector<BoxSamples<compute_t<S>>>& group, int nthreads) {
  const int64_t k = rois.size(0);
  const int64_t box_points = lv.ph * lv.pw * (sampling_ratio > 0 ? sampling_ratio * sampling_ratio : 4);
  const int64_t k1 = std::min(k, k0 + std::max<int64_t>(1, kGroupPoints / box_points));
  group.resize(size_t(k1 - k0));
  parallel_for(k0, k1, 8, nthreads, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) box_samples(rois.ptr<S>() + i * 5, i, lv, sampling_ratio, aligned, group[i - k0]);
  });
  return k1;
}

// The boxes of a group ordered by level and image, then index: the channel-outer loops then touch one
// map's planes at a time (a working set that fits L2), in an order fixed by the input alone.
template <class T>
std::vector<int64_t> by_plane(const std::vector<BoxSamples<T>>& group) {
  std::vector<int64_t> order(group.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int64_t(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return group[a].level != group[b].level ? group[a].level < group[b].level : group[a].image < group[b].image;
  });
  return order;
}

// ---- forward

// G channels of one box: the bins' sums of G planes (`stride` apart) into out (channel j at
// out + j * bins). Several channels per pass read each point once for all; each channel's sum runs in
// the same order as alone.
template <int G, class S>
void forward_planes(const S* plane, int64_t stride, const BoxSamples<compute_t<S>>& b, int64_t bins, S* out) {
  using T = compute_t<S>;
  const Bilinear<T>* p = b.points.data();
  for (int64_t bin = 0; bin < bins; ++bin) {
    T sum[G] = {};
    for (int64_t i = 0; i < b.per_bin; ++i, ++p)
      for (int j = 0; j < G; ++j) {
        const S* x = plane + j * stride;
        sum[j] += p->w1 * to_float(x[p->p1]) + p->w2 * to_float(x[p->p2]) + p->w3 * to_float(x[p->p3]) +
                  p->w4 * to_float(x[p->p4]);
      }
    for (int j = 0; j < G; ++j) out[j * bins + bin] = from_compute<S>(sum[j] / b.count);
  }
}

// All channels of one box, channels_last: image [H, W, C] -> out [PH, PW, C].
template <class S>
void forward_nhwc(const S* image, const BoxSamples<compute_t<S>>& b, int64_t bins, int64_t C, S* out,
                  std::vector<compute_t<S>>& acc) {
  using T = compute_t<S>;
  acc.resize(size_t(C));
  const Bilinear<T>* p = b.points.data();
  for (int64_t bin = 0; bin < bins; ++bin) {
    std::fill(acc.begin(), acc.end(), T(0));
    for (int64_t i = 0; i < b.per_bin; ++i, ++p) {
      const S *x1 = image + p->p1 * C, *x2 = image + p->p2 * C, *x3 = image + p->p3 * C, *x4 = image + p->p4 * C;
      for (int64_t c = 0; c < C; ++c)
        acc[c] += p->w1 * to_float(x1[c]) + p->w2 * to_float(x2[c]) + p->w3 * to_float(x3[c]) + p->w4 * to_float(x4[c]);
    }
    S* o = out + bin * C;
    for (int64_t c = 0; c < C; ++c) o[c] = from_compute<S>(acc[c] / b.count);
  }
}

// ---- backward

// G channels of one box: scatter its bins' gradients (channel j at grad + j * bins) into G planes
// (`stride` apart). Each channel adds in the same order as alone.
template <int G, class S>
void backward_planes(const S* grad, const BoxSamples<compute_t<S>>& b, int64_t bins, compute_t<S>* plane,
                     int64_t stride) {
  using T = compute_t<S>;
  const Bilinear<T>* p = b.points.data();
  for (int64_t bin = 0; bin < bins; ++bin) {
    // One division per bin (torchvision divides per point: results differ in the last bit at most).
    T g[G];
    for (int j = 0; j < G; ++j) g[j] = to_float(grad[j * bins + bin]) / b.count;
    for (int64_t i = 0; i < b.per_bin; ++i, ++p)
      for (int j = 0; j < G; ++j) {
        T* x = plane + j * stride;
        x[p->p1] += g[j] * p->w1;
        x[p->p2] += g[j] * p->w2;
        x[p->p3] += g[j] * p->w3;
        x[p->p4] += g[j] * p->w4;
      }
  }
}

// Channels [c0, c1) of one box, channels_last: grad [PH, PW, C] into image [H, W, C].
template <class S>
void backward_nhwc(const S* grad, const BoxSamples<compute_t<S>>& b, int64_t bins, int64_t C, int64_t c0, int64_t c1,
                   compute_t<S>* image, std::vector<compute_t<S>>& scaled) {
  using T = compute_t<S>;
  scaled.resize(size_t(c1 - c0));
  T* g = scaled.data() - c0;  // indexed by channel
  const Bilinear<T>* p = b.points.data();
  for (int64_t bin = 0; bin < bins; ++bin) {
    for (int64_t c = c0; c < c1; ++c) g[c] = to_float(grad[bin * C + c]) / b.count;  // once per bin
    for (int64_t i = 0; i < b.per_bin; ++i, ++p) {
      T *x1 = image + p->p1 * C, *x2 = image + p->p2 * C, *x3 = image + p->p3 * C, *x4 = image + p->p4 * C;
      const T w1 = p->w1, w2 = p->w2, w3 = p->w3, w4 = p->w4;
      for (int64_t c = c0; c < c1; ++c) {
        x1[c] += g[c] * w1;
        x2[c] += g[c] * w2;
        x3[c] += g[c] * w3;
        x4[c] += g[c] * w4;
      }
    }
  }
}

// ---- argument checks

Levels check_args(const std::vector<TensorView>& maps, const std::vector<double>& scales, const TensorView& rois,
                  const TensorView& pooled, const char* pooled_name) {
  const PoolShape shape = check_roi_align_args(maps, scales, rois, pooled, pooled_name, DeviceType::CPU);
  Levels lv;
  lv.n = shape.n, lv.c = shape.c, lv.ph = shape.ph, lv.pw = shape.pw, lv.channels_last = shape.channels_last;
  for (const TensorView& m : maps) lv.maps.push_back(&m);
  lv.scales = scales;
  return lv;
}

void forward(const std::vector<TensorView>& inputs, const std::vector<double>& scales, const TensorView& rois,
             const LevelMapping* mapping, int64_t sampling_ratio, bool aligned, const TensorView& output, int nthreads) {
  Levels lv = check_args(inputs, scales, rois, output, "output");
  lv.mapping = mapping;
  check_dtype(output, "output", inputs[0].dtype);
  const int64_t k = rois.size(0), bins = lv.ph * lv.pw, box_out = lv.c * bins;
  dispatch_floating(output.dtype, "input", [&](auto tag) {
    using S = decltype(tag);
    const auto image_of = [&](const BoxSamples<compute_t<S>>& b) {  // the box's [C, H, W] or [H, W, C]
      return lv.maps[size_t(b.level)]->template ptr<S>() + b.image * lv.c * lv.h(b.level) * lv.w(b.level);
    };
    std::vector<BoxSamples<compute_t<S>>> group;
    for (int64_t k0 = 0; k0 < k;) {
      const int64_t k1 = sample_group<S>(rois, k0, lv, sampling_ratio, aligned, group, nthreads);
      // Boxes with no level or an empty map: zeros.
      for (int64_t i = k0; i < k1; ++i)
        if (group[i - k0].per_bin == 0)
          std::fill(output.ptr<S>() + i * box_out, output.ptr<S>() + (i + 1) * box_out, from_compute<S>(0.0f));
      const std::vector<int64_t> order = by_plane(group);
      if (lv.channels_last) {  // boxes in parallel, channels innermost
        parallel_for(0, k1 - k0, 1, nthreads, [&](int64_t a, int64_t b) {
          std::vector<compute_t<S>> acc;
          for (int64_t j = a; j < b; ++j) {
            const auto& box = group[order[j]];
            if (box.per_bin) forward_nhwc(image_of(box), box, bins, lv.c, output.ptr<S>() + (k0 + order[j]) * box_out, acc);
          }
        });
      } else {  // channels in parallel, four at a time: planes stay in cache while every box reads them
        constexpr int64_t kGroup = 4;
        parallel_for(0, lv.c, kGroup, nthreads, [&](int64_t c0, int64_t c1) {
          for (int64_t j : order) {
            const auto& box = group[j];
            if (!box.per_bin) continue;
            const int64_t plane = lv.h(box.level) * lv.w(box.level);
            const S* in = image_of(box) + c0 * plane;
            S* out = output.ptr<S>() + (k0 + j) * box_out + c0 * bins;
            if (c1 - c0 == kGroup)
              forward_planes<kGroup>(in, plane, box, bins, out);
            else
              for (int64_t c = 0; c < c1 - c0; ++c) forward_planes<1>(in + c * plane, plane, box, bins, out + c * bins);
          }
        });
      }
      k0 = k1;
    }
  });
}

void backward(const TensorView& grad_output, const std::vector<double>& scales, const TensorView& rois,
              const LevelMapping* mapping, int64_t sampling_ratio, bool aligned,
              const std::vector<TensorView>& grad_inputs, int nthreads) {
  Levels lv = check_args(grad_inputs, scales, rois, grad_output, "grad_output");
  lv.mapping = mapping;
  check_dtype(grad_inputs[0], "grad_input", grad_output.dtype == DType::Float64 ? DType::Float64 : DType::Float32);
  const int64_t k = rois.size(0), bins = lv.ph * lv.pw, box_out = lv.c * bins;
  dispatch_floating(grad_output.dtype, "grad_output", [&](auto tag) {
    using S = decltype(tag);
    using T = compute_t<S>;
    const auto image_of = [&](const BoxSamples<T>& b) {
      return lv.maps[size_t(b.level)]->template ptr<T>() + b.image * lv.c * lv.h(b.level) * lv.w(b.level);
    };
    constexpr int64_t kGroup = 4;  // NCHW: channels per pass over a box's points
    // channels_last: blocks wide enough to vectorise, few enough to balance the threads.
    const int64_t block = lv.channels_last ? std::max<int64_t>(16, (lv.c + 2 * nthreads - 1) / (2 * nthreads)) : kGroup;
    std::vector<BoxSamples<T>> group;
    for (int64_t k0 = 0; k0 < k;) {
      const int64_t k1 = sample_group<S>(rois, k0, lv, sampling_ratio, aligned, group, nthreads);
      const std::vector<int64_t> order = by_plane(group);
      // Threads own disjoint channels, and each channel adds its boxes in `order`: deterministic.
      parallel_for(0, lv.c, block, nthreads, [&](int64_t c0, int64_t c1) {
        std::vector<T> scaled;
        for (int64_t j : order) {
          const auto& box = group[j];
          if (!box.per_bin) continue;
          const S* grad = grad_output.ptr<S>() + (k0 + j) * box_out;
          if (lv.channels_last) {
            backward_nhwc(grad, box, bins, lv.c, c0, c1, image_of(box), scaled);
            continue;
          }
          const int64_t plane = lv.h(box.level) * lv.w(box.level);
          T* gx = image_of(box) + c0 * plane;
          if (c1 - c0 == kGroup)
            backward_planes<kGroup>(grad + c0 * bins, box, bins, gx, plane);
          else
            for (int64_t c = 0; c < c1 - c0; ++c) backward_planes<1>(grad + (c0 + c) * bins, box, bins, gx + c * plane, plane);
        }
      });
      k0 = k1;
    }
  });
}

}  // namespace

void roi_align_forward_cpu(const TensorView& input, const TensorView& rois, double spatial_scale,
                           int64_t sampling_ratio, bool aligned, const TensorView& output, int nthreads) {
  forward({input}, {spatial_scale}, rois, nullptr, sampling_ratio, aligned, output, nthreads);
}

void roi_align_backward_cpu(const TensorView& grad_output, const TensorView& rois, double spatial_scale,
                            int64_t sampling_ratio, bool aligned, const TensorView& grad_input, int nthreads) {
  backward(grad_output, {spatial_scale}, rois, nullptr, sampling_ratio, aligned, {grad_input}, nthreads);
}

void multi_scale_roi_align_forward_cpu(const std::vector<TensorView>& inputs, const std::vector<double>& scales,
                                       const TensorView& rois, const LevelMapping& mapping, int64_t sampling_ratio,
                                       bool aligned, const TensorView& output, int nthreads) {
  forward(inputs, scales, rois, &mapping, sampling_ratio, aligned, output, nthreads);
}

void multi_scale_roi_align_backward_cpu(const TensorView& grad_output, const std::vector<double>& scales,
                                        const TensorView& rois, const LevelMapping& mapping, int64_t sampling_ratio,
                                        bool aligned, const std::vector<TensorView>& grad_inputs, int nthreads) {
  backward(grad_output, scales, rois, &mapping, sampling_ratio, aligned, grad_inputs, nthreads);
}

}  // namespace fastcv
