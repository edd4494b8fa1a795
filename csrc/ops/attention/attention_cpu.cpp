// CPU scaled-dot-product attention: FlashAttention-2's tiled algorithm on the GEMM micro-kernel.
//
// The L x S score matrix never exists: the forward walks key blocks with an online softmax (a running
// maximum and sum per query, the output rescaled when the maximum grows) and saves only the
// log-sum-exp per query; the backward recomputes each block's probabilities from it.
//
// Layout. Every product is one call of the micro-kernel's strided tile (gemm::Kernel::tile_strided),
// which reads A through a stride per k-step and per row (broadcast loads take any address) and B
// through a row stride, so operands are read where they lie, also transposed:
// - forward: scores are computed transposed, S^T[keys][queries] = K Q^T, with a block of 48-64
//   queries in the lanes (K read in place, Q^T transposed once per block). The softmax's maximum and sum
//   over keys are then lane-wise vector operations, and O[queries][Dv] += P V reads the probability
//   tile transposed as its A operand and V's rows as its B operand.
// - backward: see the comment above attention_backward_impl; Q, dO, K, V are copied once per task into
//   zero-padded row-major scratch (K and V also transposed), and all five products read them in place.
// Threads take (head, query blocks) tasks in the forward and (key-value head, key blocks) tasks in the
// backward, which own their dK/dV rows outright. dQ is accumulated per task and summed afterwards in a
// fixed order when a head's key blocks are split over several tasks (only when there are fewer heads
// than threads), so results do not depend on the threads' timing. A mask gradient (dS added into an
// accumulator of the mask's shape) regroups the backward's tasks by the entries they add to (see
// backward_split), in a split that depends on the shape only.
// float16 and bfloat16 compute in float32 (converted on the way in); float64 runs the double kernels.
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
#include "common/cpu_isa.h"
#include "common/dtype.h"
#include "common/parallel.h"
#include "compute/gemm.h"
#include "compute/transpose.h"
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
  T* grad_mask;  // the backward's mask-gradient accumulator, or null
  int64_t gb, gh, gl, gs;
  int64_t group() const { return sh.hq / sh.hkv; }
  T scale2() const { return scale * T(attention::kLog2e); }  // scores in base 2
  T mask_at(int64_t b, int64_t h, int64_t i, int64_t j) const { return mask[b * mb + h * mh + i * ml + j * ms]; }
};

template <class T>
Problem<T> make_problem(const AttentionShape& sh, const TensorView* mask, double scale, bool causal, double p,
                        uint64_t seed, uint64_t offset) {
  Problem<T> pr{sh,   nullptr, 0,      0,       0, 0, T(scale), causal, p, attention::dropout_threshold(p),
                T(1.0 / (1.0 - p)), seed, offset, nullptr, 0, 0, 0, 0};
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
// Rows [0, n) of src (row stride sr, `cols` used) converted into dst [rows_pad][ld], times `scale`,
// zeros elsewhere.
template <class T, class S>
void copy_padded(const S* src, int64_t sr, int64_t n, int64_t cols, int64_t rows_pad, int64_t ld, T scale, T* dst) {
  for (int64_t r = 0; r < rows_pad; ++r) {
    T* out = dst + r * ld;
    const int64_t m = r < n ? cols : 0;
    const S* in = src + r * sr;
    for (int64_t c = 0; c < m; ++c) out[c] = scale * T(to_float(in[c]));
    std::fill(out + m, out + ld, T(0));
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

// The forward's query blocks (lanes of its score tiles), one online_softmax_impl each. A block must be
// a multiple of the micro-kernel's MR and NR; forward_block_q picks the first that is, and a
// static_assert below proves that every compiled micro-kernel geometry has one.
constexpr int kQueryBlocks[] = {48, 64};

template <class T>
FASTCV_ATTN_INLINE void online_softmax_block(T* tile, int64_t rows, int64_t nr, T* m, T* l, T* acc, int64_t ld_acc) {
  static_assert(sizeof(kQueryBlocks) / sizeof(int) == 2, "one case per entry of kQueryBlocks");
  if (nr == kQueryBlocks[0]) return online_softmax_impl<T, kQueryBlocks[0]>(tile, rows, m, l, acc, ld_acc);
  if (nr == kQueryBlocks[1]) return online_softmax_impl<T, kQueryBlocks[1]>(tile, rows, m, l, acc, ld_acc);
  throw ArgError("attention: internal error: no online softmax for a query block of " + std::to_string(nr));
}

// The float versions are compiled per instruction set (AVX-512, AVX2, baseline), the one in use picked
// at each call. (No lambdas in the impls: a lambda's body would be compiled once, for the baseline.)
// nr: the forward's query block (forward_block_q), one of kQueryBlocks.
FASTCV_ISA_DISPATCH(void, online_softmax, online_softmax_block<float>,
                    (float* tile, int64_t rows, int64_t nr, float* m, float* l, float* acc, int64_t ld_acc),
                    (tile, rows, nr, m, l, acc, ld_acc))
FASTCV_ISA_DISPATCH(void, probabilities, probabilities_impl<float>,
                    (float* tile, int64_t rows, int64_t nr, const float* lse), (tile, rows, nr, lse))
FASTCV_ISA_DISPATCH(void, score_grad, score_grad_impl<float>,
                    (const float* p, float* dp, int64_t rows, int64_t nr, const float* delta), (p, dp, rows, nr, delta))
void online_softmax(double* tile, int64_t rows, int64_t nr, double* m, double* l, double* acc, int64_t ld_acc) {
  online_softmax_block<double>(tile, rows, nr, m, l, acc, ld_acc);
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

constexpr bool has_query_block(int mr, int nr) {
  for (const int block : kQueryBlocks)
    if (block % std::lcm(mr, nr) == 0) return true;
  return false;
}
// Every micro-kernel geometry compiled (each ISA, float and double) has a query block.
static_assert(has_query_block(gemm::kTileRows[0], gemm::tile_cols(0, 4)) &&
                  has_query_block(gemm::kTileRows[0], gemm::tile_cols(0, 8)) &&
                  has_query_block(gemm::kTileRows[1], gemm::tile_cols(1, 4)) &&
                  has_query_block(gemm::kTileRows[1], gemm::tile_cols(1, 8)) &&
                  has_query_block(gemm::kTileRows[2], gemm::tile_cols(2, 4)) &&
                  has_query_block(gemm::kTileRows[2], gemm::tile_cols(2, 8)),
              "a GEMM tile geometry has no forward query block: add one to kQueryBlocks");

// Query block of the forward: the first of kQueryBlocks that is a multiple of both MR (the output
// tiles' rows) and NR (the score tiles' lanes); 0 when none is.
inline int64_t forward_block_q(int64_t mr, int64_t nr) {
  for (const int block : kQueryBlocks)
    if (block % std::lcm(mr, nr) == 0) return block;
  return 0;
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
    ws.kconv.resize(size_t(s_pad * d));
    ws.vconv.resize(size_t(s * dv_pad));
    copy_padded(K.row(b, hk, 0), K.sr, s, d, s_pad, d, T(1), ws.kconv.data());
    copy_padded(V.row(b, hk, 0), V.sr, s, dv, s, dv_pad, T(1), ws.vconv.data());
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
//
// Tasks: (b, key-value head, chunk of key blocks). A task copies its heads' Q (scaled into base 2), dO,
// K and V into zero-padded row-major scratch (rows to whole tiles, columns to whole NR panels) and
// transposes K and V once; every product then reads its operands in place through the micro-kernel's
// strides:
//   S  [q][key] = Q' K^T        A = Q' rows,         B = K^T rows
//   dP [q][key] = dO V^T        A = dO rows,         B = V^T rows
//   dV [key][:] += P^T dO       A = P read transposed (strides block_k, 1), B = dO rows
//   dK [key][:] += dS^T Q'      A = dS read transposed,                    B = Q' rows
//   dQ [q][:]   += dS K         A = dS rows,         B = K rows
// so nothing is packed per block and dK, dV, dQ come out row-major.

template <class T>
struct BackwardScratch {
  std::vector<T> q, dout, lse, delta, k, v, kt, vt, p, pd, dp, dk, dv;
};

template <class T>
struct BackwardDims {
  int64_t mr, nr, block_q, block_k, l_pad, s_pad, ld_d, ld_dv;
};

// grad_mask[b, h, q0 + i, k0 + j] += ds[i][j] over the valid queries and keys (causal: keys j <= i; the
// others are 0). ds is dL/d(score) in natural-log units: P is the true probability (the base-2 scores
// only change how it is computed), and the mask is added to the score, so dL/dmask = dS.
template <class T>
void add_mask_grad(const Problem<T>& pr, int64_t b, int64_t h, const T* ds, int64_t ld, int64_t q0, int64_t k0,
                   int64_t qn, int64_t kn) {
  T* base = pr.grad_mask + b * pr.gb + h * pr.gh + k0 * pr.gs;
  for (int64_t i = 0; i < qn; ++i) {
    const int64_t kend = pr.causal ? std::clamp<int64_t>(q0 + i - k0 + 1, 0, kn) : kn;
    T* row = base + (q0 + i) * pr.gl;
    const T* src = ds + i * ld;
    if (pr.gs == 1) {
      for (int64_t j = 0; j < kend; ++j) row[j] += src[j];
    } else {
      for (int64_t j = 0; j < kend; ++j) row[j * pr.gs] += src[j];
    }
  }
}

// One (query block, key block) step for query head h: queries [q0, q0 + qn), keys [k0, k0 + block_k).
template <class T>
void backward_block(const gemm::Kernel<T>& kern, const Problem<T>& pr, const BackwardDims<T>& dm, int64_t b,
                    int64_t h, int64_t q0, int64_t k0, const T* q, const T* dout, const T* lse, const T* delta,
                    BackwardScratch<T>& ws, T* dq) {
  const int64_t MR = dm.mr, NR = dm.nr, BK = dm.block_k, D = pr.sh.d, Dv = pr.sh.dv;
  const int64_t qn = std::min(dm.block_q, dm.l_pad - q0);               // a multiple of MR
  const int64_t qvalid = std::min(qn, pr.sh.l - q0), kvalid = std::min(BK, pr.sh.s - k0);
  T* p = ws.p.data();
  T* dp = ws.dp.data();
  for (int64_t r = 0; r < qn; r += MR)
    for (int64_t j = 0; j < BK; j += NR) {
      if (pr.causal && k0 + j > q0 + r + MR - 1) continue;  // all masked (mask_tile fills -inf)
      kern.tile_strided(D, q + (q0 + r) * dm.ld_d, 1, dm.ld_d, ws.kt.data() + k0 + j, dm.s_pad, p + r * BK + j, BK,
                        false);
      kern.tile_strided(Dv, dout + (q0 + r) * dm.ld_dv, 1, dm.ld_dv, ws.vt.data() + k0 + j, dm.s_pad, dp + r * BK + j,
                        BK, false);
    }
  mask_tile(pr, b, h, p, false, qn, BK, q0, k0);
  probabilities(p, qn, BK, lse + q0);
  T* pd = p;
  if (pr.dropout_p > 0) {  // dV sees the dropped probabilities; dP the gradient through the mask
    pd = ws.pd.data();
    dropout_tile(pr, b, h, p, pd, false, qn, BK, q0, k0);
    dropout_tile(pr, b, h, dp, dp, false, qn, BK, q0, k0);
  }
  score_grad(p, dp, qn, BK, delta + q0);  // dS, in dp
  if (pr.grad_mask) add_mask_grad(pr, b, h, dp, BK, q0, k0, qvalid, kvalid);
  const int64_t q_last = q0 + qvalid - 1;
  for (int64_t kr = 0; kr < kvalid; kr += MR) {
    if (pr.causal && k0 + kr > q_last) break;  // these keys are after every query of the block
    for (int64_t c = 0; c < Dv; c += NR)
      kern.tile_strided(qvalid, pd + kr, BK, 1, dout + q0 * dm.ld_dv + c, dm.ld_dv, ws.dv.data() + kr * dm.ld_dv + c,
                        dm.ld_dv, true);
    for (int64_t c = 0; c < D; c += NR)
      kern.tile_strided(qvalid, dp + kr, BK, 1, q + q0 * dm.ld_d + c, dm.ld_d, ws.dk.data() + kr * dm.ld_d + c,
                        dm.ld_d, true);
  }
  for (int64_t r = 0; r < qn; r += MR) {
    if (pr.causal && k0 > q0 + r + MR - 1) continue;  // these queries see no key of the block
    for (int64_t c = 0; c < D; c += NR)
      kern.tile_strided(kvalid, dp + r * BK, 1, BK, ws.k.data() + k0 * dm.ld_d + c, dm.ld_d, dq + (q0 + r) * dm.ld_d + c,
                        dm.ld_d, true);
  }
}

// The backward's tasks: `supers * chunks` of them, each walking `members` (b, kv head) pairs in order and,
// for each, the key blocks chunk, chunk + chunks, ... (dQ is summed per chunk, the chunks added up in
// order afterwards).
// - No mask gradient: one (b, kv head) per task; a head's key blocks are split into chunks only when
//   there are fewer heads than kBackwardTasks.
// - A mask gradient: the tasks that could add to the same mask-gradient entry are one task. A task owns
//   a b (unless the mask broadcasts over the batch: then it walks every b), a kv head (unless the mask
//   broadcasts over the heads of different kv groups) and a chunk of key blocks, whose mask columns are
//   its own (one chunk when the mask broadcasts over the keys).
// Either way the chunk count depends on the shape only, not on nthreads, so the sums' order and the
// results are the same for any thread count.
struct BackwardSplit {
  int64_t supers, members, chunks;
  bool own_b, own_h;  // a task owns its b / kv head (else it walks them all)
  int64_t batch(int64_t super, int64_t member, int64_t hkv) const {
    return own_b ? (own_h ? super / hkv : super) : (own_h ? member : member / hkv);
  }
  int64_t kv_head(int64_t super, int64_t member, int64_t hkv) const {
    return own_h ? (own_b ? super % hkv : super) : (own_b ? member : member % hkv);
  }
};

constexpr int64_t kBackwardTasks = 16;                   // tasks a split aims for (threads to keep busy)
constexpr int64_t kMaskGradChunkBytes = int64_t(256) << 20;  // cap on the extra per-chunk dQ sums

// Chunks of key blocks per task so that `supers` tasks make about kBackwardTasks.
inline int64_t backward_chunks(int64_t supers, int64_t k_blocks) {
  return std::clamp<int64_t>((kBackwardTasks + supers - 1) / std::max<int64_t>(supers, 1), 1,
                             std::max<int64_t>(k_blocks, 1));
}

// dq_bytes: one (b, kv head)'s dQ accumulator.
template <class T>
BackwardSplit backward_split(const Problem<T>& pr, int64_t heads, int64_t k_blocks, int64_t dq_bytes) {
  if (!pr.grad_mask) return {heads, 1, backward_chunks(heads, k_blocks), true, true};
  BackwardSplit sp;
  sp.own_b = pr.sh.b <= 1 || pr.gb != 0;
  sp.own_h = pr.sh.hkv <= 1 || pr.gh != 0;
  sp.supers = (sp.own_b ? pr.sh.b : 1) * (sp.own_h ? pr.sh.hkv : 1);
  sp.members = sp.supers > 0 ? heads / sp.supers : 0;
  if (pr.gs == 0 && pr.sh.s > 1) {
    sp.chunks = 1;
  } else {
    const int64_t want = backward_chunks(sp.supers, k_blocks);
    const int64_t affordable = 1 + kMaskGradChunkBytes / std::max<int64_t>(heads * dq_bytes, 1);
    sp.chunks = std::min(want, affordable);
  }
  return sp;
}

template <class T, class S>
void attention_backward_impl(const TensorView& gv, const TensorView& qv, const TensorView& kv, const TensorView& vv,
                             const TensorView& outv, const TensorView& lsev, const Problem<T>& pr,
                             const TensorView& dqv, const TensorView& dkv, const TensorView& dvv, int nthreads) {
  const gemm::Kernel<T>& kern = gemm::kernel(T{});
  const int64_t MR = kern.mr, NR = kern.nr;
  const AttentionShape& sh = pr.sh;
  const int64_t D = sh.d, Dv = sh.dv, L = sh.l, Sk = sh.s, G = pr.group();
  const int64_t lcm = std::lcm(MR, NR);
  BackwardDims<T> dm;
  dm.mr = MR, dm.nr = NR;
  dm.block_q = 16 * MR;
  // Keys are the rows of dK, dV and the lanes of S, dP; a short sequence gets one block of its own
  // (rounded up) rather than a full block of zero padding to clear and transpose.
  dm.block_k = std::min(lcm * std::max<int64_t>(1, 96 / lcm), std::max(lcm, round_up(Sk, lcm)));
  dm.l_pad = round_up(L, MR);
  dm.s_pad = round_up(Sk, dm.block_k);
  dm.ld_d = round_up(D, NR), dm.ld_dv = round_up(Dv, NR);
  const Strided<S> Q = strided<S>(qv), K = strided<S>(kv), V = strided<S>(vv), dO = strided<S>(gv);
  const S* out = outv.ptr<const S>();
  const T* lse_in = lsev.ptr<const T>();
  const int64_t k_blocks = dm.s_pad / dm.block_k;
  const int64_t heads = sh.b * sh.hkv;
  const int64_t dq_size = dm.l_pad * dm.ld_d;
  const BackwardSplit split = backward_split(pr, heads, k_blocks, G * dq_size * int64_t(sizeof(T)));
  const int64_t chunks = split.chunks;
  thread_local CallBuffer<T> buffer;
  T* dqacc = buffer.get(size_t(heads * chunks * G * dq_size));
  std::fill(dqacc, dqacc + heads * chunks * G * dq_size, T(0));
  S* dk = dkv.ptr<S>();
  S* dv = dvv.ptr<S>();
  const T scale2 = pr.scale2(), ln2 = T(attention::kLn2), log2e = T(attention::kLog2e);
  parallel_for(0, split.supers * chunks, 1, nthreads, [&](int64_t begin, int64_t end) {
    thread_local BackwardScratch<T> ws;
    const int64_t q_size = dm.l_pad * dm.ld_d, do_size = dm.l_pad * dm.ld_dv;
    ws.q.resize(size_t(G * q_size));
    ws.dout.resize(size_t(G * do_size));
    ws.lse.resize(size_t(G * dm.l_pad));
    ws.delta.resize(size_t(G * dm.l_pad));
    ws.k.resize(size_t(dm.s_pad * dm.ld_d));
    ws.v.resize(size_t(dm.s_pad * dm.ld_dv));
    ws.kt.resize(size_t(D * dm.s_pad));
    ws.vt.resize(size_t(Dv * dm.s_pad));
    ws.p.resize(size_t(dm.block_q * dm.block_k));
    ws.pd.resize(pr.dropout_p > 0 ? size_t(dm.block_q * dm.block_k) : 0);
    ws.dp.resize(size_t(dm.block_q * dm.block_k));
    ws.dk.resize(size_t(dm.block_k * dm.ld_d));
    ws.dv.resize(size_t(dm.block_k * dm.ld_dv));
    for (int64_t task = begin; task < end; ++task)
    for (int64_t member = 0; member < split.members; ++member) {
      const int64_t chunk = task % chunks;
      const int64_t b = split.batch(task / chunks, member, sh.hkv), hk = split.kv_head(task / chunks, member, sh.hkv);
      const int64_t bhk = b * sh.hkv + hk;
      copy_padded(K.row(b, hk, 0), K.sr, Sk, D, dm.s_pad, dm.ld_d, T(1), ws.k.data());
      copy_padded(V.row(b, hk, 0), V.sr, Sk, Dv, dm.s_pad, dm.ld_dv, T(1), ws.v.data());
      transpose(ws.k.data(), dm.ld_d, dm.s_pad, D, ws.kt.data(), dm.s_pad);
      transpose(ws.v.data(), dm.ld_dv, dm.s_pad, Dv, ws.vt.data(), dm.s_pad);
      for (int64_t g = 0; g < G; ++g) {  // the group's query heads: Q' = scale * log2(e) * Q, dO, lse2, delta
        const int64_t h = hk * G + g, bh = b * sh.hq + h;
        T* qg = ws.q.data() + g * q_size;
        T* dog = ws.dout.data() + g * do_size;
        copy_padded(Q.row(b, h, 0), Q.sr, L, D, dm.l_pad, dm.ld_d, scale2, qg);
        copy_padded(dO.row(b, h, 0), dO.sr, L, Dv, dm.l_pad, dm.ld_dv, T(1), dog);
        T* lse = ws.lse.data() + g * dm.l_pad;
        T* delta = ws.delta.data() + g * dm.l_pad;
        for (int64_t i = 0; i < dm.l_pad; ++i) {
          T sum = 0;
          if (i < L) {
            const S* o = out + (bh * L + i) * Dv;
            for (int64_t c = 0; c < Dv; ++c) sum += dog[i * dm.ld_dv + c] * T(to_float(o[c]));
          }
          lse[i] = i < L ? lse_in[bh * L + i] * log2e : T(kInf);  // +inf: padded rows get p = 0
          delta[i] = sum;
        }
      }
      for (int64_t kb = chunk; kb < k_blocks; kb += chunks) {
        const int64_t k0 = kb * dm.block_k;
        std::fill(ws.dk.begin(), ws.dk.end(), T(0));
        std::fill(ws.dv.begin(), ws.dv.end(), T(0));
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = hk * G + g;
          T* dq = dqacc + ((bhk * chunks + chunk) * G + g) * dq_size;
          for (int64_t q0 = pr.causal ? k0 / MR * MR : 0; q0 < L; q0 += dm.block_q)  // causal: queries >= k0
            backward_block(kern, pr, dm, b, h, q0, k0, ws.q.data() + g * q_size, ws.dout.data() + g * do_size,
                           ws.lse.data() + g * dm.l_pad, ws.delta.data() + g * dm.l_pad, ws, dq);
        }
        for (int64_t j = 0; j < dm.block_k && k0 + j < Sk; ++j) {  // dK = ln 2 * dS^T Q' (= scale * dS^T Q)
          S* dkr = dk + (bhk * Sk + k0 + j) * D;
          S* dvr = dv + (bhk * Sk + k0 + j) * Dv;
          for (int64_t c = 0; c < D; ++c) dkr[c] = from_compute<S>(ws.dk[size_t(j * dm.ld_d + c)] * ln2);
          for (int64_t c = 0; c < Dv; ++c) dvr[c] = from_compute<S>(ws.dv[size_t(j * dm.ld_dv + c)]);
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
          for (int64_t c = 0; c < chunks; ++c) sum += dqacc[((bhk * chunks + c) * G + g) * dq_size + i * dm.ld_d + d];
          dq[(bh * L + i) * D + d] = from_compute<S>(sum * pr.scale);
        }
    }
  });
  buffer.trim();
}

// Multiply-adds of the scores and the output (Q K^T and P V): what decides how many threads are worth
// waking. The results do not depend on the thread count.
int64_t attention_macs(const AttentionShape& sh) { return sh.b * sh.hq * sh.l * sh.s * (sh.d + sh.dv); }

}  // namespace

void attention_forward_cpu(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* mask,
                           double scale, bool is_causal, double dropout_p, uint64_t seed, uint64_t offset,
                           const TensorView& out, const TensorView& lse, int nthreads) {
  const AttentionShape sh = check_attention_args(q, k, v, mask, out, lse, DeviceType::CPU);
  if (sh.b * sh.hq * sh.l == 0) return;
  nthreads = threads_for(attention_macs(sh), nthreads);
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
                            const TensorView* grad_mask, int nthreads) {
  const AttentionShape sh = check_attention_args(q, k, v, mask, out, lse, DeviceType::CPU);
  check_attention_grads(grad_out, dq, dk, dv, q, k, v, out, grad_mask);
  if (sh.b * sh.hkv == 0 || (sh.l == 0 && sh.s == 0)) return;
  nthreads = threads_for(attention_macs(sh), nthreads);
  dispatch_floating(q.dtype, "query", [&](auto tag) {
    using S = decltype(tag);
    using T = compute_t<S>;
    Problem<T> pr = make_problem<T>(sh, mask, scale, is_causal, dropout_p, seed, offset);
    if (grad_mask) {
      pr.grad_mask = grad_mask->ptr<T>();
      pr.gb = grad_mask->stride(0), pr.gh = grad_mask->stride(1), pr.gl = grad_mask->stride(2);
      pr.gs = grad_mask->stride(3);
    }
    attention_backward_impl<T, S>(grad_out, q, k, v, out, lse, pr, dq, dk, dv, nthreads);
  });
}

}  // namespace fastcv
