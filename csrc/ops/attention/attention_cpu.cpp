// CPU scaled-dot-product attention: FlashAttention-2's tiled algorithm on the GEMM micro-kernel.
//
// The L x S score matrix never exists: the forward walks key blocks with an online softmax (a running
// maximum and sum per query, the output rescaled when the maximum grows) and saves only the
// log-sum-exp per query; the backward recomputes each block's probabilities from it.
//
// Layout. Every product is a gemm::Kernel tile (packed A panels of MR rows, B panels of NR columns,
// both k-major), and the operands are chosen so that no tile is ever transposed on the way from one
// product to the next:
// - forward: scores are computed transposed, S^T[keys x queries] = K Q^T, with NR queries in the
//   vector lanes. Then the softmax's maximum and sum over keys are lane-wise vector operations, and the
//   probability tile [keys][NR queries] is exactly the B panel of O^T[Dv x queries] += V^T P^T.
// - backward: scores as S[queries x keys] = Q K^T with NR keys in the lanes: the tile P [q][NR keys]
//   is the B panel of both dV^T += dO^T P and dK^T += Q^T dS; only dQ += dS K needs dS transposed into
//   A panels (pack_a_rows, 8 x 8 register transposes).
// K and V (and Q, dO in the backward) are packed once per head into panel form before the parallel
// loop; threads then take (head, query block) tasks in the forward and (key-value head, key block)
// tasks in the backward, which own their dK/dV rows outright. dQ is accumulated per task in float and
// summed afterwards in a fixed order when a head's key blocks are split over several tasks (only when
// there are fewer heads than threads), so results do not depend on the thread count's timing.
// float16 and bfloat16 compute in float32 (converted while packing); float64 runs the double kernels.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/check.h"
#include "common/dtype.h"
#include "common/gemm.h"
#include "common/parallel.h"
#include "common/transpose.h"
#include "ops/attention/attention.h"
#include "ops/attention/attention_ops.h"

#define FASTCV_ATTN_INLINE inline __attribute__((always_inline))

namespace fastcv {
namespace {

using gemm::round_up;

// A strided [B, H, rows, cols] tensor of storage type S.
template <class S>
struct Strided {
  const S* p;
  int64_t sb, sh, sr;  // the last dimension is contiguous (checked)
  const S* row(int64_t b, int64_t h, int64_t r) const { return p + b * sb + h * sh + r * sr; }
};

template <class S>
Strided<S> strided(const TensorView& t) {
  return {t.ptr<const S>(), t.stride(0), t.stride(1), t.stride(2)};
}

template <class T>
struct Problem {
  AttentionShape sh;
  const T* mask;  // additive, compute type, or null
  int64_t mb, mh, ml, ms;
  T scale;
  bool causal;
  float dropout_p;
  uint64_t seed, offset;
  int64_t group() const { return sh.hq / sh.hkv; }
  T scale2() const { return scale * T(attention::kLog2e); }  // scores in base 2
  T mask_at(int64_t b, int64_t h, int64_t i, int64_t j) const { return mask[b * mb + h * mh + i * ml + j * ms]; }
};

template <class T>
Problem<T> make_problem(const AttentionShape& sh, const TensorView* mask, double scale, bool causal, double p,
                        uint64_t seed, uint64_t offset) {
  Problem<T> pr{sh, nullptr, 0, 0, 0, 0, T(scale), causal, float(p), seed, offset};
  if (mask) {
    pr.mask = mask->ptr<const T>();
    pr.mb = mask->stride(0), pr.mh = mask->stride(1), pr.ml = mask->stride(2), pr.ms = mask->stride(3);
  }
  return pr;
}

constexpr double kInf = std::numeric_limits<double>::infinity();

// ---- packing: src rows r (of `cols` values) into panels
//
// rows_k_major: A or B panels of `width` rows each, k = the column index:
//   dst[(panel * cols + c) * width + i] = scale * src(panel * width + i, c), rows >= nrows zero.
// cols_k_major: panels over the columns, k = the row index:
//   dst[(panel * rows_pad + r) * width + i] = scale * src(r, panel * width + i), zeros past the edges.
template <class T, class S>
void pack_rows_k_major(const S* src, int64_t sr, int64_t nrows, int64_t cols, int64_t width, int64_t rows_pad,
                       T scale, T* dst) {
  if constexpr (std::is_same_v<S, T>) {
    // Transpose the whole block once (8 x 8 register blocks), then cut it into panels: contiguous runs.
    thread_local std::vector<T> tmp;
    tmp.resize(size_t(cols * rows_pad));
    transpose(src, sr, nrows, cols, tmp.data(), rows_pad);
    for (int64_t c = 0; c < cols; ++c) std::fill(tmp.data() + c * rows_pad + nrows, tmp.data() + (c + 1) * rows_pad, T(0));
    for (int64_t r0 = 0; r0 < rows_pad; r0 += width) {
      T* panel = dst + r0 * cols;
      for (int64_t c = 0; c < cols; ++c) {
        const T* in = tmp.data() + c * rows_pad + r0;
        T* out = panel + c * width;
        for (int64_t i = 0; i < width; ++i) out[i] = scale * in[i];
      }
    }
    return;
  }
  const S* rows[64];
  for (int64_t r0 = 0; r0 < rows_pad; r0 += width) {
    const int64_t valid = std::max<int64_t>(0, std::min(width, nrows - r0));
    for (int64_t i = 0; i < valid; ++i) rows[i] = src + (r0 + i) * sr;
    T* panel = dst + r0 * cols;
    for (int64_t c = 0; c < cols; ++c) {  // contiguous stores; `width` sequential read streams
      T* out = panel + c * width;
      for (int64_t i = 0; i < valid; ++i) out[i] = scale * T(to_float(rows[i][c]));
      for (int64_t i = valid; i < width; ++i) out[i] = T(0);
    }
  }
}

// Rows [0, n) of out (row stride ld) = the first n columns of a transposed accumulator acc [rows][nr],
// each column multiplied by its factor (1 / l in the forward; 1 for gradients, factor null).
template <class T, class S>
void store_transposed(T* acc, int64_t rows, int64_t nr, int64_t n, const T* factor, S* out, int64_t ld) {
  if (factor)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < nr; ++j) acc[r * nr + j] *= factor[j];
  if constexpr (std::is_same_v<S, T>) {
    transpose(acc, nr, rows, n, out, ld);
  } else {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t r = 0; r < rows; ++r) out[j * ld + r] = from_compute<S>(acc[r * nr + j]);
  }
}

template <class T, class S>
void pack_cols_k_major(const S* src, int64_t sr, int64_t nrows, int64_t cols, int64_t width, int64_t rows_pad,
                       int64_t cols_pad, T scale, T* dst) {
  for (int64_t c0 = 0; c0 < cols_pad; c0 += width) {
    T* panel = dst + c0 * rows_pad;
    const int64_t valid = std::min(width, cols - c0);
    for (int64_t r = 0; r < rows_pad; ++r) {
      T* out = panel + r * width;
      const int64_t n = r < nrows ? valid : 0;
      const S* row = src + r * sr + c0;
      for (int64_t i = 0; i < n; ++i) out[i] = scale * T(to_float(row[i]));
      for (int64_t i = n; i < width; ++i) out[i] = T(0);
    }
  }
}

// Scratch that outlives a call: packed operands are rewritten every call, so reusing the memory saves
// the page faults of fresh allocations (as much as a small problem's arithmetic). Owned by the calling
// thread; returned to the system after a call that needed more than kKeepBytes.
template <class T>
struct CallBuffer {
  static constexpr size_t kKeepBytes = size_t(64) << 20;
  std::unique_ptr<T[]> data;
  size_t size = 0;
  T* get(size_t n) {
    if (n > size) data.reset(new T[n]), size = n;
    return data.get();
  }
  void trim() {
    if (size * sizeof(T) > kKeepBytes) data.reset(), size = 0;
  }
};

// ---- lane-wise loops over a tile [rows][nr] (the vector lanes along nr)

template <class T>
FASTCV_ATTN_INLINE void online_softmax_impl(T* tile, int64_t rows, int64_t nr, T* m, T* l, T* acc, int64_t acc_rows,
                                            T* scratch) {
  T* mx = scratch;
  T* base = scratch + nr;
  for (int64_t q = 0; q < nr; ++q) mx[q] = m[q];
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = 0; q < nr; ++q) mx[q] = std::max(mx[q], tile[r * nr + q]);
  bool grew = false;
  for (int64_t q = 0; q < nr; ++q) grew |= mx[q] != m[q];
  for (int64_t q = 0; q < nr; ++q) base[q] = mx[q] == -T(kInf) ? T(0) : mx[q];  // all excluded so far: p = 0
  if (grew) {  // rescale the running sum and output to the new maximum
    T* alpha = scratch + 2 * nr;
    for (int64_t q = 0; q < nr; ++q) alpha[q] = attention::exp2(m[q] - base[q]);
    for (int64_t q = 0; q < nr; ++q) l[q] *= alpha[q], m[q] = mx[q];
    for (int64_t r = 0; r < acc_rows; ++r)
      for (int64_t q = 0; q < nr; ++q) acc[r * nr + q] *= alpha[q];
  }
  T* sum = scratch + 3 * nr;
  for (int64_t q = 0; q < nr; ++q) sum[q] = T(0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = 0; q < nr; ++q) {
      const T e = attention::exp2(tile[r * nr + q] - base[q]);
      tile[r * nr + q] = e;
      sum[q] += e;
    }
  for (int64_t q = 0; q < nr; ++q) l[q] += sum[q];
}

// p = 2^(s - lse[row]) in place (scores and lse in base 2) over a [rows][nr] tile (lse +inf for rows with nothing to attend).
template <class T>
FASTCV_ATTN_INLINE void probabilities_impl(T* tile, int64_t rows, int64_t nr, const T* lse) {
  for (int64_t r = 0; r < rows; ++r) {
    const T shift = lse[r];
    for (int64_t j = 0; j < nr; ++j) tile[r * nr + j] = attention::exp2(tile[r * nr + j] - shift);
  }
}

// ds = p * (dp - delta[row]) in place in dp.
template <class T>
FASTCV_ATTN_INLINE void score_grad_impl(const T* p, T* dp, int64_t rows, int64_t nr, const T* delta) {
  for (int64_t r = 0; r < rows; ++r) {
    const T d = delta[r];
    for (int64_t j = 0; j < nr; ++j) dp[r * nr + j] = p[r * nr + j] * (dp[r * nr + j] - d);
  }
}

// The float versions are compiled per instruction set (AVX-512, AVX2, baseline), picked at load time.
FASTCV_CPU_CLONES void online_softmax(float* tile, int64_t rows, int64_t nr, float* m, float* l, float* acc,
                                      int64_t acc_rows, float* scratch) {
  online_softmax_impl(tile, rows, nr, m, l, acc, acc_rows, scratch);
}
FASTCV_CPU_CLONES void probabilities(float* tile, int64_t rows, int64_t nr, const float* lse) {
  probabilities_impl(tile, rows, nr, lse);
}
FASTCV_CPU_CLONES void score_grad(const float* p, float* dp, int64_t rows, int64_t nr, const float* delta) {
  score_grad_impl(p, dp, rows, nr, delta);
}
void online_softmax(double* tile, int64_t rows, int64_t nr, double* m, double* l, double* acc, int64_t acc_rows,
                    double* scratch) {
  online_softmax_impl(tile, rows, nr, m, l, acc, acc_rows, scratch);
}
void probabilities(double* tile, int64_t rows, int64_t nr, const double* lse) { probabilities_impl(tile, rows, nr, lse); }
void score_grad(const double* p, double* dp, int64_t rows, int64_t nr, const double* delta) {
  score_grad_impl(p, dp, rows, nr, delta);
}

// ---- masking a score tile: the additive mask, then -inf for keys past the causal limit or past S.
// `transposed`: the tile is [keys][queries] (forward), else [queries][keys] (backward). Queries past L
// need nothing: the forward discards their lanes, and the backward's lse of +inf zeroes their rows.
template <class T>
void mask_tile(const Problem<T>& pr, int64_t b, int64_t h, T* tile, bool transposed, int64_t rows, int64_t nr,
               int64_t row0, int64_t col0) {
  const int64_t nq = transposed ? nr : rows, nk = transposed ? rows : nr;
  const int64_t q0 = transposed ? col0 : row0, k0 = transposed ? row0 : col0;
  const int64_t q_end = std::min(nq, pr.sh.l - q0), k_end = std::min(nk, pr.sh.s - k0);
  const T neg = -T(kInf), log2e = T(attention::kLog2e);
  if (pr.mask) {
    const int64_t sq = transposed ? 1 : nr, sk = transposed ? nr : 1;
    for (int64_t qi = 0; qi < q_end; ++qi)
      for (int64_t kj = 0; kj < k_end; ++kj) tile[qi * sq + kj * sk] += log2e * pr.mask_at(b, h, q0 + qi, k0 + kj);
  }
  const bool crosses = pr.causal && k0 + nk - 1 > q0;  // some key of the tile is after some query
  if (transposed) {
    for (int64_t kj = k_end; kj < nk; ++kj) std::fill(tile + kj * nr, tile + (kj + 1) * nr, neg);
    if (crosses)  // key k0 + kj is after queries q0 .. k0 + kj - 1: a prefix of its row
      for (int64_t kj = 0; kj < k_end; ++kj)
        std::fill(tile + kj * nr, tile + kj * nr + std::clamp<int64_t>(k0 + kj - q0, 0, nr), neg);
  } else {
    for (int64_t qi = 0; qi < nq; ++qi) {  // query q0 + qi sees keys up to itself: a suffix is excluded
      const int64_t limit = crosses ? std::clamp<int64_t>(q0 + qi - k0 + 1, 0, k_end) : k_end;
      std::fill(tile + qi * nr + limit, tile + (qi + 1) * nr, neg);
    }
  }
}

// Multiplies a probability tile by the dropout keep mask / (1 - p) (into `out`, which may be `tile`).
template <class T>
void dropout_tile(const Problem<T>& pr, int64_t b, int64_t h, const T* tile, T* out, bool transposed, int64_t rows,
                  int64_t nr, int64_t row0, int64_t col0) {
  const T keep_scale = T(1) / (T(1) - T(pr.dropout_p));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < nr; ++c) {
      const int64_t i = transposed ? col0 + c : row0 + r, j = transposed ? row0 + r : col0 + c;
      const bool inside = i < pr.sh.l && j < pr.sh.s;
      const bool keep = inside && attention::dropout_keep(pr.seed, pr.offset, (b * pr.sh.hq + h) * pr.sh.l + i,
                                                          pr.sh.s, j, pr.dropout_p);
      out[r * nr + c] = keep ? tile[r * nr + c] * keep_scale : T(0);
    }
}

// ====================================================================================== forward

template <class T>
struct ForwardScratch {
  std::vector<T> k, v, q, acc, p, m, l, tmp;
};

// One task: query rows [q0, q0 + nq) of head (b, h), in panels of NR queries. For each key block, each
// panel computes S^T = K Q^T into its probability tile, masks it, folds it into the running softmax and
// accumulates O^T += V^T P^T; the K and V blocks stay in cache across the panels.
template <class T, class S>
void forward_task(const gemm::Kernel<T>& kern, const Problem<T>& pr, int64_t b, int64_t h, int64_t q0, int64_t nq,
                  const Strided<S>& Q, const T* kp, const T* vp, int64_t s_pad, int64_t dv_pad, int64_t block_k,
                  ForwardScratch<T>& ws, S* out, T* lse) {
  const int64_t MR = kern.mr, NR = kern.nr, D = pr.sh.d, Dv = pr.sh.dv, L = pr.sh.l;
  const int64_t panels = (nq + NR - 1) / NR;
  pack_rows_k_major(Q.row(b, h, q0), Q.sr, nq, D, NR, panels * NR, pr.scale2(), ws.q.data());
  std::fill(ws.acc.begin(), ws.acc.end(), T(0));
  std::fill(ws.m.begin(), ws.m.end(), -T(kInf));
  std::fill(ws.l.begin(), ws.l.end(), T(0));
  // Causal: no key after the block's last query.
  const int64_t k_end = pr.causal ? std::min(pr.sh.s, q0 + nq) : pr.sh.s;
  for (int64_t k0 = 0; k0 < k_end; k0 += block_k) {
    const int64_t kn = std::min(block_k, s_pad - k0);  // a multiple of MR: padded keys are masked
    for (int64_t pn = 0; pn < panels; ++pn) {
      const int64_t p0 = q0 + pn * NR;
      if (pr.causal && k0 > p0 + NR - 1) break;  // every key of the block is after every query of the panel
      T* tile = ws.p.data() + pn * block_k * NR;
      const T* qpanel = ws.q.data() + pn * D * NR;
      for (int64_t kr = 0; kr < kn; kr += MR) kern.tile(D, kp + (k0 + kr) * D, qpanel, tile + kr * NR, NR, false);
      mask_tile(pr, b, h, tile, true, kn, NR, k0, p0);
      T* acc = ws.acc.data() + pn * dv_pad * NR;
      online_softmax(tile, kn, NR, ws.m.data() + pn * NR, ws.l.data() + pn * NR, acc, dv_pad, ws.tmp.data());
      if (pr.dropout_p > 0) dropout_tile(pr, b, h, tile, tile, true, kn, NR, k0, p0);
      for (int64_t dr = 0; dr < dv_pad; dr += MR) kern.tile(kn, vp + (dr * s_pad + k0 * MR), tile, acc + dr * NR, NR, true);
    }
  }
  // O = acc^T / l, lse = m + log(l); rows that saw no key get 0 and +inf.
  T* inv = ws.tmp.data();
  for (int64_t pn = 0; pn < panels; ++pn) {
    const int64_t n = std::min(NR, nq - pn * NR), row = (b * pr.sh.hq + h) * L + q0 + pn * NR;
    const T* l = ws.l.data() + pn * NR;
    const T* m = ws.m.data() + pn * NR;
    for (int64_t j = 0; j < NR; ++j) inv[j] = l[j] > T(0) ? T(1) / l[j] : T(0);
    store_transposed(ws.acc.data() + pn * dv_pad * NR, Dv, NR, n, inv, out + row * Dv, Dv);
    for (int64_t j = 0; j < n; ++j) lse[row + j] = l[j] > T(0) ? (m[j] + std::log2(l[j])) * T(attention::kLn2) : T(kInf);
  }
}

template <class T, class S>
void attention_forward_impl(const TensorView& qv, const TensorView& kv, const TensorView& vv, const Problem<T>& pr,
                            const TensorView& outv, const TensorView& lsev, int nthreads) {
  const gemm::Kernel<T>& kern = gemm::kernel(T{});
  const int64_t MR = kern.mr, NR = kern.nr;
  const AttentionShape& sh = pr.sh;
  const int64_t D = sh.d, Dv = sh.dv;
  const int64_t s_pad = round_up(sh.s, MR), dv_pad = round_up(Dv, MR);
  const Strided<S> Q = strided<S>(qv), K = strided<S>(kv), V = strided<S>(vv);
  constexpr int64_t kPanels = 4;             // query panels of NR per block
  const int64_t block_q = kPanels * NR;
  const int64_t block_k = round_up(64, MR);  // K and V blocks of 16 KB each at D = 64
  const int64_t q_blocks = (sh.l + block_q - 1) / block_q;
  // Tasks: a head's query blocks, split into interleaved chunks only when there are fewer heads than
  // threads can share (chunk c takes blocks c, c + chunks, ...: causal blocks grow with the index).
  // A task packs its head's K (A panels of MR keys, k = d) and V^T (A panels of MR value columns,
  // k = key) into its thread's scratch, where they stay in L2 while its query blocks stream past.
  const int64_t heads = sh.b * sh.hq;
  const int64_t chunks = std::clamp<int64_t>((2 * int64_t(nthreads) + heads - 1) / heads, 1, q_blocks);
  parallel_for(0, heads * chunks, 1, nthreads, [&](int64_t begin, int64_t end) {
    thread_local ForwardScratch<T> ws;
    ws.k.resize(size_t(s_pad * D));
    ws.v.resize(size_t(dv_pad * s_pad));
    ws.q.resize(size_t(kPanels * D * NR));
    ws.acc.resize(size_t(kPanels * dv_pad * NR));
    ws.p.resize(size_t(kPanels * block_k * NR));
    ws.m.resize(size_t(kPanels * NR));
    ws.l.resize(size_t(kPanels * NR));
    ws.tmp.resize(size_t(4 * NR));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / chunks, chunk = task % chunks;
      const int64_t b = bh / sh.hq, h = bh % sh.hq, hk = h / pr.group();
      pack_rows_k_major(K.row(b, hk, 0), K.sr, sh.s, D, MR, s_pad, T(1), ws.k.data());
      pack_cols_k_major(V.row(b, hk, 0), V.sr, sh.s, Dv, MR, s_pad, dv_pad, T(1), ws.v.data());
      for (int64_t qb = chunk; qb < q_blocks; qb += chunks) {
        const int64_t q0 = qb * block_q;
        forward_task(kern, pr, b, h, q0, std::min(block_q, sh.l - q0), Q, ws.k.data(), ws.v.data(), s_pad, dv_pad,
                     block_k, ws, outv.ptr<S>(), lsev.ptr<T>());
      }
    }
  });
}

// ====================================================================================== backward

template <class T>
struct BackwardScratch {
  std::vector<T> p, pd, dp, a, dkt, dvt;
};

// One (query block, key block) step of the backward: queries [q0, q0 + qn) (qn a multiple of MR),
// keys [k0, k0 + kpanels * NR). Recomputes P, then dV^T += dO^T P_dropped, dS = P (dP - delta),
// dK^T += (scale Q)^T dS, dQ += dS K.
template <class T>
void backward_block(const gemm::Kernel<T>& kern, const Problem<T>& pr, int64_t b, int64_t h, int64_t q0, int64_t qn,
                    int64_t block_q, int64_t k0, int64_t kpanels, const T* qt, const T* dot, const T* dorows, const T* qrows,
                    const T* lse, const T* delta, const T* kvb, int64_t n_kb, int64_t n_vb, int64_t l_pad,
                    int64_t s_pad, int64_t d_mr, int64_t dv_mr, int64_t d_nr, T* dq, BackwardScratch<T>& ws) {
  const int64_t MR = kern.mr, NR = kern.nr, D = pr.sh.d, Dv = pr.sh.dv;
  const T *kb = kvb, *vb = kvb + n_kb, *krows = kvb + n_kb + n_vb;
  // Tiles [panel jp][query r][NR keys], panel stride block_q * NR.
  for (int64_t jp = 0; jp < kpanels; ++jp) {
    T* p = ws.p.data() + jp * block_q * NR;
    T* dp = ws.dp.data() + jp * block_q * NR;
    const int64_t key0 = k0 + jp * NR;
    for (int64_t r = 0; r < qn; r += MR) {
      kern.tile(D, qt + (q0 + r) * D, kb + key0 * D, p + r * NR, NR, false);
      kern.tile(Dv, dot + (q0 + r) * Dv, vb + key0 * Dv, dp + r * NR, NR, false);
    }
    mask_tile(pr, b, h, p, false, qn, NR, q0, key0);
    probabilities(p, qn, NR, lse + q0);
    T* pd = p;
    if (pr.dropout_p > 0) {  // dV sees the dropped probabilities; dP the gradient through the mask
      pd = ws.pd.data() + jp * block_q * NR;
      dropout_tile(pr, b, h, p, pd, false, qn, NR, q0, key0);
      dropout_tile(pr, b, h, dp, dp, false, qn, NR, q0, key0);
    }
    score_grad(p, dp, qn, NR, delta + q0);
    T* dvt = ws.dvt.data() + jp * dv_mr * NR;
    T* dkt = ws.dkt.data() + jp * d_mr * NR;
    for (int64_t dr = 0; dr < dv_mr; dr += MR) kern.tile(qn, dorows + dr * l_pad + q0 * MR, pd, dvt + dr * NR, NR, true);
    for (int64_t dr = 0; dr < d_mr; dr += MR) kern.tile(qn, qrows + dr * l_pad + q0 * MR, dp, dkt + dr * NR, NR, true);
  }
  // dQ[q0 + r .. + MR] += dS[rows][keys] K[keys][d]: dS rows transposed into an A panel (k = key).
  const int64_t kn = kpanels * NR;
  for (int64_t r = 0; r < qn; r += MR) {
    for (int64_t jp = 0; jp < kpanels; ++jp) {
      const T* rows[16];
      for (int64_t i = 0; i < MR; ++i) rows[i] = ws.dp.data() + jp * block_q * NR + (r + i) * NR;
      kern.pack_a_rows(rows, NR, ws.a.data() + jp * NR * MR);
    }
    for (int64_t c = 0; c < d_nr; c += NR) kern.tile(kn, ws.a.data(), krows + c * s_pad + k0 * NR, dq + (q0 + r) * d_nr + c, d_nr, true);
  }
}

template <class T, class S>
void attention_backward_impl(const TensorView& gv, const TensorView& qv, const TensorView& kv, const TensorView& vv,
                             const TensorView& outv, const TensorView& lsev, const Problem<T>& pr,
                             const TensorView& dqv, const TensorView& dkv, const TensorView& dvv, int nthreads) {
  const gemm::Kernel<T>& kern = gemm::kernel(T{});
  const int64_t MR = kern.mr, NR = kern.nr;
  const AttentionShape& sh = pr.sh;
  const int64_t D = sh.d, Dv = sh.dv, L = sh.l, Sk = sh.s, G = pr.group();
  const int64_t l_pad = round_up(L, MR), d_mr = round_up(D, MR), dv_mr = round_up(Dv, MR);
  const int64_t s_pad = round_up(Sk, NR), d_nr = round_up(D, NR);
  const Strided<S> Q = strided<S>(qv), K = strided<S>(kv), V = strided<S>(vv), dO = strided<S>(gv);
  const S* out = outv.ptr<const S>();
  const T* lse_in = lsev.ptr<const T>();

  // Per query head (b, h):
  //   qt    scale*log2(e)*Q as A panels of MR queries, k = d  (S = Q K^T, in base 2)
  //   dot   dO as A panels of MR queries, k = dv              (dP = dO V^T)
  //   dorows dO^T as A panels of MR value columns, k = query  (dV^T += dO^T P)
  //   qrows scale*Q^T as A panels of MR columns, k = query    (dK^T += Q^T dS)
  //   lse (+inf past L), delta = rowsum(dO * O).
  const int64_t n_qt = l_pad * D, n_dot = l_pad * Dv, n_dor = dv_mr * l_pad, n_qr = d_mr * l_pad;
  const int64_t per_q = n_qt + n_dot + n_dor + n_qr + 2 * l_pad;
  const int64_t n_qpacks = sh.b * sh.hq * per_q;
  // Per key-value head: K and V as B panels of NR keys (k = d, dv) for S and dP, and K as B panels
  // of NR columns (k = key) for dQ = dS K.
  const int64_t n_kb = s_pad * D, n_vb = s_pad * Dv, n_kr = d_nr * s_pad, per_kv = n_kb + n_vb + n_kr;
  const int64_t n_kvpacks = sh.b * sh.hkv * per_kv;
  // Tasks: (b, kv head, chunk); chunk c takes key blocks c, c + chunks, ... Heads are split only when
  // there are too few to keep the threads busy; each chunk then sums its own dQ.
  constexpr int64_t kKeyPanels = 4;
  const int64_t block_k = kKeyPanels * NR;
  const int64_t block_q = 8 * MR;
  const int64_t k_blocks = (Sk + block_k - 1) / block_k;
  const int64_t heads = sh.b * sh.hkv;
  const int64_t chunks = std::max<int64_t>(1, std::min(k_blocks, (2 * int64_t(nthreads) + heads - 1) / heads));
  const int64_t dq_size = l_pad * d_nr;  // one query head's dQ accumulator
  const int64_t n_dqacc = heads * chunks * G * dq_size;
  thread_local CallBuffer<T> buffer;
  T* qpacks = buffer.get(size_t(n_qpacks + n_kvpacks + n_dqacc));
  T* kvpacks = qpacks + n_qpacks;
  T* dqacc = kvpacks + n_kvpacks;
  std::fill(dqacc, dqacc + n_dqacc, T(0));
  parallel_for(0, sh.b * sh.hq, 1, nthreads, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / sh.hq, h = bh % sh.hq;
      T* base = qpacks + bh * per_q;
      pack_rows_k_major(Q.row(b, h, 0), Q.sr, L, D, MR, l_pad, pr.scale2(), base);
      pack_rows_k_major(dO.row(b, h, 0), dO.sr, L, Dv, MR, l_pad, T(1), base + n_qt);
      pack_cols_k_major(dO.row(b, h, 0), dO.sr, L, Dv, MR, l_pad, dv_mr, T(1), base + n_qt + n_dot);
      pack_cols_k_major(Q.row(b, h, 0), Q.sr, L, D, MR, l_pad, d_mr, pr.scale, base + n_qt + n_dot + n_dor);
      T* lse = base + n_qt + n_dot + n_dor + n_qr;
      T* delta = lse + l_pad;
      for (int64_t i = 0; i < l_pad; ++i) {
        if (i >= L) {
          lse[i] = T(kInf), delta[i] = T(0);
          continue;
        }
        lse[i] = lse_in[bh * L + i] * T(attention::kLog2e);
        const S* o = out + (bh * L + i) * Dv;
        const S* g = dO.row(b, h, i);
        T sum = 0;
        for (int64_t d = 0; d < Dv; ++d) sum += T(to_float(g[d])) * T(to_float(o[d]));
        delta[i] = sum;
      }
    }
  });

  parallel_for(0, sh.b * sh.hkv, 1, nthreads, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / sh.hkv, h = bh % sh.hkv;
      T* base = kvpacks + bh * per_kv;
      pack_rows_k_major(K.row(b, h, 0), K.sr, Sk, D, NR, s_pad, T(1), base);
      pack_rows_k_major(V.row(b, h, 0), V.sr, Sk, Dv, NR, s_pad, T(1), base + n_kb);
      pack_cols_k_major(K.row(b, h, 0), K.sr, Sk, D, NR, s_pad, d_nr, T(1), base + n_kb + n_vb);
    }
  });

  S* dk = dkv.ptr<S>();
  S* dv = dvv.ptr<S>();
  parallel_for(0, heads * chunks, 1, nthreads, [&](int64_t begin, int64_t end) {
    thread_local BackwardScratch<T> ws;
    ws.p.resize(size_t(block_k * block_q));
    ws.pd.resize(pr.dropout_p > 0 ? size_t(block_k * block_q) : 0);
    ws.dp.resize(size_t(block_k * block_q));
    ws.a.resize(size_t(block_k * MR));
    ws.dkt.resize(size_t(kKeyPanels * d_mr * NR));
    ws.dvt.resize(size_t(kKeyPanels * dv_mr * NR));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bhk = task / chunks, chunk = task % chunks;
      const int64_t b = bhk / sh.hkv, hk = bhk % sh.hkv;
      const T* kvb = kvpacks + bhk * per_kv;
      for (int64_t kb = chunk; kb < k_blocks; kb += chunks) {
        const int64_t k0 = kb * block_k, kn = std::min(block_k, s_pad - k0), kpanels = kn / NR;
        std::fill(ws.dkt.begin(), ws.dkt.end(), T(0));
        std::fill(ws.dvt.begin(), ws.dvt.end(), T(0));
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = hk * G + g;
          const T* qp = qpacks + (b * sh.hq + h) * per_q;
          const T *qt = qp, *dot = qp + n_qt, *dorows = dot + n_dot, *qrows = dorows + n_dor;
          const T* lse = qrows + n_qr;
          const T* delta = lse + l_pad;
          T* dq = dqacc + ((bhk * chunks + chunk) * G + g) * dq_size;
          // Causal: only queries i >= k0 see a key of this block.
          for (int64_t q0 = pr.causal ? k0 / MR * MR : 0; q0 < L; q0 += block_q) {
            const int64_t qn = std::min(block_q, l_pad - q0);  // a multiple of MR
            backward_block(kern, pr, b, h, q0, qn, block_q, k0, kpanels, qt, dot, dorows, qrows, lse, delta, kvb, n_kb, n_vb,
                           l_pad, s_pad, d_mr, dv_mr, d_nr, dq, ws);
          }
        }
        // dK and dV rows of the block, out of their transposed accumulators.
        for (int64_t jp = 0; jp < kpanels; ++jp) {
          const int64_t key = k0 + jp * NR, n = std::min(NR, Sk - key);
          if (n <= 0) break;
          store_transposed(ws.dkt.data() + jp * d_mr * NR, D, NR, n, static_cast<const T*>(nullptr),
                           dk + (bhk * Sk + key) * D, D);
          store_transposed(ws.dvt.data() + jp * dv_mr * NR, Dv, NR, n, static_cast<const T*>(nullptr),
                           dv + (bhk * Sk + key) * Dv, Dv);
        }
      }
    }
  });

  // dQ = scale * (sum of the chunks' accumulators), in chunk order.
  S* dq = dqv.ptr<S>();
  parallel_for(0, sh.b * sh.hq, 1, nthreads, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / sh.hq, h = bh % sh.hq, bhk = b * sh.hkv + h / G, g = h % G;
      for (int64_t i = 0; i < L; ++i)
        for (int64_t d = 0; d < D; ++d) {
          T sum = 0;
          for (int64_t c = 0; c < chunks; ++c) sum += dqacc[((bhk * chunks + c) * G + g) * dq_size + i * d_nr + d];
          dq[(bh * L + i) * D + d] = from_compute<S>(sum * pr.scale);
        }
    }
  });
  buffer.trim();
}

}  // namespace

void attention_forward_cpu(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* mask,
                           double scale, bool is_causal, double dropout_p, uint64_t seed, uint64_t offset,
                           const TensorView& out, const TensorView& lse, int nthreads) {
  const AttentionShape sh = check_attention_args(q, k, v, mask, out, lse, DeviceType::CPU);
  if (sh.b * sh.hq * sh.l == 0) return;
  dispatch_floating(q.dtype, "query", [&](auto tag) {
    using S = decltype(tag);
    using T = compute_t<S>;
    const Problem<T> pr = make_problem<T>(sh, mask, scale, is_causal, dropout_p, seed, offset);
    attention_forward_impl<T, S>(q, k, v, pr, out, lse, nthreads);
  });
}

void attention_backward_cpu(const TensorView& grad_out, const TensorView& q, const TensorView& k,
                            const TensorView& v, const TensorView& out, const TensorView& lse,
                            const TensorView* mask, double scale, bool is_causal, double dropout_p, uint64_t seed,
                            uint64_t offset, const TensorView& dq, const TensorView& dk, const TensorView& dv,
                            int nthreads) {
  const AttentionShape sh = check_attention_args(q, k, v, mask, out, lse, DeviceType::CPU);
  check_attention_grads(grad_out, dq, dk, dv, q, k, v, out);
  if (sh.b * sh.hkv == 0 || (sh.l == 0 && sh.s == 0)) return;
  dispatch_floating(q.dtype, "query", [&](auto tag) {
    using S = decltype(tag);
    using T = compute_t<S>;
    const Problem<T> pr = make_problem<T>(sh, mask, scale, is_causal, dropout_p, seed, offset);
    attention_backward_impl<T, S>(grad_out, q, k, v, out, lse, pr, dq, dk, dv, nthreads);
  });
}

}  // namespace fastcv
