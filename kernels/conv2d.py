"""Triton 2-D convolution as implicit GEMMs: forward, input gradient and weight gradient, the same
results as F.conv2d and its autograd. No column buffer is built: every GEMM tile gathers its operand
straight from the image (masked loads give the zero padding), so memory traffic is that of the tensors
themselves. fastcv.ops calls these launchers on GPUs; the tests run them on the CPU under
TRITON_INTERPRET=1.

Per group g the three GEMMs are
  forward       M = N*out_h*out_w output pixels  x  Cout/g           K = (C/g)*kh*kw
  input grad    M = N*H*W input pixels           x  C/g              K = (Cout/g)*kh*kw
  weight grad   M = Cout/g                       x  (C/g)*kh*kw      K = N*out_h*out_w
The K loop walks the kernel taps in the outer loops and a block of channels in the inner one, so a tap's
padding mask is one vector per row and channels_last loads run along contiguous memory. All tensors are
read through their strides (NCHW or channels_last, or anything else).

Precision: float32, float16 and bfloat16 accumulate in float32, float64 in float64; the result is stored
in the input dtype. float32 dots use TF32 only when PyTorch would for a cuDNN convolution
(torch.backends.cudnn.conv.fp32_precision, i.e. the legacy torch.backends.cudnn.allow_tf32, which is on
by default), otherwise full IEEE float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, ONE_CONFIG
from ._common import dot as _dot


def _configs(shapes):
    # shapes: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). The interpreter gets one small tile:
    # benchmarking there would be slow and meaningless.
    if INTERPRET:
        shapes = [(16, 16, 16, 1, 1)]
    elif ONE_CONFIG:
        shapes = shapes[3:4]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


_FORWARD_CONFIGS = _configs([
    (128, 128, 32, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (128, 32, 32, 4, 4),
    (128, 16, 32, 4, 3),  # depthwise and other thin groups: Cout/g is tiny
])

_WEIGHT_GRAD_CONFIGS = _configs([
    (128, 128, 32, 8, 3),
    (64, 128, 32, 4, 4),
    (128, 64, 32, 4, 4),
    (64, 64, 64, 4, 3),
    (32, 64, 64, 4, 3),
    (16, 32, 64, 4, 3),  # depthwise: Cout/g and C/g are tiny, the pixel reduction is everything
])


def _prune_thin(m_arg, n_arg):
    """Drops configurations whose tile is far wider than the GEMM (depthwise: 16-wide tiles at most);
    benchmarking them only wastes tuning time. Keeps the last (smallest) one if none fits."""
    def prune(configs, named_args, **kwargs):
        cap_m = max(16, triton.next_power_of_2(named_args[m_arg])) if m_arg else None
        cap_n = max(16, triton.next_power_of_2(named_args[n_arg]))
        kept = [c for c in configs
                if c.kwargs["BLOCK_N"] <= cap_n and (cap_m is None or c.kwargs["BLOCK_M"] <= cap_m)]
        return kept or configs[-1:]
    return prune


@triton.autotune(configs=_FORWARD_CONFIGS, key=["M", "COUT_G", "CG", "KH", "KW", "sx_c"],
                 prune_configs_by={"early_config_prune": _prune_thin(None, "COUT_G")})
@triton.jit
def conv2d_forward_kernel(x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, M, COUT_G, CG, H, W, OH, OW, KH, KW,
                          SH, SW, PH, PW, DH, DW,
                          sx_n, sx_c, sx_h, sx_w, sw_o, sw_c, sw_h, sw_w,
                          sr_n, sr_c, sr_h, sr_w, sy_n, sy_c, sy_h, sy_w,
                          HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                          PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    g = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels (n, oh, ow)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels within the group
    row_ok = rows < M
    col_ok = cols < COUT_G
    ow = rows % OW
    oh = (rows // OW) % OH
    n = rows // (OW * OH)
    cout = g * COUT_G + cols
    x_rows = x_ptr + n * sx_n + g * CG * sx_c
    w_cols = w_ptr + cout * sw_o
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for ki in range(KH):
        ih = oh * SH - PH + ki * DH
        h_ok = row_ok & (ih >= 0) & (ih < H)
        for kj in range(KW):
            iw = ow * SW - PW + kj * DW
            tap_ok = h_ok & (iw >= 0) & (iw < W)  # rows in the padding read zeros
            a_rows = x_rows + ih * sx_h + iw * sx_w
            b_cols = w_cols + ki * sw_h + kj * sw_w
            for c0 in range(0, CG, BLOCK_K):
                ks = c0 + tl.arange(0, BLOCK_K).to(tl.int64)
                k_ok = ks < CG
                a = tl.load(a_rows[:, None] + ks[None, :] * sx_c, mask=tap_ok[:, None] & k_ok[None, :], other=0)
                b = tl.load(b_cols[None, :] + ks[:, None] * sw_c, mask=k_ok[:, None] & col_ok[None, :], other=0)
                acc = _dot(a, b, acc, PRECISION, UPCAST)
    # Fused epilogue, in the accumulator's precision: bias, residual, ReLU, then one rounding.
    if HAS_BIAS:
        acc += tl.load(b_ptr + cout, mask=col_ok, other=0).to(ACC)[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_RES:
        r = r_ptr + (n * sr_n + oh * sr_h + ow * sr_w)[:, None] + cout[None, :] * sr_c
        acc += tl.load(r, mask=mask, other=0).to(ACC)
    if RELU:
        acc = tl.where(acc < 0, 0, acc)  # not tl.maximum: NaN must stay NaN, as in torch.relu
    y = y_ptr + (n * sy_n + oh * sy_h + ow * sy_w)[:, None] + cout[None, :] * sy_c
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_FORWARD_CONFIGS, key=["MP", "CG", "COUT_G", "KH", "KW", "SH", "SW", "sd_c"],
                 prune_configs_by={"early_config_prune": _prune_thin(None, "CG")})
@triton.jit
def conv2d_input_grad_kernel(dy_ptr, w_ptr, dx_ptr, N, MP, CG, COUT_G, H, W, OH, OW, KH, KW,
                             SH, SW, PH, PW, DH, DW,
                             sd_n, sd_c, sd_h, sd_w, sw_o, sw_c, sw_h, sw_w, sx_n, sx_c, sx_h, sx_w,
                             PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # An input pixel ih receives output row oh through tap ki when ih + PH - ki*DH == oh*SH. Splitting the
    # input pixels by (ih % SH, iw % SW) makes that divisibility the same for a whole tile, so a phase
    # skips the taps that never reach it instead of masking them row by row. Stride 1: a single phase.
    z = tl.program_id(2)
    g = (z // (SH * SW)).to(tl.int64)
    rh = (z % (SH * SW)) // SW
    rw = z % SW
    hp = tl.maximum((H - rh + SH - 1) // SH, 0)  # this phase's pixel rows and columns
    wp = tl.maximum((W - rw + SW - 1) // SW, 0)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels within the group
    jw = rows % tl.maximum(wp, 1)
    jh = (rows // tl.maximum(wp, 1)) % tl.maximum(hp, 1)
    n = rows // tl.maximum(wp * hp, 1)
    row_ok = (n < N) & (hp > 0) & (wp > 0)  # a phase can be empty (stride larger than the image)
    col_ok = cols < CG
    cin = g * CG + cols
    dy_rows = dy_ptr + n * sd_n + g * COUT_G * sd_c
    w_cols = w_ptr + g * COUT_G * sw_o + cols * sw_c
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for ki in range(KH):
        th = rh + PH - ki * DH
        if th % SH == 0:  # exact division below, so C and floor semantics agree for negative th
            oh = jh + th // SH
            h_ok = row_ok & (oh >= 0) & (oh < OH)
            for kj in range(KW):
                tw = rw + PW - kj * DW
                if tw % SW == 0:
                    ow = jw + tw // SW
                    tap_ok = h_ok & (ow >= 0) & (ow < OW)
                    a_rows = dy_rows + oh * sd_h + ow * sd_w
                    b_cols = w_cols + ki * sw_h + kj * sw_w
                    for k0 in range(0, COUT_G, BLOCK_K):
                        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
                        k_ok = ks < COUT_G
                        a = tl.load(a_rows[:, None] + ks[None, :] * sd_c, mask=tap_ok[:, None] & k_ok[None, :],
                                    other=0)
                        b = tl.load(b_cols[None, :] + ks[:, None] * sw_o, mask=k_ok[:, None] & col_ok[None, :],
                                    other=0)
                        acc = _dot(a, b, acc, PRECISION, UPCAST)
    ih = rh + jh * SH
    iw = rw + jw * SW
    dx = dx_ptr + (n * sx_n + ih * sx_h + iw * sx_w)[:, None] + cin[None, :] * sx_c
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=_WEIGHT_GRAD_CONFIGS, key=["COUT_G", "CG", "KH", "KW", "K_PER", "sd_c"],
                 prune_configs_by={"early_config_prune": _prune_thin("COUT_G", "CG")})
@triton.jit
def conv2d_weight_grad_kernel(dy_ptr, x_ptr, out_ptr, K, K_PER, SPLIT, COUT_G, CG, H, W, OH, OW, KH, KW,
                              SH, SW, PH, PW, DH, DW,
                              sd_n, sd_c, sd_h, sd_w, sx_n, sx_c, sx_h, sx_w,
                              so_s, so_o, so_c, so_h, so_w,
                              PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Axis 1 is (tap, block of input channels), so a program has one tap: its padding mask is per pixel.
    # Axis 2 is (group, split): split s reduces pixels [s*K_PER, (s+1)*K_PER) into its own slice of out.
    n_cblocks = tl.cdiv(CG, BLOCK_N)
    tap = tl.program_id(1) // n_cblocks
    ki = tap // KW
    kj = tap % KW
    z = tl.program_id(2)
    g = (z // SPLIT).to(tl.int64)
    s = z % SPLIT
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # output channels within the group
    cols = (tl.program_id(1) % n_cblocks) * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels within the group
    row_ok = rows < COUT_G
    col_ok = cols < CG
    dy_rows = dy_ptr + (g * COUT_G + rows) * sd_c
    x_cols = x_ptr + (g * CG + cols) * sx_c
    k_start = s.to(tl.int64) * K_PER
    k_end = tl.minimum(k_start + K_PER, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # output pixels (n, oh, ow), int64 like k_start
        k_ok = ks < k_end
        ow = ks % OW
        oh = (ks // OW) % OH
        n = ks // (OW * OH)
        ih = oh * SH - PH + ki * DH
        iw = ow * SW - PW + kj * DW
        x_ok = k_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(dy_rows[:, None] + (n * sd_n + oh * sd_h + ow * sd_w)[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0)
        b = tl.load(x_cols[None, :] + (n * sx_n + ih * sx_h + iw * sx_w)[:, None],
                    mask=x_ok[:, None] & col_ok[None, :], other=0)
        acc = _dot(a, b, acc, PRECISION, UPCAST)
    out = out_ptr + s * so_s + ki * so_h + kj * so_w + (g * COUT_G + rows)[:, None] * so_o + cols[None, :] * so_c
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _allow_tf32() -> bool:
    """Whether PyTorch lets a float32 cuDNN convolution use TF32; this kernel follows the same switch.
    Reads the per-backend fp32_precision settings (conv, then cudnn, then global; "none" inherits), which
    never raise, where the legacy torch.backends.cudnn.allow_tf32 does once the two APIs are mixed."""
    cudnn = torch.backends.cudnn
    if not hasattr(cudnn, "conv"):  # older PyTorch: only the legacy flag
        return bool(cudnn.allow_tf32)
    for precision in (cudnn.conv.fp32_precision, cudnn.fp32_precision, torch.backends.fp32_precision):
        if precision != "none":
            return precision == "tf32"
    return False


def _dot_args(dtype: torch.dtype) -> dict:
    upcast = INTERPRET and dtype == torch.bfloat16  # bfloat16 products are exact in float32: same result
    if dtype == torch.float64:
        return {"PRECISION": "ieee", "ACC": tl.float64, "UPCAST": False}
    tf32 = dtype == torch.float32 and _allow_tf32()
    return {"PRECISION": "tf32" if tf32 else "ieee", "ACC": tl.float32, "UPCAST": upcast}


# The launchers take their outputs from the caller (as every fastcv launcher does), in any layout: the
# kernels read and write through strides.


def conv2d_forward(input, weight, bias, stride, padding, dilation, groups, out, residual=None, relu=False) -> None:
    """out = F.conv2d(input, weight, bias, stride, padding, dilation, groups), then + residual (a tensor
    of the output's shape) and ReLU when asked: ResNet's relu(conv + identity) in one pass."""
    n, c, h, w = input.shape
    cout, cg, kh, kw = weight.shape
    oh, ow = out.shape[2:]
    if out.numel() == 0:
        return
    if cg == 0 or kh * kw == 0:  # nothing to reduce: the epilogue alone
        out.zero_()
        if bias is not None:
            out += bias.view(1, cout, 1, 1)
        if residual is not None:
            out += residual
        if relu:
            out.relu_()
        return
    cout_g = cout // groups
    m = n * oh * ow
    r = residual if residual is not None else out  # a placeholder pointer, never read
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(cout_g, meta["BLOCK_N"]), groups)
    conv2d_forward_kernel[grid](
        input, weight, bias if bias is not None else out, r, out, m, cout_g, cg, h, w, oh, ow, kh, kw,
        *stride, *padding, *dilation, *input.stride(), *weight.stride(), *r.stride(), *out.stride(),
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, RELU=bool(relu), **_dot_args(input.dtype),
    )


def conv2d_input_grad(grad_output, weight, stride, padding, dilation, groups, grad_input) -> None:
    """grad_input = the gradient of F.conv2d with respect to its input (of grad_input's shape)."""
    n, c, h, w = grad_input.shape
    cout, cg, kh, kw = weight.shape
    oh, ow = grad_output.shape[2:]
    if grad_input.numel() == 0:
        return
    if grad_output.numel() == 0 or kh * kw == 0:  # no output channels (or pixels) reach the input
        grad_input.zero_()
        return
    cout_g = cout // groups
    sh, sw = stride
    rows = n * triton.cdiv(h, sh) * triton.cdiv(w, sw)  # the largest stride phase
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(cg, meta["BLOCK_N"]), groups * sh * sw)
    conv2d_input_grad_kernel[grid](
        grad_output, weight, grad_input, n, rows, cg, cout_g, h, w, oh, ow, kh, kw,
        sh, sw, *padding, *dilation, *grad_output.stride(), *weight.stride(), *grad_input.stride(),
        **_dot_args(grad_output.dtype),
    )


def _weight_grad_splits(device, cout_g, cg, taps, groups, k) -> int:
    """Split-K factor for the weight gradient: enough programs to fill the GPU (about two per SM,
    counting 64x64 tiles) when the output is small, without going below ~1024 pixels per split."""
    if device.type != "cuda":
        return 1  # the interpreter: one split keeps the tests simple; they test splits explicitly
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = groups * triton.cdiv(cout_g, 64) * taps * triton.cdiv(cg, 64)
    return max(1, min(64, triton.cdiv(2 * sms, tiles), k // 1024))


def conv2d_weight_grad(grad_output, input, stride, padding, dilation, groups, grad_weight, splits=None) -> None:
    """grad_weight ([Cout, C/groups, kh, kw]) = the gradient of F.conv2d with respect to its weight.
    splits: the split-K factor (None: a heuristic). Splits write disjoint fp32 partial sums that torch
    adds in a fixed order, so the result is deterministic (no atomics)."""
    weight_shape = tuple(grad_weight.shape)
    cout, cg, kh, kw = weight_shape
    if grad_weight.numel() == 0:
        return
    n = input.shape[0]
    oh, ow = grad_output.shape[2:]
    k = n * oh * ow
    if k == 0:  # an empty batch contributes nothing
        grad_weight.zero_()
        return
    cout_g = cout // groups
    if splits is None:
        splits = _weight_grad_splits(input.device, cout_g, cg, kh * kw, groups, k)
    splits = max(1, min(int(splits), k))
    k_per = triton.cdiv(k, splits)
    splits = triton.cdiv(k, k_per)  # no empty trailing split
    dot = _dot_args(input.dtype)
    if splits == 1:
        out, out_split_stride = grad_weight, 0
    else:
        acc_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        out = torch.empty((splits, *weight_shape), dtype=acc_dtype, device=input.device)
        out_split_stride = out.stride(0)
    o_strides = grad_weight.stride() if splits == 1 else out.stride()[1:]
    grid = lambda meta: (triton.cdiv(cout_g, meta["BLOCK_M"]), kh * kw * triton.cdiv(cg, meta["BLOCK_N"]),
                         groups * splits)
    conv2d_weight_grad_kernel[grid](
        grad_output, input, out, k, k_per, splits, cout_g, cg, input.shape[2], input.shape[3], oh, ow, kh, kw,
        *stride, *padding, *dilation, *grad_output.stride(), *input.stride(), out_split_stride, *o_strides,
        **dot,
    )
    if splits > 1:
        grad_weight.copy_(out.sum(dim=0))
