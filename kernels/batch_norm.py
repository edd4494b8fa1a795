"""Triton batch norm: training and evaluation forward with a fused residual and ReLU, and the backward of
both, with the semantics of csrc/ops/batch_norm/batch_norm_ops.h and the arithmetic of batch_norm.h.
fastcv.ops can call these launchers on GPUs; the tests run them on the CPU under TRITON_INTERPRET=1.

Every tensor is a 3-D view [N, C, S] that is planar (strides C*S, S, 1) or packed (channels_last:
strides S*C, 1, C; S == 1 counts as packed). A packed tensor is walked as N*S rows of C channels, so the
kernels see a planar one as [N, C, S] and a packed one as [N*S, C, 1], both through strides, and tile
either with [BLOCK_N, BLOCK_C, BLOCK_S] blocks whose innermost memory dimension (S planar, C packed) is
the widest: loads run along contiguous memory in both layouts.

Kernels (each program one tile, or a run of tiles for the reductions):
  _stats_kernel        per (split, channel block): Chan-merged (count, mean, M2) of its run of tiles,
                       each tile by two passes over registers (mean, then squared deviations), into a
                       [3, SPLIT, C] workspace. Values are shifted by the channel's first element first,
                       so a channel with mean 1e4 and standard deviation 1e-2 keeps its variance in
                       float32 (its rounded means would otherwise carry errors near the deviations).
  _stats_merge_kernel  per channel block: the splits' moments merged with Chan's formula in a fixed
                       order (a tree within a chunk of splits, chunks in order), into mean and var.
  _apply_kernel        per tile: y = (x - mean) * (weight * invstd) + bias [+ residual] [ReLU].
  _grad_sums_kernel    per (split, channel block): sum(g) and sum(g * (x - mean)) of its tiles.
  _grad_merge_kernel   per channel block: the splits' sums in order; grad_weight and grad_bias.
  _grad_apply_kernel   per tile: grad_residual = g, grad_x = g * k + (x - mean) * cx + c0.
Accumulation is in float32 (float64 for float64 inputs); results are rounded once, when stored. All
partial results go through workspaces in fixed orders (no atomics): results are deterministic.
Offsets are int64.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import INTERPRET


def _tuning(device: torch.device, dtype: torch.dtype):
    """(elements per tile, programs to aim the reductions at). On a GPU: 4096-element tiles (16 values
    per thread with 8 warps; 2048 in float64) and four 8-warp programs per SM. Under the interpreter,
    where every program costs milliseconds: 256-element tiles and 4 programs, which still gives the
    tests' small shapes several splits per channel or several tiles per program. The tests patch this
    to try other tilings."""
    if INTERPRET or device.type != "cuda":
        return 256, 4
    return (2048 if dtype == torch.float64 else 4096), 4 * _sm_count(device.index)


@functools.lru_cache(maxsize=None)
def _sm_count(index) -> int:
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()) \
        .multi_processor_count


# ---------------------------------------------------------------------------------------------------
# Shared device functions


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    # batch_norm.h's merge(): Chan et al.'s pairwise formula; an empty side (n == 0) leaves the other.
    n = n_a + n_b
    w_b = n_b / tl.maximum(n, 1.0)  # counts are 0 or >= 1
    delta = mean_b - mean_a
    return n, mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b


@triton.jit
def _inverse_std(var, eps, F64: tl.constexpr):
    # 1 / sqrt(var + eps), correctly rounded (float64 division and square root are already).
    if F64:
        return 1.0 / tl.sqrt(var + eps)
    else:
        return tl.div_rn(1.0, tl.sqrt_rn(var + eps))


@triton.jit
def _tile(t, S_BLOCKS, N, C, S, channels, sn, sc, ss,
          BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    # Tile t of the (n, s) plane for a block of channels: int64 element offsets [BN, BC, BS], the mask,
    # and the 1-D masks along n and s. (tl.cast, not .to(): the interpreter's loop indices are ints.)
    rows = tl.cast(t // S_BLOCKS, tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.cast(t % S_BLOCKS, tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    n_ok = rows < N
    s_ok = cols < S
    offs = (rows * sn)[:, None, None] + (channels.to(tl.int64) * sc)[None, :, None] + (cols * ss)[None, None, :]
    mask = (n_ok[:, None] & (channels < C)[None, :])[:, :, None] & s_ok[None, None, :]
    return offs, mask, n_ok, s_ok


# ---------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _stats_kernel(x_ptr, ws_ptr, N, C, S, sn, sc, ss, S_BLOCKS, TILES, TILES_PER, C_BLOCKS, SPLIT,
                  ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    split = pid // C_BLOCKS
    channels = (pid % C_BLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = channels < C
    # The shift: every value enters as x - x[0, c, 0], so the moments are those of values near zero.
    shift = tl.load(x_ptr + channels.to(tl.int64) * sc, mask=c_ok, other=0).to(ACC)
    run_n = tl.zeros([BLOCK_C], ACC)
    run_mean = tl.zeros([BLOCK_C], ACC)
    run_m2 = tl.zeros([BLOCK_C], ACC)
    t_start = split * TILES_PER
    t_end = tl.minimum(t_start + TILES_PER, TILES)
    for t in range(t_start, t_end):
        offs, mask, n_ok, s_ok = _tile(t, S_BLOCKS, N, C, S, channels, sn, sc, ss, BLOCK_N, BLOCK_C, BLOCK_S)
        x = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC)
        x = tl.where(mask, x - shift[None, :, None], 0)
        count = tl.sum(n_ok.to(ACC), axis=0) * tl.sum(s_ok.to(ACC), axis=0)  # >= 1: tiles are never empty
        mean = tl.sum(tl.sum(x, axis=2), axis=0) / count
        dev = tl.where(mask, x - mean[None, :, None], 0)
        m2 = tl.sum(tl.sum(dev * dev, axis=2), axis=0)
        run_n, run_mean, run_m2 = _chan_merge(run_n, run_mean, run_m2, count, mean, m2)
    out = ws_ptr + split * C + channels
    plane = SPLIT * C
    tl.store(out, run_n, mask=c_ok)
    tl.store(out + plane, run_mean, mask=c_ok)
    tl.store(out + 2 * plane, run_m2, mask=c_ok)


@triton.jit
def _stats_merge_kernel(x_ptr, ws_ptr, mean_ptr, var_ptr, C, sc, SPLIT,
                        ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = channels < C
    shift = tl.load(x_ptr + channels.to(tl.int64) * sc, mask=c_ok, other=0).to(ACC)
    n = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    plane = SPLIT * C
    for p0 in range(0, SPLIT, BLOCK_P):
        splits = p0 + tl.arange(0, BLOCK_P)
        mask = (splits < SPLIT)[:, None] & c_ok[None, :]
        offs = splits[:, None] * C + channels[None, :]
        # Absent entries read as empty moments (n = 0), which the merge passes over.
        pn = tl.load(ws_ptr + offs, mask=mask, other=0)
        pmean = tl.load(ws_ptr + plane + offs, mask=mask, other=0)
        pm2 = tl.load(ws_ptr + 2 * plane + offs, mask=mask, other=0)
        bn, bmean, bm2 = tl.reduce((pn, pmean, pm2), 0, _chan_merge)
        n, mean, m2 = _chan_merge(n, mean, m2, bn, bmean, bm2)
    tl.store(mean_ptr + channels, shift + mean, mask=c_ok)
    tl.store(var_ptr + channels, m2 / tl.maximum(n, 1.0), mask=c_ok)  # n = N*S >= 1: the biased variance


@triton.jit
def _apply_kernel(x_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, r_ptr, y_ptr, eps: tl.float64,
                  N, C, S, sn, sc, ss, S_BLOCKS, C_BLOCKS,
                  HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                  ACC: tl.constexpr, F64: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    channels = (pid % C_BLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = channels < C
    # batch_norm.h's affine(): scale = weight * invstd, shift = bias, per channel of this program
    mean = tl.load(mean_ptr + channels, mask=c_ok, other=0).to(ACC)
    var = tl.load(var_ptr + channels, mask=c_ok, other=1).to(ACC)
    scale = _inverse_std(var, tl.full([BLOCK_C], eps, ACC), F64)
    if HAS_WEIGHT:
        scale = tl.load(w_ptr + channels, mask=c_ok, other=0).to(ACC) * scale
    offs, mask, n_ok, s_ok = _tile(pid // C_BLOCKS, S_BLOCKS, N, C, S, channels, sn, sc, ss,
                                   BLOCK_N, BLOCK_C, BLOCK_S)
    x = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC)
    v = (x - mean[None, :, None]) * scale[None, :, None]
    if HAS_BIAS:
        v += tl.load(b_ptr + channels, mask=c_ok, other=0).to(ACC)[None, :, None]
    if HAS_RES:
        v += tl.load(r_ptr + offs, mask=mask, other=0).to(ACC)
    if RELU:
        v = tl.where(v < 0, 0, v)  # batch_norm.h's relu(): NaN passes, as in torch.relu
    tl.store(y_ptr + offs, v.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_sums_kernel(dy_ptr, x_ptr, y_ptr, mean_ptr, ws_ptr, N, C, S, sn, sc, ss,
                      S_BLOCKS, TILES, TILES_PER, C_BLOCKS, SPLIT, RELU: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    split = pid // C_BLOCKS
    channels = (pid % C_BLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = channels < C
    mean = tl.load(mean_ptr + channels, mask=c_ok, other=0).to(ACC)
    sum_g = tl.zeros([BLOCK_C], ACC)
    sum_gx = tl.zeros([BLOCK_C], ACC)
    t_start = split * TILES_PER
    t_end = tl.minimum(t_start + TILES_PER, TILES)
    for t in range(t_start, t_end):
        offs, mask, n_ok, s_ok = _tile(t, S_BLOCKS, N, C, S, channels, sn, sc, ss, BLOCK_N, BLOCK_C, BLOCK_S)
        g = tl.load(dy_ptr + offs, mask=mask, other=0).to(ACC)
        if RELU:
            g = tl.where(tl.load(y_ptr + offs, mask=mask, other=0).to(ACC) > 0, g, 0)
        x = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC)
        centred = tl.where(mask, x - mean[None, :, None], 0)
        sum_g += tl.sum(tl.sum(g, axis=2), axis=0)
        sum_gx += tl.sum(tl.sum(g * centred, axis=2), axis=0)
    out = ws_ptr + split * C + channels
    tl.store(out, sum_g, mask=c_ok)
    tl.store(out + SPLIT * C, sum_gx, mask=c_ok)


@triton.jit
def _grad_merge_kernel(ws_ptr, sums_ptr, var_ptr, gw_ptr, gb_ptr, eps: tl.float64, C, SPLIT,
                       HAS_GW: tl.constexpr, HAS_GB: tl.constexpr, ACC: tl.constexpr, F64: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = channels < C
    sum_g = tl.zeros([BLOCK_C], ACC)
    sum_gx = tl.zeros([BLOCK_C], ACC)
    plane = SPLIT * C
    for p0 in range(0, SPLIT, BLOCK_P):
        splits = p0 + tl.arange(0, BLOCK_P)
        mask = (splits < SPLIT)[:, None] & c_ok[None, :]
        offs = splits[:, None] * C + channels[None, :]
        sum_g += tl.sum(tl.load(ws_ptr + offs, mask=mask, other=0), axis=0)
        sum_gx += tl.sum(tl.load(ws_ptr + plane + offs, mask=mask, other=0), axis=0)
    tl.store(sums_ptr + channels, sum_g, mask=c_ok)
    tl.store(sums_ptr + C + channels, sum_gx, mask=c_ok)
    if HAS_GW:
        var = tl.load(var_ptr + channels, mask=c_ok, other=1).to(ACC)
        tl.store(gw_ptr + channels, sum_gx * _inverse_std(var, tl.full([BLOCK_C], eps, ACC), F64), mask=c_ok)
    if HAS_GB:
        tl.store(gb_ptr + channels, sum_g, mask=c_ok)


@triton.jit
def _grad_apply_kernel(dy_ptr, x_ptr, y_ptr, mean_ptr, var_ptr, w_ptr, sums_ptr, dx_ptr, dr_ptr,
                       eps: tl.float64, inv_m: tl.float64, N, C, S, sn, sc, ss, S_BLOCKS, C_BLOCKS,
                       RELU: tl.constexpr, HAS_WEIGHT: tl.constexpr, TRAINING: tl.constexpr,
                       HAS_GX: tl.constexpr, HAS_GR: tl.constexpr, ACC: tl.constexpr, F64: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    channels = (pid % C_BLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = channels < C
    offs, mask, n_ok, s_ok = _tile(pid // C_BLOCKS, S_BLOCKS, N, C, S, channels, sn, sc, ss,
                                   BLOCK_N, BLOCK_C, BLOCK_S)
    g = tl.load(dy_ptr + offs, mask=mask, other=0).to(ACC)
    if RELU:
        g = tl.where(tl.load(y_ptr + offs, mask=mask, other=0).to(ACC) > 0, g, 0)  # relu_mask()
    if HAS_GR:
        tl.store(dr_ptr + offs, g.to(dr_ptr.dtype.element_ty), mask=mask)
    if HAS_GX:
        # batch_norm.h's grad_coeffs() and grad_input()
        var = tl.load(var_ptr + channels, mask=c_ok, other=1).to(ACC)
        invstd = _inverse_std(var, tl.full([BLOCK_C], eps, ACC), F64)
        k = invstd
        if HAS_WEIGHT:
            k = tl.load(w_ptr + channels, mask=c_ok, other=0).to(ACC) * invstd
        dx = g * k[None, :, None]
        if TRAINING:
            mean = tl.load(mean_ptr + channels, mask=c_ok, other=0).to(ACC)
            sum_g = tl.load(sums_ptr + channels, mask=c_ok, other=0)
            sum_gx = tl.load(sums_ptr + C + channels, mask=c_ok, other=0)
            m_inv = tl.full([BLOCK_C], inv_m, ACC)
            cx = -k * invstd * invstd * sum_gx * m_inv
            c0 = -k * sum_g * m_inv
            x = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC)
            dx += (x - mean[None, :, None]) * cx[None, :, None] + c0[None, :, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launchers


class _Plan:
    """How a [N, C, S] problem is walked: the kernels' view (n, c, s and strides: planar as it is,
    packed as [N*S, C, 1]), the tile, the grid of tiles, and the reductions' split into runs of tiles."""

    def __init__(self, x: torch.Tensor):
        n, c, s = x.shape
        packed = _is_packed(x)
        if packed:
            self.n, self.c, self.s, self.strides = n * s, c, 1, (c, 1, 0)
        else:
            self.n, self.c, self.s, self.strides = n, c, s, (c * s, s, 1)
        self.packed = packed
        tile, self.target = _tuning(x.device, x.dtype)
        # The contiguous dimension first (S planar, C packed), then channels, then rows, each the
        # power of two that covers it with little padding.
        if packed:
            self.block_s = 1
            self.block_c = _fit(self.c, min(tile, 128))
        else:
            self.block_s = _fit(self.s, tile)
            self.block_c = _fit(self.c, max(1, tile // self.block_s))
        self.block_n = min(triton.next_power_of_2(self.n), max(1, tile // (self.block_s * self.block_c)))
        self.s_blocks = triton.cdiv(self.s, self.block_s)
        self.tiles = triton.cdiv(self.n, self.block_n) * self.s_blocks
        self.c_blocks = triton.cdiv(self.c, self.block_c)
        elements = self.block_n * self.block_c * self.block_s
        self.num_warps = max(1, min(8, elements // 256))
        # Reductions: each program takes a run of tiles_per consecutive tiles of one channel block.
        split = max(1, min(self.tiles, triton.cdiv(self.target, self.c_blocks)))
        self.tiles_per = triton.cdiv(self.tiles, split)
        self.split = triton.cdiv(self.tiles, self.tiles_per)  # no empty run
        # The merges: a block of channels per program, splits in chunks of block_p.
        self.merge_block_c = min(triton.next_power_of_2(c), 32 if not INTERPRET else 8)
        self.merge_block_p = min(triton.next_power_of_2(self.split), 32 if not INTERPRET else 4)

    def view_args(self):
        return (self.n, self.c, self.s, *self.strides)

    def blocks(self):
        return {"BLOCK_N": self.block_n, "BLOCK_C": self.block_c, "BLOCK_S": self.block_s,
                "num_warps": self.num_warps}

    def merge_grid(self):
        return (triton.cdiv(self.c, self.merge_block_c),)


def _fit(size: int, cap: int) -> int:
    """A block width for a dimension of `size`: the largest power of two from min(cap, the power of two
    covering size) down to 16 that pads size by at most 1/8, else the one that pads it least."""
    widths = [min(triton.next_power_of_2(size), cap)]
    while widths[-1] > 16:
        widths.append(widths[-1] // 2)
    padded = lambda w: triton.cdiv(size, w) * w
    for w in widths:
        if padded(w) * 8 <= size * 9:
            return w
    return min(widths, key=padded)  # the first (largest) of the least padded


def _is_packed(x: torch.Tensor) -> bool:
    # batch_norm_args.cpp: S == 1 is packed whatever the strides; otherwise the channel stride decides.
    n, c, s = x.shape
    return s == 1 or (x.stride(1) == 1 and c > 1)


def _check_like(t, name, x, packed):
    if t is None:
        return
    if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
        raise ValueError(f"batch_norm: {name} must be a {tuple(x.shape)} {x.dtype} tensor on {x.device}, "
                         f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    n, c, s = t.shape
    expected = (s * c, 1, c) if packed else (c * s, s, 1)
    if any(size > 1 and stride != want for size, stride, want in zip(t.shape, t.stride(), expected)):
        raise ValueError(f"batch_norm: {name} must be dense [N, C, S] in the "
                         f"{'packed (channels_last)' if packed else 'planar'} layout of input, "
                         f"got strides {t.stride()}")


def _check_channel(t, name, x):
    if t is None:
        return
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if t.shape != (x.shape[1],) or t.dtype != acc or t.device != x.device or not t.is_contiguous():
        raise ValueError(f"batch_norm: {name} must be a contiguous [{x.shape[1]}] {acc} tensor on {x.device}, "
                         f"got {tuple(t.shape)} {t.dtype} on {t.device}")


def _check(x, like=(), channel=()):
    if x.dim() != 3:
        raise ValueError(f"batch_norm: input must be viewed as [N, C, S], got {x.dim()} dimensions")
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise ValueError(f"batch_norm: input must be float32, float64, float16 or bfloat16, got {x.dtype}")
    packed = _is_packed(x)
    _check_like(x, "input", x, packed)
    for name, t in like:
        _check_like(t, name, x, packed)
    for name, t in channel:
        _check_channel(t, name, x)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _batch_stats(x: torch.Tensor, plan: _Plan, mean: torch.Tensor, var: torch.Tensor) -> None:
    acc = _acc(x.dtype)
    ws = torch.empty((3, plan.split, plan.c), dtype=mean.dtype, device=x.device)
    _stats_kernel[(plan.split * plan.c_blocks,)](
        x, ws, *plan.view_args(), plan.s_blocks, plan.tiles, plan.tiles_per, plan.c_blocks, plan.split,
        ACC=acc, **plan.blocks(),
    )
    _stats_merge_kernel[plan.merge_grid()](
        x, ws, mean, var, plan.c, plan.strides[1], plan.split,
        ACC=acc, BLOCK_P=plan.merge_block_p, BLOCK_C=plan.merge_block_c, num_warps=4,
    )


def _apply(x, mean, var, weight, bias, residual, relu, eps, y, plan: _Plan) -> None:
    _apply_kernel[(plan.tiles * plan.c_blocks,)](
        x, mean, var, weight if weight is not None else mean, bias if bias is not None else mean,
        residual if residual is not None else x, y, float(eps), *plan.view_args(), plan.s_blocks, plan.c_blocks,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None, RELU=bool(relu),
        ACC=_acc(x.dtype), F64=x.dtype == torch.float64, **plan.blocks(),
    )


def forward_train(x, weight, bias, residual, relu: bool, eps: float, y, mean, var) -> None:
    """Training forward: the batch's per-channel mean and biased variance into mean and var, and
    y = (x - mean) * weight / sqrt(var + eps) + bias [+ residual] [ReLU] normalised with them."""
    _check(x, (("residual", residual), ("output", y)),
           (("weight", weight), ("bias", bias), ("mean", mean), ("var", var)))
    plan = _Plan(x)
    _batch_stats(x, plan, mean, var)
    _apply(x, mean, var, weight, bias, residual, relu, eps, y, plan)


def forward_eval(x, mean, var, weight, bias, residual, relu: bool, eps: float, y) -> None:
    """Evaluation forward: y = bn(x) [+ residual] [ReLU] with the given mean and (biased) var."""
    _check(x, (("residual", residual), ("output", y)),
           (("weight", weight), ("bias", bias), ("mean", mean), ("var", var)))
    _apply(x, mean, var, weight, bias, residual, relu, eps, y, _Plan(x))


def backward(grad_y, x, y, mean, var, weight, training: bool, eps: float,
             grad_x, grad_residual, grad_weight, grad_bias) -> None:
    """Backward of either forward. y: the forward's output when a ReLU was fused (g = grad_y where
    y > 0, else 0), else None. mean, var: the statistics the forward normalised with; training: whether
    they were the batch's (the gradient then flows through them). Outputs, each optional: grad_x,
    grad_residual (= g), grad_weight (= sum(g * (x - mean)) * invstd), grad_bias (= sum(g))."""
    _check(x, (("grad_output", grad_y), ("output", y), ("grad_input", grad_x), ("grad_residual", grad_residual)),
           (("mean", mean), ("var", var), ("weight", weight), ("grad_weight", grad_weight),
            ("grad_bias", grad_bias)))
    plan = _Plan(x)
    acc = _acc(x.dtype)
    f64 = x.dtype == torch.float64
    relu = y is not None
    sums = mean  # a placeholder pointer, read only in training
    if training or grad_weight is not None or grad_bias is not None:
        ws = torch.empty((2, plan.split, plan.c), dtype=mean.dtype, device=x.device)
        sums = torch.empty((2, plan.c), dtype=mean.dtype, device=x.device)
        _grad_sums_kernel[(plan.split * plan.c_blocks,)](
            grad_y, x, y if relu else x, mean, ws, *plan.view_args(),
            plan.s_blocks, plan.tiles, plan.tiles_per, plan.c_blocks, plan.split, RELU=relu, ACC=acc, **plan.blocks(),
        )
        _grad_merge_kernel[plan.merge_grid()](
            ws, sums, var, grad_weight if grad_weight is not None else sums,
            grad_bias if grad_bias is not None else sums, float(eps), plan.c, plan.split,
            HAS_GW=grad_weight is not None, HAS_GB=grad_bias is not None, ACC=acc, F64=f64,
            BLOCK_P=plan.merge_block_p, BLOCK_C=plan.merge_block_c, num_warps=4,
        )
    if grad_x is None and grad_residual is None:
        return
    m = x.shape[0] * x.shape[2]
    _grad_apply_kernel[(plan.tiles * plan.c_blocks,)](
        grad_y, x, y if relu else x, mean, var, weight if weight is not None else var, sums,
        grad_x if grad_x is not None else grad_y, grad_residual if grad_residual is not None else grad_y,
        float(eps), 1.0 / m, *plan.view_args(), plan.s_blocks, plan.c_blocks,
        RELU=relu, HAS_WEIGHT=weight is not None, TRAINING=bool(training),
        HAS_GX=grad_x is not None, HAS_GR=grad_residual is not None, ACC=acc, F64=f64, **plan.blocks(),
    )
