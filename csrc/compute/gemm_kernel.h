#pragma once
// The GEMM micro-kernel's interface, kept apart from gemm.h: isa/gemm_tile.cpp (compiled with AVX-512 or
// AVX2 flags) includes only this, so no inline function of a shared header is compiled with those flags.
#include <cstdint>

namespace fastcv {
namespace gemm {

// Register blocking per instruction set, indexed by fastcv::Isa's value (baseline SSE2, AVX2,
// AVX-512): tiles of kTileRows[isa] rows by kTileVectors vectors. 32 vector registers with AVX-512 hold
// 8 x 2 accumulators (MR = 8 also divides the usual channel counts), 16 registers hold 6 x 2.
// Constants, so that code built on the tiles can check at compile time that every geometry works.
constexpr int kVectorBytes[3] = {16, 32, 64};
constexpr int kTileRows[3] = {6, 6, 8};
constexpr int kTileVectors = 2;
constexpr int tile_cols(int isa, int element_bytes) { return kVectorBytes[isa] / element_bytes * kTileVectors; }

// One register-blocked micro-kernel: c[i * ldc + j] (+)= sum_k a[k * mr + i] * b[k * nr + j] for an
// mr x nr tile; `accumulate` false overwrites c. Compiled per instruction set (isa/gemm_tile.cpp).
//
// And a dot-product kernel for products whose operands are both contiguous along the summed index
// (a convolution's weight gradient in NCHW): c[i * ldc + j] += sum_s sum_{t < len} a[s * dm + i][t] *
// b[s * dn + j][t] for i < dm, j < dn over `segments` pairs of row sets (the images of a batch), the
// rows given by pointers, so neither operand is packed or transposed. Each sum is kept in vector lanes
// across all segments and reduced once, in a fixed order.
template <class T>
struct Kernel {
  int mr, nr;
  void (*tile)(int64_t kc, const T* a, const T* b, T* c, int64_t ldc, bool accumulate);
  // The same tile with unpacked operands: step k reads a[k * lda_k + i * lda_i] (broadcast loads take
  // any address) and b[k * ldb + j], so row-major matrices are read in place whether their rows are the
  // k-steps or the tile's rows (attention's K, V and probability tiles need no packing).
  void (*tile_strided)(int64_t kc, const T* a, int64_t lda_k, int64_t lda_i, const T* b, int64_t ldb, T* c,
                       int64_t ldc, bool accumulate);
  // The same tile with A read from rows where they lie, in segments: segment s adds
  //   sum_{k < span[2s + 1]} rows[s * mr + i][k] * b[(span[2s] + k) * nr + j]
  // over one packed B panel (span[2s]: the segment's first k in it). A convolution's channels_last forward
  // reads each pixel's channels of one tap (or kernel row) in the image itself, with no A panel packed.
  void (*tile_rows)(int64_t segments, const T* const* rows, const int64_t* span, const T* b, T* c, int64_t ldc,
                    bool accumulate);
  int dm, dn;
  void (*dot)(int64_t segments, int64_t len, const T* const* a, const T* const* b, T* c, int64_t ldc);
  // An A panel from mr rows that are contiguous along k: dst[k * mr + i] = rows[i][k] for k < kc
  // (a transpose, done in registers 8 x 8 at a time where mr is 8).
  void (*pack_a_rows)(const T* const* rows, int64_t kc, T* dst);
  // One row of a B block into its kc x nr panels: dst[jp * nr * kc + jj] = row[jp * nr + jj] for the n
  // values, zeros after them in the last panel. A whole panel row is a few vector moves, where a memcpy
  // call per panel cost a tenth of a 3x3 convolution's forward (measured).
  void (*pack_b_row)(const T* row, int64_t n, int64_t kc, T* dst);
  const char* isa;
};

}  // namespace gemm
}  // namespace fastcv
