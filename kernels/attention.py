"""Triton scaled-dot-product attention, FlashAttention-2 style: forward and backward, with grouped-query
attention, an additive float mask, causal masking and dropout, the semantics of
F.scaled_dot_product_attention. fastcv.ops calls these launchers on GPUs (no autograd in here); the tests
run them on the CPU under TRITON_INTERPRET=1.

Shapes: q [B, Hq, L, D]; k, v [B, Hkv, S, D], Hq % Hkv == 0, query head h reading kv head h // (Hq/Hkv).
Any strides with a unit last one. out [B, Hq, L, D] and lse [B, Hq, L] (float32) are contiguous. The head
dim D (1..256) is padded to BLOCK_D = max(16, next power of two) and the loads are masked along it.

Kernels (each program one tile of query rows or of key rows; batch and head offsets in int64):
  _fwd_kernel        per (b, h, block of BLOCK_M query rows): the online softmax over key blocks of
                     BLOCK_N. s = scale * q.k + mask; the softmax runs in base 2 on s * log2(e), with
                     log2(e) folded into the scale (one multiply per score, exp2 instead of exp). Key
                     blocks are walked in two stages: the full ones (inside S and, when causal, wholly
                     at or below the diagonal) with no masking work at all, then the boundary ones (the
                     diagonal blocks and the one crossing S) with the masks. Causal programs stop at the
                     diagonal and are launched heaviest first. Writes out = sum(P V) / rowsum(P) and
                     lse = max + log(rowsum) (natural log, without dropout: the softmax normaliser).
  _bwd_preprocess    per (b, h, query block): delta = rowsum(dO * O) in float32 (a scratch tensor).
  _bwd_dkdv_kernel   per (b, kv head, block of BLOCK_N key rows): dK and dV accumulated in float32
                     registers over the query blocks of every query head of the group, recomputing
                     P = exp2(s - lse) from the stored lse: dV += P_drop^T dO, dP = dO V^T (times the
                     keep mask / (1-p) with dropout), dS = P * (dP - delta), dK += dS^T Q, dK *= scale.
                     Causal: starts at the first query block that reaches the key block; only the
                     diagonal blocks are masked, the blocks past the last full query block mask rows.
                     With MASK_GRAD, dS is also added into the mask's gradient (float32, seen as
                     [B, Hq, L, S] through strides): read-add-write where each entry belongs to this
                     program, fp32 atomic adds where the mask broadcasts over batch, heads, queries or
                     keys (tiles summed first along broadcast queries or keys); the autotuner restores
                     the accumulator after each benchmark run.
  _bwd_dq_kernel     per (b, h, query block): dQ = scale * sum over key blocks of dS K, recomputing P and
                     dP the same way, the key blocks walked in the forward's two stages.
                     dQ has its own kernel (P is computed twice in the backward) instead of float32
                     atomic adds from the dK/dV kernel: no atomics, so every result is deterministic.
  _dropout_mask_kernel  the keep mask the attention kernels use, as a [B, Hq, L, S] bool tensor (tests).

Numerics: every dot product accumulates in float32 (float16 and bfloat16 operands on tensor cores;
float32 operands with input_precision="ieee", i.e. no TF32); the softmax statistics, dK, dV, dQ and delta
are float32; results are rounded once, when stored. P (and dS) are rounded to the input dtype before
their dot products, as in FlashAttention. float64 is not supported (TypeError).

Masks: additive float32 [B, Hq, L, S] (any broadcast strides). A -inf entry masks a score. A row whose
scores are all -inf (only possible with a mask: causal rows always see key 0) gets out = 0 and lse = +inf,
so that its recomputed P = exp2(s - lse) is 0 in the backward and its gradients are 0 (PyTorch's result).
The online softmax subtracts 0 instead of a -inf running maximum, so no NaN is ever formed.

Dropout (probability p): element (b, h, i, j) of P is kept iff r >= threshold, threshold = round(p * 2^32)
(clamped to 2^32 - 1), r being output (j mod 4) of Philox-4x32-10 (tl.philox) with
    key     = seed (64 bits)
    counter = (c0, c1, c2, c3) = (j // 4, i, b * Hq + h, offset)          (four uint32 words)
so one Philox call gives the decisions of four neighbouring keys, every word stays in uint32 range without
wrapping (L, S, B*Hq < 2^31; 0 <= offset < 2^32) and the forward, the backward and dropout_mask regenerate
the same mask from (seed, offset) whatever their block sizes. Kept values are scaled by 1 / (1 - p).

Tuning: triton.autotune over (BLOCK_M, BLOCK_N, num_warps, num_stages), keyed on the padded head dim,
causality, mask, dropout, the dtype and power-of-two buckets of L and S, over a few candidates per
kernel, head dim (<= 64, 128, 256) and element size (_TABLE, picked from sm_90 compiles by register
spills and shared memory); candidates whose shared memory would pass 220 KB (with a mask's tiles) are
pruned. FASTCV_TRITON_AUTOTUNE=0 (and the
interpreter) use one configuration per kernel, chosen by head dim. K/V loads are software-pipelined over
num_stages. Tensor descriptors (TMA) are not used: the pointer path works for every stride and under the
interpreter.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, ONE_CONFIG
from ._common import dot as _dot

# log2(e) and ln(2) for the base-2 softmax. constexpr, so that the @triton.jit functions can read them (the
# launchers take the Python float, _LOG2E.value).
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

# Blocks forced by the tests (kind -> (BLOCK_M, BLOCK_N)), bypassing the tuner; None: normal behaviour.
_BLOCKS_OVERRIDE: dict | None = None


# ---------------------------------------------------------------------------------------------------
# Configurations


def _shared_bytes(kind, m, n, d, stages, es, has_mask):
    """Shared memory of a configuration, as Triton lays it out for sm_90 (these match the compiled
    kernels' metadata.shared within 1 KB): the tiles loaded once, `stages` buffers of the tiles loaded
    in the loop, and `stages` float32 mask tiles when there is a mask."""
    if kind == "fwd":  # Q once; K and V per stage
        tiles = m * d + stages * 2 * n * d
    elif kind == "kv":  # K and V once; Q and dO per stage
        tiles = 2 * n * d + stages * 2 * m * d
    else:  # Q and dO once; K and V per stage
        tiles = 2 * m * d + stages * 2 * n * d
    return es * tiles + (stages * m * n * 4 if has_mask else 0)


_SHARED_LIMIT = 220 * 1024  # an H100/H200 block can have 227 KB

# Candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, head dim (padded: 64 covers 16..64)
# and element size, the first being the default without tuning. Picked from sm_90 compiles
# (bench/compile_attention_triton.py): no or few register spills (ptxas -v) and shared memory that fits.
# The 16-bit defaults for D <= 128 are what triton.autotune chose on an H200 (Triton 3.6) for
# B=4, H=16, L=S=4096, bfloat16.
_TABLE = {
    ("fwd", 64, 2): [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)],
    ("fwd", 128, 2): [(128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)],
    ("fwd", 256, 2): [(64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (32, 32, 4, 2)],
    ("kv", 64, 2): [(32, 64, 4, 3), (32, 128, 8, 3), (64, 64, 8, 3)],
    ("kv", 128, 2): [(32, 128, 8, 3), (32, 64, 8, 3), (16, 64, 4, 3)],
    ("kv", 256, 2): [(16, 32, 8, 2), (32, 32, 8, 2), (16, 32, 4, 1)],
    ("q", 64, 2): [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
    ("q", 128, 2): [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)],
    ("q", 256, 2): [(64, 32, 8, 2), (128, 32, 8, 2), (32, 32, 4, 2)],
    # float32 (IEEE dot products on FMA units, operands in registers): small tiles, mostly 8 warps (4 spill)
    ("fwd", 64, 4): [(64, 32, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
    ("fwd", 128, 4): [(16, 32, 4, 2), (32, 32, 8, 1), (32, 32, 8, 2)],
    ("fwd", 256, 4): [(32, 32, 8, 2), (16, 32, 4, 2)],
    ("kv", 64, 4): [(32, 64, 8, 2), (16, 32, 4, 2)],
    ("kv", 128, 4): [(16, 32, 8, 2), (16, 64, 8, 2)],
    ("kv", 256, 4): [(16, 32, 8, 1), (16, 16, 4, 1)],
    ("q", 64, 4): [(64, 32, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
    ("q", 128, 4): [(32, 32, 8, 2), (64, 32, 8, 2), (16, 32, 4, 2)],
    ("q", 256, 4): [(32, 32, 8, 2), (16, 32, 4, 2)],
}
_FALLBACK = (16, 16, 4, 1)  # fits everything (a mask with D = 256 in float32 included)


def _d_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else block_d


def _candidates(kind, block_d, es, has_mask):
    """The table's candidates for a head dim that fit shared memory with or without a mask."""
    shapes = _TABLE[(kind, _d_bucket(block_d), es)]
    kept = [c for c in shapes if _shared_bytes(kind, c[0], c[1], block_d, c[3], es, has_mask) <= _SHARED_LIMIT]
    return kept or [_FALLBACK]


def _default(kind, block_d, es, has_mask=False):
    """The one configuration used without tuning (the interpreter: one small tile; benchmarking there
    would be slow and meaningless)."""
    if INTERPRET:
        return (16, 16, 1, 1)
    return _candidates(kind, block_d, es, has_mask)[0]


def _prune(kind):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        wanted = _candidates(kind, args["BLOCK_D"], args["Q"].element_size(), args["HAS_MASK"])
        kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]
        return kept or [_config(*wanted[0])]
    return prune


def _config(m, n, w, s):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


def _configs(kind):
    """Every candidate of a kernel, for triton.autotune; the pruning keeps those of the head dim."""
    shapes = dict.fromkeys(c for (k, _, _), lst in _TABLE.items() if k == kind for c in lst)
    return [_config(*c) for c in list(shapes) + [_FALLBACK]]


# seed, threshold and offset change every call: compile them as plain integers (no value specialisation)
_NO_SPEC = ["seed", "thr", "offset"]

_KEY = ["BLOCK_D", "IS_CAUSAL", "HAS_MASK", "DROPOUT", "L_BUCKET", "S_BUCKET"]


# ---------------------------------------------------------------------------------------------------
# Device functions


@triton.jit
def _keep(seed, thr, bh, offset, rows, col0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] keep decisions for query rows `rows` and keys col0 .. col0 + BLOCK_N - 1
    (col0 a multiple of 4): Philox-4x32 of counter (j // 4, i, b*Hq + h, offset), output j % 4."""
    quads = (col0 // 4 + tl.arange(0, BLOCK_N // 4)).to(tl.uint32)
    c0 = tl.broadcast_to(quads[None, :], (BLOCK_M, BLOCK_N // 4))
    c1 = tl.broadcast_to(rows.to(tl.uint32)[:, None], (BLOCK_M, BLOCK_N // 4))
    zero = tl.zeros((BLOCK_M, BLOCK_N // 4), tl.uint32)
    c2 = zero + tl.cast(bh, tl.uint32)
    c3 = zero + tl.cast(offset, tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    # column 4q + k takes r_k: join(join(r0, r2), join(r1, r3))[.., t, u] = r_(2t + u)
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_N))
    return r >= tl.cast(thr, tl.uint32)


@triton.jit
def _kv_scores(q, k_ptrs, v_ptrs, m_ptrs, rows, row_ok, cols, d_ok, qk_scale, S, BOUNDARY: tl.constexpr,
               IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block's K and V, and its scores with the query rows in base 2 (qk_scale holds log2 e), the
    additive mask added, and -inf where a key is past S or after the query (boundary blocks only: before
    exp2, padded keys (k = 0) and masked scores can lie far above the row's maximum or lse)."""
    if BOUNDARY:
        col_ok = cols < S
        k = tl.load(k_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0)
        v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0)
    elif EVEN_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=d_ok[None, :], other=0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0)
    s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), PRECISION, UPCAST) * qk_scale
    if HAS_MASK:
        if BOUNDARY:
            mk = tl.load(m_ptrs, mask=row_ok[:, None] & (cols < S)[None, :], other=0)
        else:
            mk = tl.load(m_ptrs, mask=row_ok[:, None], other=0)
        s += mk * _LOG2E
    if BOUNDARY:
        valid = (cols < S)[None, :]
        if IS_CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None])
        s = tl.where(valid, s, float("-inf"))
    return k, v, s


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, m_ptrs, rows, row_ok, offs_n, d_ok, lo, hi,
               skn, svn, sms, qk_scale, S, seed, thr, bh, offset,
               BOUNDARY: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
               EVEN_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    k_ptrs += tl.cast(lo, tl.int64) * skn
    v_ptrs += tl.cast(lo, tl.int64) * svn
    if HAS_MASK:
        m_ptrs += tl.cast(lo, tl.int64) * sms
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k, v, s = _kv_scores(q, k_ptrs, v_ptrs, m_ptrs, rows, row_ok, cols, d_ok, qk_scale, S, BOUNDARY, IS_CAUSAL,
                             HAS_MASK, EVEN_D, PRECISION, UPCAST, BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if HAS_MASK:  # a row with only -inf so far: subtract 0, not -inf (no NaN)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            p = tl.where(_keep(seed, thr, bh, offset, rows, start_n, BLOCK_M, BLOCK_N), p, 0.0)
        acc = _dot(p.to(v.dtype), v, acc, PRECISION, UPCAST)
        m_i = m_new
        k_ptrs += BLOCK_N * skn
        v_ptrs += BLOCK_N * svn
        if HAS_MASK:
            m_ptrs += BLOCK_N * sms
    return acc, l_i, m_i


@triton.jit
def _query_block(L, H, GROUP, BLOCK_M: tl.constexpr):
    """This program's (b, h) and query block, heaviest first (causal: the last block, whose loop is
    longest, starts earliest); the key-value head; b and h as int64 for offsets."""
    m_blocks = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // m_blocks
    start_m = (m_blocks - 1 - pid % m_blocks) * BLOCK_M
    h = bh % H
    return bh, start_m, tl.cast(bh // H, tl.int64), tl.cast(h, tl.int64), tl.cast(h // GROUP, tl.int64)


@triton.jit
def _key_pointers(K, V, Mask, b64, h64, kv_h, rows64, offs_n, offs_d, skb, skh, skn, svb, svh, svn, smb, smh, sml,
                  sms, HAS_MASK: tl.constexpr):
    """Pointers to the first key block's K and V tiles [BLOCK_N, BLOCK_D] and mask tile [BLOCK_M, BLOCK_N]
    (the mask pointer itself when there is none)."""
    k_ptrs = K + b64 * skb + kv_h * skh + tl.cast(offs_n, tl.int64)[:, None] * skn + offs_d[None, :]
    v_ptrs = V + b64 * svb + kv_h * svh + tl.cast(offs_n, tl.int64)[:, None] * svn + offs_d[None, :]
    if HAS_MASK:
        m_ptrs = Mask + b64 * smb + h64 * smh + rows64[:, None] * sml + tl.cast(offs_n, tl.int64)[None, :] * sms
    else:
        m_ptrs = Mask
    return k_ptrs, v_ptrs, m_ptrs


@triton.jit
def _key_range(S, start_m, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(end of the full key blocks, end of all key blocks) for query rows from start_m: full blocks lie
    inside S and, when causal, wholly at or below the diagonal for every row; the rest need masking."""
    full_blocks = S // BLOCK_N
    if IS_CAUSAL:
        full_blocks = tl.minimum(full_blocks, (start_m + 1) // BLOCK_N)
        hi = tl.minimum(S, start_m + BLOCK_M)
    else:
        hi = S
    return full_blocks * BLOCK_N, hi


@triton.jit(do_not_specialize=_NO_SPEC)
def _fwd_kernel(Q, K, V, Mask, Out, Lse,
                sqb, sqh, sql, skb, skh, skn, svb, svh, svn, smb, smh, sml, sms,
                H, GROUP, L, S, D, qk_scale, inv_keep, seed, thr, offset, L_BUCKET, S_BUCKET,
                IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh, start_m, b64, h64, kv_h = _query_block(L, H, GROUP, BLOCK_M)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < L
    d_ok = offs_d < D
    rows64 = tl.cast(rows, tl.int64)
    q_ptrs = Q + b64 * sqb + h64 * sqh + rows64[:, None] * sql + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0)
    k_ptrs, v_ptrs, m_ptrs = _key_pointers(K, V, Mask, b64, h64, kv_h, rows64, offs_n, offs_d, skb, skh, skn, svb,
                                           svh, svn, smb, smh, sml, sms, HAS_MASK)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    full_end, hi = _key_range(S, start_m, IS_CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, m_ptrs, rows, row_ok, offs_n, d_ok,
                               0, full_end, skn, svn, sms, qk_scale, S, seed, thr, bh, offset,
                               False, IS_CAUSAL, HAS_MASK, DROPOUT, EVEN_D, PRECISION, UPCAST, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, m_ptrs, rows, row_ok, offs_n, d_ok,
                               full_end, hi, skn, svn, sms, qk_scale, S, seed, thr, bh, offset,
                               True, IS_CAUSAL, HAS_MASK, DROPOUT, EVEN_D, PRECISION, UPCAST, BLOCK_M, BLOCK_N)
    if HAS_MASK:  # fully masked rows: out = 0, lse = +inf
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
    else:
        l_safe = l_i
        lse = (m_i + tl.math.log2(l_i)) * _LN2
    out = acc * (inv_keep / l_safe)[:, None]
    row_base = tl.cast(bh, tl.int64) * L + rows64
    tl.store(Lse + row_base, lse, mask=row_ok)
    o_ptrs = Out + row_base[:, None] * D + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_preprocess(Out, DO, Delta, sdb, sdh, sdl, H, L, D,
                    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    m_blocks = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // m_blocks
    rows = (pid % m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < L)[:, None] & (offs_d < D)[None, :]
    rows64 = tl.cast(rows, tl.int64)
    row_base = tl.cast(bh, tl.int64) * L + rows64
    o = tl.load(Out + row_base[:, None] * D + offs_d[None, :], mask=mask, other=0).to(tl.float32)
    do_ptrs = DO + tl.cast(bh // H, tl.int64) * sdb + tl.cast(bh % H, tl.int64) * sdh \
        + rows64[:, None] * sdl + offs_d[None, :]
    do = tl.load(do_ptrs, mask=mask, other=0).to(tl.float32)
    tl.store(Delta + row_base, tl.sum(o * do, 1), mask=rows < L)


@triton.jit
def _mask_grad(dm_ptr, dst, rows, cols, L, S, dml, dms, MASK_GRAD: tl.constexpr, SUM_L: tl.constexpr,
               SUM_S: tl.constexpr):
    """Adds dS^T [keys `cols`, queries `rows`] (float32, natural-log units: d loss / d mask) into the mask
    gradient at dm_ptr (this (b, h)'s entry) + row * dml + col * dms. A mask that broadcasts over the
    queries (SUM_L) or keys (SUM_S) gets the tile's sums along them; MASK_GRAD 1 adds with a plain load and
    store (every entry belongs to one program, visited once), 2 atomically (entries shared between
    programs, heads of a group or
    query blocks): both add to what the tensor holds. Padded rows and columns hold dS = 0."""
    r_ok = rows < L
    c_ok = cols < S
    if SUM_L and SUM_S:
        tl.atomic_add(dm_ptr, tl.sum(tl.sum(dst, 1), 0))
    elif SUM_L:
        tl.atomic_add(dm_ptr + tl.cast(cols, tl.int64) * dms, tl.sum(dst, 1), mask=c_ok)
    elif SUM_S:
        tl.atomic_add(dm_ptr + tl.cast(rows, tl.int64) * dml, tl.sum(dst, 0), mask=r_ok)
    else:
        ptrs = dm_ptr + tl.cast(cols, tl.int64)[:, None] * dms + tl.cast(rows, tl.int64)[None, :] * dml
        ok = c_ok[:, None] & r_ok[None, :]
        if MASK_GRAD == 1:
            tl.store(ptrs, tl.load(ptrs, mask=ok, other=0) + dst, mask=ok)
        else:
            tl.atomic_add(ptrs, dst, mask=ok)


@triton.jit
def _bwd_kv_inner(dk, dv, k, v, q_ptrs, do_ptrs, m_ptrs, Lse, Delta, row_base, start_n, cols, col_ok, lo, hi,
                  sql, sdl, sml, qk_scale, inv_keep, L, S, seed, thr, bh, offset, d_ok, dm_ptr, dml, dms,
                  CAUSAL_MASK: tl.constexpr, ROW_MASK: tl.constexpr, MASK_COLS: tl.constexpr, HAS_MASK: tl.constexpr,
                  DROPOUT: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                  MASK_GRAD: tl.constexpr, DM_SUM_L: tl.constexpr, DM_SUM_S: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Transposed tiles: rows of s^T are this program's keys, columns the query rows of the block.
    offs_m = tl.arange(0, BLOCK_M)
    q_ptrs += tl.cast(lo, tl.int64) * sql
    do_ptrs += tl.cast(lo, tl.int64) * sdl
    if HAS_MASK:
        m_ptrs += tl.cast(lo, tl.int64) * sml
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        if ROW_MASK:
            row_ok = rows < L
            q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0)
            do = tl.load(do_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0)
            lse = tl.load(Lse + row_base + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(Delta + row_base + rows, mask=row_ok, other=0)
        else:
            if EVEN_D:
                q = tl.load(q_ptrs)
                do = tl.load(do_ptrs)
            else:
                q = tl.load(q_ptrs, mask=d_ok[None, :], other=0)
                do = tl.load(do_ptrs, mask=d_ok[None, :], other=0)
            lse = tl.load(Lse + row_base + rows)
            delta = tl.load(Delta + row_base + rows)
        st = _dot(k, tl.trans(q), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), PRECISION, UPCAST) * qk_scale
        if HAS_MASK:
            if ROW_MASK:
                mk = tl.load(m_ptrs, mask=row_ok[None, :], other=0)
            else:
                mk = tl.load(m_ptrs)
            st += mk * _LOG2E
        # masked scores to -inf before exp2: a causally masked score can lie far above its row's lse
        if CAUSAL_MASK:
            st = tl.where(cols[:, None] <= rows[None, :], st, float("-inf"))
        if MASK_COLS:  # padded keys (k = 0, s = 0, possibly far above lse): no inf, even unstored
            st = tl.where(col_ok[:, None], st, float("-inf"))
        pt = tl.math.exp2(st - (lse * _LOG2E)[None, :])  # lse = +inf: P = 0
        dpt = _dot(v, tl.trans(do), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), PRECISION, UPCAST)
        if DROPOUT:
            keep = tl.trans(_keep(seed, thr, bh, offset, rows, start_n, BLOCK_M, BLOCK_N))
            pt_drop = tl.where(keep, pt * inv_keep, 0.0)
            dpt = tl.where(keep, dpt * inv_keep, 0.0)
        else:
            pt_drop = pt
        dv = _dot(pt_drop.to(do.dtype), do, dv, PRECISION, UPCAST)
        dst = pt * (dpt - delta[None, :])
        if MASK_GRAD != 0:
            _mask_grad(dm_ptr, dst, rows, cols, L, S, dml, dms, MASK_GRAD, DM_SUM_L, DM_SUM_S)
        dk = _dot(dst.to(q.dtype), q, dk, PRECISION, UPCAST)
        q_ptrs += BLOCK_M * sql
        do_ptrs += BLOCK_M * sdl
        if HAS_MASK:
            m_ptrs += BLOCK_M * sml
    return dk, dv


@triton.heuristics({"MASK_COLS": lambda args: args["S"] % args["BLOCK_N"] != 0})
@triton.jit(do_not_specialize=_NO_SPEC)
def _bwd_dkdv_kernel(Q, K, V, Mask, DO, Lse, Delta, DK, DV, DMask,
                     sqb, sqh, sql, skb, skh, skn, svb, svh, svn, smb, smh, sml, sms, sdb, sdh, sdl,
                     dmb, dmh, dml, dms,
                     H, HKV, GROUP, L, S, D, qk_scale, scale, inv_keep, seed, thr, offset, L_BUCKET, S_BUCKET,
                     IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                     BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                     MASK_GRAD: tl.constexpr, DM_SUM_L: tl.constexpr, DM_SUM_S: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_COLS: tl.constexpr):
    n_blocks = tl.cdiv(S, BLOCK_N)
    pid = tl.program_id(0)
    bhk = pid // n_blocks
    start_n = (pid % n_blocks) * BLOCK_N
    b = bhk // HKV
    hk = bhk % HKV
    b64 = tl.cast(b, tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < S
    d_ok = offs_d < D
    cols64 = tl.cast(cols, tl.int64)
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b64 * skb + tl.cast(hk, tl.int64) * skh + cols64[:, None] * skn + offs_d[None, :],
                mask=kv_mask, other=0)
    v = tl.load(V + b64 * svb + tl.cast(hk, tl.int64) * svh + cols64[:, None] * svn + offs_d[None, :],
                mask=kv_mask, other=0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    # Query blocks: [lo, mid) reach the diagonal (causal masking), [mid, full_end) are full,
    # [max(mid, full_end), end) cross L (rows masked).
    m_end = tl.cdiv(L, BLOCK_M) * BLOCK_M
    full_end = (L // BLOCK_M) * BLOCK_M
    if IS_CAUSAL:
        lo = tl.minimum((start_n // BLOCK_M) * BLOCK_M, m_end)
        mid = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, m_end)
        mid = tl.maximum(mid, lo)
    else:
        lo = 0
        mid = 0
    tail = tl.maximum(mid, full_end)
    offs_m64 = tl.cast(offs_m, tl.int64)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        h64 = tl.cast(h, tl.int64)
        row_base = tl.cast(bh, tl.int64) * L
        q_ptrs = Q + b64 * sqb + h64 * sqh + offs_m64[:, None] * sql + offs_d[None, :]
        do_ptrs = DO + b64 * sdb + h64 * sdh + offs_m64[:, None] * sdl + offs_d[None, :]
        if HAS_MASK:
            m_ptrs = Mask + b64 * smb + h64 * smh + offs_m64[None, :] * sml + cols64[:, None] * sms
        else:
            m_ptrs = Mask
        dm_ptr = DMask + b64 * dmb + h64 * dmh
        dk, dv = _bwd_kv_inner(dk, dv, k, v, q_ptrs, do_ptrs, m_ptrs, Lse, Delta, row_base, start_n, cols, col_ok, lo, mid,
                               sql, sdl, sml, qk_scale, inv_keep, L, S, seed, thr, bh, offset, d_ok, dm_ptr, dml, dms,
                               True, True, MASK_COLS, HAS_MASK, DROPOUT, EVEN_D, PRECISION, UPCAST,
                               MASK_GRAD, DM_SUM_L, DM_SUM_S, BLOCK_M, BLOCK_N)
        dk, dv = _bwd_kv_inner(dk, dv, k, v, q_ptrs, do_ptrs, m_ptrs, Lse, Delta, row_base, start_n, cols, col_ok, mid, full_end,
                               sql, sdl, sml, qk_scale, inv_keep, L, S, seed, thr, bh, offset, d_ok, dm_ptr, dml, dms,
                               False, False, MASK_COLS, HAS_MASK, DROPOUT, EVEN_D, PRECISION, UPCAST,
                               MASK_GRAD, DM_SUM_L, DM_SUM_S, BLOCK_M, BLOCK_N)
        dk, dv = _bwd_kv_inner(dk, dv, k, v, q_ptrs, do_ptrs, m_ptrs, Lse, Delta, row_base, start_n, cols, col_ok, tail, m_end,
                               sql, sdl, sml, qk_scale, inv_keep, L, S, seed, thr, bh, offset, d_ok, dm_ptr, dml, dms,
                               False, True, MASK_COLS, HAS_MASK, DROPOUT, EVEN_D, PRECISION, UPCAST,
                               MASK_GRAD, DM_SUM_L, DM_SUM_S, BLOCK_M, BLOCK_N)
    out_rows = (b64 * HKV + tl.cast(hk, tl.int64)) * S + cols64
    out_ptrs = out_rows[:, None] * D + offs_d[None, :]
    tl.store(DK + out_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_q_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, m_ptrs, rows, row_ok, offs_n, d_ok, lo, hi,
                 skn, svn, sms, qk_scale, inv_keep, S, seed, thr, bh, offset,
                 BOUNDARY: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                 EVEN_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    k_ptrs += tl.cast(lo, tl.int64) * skn
    v_ptrs += tl.cast(lo, tl.int64) * svn
    if HAS_MASK:
        m_ptrs += tl.cast(lo, tl.int64) * sms
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k, v, s = _kv_scores(q, k_ptrs, v_ptrs, m_ptrs, rows, row_ok, cols, d_ok, qk_scale, S, BOUNDARY, IS_CAUSAL,
                             HAS_MASK, EVEN_D, PRECISION, UPCAST, BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse2[:, None])
        dp = _dot(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), PRECISION, UPCAST)
        if DROPOUT:
            keep = _keep(seed, thr, bh, offset, rows, start_n, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, PRECISION, UPCAST)
        k_ptrs += BLOCK_N * skn
        v_ptrs += BLOCK_N * svn
        if HAS_MASK:
            m_ptrs += BLOCK_N * sms
    return dq


@triton.jit(do_not_specialize=_NO_SPEC)
def _bwd_dq_kernel(Q, K, V, Mask, DO, Lse, Delta, DQ,
                   sqb, sqh, sql, skb, skh, skn, svb, svh, svn, smb, smh, sml, sms, sdb, sdh, sdl,
                   H, GROUP, L, S, D, qk_scale, scale, inv_keep, seed, thr, offset, L_BUCKET, S_BUCKET,
                   IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                   BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh, start_m, b64, h64, kv_h = _query_block(L, H, GROUP, BLOCK_M)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < L
    d_ok = offs_d < D
    rows64 = tl.cast(rows, tl.int64)
    tile_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b64 * sqb + h64 * sqh + rows64[:, None] * sql + offs_d[None, :], mask=tile_mask, other=0)
    do = tl.load(DO + b64 * sdb + h64 * sdh + rows64[:, None] * sdl + offs_d[None, :], mask=tile_mask, other=0)
    row_base = tl.cast(bh, tl.int64) * L + rows64
    lse2 = tl.load(Lse + row_base, mask=row_ok, other=float("inf")) * _LOG2E
    delta = tl.load(Delta + row_base, mask=row_ok, other=0)
    k_ptrs, v_ptrs, m_ptrs = _key_pointers(K, V, Mask, b64, h64, kv_h, rows64, offs_n, offs_d, skb, skh, skn, svb,
                                           svh, svn, smb, smh, sml, sms, HAS_MASK)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    full_end, hi = _key_range(S, start_m, IS_CAUSAL, BLOCK_M, BLOCK_N)
    dq = _bwd_q_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, m_ptrs, rows, row_ok, offs_n, d_ok, 0, full_end,
                      skn, svn, sms, qk_scale, inv_keep, S, seed, thr, bh, offset,
                      False, IS_CAUSAL, HAS_MASK, DROPOUT, EVEN_D, PRECISION, UPCAST, BLOCK_M, BLOCK_N)
    dq = _bwd_q_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, m_ptrs, rows, row_ok, offs_n, d_ok, full_end, hi,
                      skn, svn, sms, qk_scale, inv_keep, S, seed, thr, bh, offset,
                      True, IS_CAUSAL, HAS_MASK, DROPOUT, EVEN_D, PRECISION, UPCAST, BLOCK_M, BLOCK_N)
    tl.store(DQ + row_base[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=tile_mask)


@triton.jit(do_not_specialize=_NO_SPEC)
def _dropout_mask_kernel(Out, L, S, seed, thr, offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    m_blocks = tl.cdiv(L, BLOCK_M)
    n_blocks = tl.cdiv(S, BLOCK_N)
    pid = tl.program_id(0)
    bh = pid // (m_blocks * n_blocks)
    start_n = (pid % n_blocks) * BLOCK_N
    rows = (pid // n_blocks % m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = start_n + tl.arange(0, BLOCK_N)
    keep = _keep(seed, thr, bh, offset, rows, start_n, BLOCK_M, BLOCK_N)
    ptrs = Out + (tl.cast(bh, tl.int64) * L + tl.cast(rows, tl.int64))[:, None] * S + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows < L)[:, None] & (cols < S)[None, :])


# ---------------------------------------------------------------------------------------------------
# Tuned variants (the raw kernels stay callable with explicit blocks)

_fwd_tuned = triton.autotune(_configs("fwd"), key=_KEY,
                             prune_configs_by={"early_config_prune": _prune("fwd")})(_fwd_kernel)
# The mask gradient is accumulated in place (atomic adds): benchmarking restores it after every run.
_dkdv_tuned = triton.autotune(_configs("kv"), key=_KEY + ["MASK_GRAD", "DM_SUM_L", "DM_SUM_S"],
                              prune_configs_by={"early_config_prune": _prune("kv")},
                              restore_value=["DMask"])(_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(_configs("q"), key=_KEY,
                            prune_configs_by={"early_config_prune": _prune("q")})(_bwd_dq_kernel)


# ---------------------------------------------------------------------------------------------------
# Launchers

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _bucket(n: int) -> int:
    return min(triton.next_power_of_2(n), 1 << 16)


def _dropout_args(dropout_p: float, seed: int, offset: int):
    """(threshold, 1 / (1 - p), seed as the kernels take it)."""
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    seed = int(seed)
    offset = int(offset)
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"attention: seed must be in [0, 2**64), got {seed}")
    if not 0 <= offset < 1 << 32:
        raise ValueError(f"attention: offset must be in [0, 2**32), got {offset}")
    if seed >= 1 << 63:  # the same 64 bits as an int64; the kernels reinterpret it as uint64
        seed -= 1 << 64
    thr = min(int(round(p * 2.0 ** 32)), (1 << 32) - 1)
    return thr, 1.0 / (1.0 - p), seed


def _check(q, k, v, mask, tensors=()):
    for name, t in (("q", q), ("k", k), ("v", v)) + tuple(tensors):
        if t.dtype == torch.float64:
            raise TypeError(f"attention: the Triton kernels do not take float64 ({name}); use the CPU path")
        if t.dtype not in _DTYPES:
            raise TypeError(f"attention: {name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"attention: {name} is {t.dtype} but q is {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"attention: {name} is on {t.device} but q is on {q.device}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention: q, k and v must be 4-D [B, H, L, D] tensors")
    B, Hq, L, D = q.shape
    Bk, Hkv, S, Dk = k.shape
    if Bk != B or tuple(v.shape) != (B, Hkv, S, D) or Dk != D:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"attention: query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if not 1 <= D <= 256:
        raise ValueError(f"attention: head dim must be in 1..256, got {D}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"attention: {name} must have a unit stride in its last dimension")
    if mask is not None:
        if mask.dtype != torch.float32:
            raise TypeError(f"attention: mask must be an additive float32 tensor, got {mask.dtype}")
        mask = mask.expand(B, Hq, L, S)
    return mask


def _common(q, k, mask, is_causal, dropout_p, seed, offset):
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    block_d = max(16, triton.next_power_of_2(D))
    thr, inv_keep, seed = _dropout_args(dropout_p, seed, offset)
    upcast = INTERPRET and q.dtype == torch.bfloat16
    return dict(
        flags=dict(IS_CAUSAL=bool(is_causal), HAS_MASK=mask is not None, DROPOUT=float(dropout_p) > 0.0,
                   BLOCK_D=block_d, EVEN_D=block_d == D, PRECISION="ieee", UPCAST=upcast),
        mask_args=(mask if mask is not None else q, *(mask.stride() if mask is not None else (0, 0, 0, 0))),
        B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, D=D, block_d=block_d, thr=thr, inv_keep=inv_keep, seed=seed,
        offset=int(offset), es=q.element_size(),
    )


def _launch(tuned, kind, c, grid_rows, grid_mult, args, extra_flags=None):
    """Runs a kernel: explicit blocks (tests' override, or one configuration), else the autotuner."""
    flags = c["flags"] if extra_flags is None else {**c["flags"], **extra_flags}
    blocks = None
    if _BLOCKS_OVERRIDE is not None and kind in _BLOCKS_OVERRIDE:
        m, n = _BLOCKS_OVERRIDE[kind]
        blocks = (m, n, 1 if INTERPRET else 4, 1 if INTERPRET else 2)
    elif ONE_CONFIG:
        blocks = _default(kind, c["block_d"], c["es"], c["flags"]["HAS_MASK"])
    if blocks is not None:
        m, n, w, s = blocks
        per = m if kind != "kv" else n
        tuned.fn[(grid_mult * triton.cdiv(grid_rows, per),)](
            *args, **flags, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
    else:
        per_key = "BLOCK_M" if kind != "kv" else "BLOCK_N"
        grid = lambda meta: (grid_mult * triton.cdiv(grid_rows, meta[per_key]),)
        tuned[grid](*args, **flags)


def forward(q, k, v, mask, scale: float, is_causal: bool, dropout_p: float, seed: int, offset: int,
            out, lse) -> None:
    """out = softmax(scale * q k^T + mask [causal]) [dropout] v into out ([B, Hq, L, D] contiguous, q's
    dtype), and the natural-log log-sum-exp of each row's scores into lse ([B, Hq, L] float32; +inf for
    a fully masked row, whose out is 0). mask: None or additive float32, broadcastable to [B, Hq, L, S]."""
    mask = _check(q, k, v, mask, (("out", out),))
    c = _common(q, k, mask, is_causal, dropout_p, seed, offset)
    B, Hq, L, S, D = c["B"], c["Hq"], c["L"], c["S"], c["D"]
    if tuple(out.shape) != (B, Hq, L, D) or not out.is_contiguous():
        raise ValueError(f"attention: out must be a contiguous {(B, Hq, L, D)} tensor")
    if tuple(lse.shape) != (B, Hq, L) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"attention: lse must be a contiguous {(B, Hq, L)} float32 tensor")
    args = (q, k, v, c["mask_args"][0], out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *c["mask_args"][1:], Hq, Hq // c["Hkv"], L, S, D, float(scale) * _LOG2E.value, c["inv_keep"],
            c["seed"], c["thr"], c["offset"], _bucket(L), _bucket(S))
    _launch(_fwd_tuned, "fwd", c, L, B * Hq, args)


def _mask_grad_args(dmask, B, Hq, L, S, device):
    """(DMask, its strides as [B, Hq, L, S], flags) for the dK/dV kernel. DMask is a 1-D tensor over the
    memory the view spans (the autotuner saves and restores it: the view itself overlaps)."""
    if dmask is None:
        return torch.zeros(1, dtype=torch.float32, device=device), (0, 0, 0, 0), \
            dict(MASK_GRAD=0, DM_SUM_L=False, DM_SUM_S=False)
    if dmask.dtype != torch.float32 or dmask.device != device:
        raise TypeError(f"attention: dmask must be a float32 tensor on {device}, got {dmask.dtype} on {dmask.device}")
    dmask = dmask.expand(B, Hq, L, S)
    st = dmask.stride()
    if min(st) < 0:
        raise ValueError("attention: dmask must not have negative strides")
    span = 1 + sum((n - 1) * s for n, s in zip(dmask.shape, st))
    base = dmask.as_strided((span,), (1,))
    sum_l, sum_s = st[2] == 0 and L > 1, st[3] == 0 and S > 1
    shared = (st[0] == 0 and B > 1) or (st[1] == 0 and Hq > 1) or sum_l or sum_s
    return base, st, dict(MASK_GRAD=2 if shared else 1, DM_SUM_L=sum_l, DM_SUM_S=sum_s)


def backward(grad_out, q, k, v, out, lse, mask, scale: float, is_causal: bool, dropout_p: float,
             seed: int, offset: int, dq, dk, dv, dmask=None) -> None:
    """Gradients of forward() with respect to q, k and v, for the same arguments, out and lse, into dq
    (like q), dk and dv (like k, v): contiguous, in the inputs' dtype. dmask: None, or a float32 tensor
    broadcastable to [B, Hq, L, S] (any strides, 0 on the dimensions the mask broadcasts over) into which
    the mask's gradient dS = P * (dP - delta) is added (summed over the broadcast dimensions)."""
    mask = _check(q, k, v, mask, (("grad_out", grad_out), ("out", out), ("dq", dq), ("dk", dk), ("dv", dv)))
    c = _common(q, k, mask, is_causal, dropout_p, seed, offset)
    B, Hq, Hkv, L, S, D = c["B"], c["Hq"], c["Hkv"], c["L"], c["S"], c["D"]
    for name, t, shape in (("dq", dq, q.shape), ("dk", dk, k.shape), ("dv", dv, v.shape), ("out", out, q.shape)):
        if t.shape != shape or not t.is_contiguous():
            raise ValueError(f"attention: {name} must be a contiguous {tuple(shape)} tensor")
    if grad_out.shape != q.shape:
        raise ValueError(f"attention: grad_out must be {tuple(q.shape)}, got {tuple(grad_out.shape)}")
    if grad_out.stride(-1) != 1 and D > 1:
        grad_out = grad_out.contiguous()
    delta = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    pre_m = 16 if INTERPRET else 64
    _bwd_preprocess[(B * Hq * triton.cdiv(L, pre_m),)](
        out, grad_out, delta, *grad_out.stride()[:3], Hq, L, D, BLOCK_D=c["block_d"], BLOCK_M=pre_m,
        num_warps=1 if INTERPRET else 4)
    common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *c["mask_args"][1:], *grad_out.stride()[:3])
    tail = (L, S, D, float(scale) * _LOG2E.value, float(scale), c["inv_keep"], c["seed"], c["thr"], c["offset"],
            _bucket(L), _bucket(S))
    dm, dm_strides, dm_flags = _mask_grad_args(dmask, B, Hq, L, S, q.device)
    kv_args = (q, k, v, c["mask_args"][0], grad_out, lse, delta, dk, dv, dm, *common, *dm_strides, Hq, Hkv,
               Hq // Hkv, *tail)
    _launch(_dkdv_tuned, "kv", c, S, B * Hkv, kv_args, dm_flags)
    q_args = (q, k, v, c["mask_args"][0], grad_out, lse, delta, dq, *common, Hq, Hq // Hkv, *tail)
    _launch(_dq_tuned, "q", c, L, B * Hq, q_args)


def dropout_mask(B: int, Hq: int, L: int, S: int, dropout_p: float, seed: int, offset: int, device) -> torch.Tensor:
    """The [B, Hq, L, S] bool keep mask that forward and backward apply for (dropout_p, seed, offset)."""
    thr, _, seed = _dropout_args(dropout_p, seed, offset)
    out = torch.empty((B, Hq, L, S), dtype=torch.int8, device=device)
    if out.numel() == 0:
        return out.view(torch.bool)
    bm, bn = (16, 16) if INTERPRET else (64, 64)
    _dropout_mask_kernel[(B * Hq * triton.cdiv(L, bm) * triton.cdiv(S, bn),)](
        out, L, S, seed, thr, int(offset), BLOCK_M=bm, BLOCK_N=bn, num_warps=1 if INTERPRET else 4)
    return out.view(torch.bool)
