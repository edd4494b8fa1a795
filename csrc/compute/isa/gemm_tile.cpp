// The GEMM micro-kernels, compiled once per instruction set by CMakeLists.txt (-march=x86-64-v4, -v3
// and the baseline, each with its own FASTCV_ISA namespace) and chosen at run time by gemm.cpp.
// Written with GCC vector extensions so one source serves every width; this file alone is compiled
// with -ffp-contract=fast, because the fused multiply-add is the GEMM's speed (no bit-exactness with
// PyTorch is promised for a matrix product, whose summation order differs anyway).
//
// Nothing here may be an inline function or template shared with other translation units: the linker
// would keep one copy, possibly the AVX-512 one, for every caller. Everything is static or in the
// ISA's own namespace.
#include <cstdint>

#include "compute/gemm_kernel.h"

#ifndef FASTCV_ISA
#error "compile with -DFASTCV_ISA=<name> (see CMakeLists.txt)"
#endif

namespace fastcv {
namespace gemm {
namespace FASTCV_ISA {
namespace {

template <class T, int W>
struct Vec {
  typedef T type __attribute__((vector_size(W * sizeof(T)), aligned(sizeof(T))));  // unaligned loads
};

// MR x (NV * W) tile; the MR * NV accumulators must fit the register file with room for NV B vectors.
template <class T, int W, int MR, int NV>
inline __attribute__((always_inline)) void tile_strided_impl(int64_t kc, const T* a, int64_t lda_k, int64_t lda_i,
                                                             const T* b, int64_t ldb, T* c, int64_t ldc,
                                                             bool accumulate) {
  using V = typename Vec<T, W>::type;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v)
      acc[i][v] = accumulate ? *reinterpret_cast<const V*>(c + i * ldc + v * W) : V{};
  for (int64_t k = 0; k < kc; ++k) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = *reinterpret_cast<const V*>(b + v * W);
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NV; ++v) acc[i][v] += a[i * lda_i] * bv[v];  // broadcasts; contracted to FMA
    a += lda_k;
    b += ldb;
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(c + i * ldc + v * W) = acc[i][v];
}

template <class T, int W, int MR, int NV>
void tile_strided(int64_t kc, const T* a, int64_t lda_k, int64_t lda_i, const T* b, int64_t ldb, T* c, int64_t ldc,
                  bool accumulate) {
  tile_strided_impl<T, W, MR, NV>(kc, a, lda_k, lda_i, b, ldb, c, ldc, accumulate);
}

// Packed panels: the strides are the panel widths, known at compile time.
template <class T, int W, int MR, int NV>
void tile(int64_t kc, const T* a, const T* b, T* c, int64_t ldc, bool accumulate) {
  tile_strided_impl<T, W, MR, NV>(kc, a, MR, 1, b, NV * W, c, ldc, accumulate);
}

template <class T, int W, int MR, int NV>
void tile_rows(int64_t segments, const T* const* rows, const int64_t* span, const T* b, T* c, int64_t ldc,
               bool accumulate) {
  using V = typename Vec<T, W>::type;
  constexpr int64_t NR = NV * W;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v)
      acc[i][v] = accumulate ? *reinterpret_cast<const V*>(c + i * ldc + v * W) : V{};
  for (int64_t s = 0; s < segments; ++s) {
    const T* r[MR];
    for (int i = 0; i < MR; ++i) r[i] = rows[s * MR + i];
    const T* bk = b + span[2 * s] * NR;
    for (int64_t k = 0, n = span[2 * s + 1]; k < n; ++k, bk += NR) {
      V bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = *reinterpret_cast<const V*>(bk + v * W);
      for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) acc[i][v] += r[i][k] * bv[v];  // broadcasts; contracted to FMA
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(c + i * ldc + v * W) = acc[i][v];
}

// The lane sums of 16 vectors of 16 lanes in four rounds of shuffles and adds (45 operations instead
// of 240 scalar additions: on 14x14 images the reductions were half the weight gradient's time).
// Lane L of the result holds vector kLaneOf[L]'s total (a bit reversal, found by tracing the rounds).
template <class T, class V>
void reduce16(const V* v, T* out) {
  using I = typename Vec<int32_t, 16>::type;
  V r1[8], r2[4], r3[2];
  for (int p = 0; p < 8; ++p)
    r1[p] = __builtin_shuffle(v[2 * p], v[2 * p + 1], I{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}) +
            __builtin_shuffle(v[2 * p], v[2 * p + 1], I{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  for (int p = 0; p < 4; ++p)
    r2[p] = __builtin_shuffle(r1[2 * p], r1[2 * p + 1], I{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27}) +
            __builtin_shuffle(r1[2 * p], r1[2 * p + 1], I{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
  for (int p = 0; p < 2; ++p)
    r3[p] = __builtin_shuffle(r2[2 * p], r2[2 * p + 1], I{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29}) +
            __builtin_shuffle(r2[2 * p], r2[2 * p + 1], I{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
  const V f = __builtin_shuffle(r3[0], r3[1], I{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}) +
              __builtin_shuffle(r3[0], r3[1], I{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
  constexpr int kLaneOf[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  for (int l = 0; l < 16; ++l) out[kLaneOf[l]] = f[l];
}

template <class T, int W, int DM, int DN>
void dot(int64_t segments, int64_t len, const T* const* a_rows, const T* const* b_rows, T* c, int64_t ldc) {
  using V = typename Vec<T, W>::type;
  V acc[DM][DN];
  T tail[DM][DN] = {};
  for (int i = 0; i < DM; ++i)
    for (int j = 0; j < DN; ++j) acc[i][j] = V{};
  const int64_t body = len / W * W;
  for (int64_t s = 0; s < segments; ++s) {
    const T* const* a = a_rows + s * DM;
    const T* const* b = b_rows + s * DN;
    for (int64_t t = 0; t < body; t += W) {
      V av[DM];
      for (int i = 0; i < DM; ++i) av[i] = *reinterpret_cast<const V*>(a[i] + t);
      for (int j = 0; j < DN; ++j) {
        const V bv = *reinterpret_cast<const V*>(b[j] + t);
        for (int i = 0; i < DM; ++i) acc[i][j] += av[i] * bv;
      }
    }
    for (int i = 0; i < DM; ++i)
      for (int j = 0; j < DN; ++j)
        for (int64_t r = body; r < len; ++r) tail[i][j] += a[i][r] * b[j][r];
  }
  T total[DM][DN];
  if constexpr (W == 16 && DM * DN == 16) {
    reduce16(&acc[0][0], &total[0][0]);
  } else {
    for (int i = 0; i < DM; ++i)
      for (int j = 0; j < DN; ++j) {
        total[i][j] = 0;
        for (int l = 0; l < W; ++l) total[i][j] += acc[i][j][l];
      }
  }
  for (int i = 0; i < DM; ++i)
    for (int j = 0; j < DN; ++j) c[i * ldc + j] += total[i][j] + tail[i][j];
}

template <class T, int MR>
void pack_a_rows(const T* const* rows, int64_t kc, T* dst) {
  int64_t k = 0;
  if constexpr (MR == 8 && sizeof(T) == 4) {  // 8 x 8 transposes in three rounds of shuffles
    using V = typename Vec<T, 8>::type;
    using I = typename Vec<int32_t, 8>::type;
    for (; k + 8 <= kc; k += 8) {
      V r[8], t[8], u[8];
      for (int i = 0; i < 8; ++i) r[i] = *reinterpret_cast<const V*>(rows[i] + k);
      for (int i = 0; i < 8; i += 2) {
        t[i] = __builtin_shuffle(r[i], r[i + 1], I{0, 8, 1, 9, 4, 12, 5, 13});
        t[i + 1] = __builtin_shuffle(r[i], r[i + 1], I{2, 10, 3, 11, 6, 14, 7, 15});
      }
      for (int h = 0; h < 8; h += 4)
        for (int q = 0; q < 2; ++q) {
          u[h + 2 * q] = __builtin_shuffle(t[h + q], t[h + q + 2], I{0, 1, 8, 9, 4, 5, 12, 13});
          u[h + 2 * q + 1] = __builtin_shuffle(t[h + q], t[h + q + 2], I{2, 3, 10, 11, 6, 7, 14, 15});
        }
      for (int c = 0; c < 4; ++c) {
        *reinterpret_cast<V*>(dst + (k + c) * 8) = __builtin_shuffle(u[c], u[c + 4], I{0, 1, 2, 3, 8, 9, 10, 11});
        *reinterpret_cast<V*>(dst + (k + c + 4) * 8) = __builtin_shuffle(u[c], u[c + 4], I{4, 5, 6, 7, 12, 13, 14, 15});
      }
    }
  }
  for (; k < kc; ++k)
    for (int i = 0; i < MR; ++i) dst[k * MR + i] = rows[i][k];
}

template <class T, int W, int NV>
void pack_b_row(const T* row, int64_t n, int64_t kc, T* dst) {
  using V = typename Vec<T, W>::type;
  constexpr int64_t NR = W * NV;
  int64_t jp = 0;
  for (; (jp + 1) * NR <= n; ++jp)
    for (int v = 0; v < NV; ++v)
      *reinterpret_cast<V*>(dst + jp * NR * kc + v * W) = *reinterpret_cast<const V*>(row + jp * NR + v * W);
  if (jp * NR < n) {
    T* out = dst + jp * NR * kc;
    const int64_t rest = n - jp * NR;
    for (int64_t j = 0; j < NR; ++j) out[j] = j < rest ? row[jp * NR + j] : T(0);
  }
}

}  // namespace

#if defined(__AVX512F__)
constexpr int kIsa = 2;
constexpr int kDM = 4, kDN = 4;
#elif defined(__AVX2__)
constexpr int kIsa = 1;
constexpr int kDM = 2, kDN = 4;
#else
constexpr int kIsa = 0;
constexpr int kDM = 2, kDN = 4;
#endif
constexpr int kWidthBytes = kVectorBytes[kIsa], kMR = kTileRows[kIsa], kNV = kTileVectors;

#define FASTCV_STR2(x) #x
#define FASTCV_STR(x) FASTCV_STR2(x)

Kernel<float> make(float) {
  constexpr int W = kWidthBytes / 4;
  return {kMR, W * kNV, &tile<float, W, kMR, kNV>, &tile_strided<float, W, kMR, kNV>, &tile_rows<float, W, kMR, kNV>, kDM, kDN, &dot<float, W, kDM, kDN>, &pack_a_rows<float, kMR>,
          &pack_b_row<float, W, kNV>, FASTCV_STR(FASTCV_ISA)};
}
Kernel<double> make(double) {
  constexpr int W = kWidthBytes / 8;
  return {kMR, W * kNV, &tile<double, W, kMR, kNV>, &tile_strided<double, W, kMR, kNV>, &tile_rows<double, W, kMR, kNV>, kDM, kDN, &dot<double, W, kDM, kDN>, &pack_a_rows<double, kMR>,
          &pack_b_row<double, W, kNV>, FASTCV_STR(FASTCV_ISA)};
}

}  // namespace FASTCV_ISA
}  // namespace gemm
}  // namespace fastcv
