#pragma once
// The per-element and per-channel arithmetic of batch norm, shared by the CPU and CUDA kernels (the CPU
// tests then exercise the GPU's math too). Compute type A is float (float32, float16, bfloat16 inputs)
// or double (float64 inputs).
//
// Every kernel sees the input as a 3-D view x[N, C, S] (S: the product of the spatial sizes) that is
// either planar (NCHW: strides C*S, S, 1) or packed (channels_last: strides S*C, 1, C; a [N, C]
// input is packed with S = 1). The channel is the reduced-over "column" in both.
#include <cmath>

#include "common/macros.h"

namespace fastcv {
namespace batch_norm {

// Moments of a set of values: count, mean, and M2 = sum((x - mean)^2). Partial results merge with
// Chan et al.'s pairwise formula, which needs no E[x^2] - E[x]^2 difference: a channel with mean 1e4
// and standard deviation 1e-2 keeps its variance in float32. Kernels compute each block's moments
// with two passes over data still in cache (mean, then squared deviations), then merge the blocks.
template <class A>
struct Moments {
  A n = 0, mean = 0, m2 = 0;
};

template <class A>
FASTCV_HD Moments<A> merge(const Moments<A>& a, const Moments<A>& b) {
  if (a.n == A(0)) return b;  // also spares the division when a block merges into empty moments
  const A n = a.n + b.n;
  if (n == A(0)) return a;
  const A delta = b.mean - a.mean;
  const A wb = b.n / n;
  Moments<A> r;
  r.n = n;
  r.mean = a.mean + delta * wb;
  r.m2 = a.m2 + b.m2 + delta * delta * a.n * wb;
  return r;
}

template <class A>
FASTCV_HD A inverse_std(A var, A eps) {
  return A(1) / std::sqrt(var + eps);
}

// Forward, per element: y = (x - mean) * scale + shift [+ residual] [then ReLU], with
// scale = weight * invstd and shift = bias - mean_lo * scale. Subtracting the mean first (not
// x * scale + (bias - mean * scale)) keeps the result exact when |mean| is far above the standard
// deviation: x - mean is exact for x near the mean. mean_lo, the part of a double-precision mean that
// float cannot hold, enters through the shift, so a float32 channel with mean 1e4 and standard
// deviation 1e-2 loses nothing to the mean's rounding (about 5e-4 there, 5% of a standard deviation).
template <class A>
struct Affine {
  A mean, scale, shift;
};

template <class A>
FASTCV_HD Affine<A> affine(A mean, A var, A eps, A weight, A bias, A mean_lo = A(0)) {
  const A scale = weight * inverse_std(var, eps);
  return {mean, scale, bias - mean_lo * scale};
}

template <class A>
FASTCV_HD A apply(A x, const Affine<A>& f) {
  return (x - f.mean) * f.scale + f.shift;
}

// NaN passes through, as in torch.relu.
FASTCV_HD float relu(float v) { return v < 0.f ? 0.f : v; }
FASTCV_HD double relu(double v) { return v < 0.0 ? 0.0 : v; }

// Backward, per element. g is the incoming gradient already masked by the ReLU (g = dy where y > 0,
// else 0) when a ReLU was fused. With the channel's sums over its M = N*S elements
//   sum_g = sum(g),  sum_gx = sum(g * (x - mean)),
// training (batch statistics):   dx = k * (g - sum_g / M - (x - mean) * invstd^2 * sum_gx / M)
// evaluation (fixed statistics): dx = k * g,                  k = weight * invstd,
// written as dx = g * k + (x - mean) * cx + c0, so that each element costs two multiply-adds.
// grad_weight = sum_gx * invstd, grad_bias = sum_g.
template <class A>
struct GradCoeffs {
  A mean, k, cx, c0;
};

template <class A>
FASTCV_HD GradCoeffs<A> grad_coeffs(A mean, A var, A eps, A weight, A sum_g, A sum_gx, A count, bool training) {
  const A invstd = inverse_std(var, eps);
  const A k = weight * invstd;
  if (!training) return {mean, k, A(0), A(0)};
  const A inv_m = A(1) / count;
  return {mean, k, -k * invstd * invstd * sum_gx * inv_m, -k * sum_g * inv_m};
}

template <class A>
FASTCV_HD A grad_input(A g, A x, const GradCoeffs<A>& c) {
  return g * c.k + (x - c.mean) * c.cx + c.c0;
}

// The gradient that passes a fused ReLU: dy where the output is positive (PyTorch's threshold_backward
// passes nothing at exactly zero).
template <class A>
FASTCV_HD A relu_mask(A dy, A y) {
  return y > A(0) ? dy : A(0);
}

}  // namespace batch_norm
}  // namespace fastcv
