#include "compute/transpose.h"

#include "common/cpu_isa.h"

#ifdef FASTCV_ISA_X86
#include <immintrin.h>
#endif

namespace fastcv {
namespace {

template <class T>
void transpose_scalar(const T* src, int64_t ss, int64_t r0, int64_t r1, int64_t c0, int64_t c1, T* dst, int64_t ds) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c = c0; c < c1; ++c) dst[c * ds + r] = src[r * ss + c];
}

#ifdef FASTCV_ISA_X86
// Eight rows of eight floats: unpack pairs, shuffle quads, then swap 128-bit halves.
__attribute__((target("avx2"))) void transpose_avx2(const float* src, int64_t ss, int64_t rows, int64_t cols,
                                                     float* dst, int64_t ds) {
  const int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
  for (int64_t r = 0; r < r8; r += 8) {
    for (int64_t c = 0; c < c8; c += 8) {
      const float* s = src + r * ss + c;
      const __m256 a0 = _mm256_loadu_ps(s), a1 = _mm256_loadu_ps(s + ss), a2 = _mm256_loadu_ps(s + 2 * ss),
                   a3 = _mm256_loadu_ps(s + 3 * ss), a4 = _mm256_loadu_ps(s + 4 * ss),
                   a5 = _mm256_loadu_ps(s + 5 * ss), a6 = _mm256_loadu_ps(s + 6 * ss),
                   a7 = _mm256_loadu_ps(s + 7 * ss);
      const __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1);
      const __m256 t2 = _mm256_unpacklo_ps(a2, a3), t3 = _mm256_unpackhi_ps(a2, a3);
      const __m256 t4 = _mm256_unpacklo_ps(a4, a5), t5 = _mm256_unpackhi_ps(a4, a5);
      const __m256 t6 = _mm256_unpacklo_ps(a6, a7), t7 = _mm256_unpackhi_ps(a6, a7);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* d = dst + c * ds + r;
      _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(d + ds, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(d + 2 * ds, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(d + 3 * ds, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(d + 4 * ds, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(d + 5 * ds, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(d + 6 * ds, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(d + 7 * ds, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
    transpose_scalar(src, ss, r, r + 8, c8, cols, dst, ds);
  }
  transpose_scalar(src, ss, r8, rows, int64_t(0), cols, dst, ds);
}

#endif

}  // namespace

void transpose(const float* src, int64_t src_stride, int64_t rows, int64_t cols, float* dst, int64_t dst_stride) {
#ifdef FASTCV_ISA_X86
  if (cpu_isa() >= Isa::avx2) return transpose_avx2(src, src_stride, rows, cols, dst, dst_stride);
#endif
  transpose_scalar(src, src_stride, int64_t(0), rows, int64_t(0), cols, dst, dst_stride);
}

void transpose(const double* src, int64_t src_stride, int64_t rows, int64_t cols, double* dst, int64_t dst_stride) {
  transpose_scalar(src, src_stride, int64_t(0), rows, int64_t(0), cols, dst, dst_stride);
}

}  // namespace fastcv
