// CPU RoI Align. Per box, the bilinear weights of every sampling point are computed once and reused
// across channels. NCHW walks one channel plane at a time; channels_last runs the channel loop
// innermost, contiguous, where the compiler vectorises it. Forward: threads over boxes. Backward:
// threads over channel blocks, so no two threads write the same gradient element.
#include <algorithm>
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

struct Shape {
  int64_t n, c, h, w, ph, pw;
  bool channels_last;
};

// One box: its image, the divisor of each bin, and the sampling points of every bin, bin-major.
template <class T>
struct BoxSamples {
  int64_t image = 0;
  T count = T(1);
  int64_t per_bin = 0;
  std::vector<Bilinear<T>> points;
};

template <class S>
void box_samples(const S* roi, int64_t k, const Shape& s, double spatial_scale, int64_t sampling_ratio,
                 bool aligned, BoxSamples<compute_t<S>>& out) {
  using T = compute_t<S>;
  const T index = to_float(roi[0]);
  if (!(index >= T(0) && index < T(s.n)))
    throw ArgError("rois[" + std::to_string(k) + ", 0] (the batch index) is " + std::to_string(double(index)) +
                   ", outside [0, " + std::to_string(s.n) + ")");
  Geometry<T> g;
  if (!roi_align::geometry(to_float(roi[1]), to_float(roi[2]), to_float(roi[3]), to_float(roi[4]), spatial_scale,
                           s.ph, s.pw, sampling_ratio, aligned, g))
    throw ArgError("rois[" + std::to_string(k) + "] is not finite or too large for adaptive sampling "
                   "(more than 65,536 points per bin side); pass a sampling_ratio > 0 or fix the box");
  out.image = int64_t(index);
  out.count = g.count;
  out.per_bin = g.grid_h * g.grid_w;
  out.points.resize(size_t(s.ph * s.pw * out.per_bin));
  Bilinear<T>* p = out.points.data();
  for (int64_t ph = 0; ph < s.ph; ++ph)
    for (int64_t pw = 0; pw < s.pw; ++pw)
      for (int64_t iy = 0; iy < g.grid_h; ++iy) {
        const T y = roi_align::sample_y(g, ph, iy);
        for (int64_t ix = 0; ix < g.grid_w; ++ix) *p++ = roi_align::bilinear(y, roi_align::sample_x(g, pw, ix), s.h, s.w);
      }
}

// ---- forward

// G channels of one box: the bins' sums of G planes (the box's image, channels c..c+G-1, `stride`
// apart) into out (channel j at out + j * bins). Several channels per pass over the sampling points
// read each point once for all of them; each channel's sum runs in the same order as alone.
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

template <class S>
void forward_nhwc(const S* in, const BoxSamples<compute_t<S>>& b, const Shape& s, S* out, std::vector<compute_t<S>>& acc) {
  using T = compute_t<S>;
  const int64_t bins = s.ph * s.pw, C = s.c;
  const S* image = in + b.image * s.h * s.w * C;
  acc.resize(size_t(C));
  for (int64_t bin = 0; bin < bins; ++bin) {
    std::fill(acc.begin(), acc.end(), T(0));
    const Bilinear<T>* p = b.points.data() + bin * b.per_bin;
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

template <class S>
void backward_nhwc(const S* grad, const BoxSamples<compute_t<S>>& b, const Shape& s, int64_t c0, int64_t c1,
                   compute_t<S>* grad_in, std::vector<compute_t<S>>& scaled) {
  using T = compute_t<S>;
  const int64_t bins = s.ph * s.pw, C = s.c;
  T* image = grad_in + b.image * s.h * s.w * C;
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

// map: the input (forward) or its gradient (backward); pooled: the output or its gradient; rois must
// have the dtype of the data (input, grad_output).
Shape check_args(const TensorView& map, const TensorView& rois, const TensorView& pooled, const char* pooled_name) {
  const TensorView& input = map;
  check_shape(input, "input", {-1, -1, -1, -1});
  check_shape(rois, "rois", {-1, 5});
  check_dtype(rois, "rois", pooled.dtype);
  check_contiguous(rois, "rois");
  check_shape(pooled, pooled_name, {rois.size(0), input.size(1), -1, -1});
  for (const TensorView* t : {&input, &rois, &pooled}) check_device(*t, "tensors", DeviceType::CPU);
  Shape s{input.size(0), input.size(1), input.size(2), input.size(3), pooled.size(2), pooled.size(3), false};
  // Contiguous NCHW, or channels_last (strides C*H*W*... with C innermost).
  const bool nchw = input.is_contiguous() && pooled.is_contiguous();
  const bool nhwc = input.stride(1) == 1 && input.stride(3) == s.c && input.stride(2) == s.w * s.c &&
                    pooled.stride(1) == 1 && pooled.stride(3) == s.c && pooled.stride(2) == s.pw * s.c;
  check_arg(nchw || nhwc || s.c == 1, "input and output must both be contiguous NCHW or both channels_last");
  s.channels_last = !nchw && nhwc;
  check_arg(s.ph > 0 && s.pw > 0, "output_size must be positive");
  return s;
}

// The sampling points of boxes [k0, k1), computed once (in parallel) and shared by every channel.
// Groups are cut so the points stay within kGroupPoints (a few tens of MB).
constexpr int64_t kGroupPoints = int64_t(1) << 19;

// The boxes of a group ordered by image, then index: the channel-outer loops then touch one image's
// planes at a time (a working set that fits L2), in an order fixed by the input alone.
template <class T>
std::vector<int64_t> by_image(const std::vector<BoxSamples<T>>& group) {
  std::vector<int64_t> order(group.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int64_t(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return group[a].image < group[b].image; });
  return order;
}

template <class S>
int64_t sample_group(const TensorView& rois, int64_t k0, const Shape& s, double spatial_scale, int64_t sampling_ratio,
                     bool aligned, std::vector<BoxSamples<compute_t<S>>>& group, int nthreads) {
  const int64_t k = rois.size(0);
  const int64_t box_points = s.ph * s.pw * (sampling_ratio > 0 ? sampling_ratio * sampling_ratio : 4);
  const int64_t k1 = std::min(k, k0 + std::max<int64_t>(1, kGroupPoints / box_points));
  group.resize(size_t(k1 - k0));
  parallel_for(k0, k1, 8, nthreads, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i)
      box_samples(rois.ptr<S>() + i * 5, i, s, spatial_scale, sampling_ratio, aligned, group[i - k0]);
  });
  return k1;
}

}  // namespace

void roi_align_forward_cpu(const TensorView& input, const TensorView& rois, double spatial_scale,
                           int64_t sampling_ratio, bool aligned, const TensorView& output, int nthreads) {
  const Shape s = check_args(input, rois, output, "output");
  check_dtype(output, "output", input.dtype);
  const int64_t k = rois.size(0), bins = s.ph * s.pw, box_out = s.c * bins;
  dispatch_floating(input.dtype, "input", [&](auto tag) {
    using S = decltype(tag);
    std::vector<BoxSamples<compute_t<S>>> group;
    for (int64_t k0 = 0; k0 < k;) {
      const int64_t k1 = sample_group<S>(rois, k0, s, spatial_scale, sampling_ratio, aligned, group, nthreads);
      if (s.h == 0 || s.w == 0) {  // nothing to sample
        std::fill(output.ptr<S>() + k0 * box_out, output.ptr<S>() + k1 * box_out, from_compute<S>(0.0f));
      } else if (s.channels_last) {  // boxes in parallel, channels innermost
        parallel_for(k0, k1, 1, nthreads, [&](int64_t a, int64_t b) {
          std::vector<compute_t<S>> acc;
          for (int64_t i = a; i < b; ++i) forward_nhwc(input.ptr<S>(), group[i - k0], s, output.ptr<S>() + i * box_out, acc);
        });
      } else {  // channels in parallel (4 at a time): the planes stay in cache while every box reads them
        constexpr int64_t kGroup = 4;
        const int64_t plane = s.h * s.w;
        const std::vector<int64_t> order = by_image(group);
        parallel_for(0, s.c, kGroup, nthreads, [&](int64_t c0, int64_t c1) {
          for (int64_t j : order) {
            const int64_t i = k0 + j;
            const auto& b = group[j];
            const S* in = input.ptr<S>() + (b.image * s.c + c0) * plane;
            S* out = output.ptr<S>() + i * box_out + c0 * bins;
            if (c1 - c0 == kGroup)
              forward_planes<kGroup>(in, plane, b, bins, out);
            else
              for (int64_t c = 0; c < c1 - c0; ++c) forward_planes<1>(in + c * plane, plane, b, bins, out + c * bins);
          }
        });
      }
      k0 = k1;
    }
  });
}

void roi_align_backward_cpu(const TensorView& grad_output, const TensorView& rois, double spatial_scale,
                            int64_t sampling_ratio, bool aligned, const TensorView& grad_input, int nthreads) {
  const Shape s = check_args(grad_input, rois, grad_output, "grad_output");
  check_dtype(grad_input, "grad_input", grad_output.dtype == DType::Float64 ? DType::Float64 : DType::Float32);
  if (s.h == 0 || s.w == 0) return;
  const int64_t k = rois.size(0), bins = s.ph * s.pw, box_out = s.c * bins;
  dispatch_floating(grad_output.dtype, "grad_output", [&](auto tag) {
    using S = decltype(tag);
    using T = compute_t<S>;
    std::vector<BoxSamples<T>> group;
    // Threads own disjoint channels, and each channel adds its boxes in index order: deterministic.
    // channels_last: blocks wide enough to vectorise, few enough to balance the threads.
    constexpr int64_t kGroup = 4;  // NCHW: channels per pass over a box's points
    const int64_t block = s.channels_last ? std::max<int64_t>(16, (s.c + 2 * nthreads - 1) / (2 * nthreads)) : kGroup;
    const int64_t plane = s.h * s.w;
    for (int64_t k0 = 0; k0 < k;) {
      const int64_t k1 = sample_group<S>(rois, k0, s, spatial_scale, sampling_ratio, aligned, group, nthreads);
      const std::vector<int64_t> order = by_image(group);
      parallel_for(0, s.c, block, nthreads, [&](int64_t c0, int64_t c1) {
        std::vector<T> scaled;
        for (int64_t j : order) {
          const int64_t i = k0 + j;
          const auto& b = group[j];
          const S* grad = grad_output.ptr<S>() + i * box_out;
          if (s.channels_last) {
            backward_nhwc(grad, b, s, c0, c1, grad_input.ptr<T>(), scaled);
          } else {
            T* gx = grad_input.ptr<T>() + (b.image * s.c + c0) * plane;
            if (c1 - c0 == kGroup)
              backward_planes<kGroup>(grad + c0 * bins, b, bins, gx, plane);
            else
              for (int64_t c = 0; c < c1 - c0; ++c) backward_planes<1>(grad + (c0 + c) * bins, b, bins, gx + c * plane, plane);
          }
        }
      });
      k0 = k1;
    }
  });
}

}  // namespace fastcv
