#pragma once
// A fast out-of-place transpose of a float matrix, for packing GEMM panels from row-major operands
// (attention's K^T, Q^T and O^T): 8 x 8 register blocks where AVX2 is available, scalar elsewhere.
#include <cstdint>

namespace fastcv {

// dst[c * dst_stride + r] = src[r * src_stride + c] for r < rows, c < cols.
void transpose(const float* src, int64_t src_stride, int64_t rows, int64_t cols, float* dst, int64_t dst_stride);
void transpose(const double* src, int64_t src_stride, int64_t rows, int64_t cols, double* dst, int64_t dst_stride);

}  // namespace fastcv
