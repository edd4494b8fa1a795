// CUDA depthwise convolution (groups == channels), one launch per op for the whole batch, NCHW or
// NHWC, with the per-element arithmetic of depthwise.h (the CPU kernels' border and reference path).
//   forward, input gradient: one thread per output element, in the tensor's memory order (writes
//     coalesce; in NHWC neighbouring threads read neighbouring channels). The input gradient gathers
//     the taps that reach its element: no atomics.
//   weight gradient: one block per (output channel, tap) in NCHW, or per (32 output channels, tap) in
//     NHWC (the 32 channels across a warp, so its reads coalesce); each thread sums a fixed subset of
//     the output pixels, then the block adds the threads' sums in a fixed order through shared memory.
//     No atomics: the result is the same on every run.
// Float16 and bfloat16 accumulate in float, float64 in double. Indices are 64-bit.
#include <cuda_runtime.h>

#include "common/cuda_utils.cuh"
#include "common/dtype.h"
#include "ops/conv2d/conv2d_ops.h"
#include "ops/conv2d/depthwise.h"

namespace fastcv {
namespace {

using conv2d::Geometry;
constexpr int kThreads = 256;
constexpr int kLanes = 32, kRows = 8;  // NHWC weight gradient: channels x pixel lanes per block

struct WeightStrides {
  int64_t o, i, j;  // of dims 0, 2 and 3 of a [Cout, 1, kh, kw] weight
};

template <class S>
__global__ void forward_kernel(const S* __restrict__ x, const S* __restrict__ w, WeightStrides ws,
                               const S* __restrict__ bias, S* __restrict__ out, Geometry g, bool nhwc, int64_t total) {
  using T = compute_t<S>;
  const int64_t M = g.out_channels / g.channels;
  for (const int64_t idx : grid_stride(total)) {
    int64_t n, o, oh, ow, xh, xw;
    const S* plane;
    if (nhwc) {
      int64_t r = idx / g.out_channels;
      o = idx % g.out_channels, ow = r % g.out_w, r /= g.out_w, oh = r % g.out_h, n = r / g.out_h;
      plane = x + n * g.height * g.width * g.channels + o / M, xh = g.width * g.channels, xw = g.channels;
    } else {
      int64_t r = idx / g.out_w;
      ow = idx % g.out_w, oh = r % g.out_h, r /= g.out_h, o = r % g.out_channels, n = r / g.out_channels;
      plane = x + (n * g.channels + o / M) * g.height * g.width, xh = g.width, xw = 1;
    }
    const T acc = depthwise::output_pixel<T>(plane, xh, xw, w + o * ws.o, ws.i, ws.j, g, oh, ow);
    out[idx] = from_compute<S>(acc + (bias ? T(to_float(bias[o])) : T(0)));
  }
}

template <class S>
__global__ void input_grad_kernel(const S* __restrict__ grad_output, const S* __restrict__ w, WeightStrides ws,
                                  S* __restrict__ grad_input, Geometry g, bool nhwc, int64_t total) {
  using T = compute_t<S>;
  const int64_t M = g.out_channels / g.channels;
  for (const int64_t idx : grid_stride(total)) {
    int64_t n, c, h, x, gm, gh, gw;
    const S* go;
    if (nhwc) {
      int64_t r = idx / g.channels;
      c = idx % g.channels, x = r % g.width, r /= g.width, h = r % g.height, n = r / g.height;
      go = grad_output + n * g.out_h * g.out_w * g.out_channels + c * M;
      gm = 1, gh = g.out_w * g.out_channels, gw = g.out_channels;
    } else {
      int64_t r = idx / g.width;
      x = idx % g.width, h = r % g.height, r /= g.height, c = r % g.channels, n = r / g.channels;
      go = grad_output + (n * g.out_channels + c * M) * g.out_h * g.out_w;
      gm = g.out_h * g.out_w, gh = g.out_w, gw = 1;
    }
    grad_input[idx] = from_compute<S>(
        depthwise::input_grad_pixel<T>(go, gm, gh, gw, w + c * M * ws.o, ws.o, ws.i, ws.j, M, g, h, x));
  }
}

// The output pixels a tap reads inside the image: rows [oh0, oh0 + vh), columns [ow0, ow0 + vw).
struct TapRange {
  int64_t oh0, vh, ow0, vw;
};

__device__ TapRange tap_range(const Geometry& g, int64_t i, int64_t j) {
  int64_t h0, h1, w0, w1;
  depthwise::tap_outputs(g.height, g.out_h, g.sh, i * g.dh - g.ph, h0, h1);
  depthwise::tap_outputs(g.width, g.out_w, g.sw, j * g.dw - g.pw, w0, w1);
  return {h0, h1 - h0, w0, w1 - w0};
}

// NCHW: block = (output channel o, tap k); threads stride over the (image, row, column) triples.
template <class S>
__global__ void weight_grad_nchw_kernel(const S* __restrict__ grad_output, const S* __restrict__ x,
                                        S* __restrict__ grad_weight, WeightStrides ws, Geometry g) {
  using T = compute_t<S>;
  __shared__ T partial[kThreads];
  const int64_t taps = g.kh * g.kw, o = blockIdx.x / taps, k = blockIdx.x % taps, i = k / g.kw, j = k % g.kw;
  const int64_t c = o / (g.out_channels / g.channels);
  const TapRange r = tap_range(g, i, j);
  const int64_t count = g.batch * r.vh * r.vw;
  T acc = T(0);
  for (int64_t e = threadIdx.x; e < count; e += blockDim.x) {
    const int64_t ow = r.ow0 + e % r.vw, rest = e / r.vw, oh = r.oh0 + rest % r.vh, n = rest / r.vh;
    acc += depthwise::weight_grad_term<T>(grad_output + (n * g.out_channels + o) * g.out_h * g.out_w, g.out_w, 1,
                                          x + (n * g.channels + c) * g.height * g.width, g.width, 1, g, i, j, oh, ow);
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {  // a fixed tree: the same sum on every run
    if (int(threadIdx.x) < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) grad_weight[o * ws.o + i * ws.i + j * ws.j] = from_compute<S>(partial[0]);
}

// NHWC: block = (kLanes output channels, tap k); threadIdx.x picks the channel, threadIdx.y strides
// over the (image, row, column) triples.
template <class S>
__global__ void weight_grad_nhwc_kernel(const S* __restrict__ grad_output, const S* __restrict__ x,
                                        S* __restrict__ grad_weight, WeightStrides ws, Geometry g) {
  using T = compute_t<S>;
  __shared__ T partial[kRows][kLanes];
  const int64_t taps = g.kh * g.kw, k = blockIdx.x % taps, i = k / g.kw, j = k % g.kw;
  const int64_t o = blockIdx.x / taps * kLanes + threadIdx.x, c = o / (g.out_channels / g.channels);
  const TapRange r = tap_range(g, i, j);
  const int64_t count = g.batch * r.vh * r.vw;
  T acc = T(0);
  if (o < g.out_channels)
    for (int64_t e = threadIdx.y; e < count; e += kRows) {
      const int64_t ow = r.ow0 + e % r.vw, rest = e / r.vw, oh = r.oh0 + rest % r.vh, n = rest / r.vh;
      acc += depthwise::weight_grad_term<T>(grad_output + n * g.out_h * g.out_w * g.out_channels + o,
                                            g.out_w * g.out_channels, g.out_channels,
                                            x + n * g.height * g.width * g.channels + c, g.width * g.channels,
                                            g.channels, g, i, j, oh, ow);
    }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && o < g.out_channels) {
    T s = T(0);
    for (int y = 0; y < kRows; ++y) s += partial[y][threadIdx.x];
    grad_weight[o * ws.o + i * ws.i + j * ws.j] = from_compute<S>(s);
  }
}

WeightStrides strides_of(const TensorView& w) { return {w.stride(0), w.stride(2), w.stride(3)}; }

}  // namespace

void depthwise_forward_cuda(const TensorView& input, const TensorView& weight, const TensorView* bias,
                            const TensorView& output, const Geometry& g, uintptr_t stream) {
  check_conv2d_args(g, &input, weight, bias, &output, DeviceType::CUDA);
  check_arg(is_depthwise(g), "depthwise_forward_cuda: groups must equal the input channels");
  const int64_t total = output.numel();
  if (total == 0) return;
  const bool nhwc = nhwc_layout(input) || nhwc_layout(output);
  DeviceGuard guard(output);
  dispatch_floating(output.dtype, "input", [&](auto tag) {
    using S = decltype(tag);
    forward_kernel<S><<<blocks_for(total, kThreads), kThreads, 0, as_stream(stream)>>>(
        input.ptr<S>(), weight.ptr<S>(), strides_of(weight), optional_ptr<S>(bias), output.ptr<S>(), g, nhwc,
        total);
  });
  FASTCV_CUDA_CHECK_LAUNCH("depthwise forward_kernel");
}

void depthwise_input_grad_cuda(const TensorView& grad_output, const TensorView& weight, const TensorView& grad_input,
                               const Geometry& g, uintptr_t stream) {
  check_conv2d_args(g, &grad_input, weight, nullptr, &grad_output, DeviceType::CUDA);
  check_arg(is_depthwise(g), "depthwise_input_grad_cuda: groups must equal the input channels");
  const int64_t total = grad_input.numel();
  if (total == 0) return;
  const bool nhwc = nhwc_layout(grad_input) || nhwc_layout(grad_output);
  DeviceGuard guard(grad_input);
  dispatch_floating(grad_input.dtype, "grad_output", [&](auto tag) {
    using S = decltype(tag);
    input_grad_kernel<S><<<blocks_for(total, kThreads), kThreads, 0, as_stream(stream)>>>(
        grad_output.ptr<S>(), weight.ptr<S>(), strides_of(weight), grad_input.ptr<S>(), g, nhwc, total);
  });
  FASTCV_CUDA_CHECK_LAUNCH("depthwise input_grad_kernel");
}

void depthwise_weight_grad_cuda(const TensorView& grad_output, const TensorView& input, const TensorView& grad_weight,
                                const Geometry& g, uintptr_t stream) {
  check_conv2d_args(g, &input, grad_weight, nullptr, &grad_output, DeviceType::CUDA);
  check_arg(is_depthwise(g), "depthwise_weight_grad_cuda: groups must equal the input channels");
  if (grad_weight.numel() == 0) return;
  const bool nhwc = nhwc_layout(input) || nhwc_layout(grad_output);
  DeviceGuard guard(grad_weight);
  // An empty batch gives count = 0 in every block: the kernels then write zeros.
  dispatch_floating(grad_weight.dtype, "grad_output", [&](auto tag) {
    using S = decltype(tag);
    if (nhwc) {
      const int64_t blocks = (g.out_channels + kLanes - 1) / kLanes * g.taps();
      weight_grad_nhwc_kernel<S><<<unsigned(blocks), dim3(kLanes, kRows), 0, as_stream(stream)>>>(
          grad_output.ptr<S>(), input.ptr<S>(), grad_weight.ptr<S>(), strides_of(grad_weight), g);
    } else {
      weight_grad_nchw_kernel<S><<<unsigned(g.out_channels * g.taps()), kThreads, 0, as_stream(stream)>>>(
          grad_output.ptr<S>(), input.ptr<S>(), grad_weight.ptr<S>(), strides_of(grad_weight), g);
    }
  });
  FASTCV_CUDA_CHECK_LAUNCH("depthwise weight_grad_kernel");
}

}  // namespace fastcv
