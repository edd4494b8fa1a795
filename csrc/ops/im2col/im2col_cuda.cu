// CUDA im2col / col2im for the whole batch in one launch each. im2col: one thread per column element
// (writes coalesce). col2im: one thread per image element gathering the blocks that cover it, in a
// fixed order: no atomics, deterministic.
#include <cuda_runtime.h>

#include "common/cuda_utils.cuh"
#include "common/dtype.h"
#include "ops/im2col/im2col_ops.h"

namespace fastcv {
namespace {

using im2col::Geometry;
constexpr int kThreads = 256;

template <class S>
__global__ void im2col_kernel(const S* __restrict__ image, Geometry g, int64_t total, S* __restrict__ columns) {
  const int64_t L = g.out_h * g.out_w;
  for (const int64_t idx : grid_stride(total)) {
    const int64_t col = idx % L, row = (idx / L) % (g.channels * g.kh * g.kw), n = idx / (L * g.channels * g.kh * g.kw);
    const int64_t j = row % g.kw, i = (row / g.kw) % g.kh, c = row / (g.kw * g.kh);
    const int64_t ih = (col / g.out_w) * g.sh - g.ph + i * g.dh, iw = (col % g.out_w) * g.sw - g.pw + j * g.dw;
    const bool inside = ih >= 0 && ih < g.height && iw >= 0 && iw < g.width;
    columns[idx] = inside ? image[((n * g.channels + c) * g.height + ih) * g.width + iw]
                          : from_compute<S>(compute_t<S>(0));
  }
}

template <class S>
__global__ void col2im_kernel(const S* __restrict__ columns, Geometry g, int64_t total, S* __restrict__ image) {
  using T = compute_t<S>;
  const int64_t L = g.out_h * g.out_w;
  for (const int64_t idx : grid_stride(total)) {
    const int64_t w = idx % g.width, h = (idx / g.width) % g.height;
    const int64_t c = (idx / (g.width * g.height)) % g.channels, n = idx / (g.width * g.height * g.channels);
    T sum = T(0);
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t y = h + g.ph - i * g.dh;  // = oh * sh for the block row that puts offset i here
      if (y < 0 || y % g.sh || y / g.sh >= g.out_h) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t x = w + g.pw - j * g.dw;
        if (x < 0 || x % g.sw || x / g.sw >= g.out_w) continue;
        const int64_t row = (c * g.kh + i) * g.kw + j;
        sum += to_float(columns[(n * g.channels * g.kh * g.kw + row) * L + (y / g.sh) * g.out_w + x / g.sw]);
      }
    }
    image[idx] = from_compute<S>(sum);
  }
}

}  // namespace

void im2col_cuda(const TensorView& image, const Geometry& g, const TensorView& columns, uintptr_t stream) {
  check_im2col_args(image, g, columns, DeviceType::CUDA);
  const int64_t total = columns.numel();
  if (total == 0) return;
  DeviceGuard guard(columns);
  dispatch_floating(image.dtype, "input", [&](auto tag) {
    using S = decltype(tag);
    im2col_kernel<S><<<blocks_for(total, kThreads), kThreads, 0, as_stream(stream)>>>(image.ptr<S>(), g, total,
                                                                                     columns.ptr<S>());
  });
  FASTCV_CUDA_CHECK_LAUNCH("im2col_kernel");
}

void col2im_cuda(const TensorView& columns, const Geometry& g, const TensorView& image, uintptr_t stream) {
  check_im2col_args(image, g, columns, DeviceType::CUDA);
  const int64_t total = image.numel();
  if (total == 0) return;
  DeviceGuard guard(image);
  dispatch_floating(image.dtype, "input", [&](auto tag) {
    using S = decltype(tag);
    col2im_kernel<S><<<blocks_for(total, kThreads), kThreads, 0, as_stream(stream)>>>(columns.ptr<S>(), g, total,
                                                                                     image.ptr<S>());
  });
  FASTCV_CUDA_CHECK_LAUNCH("col2im_kernel");
}

}  // namespace fastcv
