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

template <class S>
void forward_nchw(const S* in, const BoxSamples<compute_t<S>>& b, const Shape& s, S* out) {
  using T = compute_t<S>;
  const int64_t plane = s.h * s.w, bins = s.ph * s.pw;
  for (int64_t c = 0; c < s.c; ++c) {
    const S* x = in + (b.image * s.c + c) * plane;
    for (int64_t bin = 0; bin < bins; ++bin) {
      const Bilinear<T>* p = b.points.data() + bin * b.per_bin;
      T sum = T(0);
      for (int64_t i = 0; i < b.per_bin; ++i, ++p)
        sum += p->w1 * to_float(x[p->p1]) + p->w2 * to_float(x[p->p2]) + p->w3 * to_float(x[p->p3]) +
               p->w4 * to_float(x[p->p4]);
      out[c * bins + bin] = from_compute<S>(sum / b.count);
    }
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

template <class S>
void backward_nchw(const S* grad, const BoxSamples<compute_t<S>>& b, const Shape& s, int64_t c0, int64_t c1,
                   compute_t<S>* grad_in) {
  using T = compute_t<S>;
  const int64_t plane = s.h * s.w, bins = s.ph * s.pw;
  for (int64_t c = c0; c < c1; ++c) {
    T* gx = grad_in + (b.image * s.c + c) * plane;
    for (int64_t bin = 0; bin < bins; ++bin) {
      const T g = to_float(grad[c * bins + bin]);
      const Bilinear<T>* p = b.points.data() + bin * b.per_bin;
      for (int64_t i = 0; i < b.per_bin; ++i, ++p) {
        gx[p->p1] += g * p->w1 / b.count;
        gx[p->p2] += g * p->w2 / b.count;
        gx[p->p3] += g * p->w3 / b.count;
        gx[p->p4] += g * p->w4 / b.count;
      }
    }
  }
}

template <class S>
void backward_nhwc(const S* grad, const BoxSamples<compute_t<S>>& b, const Shape& s, int64_t c0, int64_t c1,
                   compute_t<S>* grad_in) {
  using T = compute_t<S>;
  const int64_t bins = s.ph * s.pw, C = s.c;
  T* image = grad_in + b.image * s.h * s.w * C;
  for (int64_t bin = 0; bin < bins; ++bin) {
    const S* g = grad + bin * C;
    const Bilinear<T>* p = b.points.data() + bin * b.per_bin;
    for (int64_t i = 0; i < b.per_bin; ++i, ++p) {
      T *x1 = image + p->p1 * C, *x2 = image + p->p2 * C, *x3 = image + p->p3 * C, *x4 = image + p->p4 * C;
      for (int64_t c = c0; c < c1; ++c) {
        const T gc = to_float(g[c]);
        x1[c] += gc * p->w1 / b.count;
        x2[c] += gc * p->w2 / b.count;
        x3[c] += gc * p->w3 / b.count;
        x4[c] += gc * p->w4 / b.count;
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

}  // namespace

void roi_align_forward_cpu(const TensorView& input, const TensorView& rois, double spatial_scale,
                           int64_t sampling_ratio, bool aligned, const TensorView& output, int nthreads) {
  const Shape s = check_args(input, rois, output, "output");
  check_dtype(output, "output", input.dtype);
  const int64_t k = rois.size(0);
  dispatch_floating(input.dtype, "input", [&](auto tag) {
    using S = decltype(tag);
    const int64_t box_out = s.c * s.ph * s.pw;
    parallel_for(0, k, 1, nthreads, [&](int64_t k0, int64_t k1) {
      BoxSamples<compute_t<S>> b;
      std::vector<compute_t<S>> acc;
      for (int64_t i = k0; i < k1; ++i) {
        S* out = output.ptr<S>() + i * box_out;
        box_samples(rois.ptr<S>() + i * 5, i, s, spatial_scale, sampling_ratio, aligned, b);
        if (s.h == 0 || s.w == 0) {  // nothing to sample
          std::fill(out, out + box_out, from_compute<S>(0.0f));
        } else if (s.channels_last) {
          forward_nhwc(input.ptr<S>(), b, s, out, acc);
        } else {
          forward_nchw(input.ptr<S>(), b, s, out);
        }
      }
    });
  });
}

void roi_align_backward_cpu(const TensorView& grad_output, const TensorView& rois, double spatial_scale,
                            int64_t sampling_ratio, bool aligned, const TensorView& grad_input, int nthreads) {
  const Shape s = check_args(grad_input, rois, grad_output, "grad_output");
  check_dtype(grad_input, "grad_input", grad_output.dtype == DType::Float64 ? DType::Float64 : DType::Float32);
  if (s.h == 0 || s.w == 0) return;
  const int64_t k = rois.size(0);
  dispatch_floating(grad_output.dtype, "grad_output", [&](auto tag) {
    using S = decltype(tag);
    using T = compute_t<S>;
    const int64_t box_out = s.c * s.ph * s.pw;
    // Channel blocks: enough of them to balance the threads, wide enough to vectorise channels_last.
    const int64_t block = std::max<int64_t>(16, (s.c + 4 * nthreads - 1) / (4 * nthreads));
    parallel_for(0, s.c, block, nthreads, [&](int64_t c0, int64_t c1) {
      BoxSamples<T> b;
      for (int64_t i = 0; i < k; ++i) {
        box_samples(rois.ptr<S>() + i * 5, i, s, spatial_scale, sampling_ratio, aligned, b);
        const S* grad = grad_output.ptr<S>() + i * box_out;
        if (s.channels_last)
          backward_nhwc(grad, b, s, c0, c1, grad_input.ptr<T>());
        else
          backward_nchw(grad, b, s, c0, c1, grad_input.ptr<T>());
      }
    });
  });
}

}  // namespace fastcv
