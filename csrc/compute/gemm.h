#pragma once
// A blocked GEMM for the CPU convolution: C = A * B with both operands packed into panels by the caller's
// packers, so a convolution can build its panels straight from the image (implicit im2col: the column
// matrix only ever exists one cache-sized block at a time).
//
// Panels: A in row panels of MR rows stored k-major (panel[k * MR + i]); B in column panels of NR columns
// stored k-major (panel[k * NR + j]). Rows and columns past the matrix edge are packed as zeros, so the
// micro-kernel always computes whole MR x NR tiles into a padded C block.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "compute/gemm_kernel.h"

namespace fastcv {
namespace gemm {

// The kernel for the instruction set in use (cpu_isa(): AVX-512, AVX2+FMA, or baseline x86-64 SSE2).
// Callers take it once per call, so forcing an ISA between calls switches every kernel.
const Kernel<float>& kernel(float);
const Kernel<double>& kernel(double);

// The micro-kernel's own rate in GFLOP/s, summed over nthreads threads each timing `seconds` of tiles on
// L1-resident panels: the ceiling the convolution's GFLOP/s are compared with (python -m fastcv bench).
template <class T>
double tile_gflops(int nthreads, double seconds);

// Depth of one packed block: a B panel of KC x NR floats (32 KB at NR = 32) stays in L1 while the
// micro-kernel streams it, and an A panel of MR x KC stays there too.
constexpr int64_t kKC = 256;

// Per-thread scratch: B panels of a block, one A panel, the C block, one gathered row, and one tile for
// the edges of an exact C (multiply's `exact`).
template <class T>
struct Workspace {
  std::vector<T> a, b, c, row, edge;
};

// The calling thread's workspace (kernels run on persistent pool or OpenMP threads, so it is reused).
template <class T>
Workspace<T>& workspace() {
  thread_local Workspace<T> ws;
  return ws;
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// C block [round_up(m, MR) x ldc] = A[m x K] * B[K x n], ldc >= round_up(n, NR).
//   pack_a(i, k0, kc, dst) -> const T*: the MR x kc panel of rows [i, i + MR), written to dst (MR * kc
//   values) or pointing into storage packed ahead of time.
//   pack_b(k0, kc, dst) -> const T*: all kc x NR panels of the n columns, one after another (panel jp at
//   jp * NR * kc), written to dst or pointing into storage. Packing a block at once lets a gather read
//   each source row as one run instead of NR-wide pieces (measured: 3x faster on a 1x1 convolution).
// Each A panel is reused across all B panels of the block, and the B block across all A panels.
// `accumulate` adds to what c holds (a sum over several calls, as the weight gradient's over images).
// `between(k0, ip, m_panels)` runs after each row panel's tiles: a place to prefetch the next block's
// source while the arithmetic hides the memory latency.
// `a_stored`: pack_a only points into panels stored ahead of time (a convolution's packed weights), so
// they can be visited once per B panel: each B panel then stays in L1 while the A panels stream from L2,
// instead of every B panel streaming past each A panel (2-4% on the NCHW forward, measured).
// `exact`: c is the destination itself, exactly m x n values with row stride ldc (a convolution's output
// tensor), instead of a padded block. Whole tiles are computed into it in place; the tiles that cross its
// edge go through ws.edge, and only their m x n part is copied in (and out, when accumulating), so
// nothing outside the destination is touched. Saves the copy of a C block into the output, which for a
// 1x1 convolution with few input channels cost as much as the products (measured: 64->256 at 56x56).
// Tile(dst, ld) computes an MR x NR tile into dst with row stride ld. Where only rows x cols of it lie in
// the destination, it runs on `edge` (MR x NR) instead and only that part is copied in (when accumulating)
// and out, so nothing outside the destination is touched.
template <class T, class Tile>
void edge_tile(T* dst, int64_t ldc, int64_t rows, int64_t cols, int64_t MR, int64_t NR, bool accumulate, T* edge,
               const Tile& tile) {
  if (rows == MR && cols == NR) {
    tile(dst, ldc);
    return;
  }
  if (accumulate)
    for (int64_t i = 0; i < rows; ++i) std::copy(dst + i * ldc, dst + i * ldc + cols, edge + i * NR);
  tile(edge, NR);
  for (int64_t i = 0; i < rows; ++i) std::copy(edge + i * NR, edge + i * NR + cols, dst + i * ldc);
}

struct NoHook {
  void operator()(int64_t, int64_t, int64_t) const {}
};
template <class T, class PackA, class PackB, class Hook = NoHook>
void multiply(const Kernel<T>& kern, int64_t m, int64_t n, int64_t K, const PackA& pack_a,
              const PackB& pack_b, Workspace<T>& ws, T* c, int64_t ldc, bool accumulate = false,
              const Hook& between = Hook{}, bool a_stored = false, bool exact = false) {
  const int64_t MR = kern.mr, NR = kern.nr;
  const int64_t m_panels = (m + MR - 1) / MR, n_panels = (n + NR - 1) / NR;
  const int64_t kc_max = std::min<int64_t>(kKC, std::max<int64_t>(K, 1));
  ws.a.resize(size_t(MR * kc_max));
  ws.b.resize(size_t(n_panels * NR * kc_max));
  if (K == 0) {  // an empty sum: zeros
    if (accumulate) return;
    const int64_t rows = exact ? m : m_panels * MR, cols = exact ? n : n_panels * NR;
    for (int64_t i = 0; i < rows; ++i) std::fill(c + i * ldc, c + i * ldc + cols, T(0));
    return;
  }
  if (exact) ws.edge.assign(size_t(MR * NR), T(0));
  // Tile (ip, jp) over depth kc, adding to what C holds when acc.
  const auto tile = [&](int64_t ip, int64_t jp, int64_t kc, const T* a, const T* b, bool acc) {
    const int64_t rows = exact ? std::min(MR, m - ip * MR) : MR, cols = exact ? std::min(NR, n - jp * NR) : NR;
    edge_tile(c + ip * MR * ldc + jp * NR, ldc, rows, cols, MR, NR, acc, ws.edge.data(),
              [&](T* dst, int64_t ld) { kern.tile(kc, a, b, dst, ld, acc); });
  };
  for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
    const int64_t kc = std::min(kc_max, K - k0);
    const T* b = pack_b(k0, kc, ws.b.data());
    if (a_stored) {  // each B panel stays in L1 while the A panels stream past it from L2
      for (int64_t jp = 0; jp < n_panels; ++jp)
        for (int64_t ip = 0; ip < m_panels; ++ip) {
          tile(ip, jp, kc, pack_a(ip * MR, k0, kc, ws.a.data()), b + jp * NR * kc, accumulate || k0 > 0);
          if (jp + 1 == n_panels) between(k0, ip, m_panels);
        }
      continue;
    }
    for (int64_t ip = 0; ip < m_panels; ++ip) {
      const T* a = pack_a(ip * MR, k0, kc, ws.a.data());
      for (int64_t jp = 0; jp < n_panels; ++jp) tile(ip, jp, kc, a, b + jp * NR * kc, accumulate || k0 > 0);
      between(k0, ip, m_panels);
    }
  }
}

// An operand packed once per call (a convolution's weights): `count` rows (or columns) of a matrix with
// K entries each, in panels of `width`, laid out so panel(r, k0, kc) is exactly what multiply() wants
// for rows [r, r + width) and depth [k0, k0 + kc) (K blocked by kKC). Element (r, k) is
// src[r_offset[r] + k_offset[k]]: the offset tables describe any weight layout or transposition
// without a division per element.
template <class T>
struct Packed {
  int64_t width = 1, padded = 0, K = 0;
  std::vector<T> data;

  template <class S, class Convert>
  void pack(const S* src, const std::vector<int64_t>& r_offset, const std::vector<int64_t>& k_offset,
            int64_t panel_width, const Convert& convert) {
    width = panel_width;
    K = int64_t(k_offset.size());
    const int64_t count = int64_t(r_offset.size());
    padded = round_up(count, width);
    data.assign(size_t(padded * K), T(0));
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kc = std::min(kKC, K - k0);
      for (int64_t r = 0; r < count; ++r) {
        T* dst = data.data() + k0 * padded + (r / width) * width * kc + r % width;
        const S* row = src + r_offset[size_t(r)];
        for (int64_t kk = 0; kk < kc; ++kk) dst[kk * width] = convert(row[k_offset[size_t(k0 + kk)]]);
      }
    }
  }
  const T* panel(int64_t r, int64_t k0, int64_t kc) const { return data.data() + k0 * padded + r * kc; }
};

}  // namespace gemm
}  // namespace fastcv
