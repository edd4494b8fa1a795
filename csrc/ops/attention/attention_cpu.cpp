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
#include <numeric>
#include <string>
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
  double dropout_p;
  uint32_t threshold;  // attention::dropout_threshold(dropout_p)
  T keep_scale;        // 1 / (1 - dropout_p), rounded once to T
  uint64_t seed, offset;
  int64_t group() const { return sh.hq / sh.hkv; }
  T scale2() const { return scale * T(attention::kLog2e); }  // scores in base 2
  T mask_at(int64_t b, int64_t h, int64_t i, int64_t j) const { return mask[b * mb + h * mh + i * ml + j * ms]; }
};

template <class T>
Problem<T> make_problem(const AttentionShape& sh, const TensorView* mask, double scale, bool causal, double p,
                        uint64_t seed, uint64_t offset) {
  Problem<T> pr{sh,     nullptr, 0,      0, 0, 0, T(scale), causal, p, attention::dropout_threshold(p),
                T(1.0 / (1.0 - p)), seed, offset};
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

// A vector of 32 bytes (GCC's vector extensions: split in two on SSE, one register on AVX2/AVX-512).
template <class T>
struct Vec32 {
  typedef T type __attribute__((vector_size(32), aligned(sizeof(T))));  // unaligned loads and stores
};

// mx[q] = max(m[q], tile[r][q] over rows r), written with vector operations: GCC leaves the plain loop
// over a constant NR unrolled into scalar compares.
template <class T, int NR>
FASTCV_ATTN_INLINE void row_max(const T* __restrict tile, int64_t rows, const T* __restrict m, T* __restrict mx) {
  using V = typename Vec32<T>::type;
  constexpr int W = 32 / sizeof(T), NV = NR / W;
  static_assert(NR % W == 0, "NR must be a whole number of vectors");
  V acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = *reinterpret_cast<const V*>(m + v * W);
  for (int64_t r = 0; r < rows; ++r)
    for (int v = 0; v < NV; ++v) {
      const V t = *reinterpret_cast<const V*>(tile + r * NR + v * W);
      acc[v] = acc[v] >= t ? acc[v] : t;  // a NaN score propagates
    }
  for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(mx + v * W) = acc[v];
}

// Folds a tile of scores [rows][NR queries] (base 2) into the running maximum m, sum l and output
// accumulator acc [NR queries][ld_acc], and replaces the scores by their probabilities 2^(s - m). NR
// (the forward's query block) is a compile-time constant so the per-lane state lives in registers.
template <class T, int NR>
FASTCV_ATTN_INLINE void online_softmax_impl(T* __restrict tile, int64_t rows, T* __restrict m, T* __restrict l,
                                            T* __restrict acc, int64_t ld_acc) {
  T mx[NR], base[NR], sum[NR];
  row_max<T, NR>(tile, rows, m, mx);
  for (int q = 0; q < NR; ++q) base[q] = mx[q] == -T(kInf) ? T(0) : mx[q];  // all excluded so far: p = 0
  T alpha[NR];
  for (int q = 0; q < NR; ++q) alpha[q] = attention::exp2(m[q] - base[q]);
  for (int q = 0; q < NR; ++q) {  // rescale the running sum and output where the maximum grew
    if (mx[q] == m[q]) continue;  // (after the first blocks, most rows keep their maximum)
    l[q] *= alpha[q];
    m[q] = mx[q];
    for (int64_t c = 0; c < ld_acc; ++c) acc[q * ld_acc + c] *= alpha[q];  // acc holds one row per query
  }
  for (int q = 0; q < NR; ++q) sum[q] = T(0);
  for (int64_t r = 0; r < rows; ++r)
    for (int q = 0; q < NR; ++q) {
      const T e = attention::exp2(tile[r * NR + q] - base[q]);
      tile[r * NR + q] = e;
      sum[q] += e;
    }
  for (int q = 0; q < NR; ++q) l[q] += sum[q];
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
// (No lambdas in here: a lambda's body would be compiled once, for the baseline instruction set.)
// nr: the forward's query block (forward_block_q): 48 or 64.
FASTCV_CPU_CLONES void online_softmax(float* tile, int64_t rows, int64_t nr, float* m, float* l, float* acc,
                                      int64_t ld_acc) {
  switch (nr) {
    case 48: return online_softmax_impl<float, 48>(tile, rows, m, l, acc, ld_acc);
    case 64: return online_softmax_impl<float, 64>(tile, rows, m, l, acc, ld_acc);
    default: throw ArgError("attention: unexpected query block " + std::to_string(nr));
  }
}
FASTCV_CPU_CLONES void probabilities(float* tile, int64_t rows, int64_t nr, const float* lse) {
  probabilities_impl(tile, rows, nr, lse);
}
FASTCV_CPU_CLONES void score_grad(const float* p, float* dp, int64_t rows, int64_t nr, const float* delta) {
  score_grad_impl(p, dp, rows, nr, delta);
}
void online_softmax(double* tile, int64_t rows, int64_t nr, double* m, double* l, double* acc, int64_t ld_acc) {
  switch (nr) {
    case 48: return online_softmax_impl<double, 48>(tile, rows, m, l, acc, ld_acc);
    case 64: return online_softmax_impl<double, 64>(tile, rows, m, l, acc, ld_acc);
    default: throw ArgError("attention: unexpected query block " + std::to_string(nr));
  }
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
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < nr; ++c) {
      const int64_t i = transposed ? col0 + c : row0 + r, j = transposed ? row0 + r : col0 + c;
      const bool keep = i < pr.sh.l && j < pr.sh.s &&
                        attention::dropout_keep(pr.seed, uint32_t(pr.offset), uint32_t(b * pr.sh.hq + h), uint32_t(i),
                                                uint32_t(j), pr.threshold);
      out[r * nr + c] = keep ? tile[r * nr + c] * pr.keep_scale : T(0);
    }
}

// ====================================================================================== forward

template <class T>
struct ForwardScratch {
  std::vector<T> kconv, vconv, ktail, vtail, qt, p, acc, m, l;
};

// A row-major matrix the micro-kernel reads in place: element (r, c) at p[r * ld + c].
template <class T>
struct Rows {
  const T* p;
  int64_t ld;
  const T* row(int64_t r) const { return p + r * ld; }
};

// Query block of the forward: a multiple of both MR (the output tiles' rows) and NR (the score tiles'
// lanes), about 48 queries.
inline int64_t forward_block_q(int64_t mr, int64_t nr) {
  const int64_t lcm = std::lcm(mr, nr);
  return lcm * std::max<int64_t>(1, 48 / lcm);
}

// A head's K and V as the micro-kernel reads them, from the caller's tensors when they are float or
// double (in place), else from converted copies. `key_tail`: keys from here on form the last partial
// MR tile, read from a zero-padded copy (so no tile reads past the tensor's end); `dv_direct`: value
// columns before it are read in place, the rest (a partial NR panel) from a zero-padded copy.
template <class T>
struct HeadOperands {
  Rows<T> k, v, ktail, vtail;
  int64_t key_tail, dv_direct;
};

template <class T, class S>
HeadOperands<T> head_operands(const Strided<S>& K, const Strided<S>& V, int64_t b, int64_t hk, int64_t s, int64_t d,
                              int64_t dv, int64_t mr, int64_t nr, ForwardScratch<T>& ws) {
  HeadOperands<T> op;
  if constexpr (std::is_same_v<S, T>) {
    op.k = {K.row(b, hk, 0), K.sr};
    op.v = {V.row(b, hk, 0), V.sr};
    op.key_tail = s / mr * mr;
    op.dv_direct = dv / nr * nr;
  } else {  // float16 / bfloat16: float copies, padded so that every tile is whole
    const int64_t s_pad = round_up(s, mr), dv_pad = round_up(dv, nr);
    ws.kconv.assign(size_t(s_pad * d), T(0));
    ws.vconv.assign(size_t(s * dv_pad), T(0));
    for (int64_t r = 0; r < s; ++r) {
      for (int64_t c = 0; c < d; ++c) ws.kconv[size_t(r * d + c)] = to_float(K.row(b, hk, r)[c]);
      for (int64_t c = 0; c < dv; ++c) ws.vconv[size_t(r * dv_pad + c)] = to_float(V.row(b, hk, r)[c]);
    }
    op.k = {ws.kconv.data(), d};
    op.v = {ws.vconv.data(), dv_pad};
    op.key_tail = s_pad;
    op.dv_direct = dv_pad;
  }
  if (op.key_tail < s) {
    ws.ktail.assign(size_t(mr * d), T(0));
    for (int64_t r = op.key_tail; r < s; ++r) std::copy_n(op.k.row(r), d, ws.ktail.data() + (r - op.key_tail) * d);
    op.ktail = {ws.ktail.data(), d};
  }
  if (op.dv_direct < dv) {
    ws.vtail.assign(size_t(s * nr), T(0));
    for (int64_t r = 0; r < s; ++r)
      std::copy(op.v.row(r) + op.dv_direct, op.v.row(r) + dv, ws.vtail.data() + r * nr);
    op.vtail = {ws.vtail.data(), nr};
  }
  return op;
}

// One task: query rows [q0, q0 + nq) of head (b, h). Per key block: S^T = K Q^T (keys in the tile's
// rows, the block's queries in its lanes, K read in place), mask, online softmax, then O += P V with
// the probability tile read transposed in place as the A operand and V's rows as the B operand.
template <class T, class S>
void forward_task(const gemm::Kernel<T>& kern, const Problem<T>& pr, int64_t b, int64_t h, int64_t q0, int64_t nq,
                  int64_t block_q, int64_t block_k, const Strided<S>& Q, const HeadOperands<T>& op,
                  ForwardScratch<T>& ws, S* out, T* lse) {
  const int64_t MR = kern.mr, NR = kern.nr, D = pr.sh.d, Dv = pr.sh.dv, L = pr.sh.l, Sk = pr.sh.s;
  const int64_t ld_acc = round_up(Dv, NR);
  // Q^T [D][block_q], scaled into base 2: the B operand of every score tile.
  T* qt = ws.qt.data();
  if constexpr (std::is_same_v<S, T>) {
    transpose(Q.row(b, h, q0), Q.sr, nq, D, qt, block_q);
  } else {
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t c = 0; c < D; ++c) qt[c * block_q + i] = to_float(Q.row(b, h, q0 + i)[c]);
  }
  const T scale2 = pr.scale2();
  for (int64_t c = 0; c < D; ++c) {
    T* row = qt + c * block_q;
    for (int64_t i = 0; i < nq; ++i) row[i] *= scale2;
    std::fill(row + nq, row + block_q, T(0));
  }
  std::fill(ws.acc.begin(), ws.acc.end(), T(0));
  std::fill(ws.m.begin(), ws.m.end(), -T(kInf));
  std::fill(ws.l.begin(), ws.l.end(), T(0));
  T* tile = ws.p.data();  // [keys][block_q]
  const int64_t k_end = pr.causal ? std::min(Sk, q0 + nq) : Sk;  // causal: no key after the last query
  const int64_t s_pad = round_up(Sk, MR);
  for (int64_t k0 = 0; k0 < k_end; k0 += block_k) {
    const int64_t kn = std::min(block_k, s_pad - k0);  // a multiple of MR; keys past S are masked
    for (int64_t kr = 0; kr < kn; kr += MR) {
      const int64_t key = k0 + kr;
      const T* a = key < op.key_tail ? op.k.row(key) : op.ktail.p;
      const int64_t lda = key < op.key_tail ? op.k.ld : op.ktail.ld;
      for (int64_t p0 = 0; p0 < nq; p0 += NR) {  // lanes past nq are never read
        if (pr.causal && key > q0 + p0 + NR - 1) continue;  // all after every query: masked below
        kern.tile_strided(D, a, 1, lda, qt + p0, block_q, tile + kr * block_q + p0, block_q, false);
      }
    }
    mask_tile(pr, b, h, tile, true, kn, block_q, k0, q0);
    online_softmax(tile, kn, block_q, ws.m.data(), ws.l.data(), ws.acc.data(), ld_acc);
    if (pr.dropout_p > 0) dropout_tile(pr, b, h, tile, tile, true, kn, block_q, k0, q0);
    const int64_t kvalid = std::min(kn, Sk - k0);  // keys past S have probability 0
    for (int64_t r = 0; r < nq; r += MR) {
      if (pr.causal && k0 > q0 + r + MR - 1) continue;  // these queries see no key of the block
      const T* a = tile + r;
      T* c = ws.acc.data() + r * ld_acc;
      for (int64_t c0 = 0; c0 < op.dv_direct; c0 += NR)
        kern.tile_strided(kvalid, a, block_q, 1, op.v.row(k0) + c0, op.v.ld, c + c0, ld_acc, true);
      if (op.dv_direct < Dv)
        kern.tile_strided(kvalid, a, block_q, 1, op.vtail.row(k0), op.vtail.ld, c + op.dv_direct, ld_acc, true);
    }
  }
  // O = acc / l, lse = m + log(l); rows that saw no key get 0 and +inf.
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t row = (b * pr.sh.hq + h) * L + q0 + i;
    const T l = ws.l[size_t(i)], m = ws.m[size_t(i)];
    const T inv = l > T(0) ? T(1) / l : T(0);
    const T* acc = ws.acc.data() + i * ld_acc;
    S* o = out + row * Dv;
    for (int64_t c = 0; c < Dv; ++c) o[c] = from_compute<S>(acc[c] * inv);
    lse[row] = l > T(0) ? (m + std::log2(l)) * T(attention::kLn2) : T(kInf);
  }
}

template <class T, class S>
void attention_forward_impl(const TensorView& qv, const TensorView& kv, const TensorView& vv, const Problem<T>& pr,
                            const TensorView& outv, const TensorView& lsev, int nthreads) {
  const gemm::Kernel<T>& kern = gemm::kernel(T{});
  const int64_t MR = kern.mr, NR = kern.nr;
  const AttentionShape& sh = pr.sh;
  const Strided<S> Q = strided<S>(qv), K = strided<S>(kv), V = strided<S>(vv);
  const int64_t block_q = forward_block_q(MR, NR);
  const int64_t block_k = round_up(64, MR);  // K and V blocks of 16 KB each at D = 64
  const int64_t q_blocks = (sh.l + block_q - 1) / block_q;
  // Tasks: a head's query blocks, split into interleaved chunks only when there are fewer heads than
  // threads can share (chunk c takes blocks c, c + chunks, ...: causal blocks grow with the index).
  const int64_t heads = sh.b * sh.hq;
  const int64_t chunks = std::clamp<int64_t>((2 * int64_t(nthreads) + heads - 1) / heads, 1, q_blocks);
  parallel_for(0, heads * chunks, 1, nthreads, [&](int64_t begin, int64_t end) {
    thread_local ForwardScratch<T> ws;
    ws.qt.resize(size_t(sh.d * block_q));
    ws.p.resize(size_t(block_k * block_q));
    ws.acc.resize(size_t(block_q * round_up(sh.dv, NR)));
    ws.m.resize(size_t(block_q));
    ws.l.resize(size_t(block_q));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / chunks, chunk = task % chunks;
      const int64_t b = bh / sh.hq, h = bh % sh.hq;
      const HeadOperands<T> op = head_operands(K, V, b, h / pr.group(), sh.s, sh.d, sh.dv, MR, NR, ws);
      for (int64_t qb = chunk; qb < q_blocks; qb += chunks) {
        const int64_t q0 = qb * block_q;
        forward_task(kern, pr, b, h, q0, std::min(block_q, sh.l - q0), block_q, block_k, Q, op, ws, outv.ptr<S>(),
                     lsev.ptr<T>());
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
