"""2-D convolution and transposed convolution: F.conv2d and F.conv_transpose2d, with gradients.

Three registered ops, each linear in both of its tensor arguments, so each is the others' gradient
and derivatives of every order work:
  conv2d(input, weight, bias)                     F.conv2d
  conv2d_input_grad(grad_output, weight, size)    its input gradient, which is conv_transpose2d
  conv2d_weight_grad(grad_output, input, size)    its weight gradient, summed over the batch
and conv2d_fused(input, weight, bias, residual, relu): relu?(conv2d + residual) in one pass, and
conv2d_bn_stats(input, weight, bias): conv2d and its output's batch statistics (fastcv.ops.conv_bn).

Backends: CPU C++ (csrc/ops/conv2d: GEMMs on panels packed straight from the image, so no im2col
buffer; NCHW and channels_last natively, forward and gradients) and, on the GPU, the Triton
implicit-GEMM kernels of kernels/conv2d.py (forward, input and weight gradient, any layout).
Depthwise convolutions (groups == in_channels) run direct kernels instead (depthwise_cpu.cpp, and
depthwise_cuda.cu where the GPU backend is "cuda"), all three ops in either layout.

Layout: the output is channels_last when the input or the weight is (PyTorch's rule), else contiguous.
Autocast: under torch.autocast the public functions cast to the autocast dtype, as F.conv2d does.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from fastcv import _C
from fastcv._backend import CPU, CUDA, FLOATING, TRITON, cuda_stream, num_threads, select, triton
from fastcv._library import LOWER, OPS, autocast_args, autocast_enabled, define
from fastcv.ops._args import memory_format, pair
from fastcv.ops.batch_norm import _stats_dtype

__all__ = ["conv2d", "conv2d_fused", "conv_transpose2d"]


def _out_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


class Conv2dGeometry(NamedTuple):
    """A convolution's sizes, as the kernels take them: csrc/ops/conv2d/conv2d.h's Geometry, field for
    field (the binding checks the names)."""
    batch: int
    channels: int
    height: int
    width: int
    out_channels: int
    groups: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    dh: int
    dw: int
    out_h: int
    out_w: int

    def input_shape(self) -> tuple[int, int, int, int]:
        return self.batch, self.channels, self.height, self.width

    def output_shape(self) -> tuple[int, int, int, int]:
        return self.batch, self.out_channels, self.out_h, self.out_w


def _geometry(input_shape, weight_shape, stride, padding, dilation, groups) -> Conv2dGeometry:
    """The geometry of a convolution, validated with F.conv2d's rules."""
    n, c, h, w = input_shape
    cout, cin_g, kh, kw = weight_shape
    if not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    for name, value, low in (("stride", stride, 1), ("dilation", dilation, 1), ("padding", padding, 0)):
        if min(value) < low:
            raise ValueError(f"{name} must be {'positive' if low else 'non-negative'}, got {tuple(value)}")
    if cin_g * groups != c:
        raise ValueError(f"input has {c} channels, but weight {list(weight_shape)} with groups={groups} expects "
                         f"{cin_g * groups} (weight.shape[1] * groups)")
    if cout % groups:
        raise ValueError(f"weight.shape[0] (out channels, {cout}) must be divisible by groups ({groups})")
    if kh <= 0 or kw <= 0:
        raise ValueError(f"the kernel size must be positive, got weight of shape {list(weight_shape)}")
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    out_h, out_w = _out_size(h, kh, sh, ph, dh), _out_size(w, kw, sw, pw, dw)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"the dilated kernel ({dh * (kh - 1) + 1}x{dw * (kw - 1) + 1}) is larger than the "
                         f"padded input ({h + 2 * ph}x{w + 2 * pw})")
    # A stride larger than the padded input leaves one output along its axis, which reads the first window
    # whatever the stride: the kernels get the smallest stride that leaves one output (the padded size
    # less the dilated kernel, plus one), the same convolution. Their buffers and grids follow the stride
    # (the CPU kernels' stride-phase rows of the padded input, the depthwise kernels' column phases, the
    # Triton input gradient's grid of sh * sw phases), so a stride of 10**8 would ask for gigabytes.
    if out_h == 1:
        sh = min(sh, h + 2 * ph - dh * (kh - 1))
    if out_w == 1:
        sw = min(sw, w + 2 * pw - dw * (kw - 1))
    return Conv2dGeometry(n, c, h, w, cout, groups, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w)


def _check_tensor(t, arg: str, rank: int, like: Tensor | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOATING:
        raise TypeError(f"{arg} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    if t.dim() != rank:
        raise ValueError(f"{arg} must be a {rank}-D tensor, got shape {list(t.shape)}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{arg} is on {t.device}, but the input is on {like.device}")
        if t.dtype != like.dtype:
            raise TypeError(f"{arg} has dtype {t.dtype}, but the input has {like.dtype}")


def _empty(shape, like: Tensor, fmt: torch.memory_format) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def _depthwise(g) -> bool:
    """groups == in_channels (each output channel reads one input channel): the direct kernels."""
    return g.groups == g.channels and g.out_channels % g.channels == 0


def _select(t: Tensor, g, epilogue: bool = False) -> str:
    """The kernels that run a convolution of geometry g on t's device: depthwise ones have CUDA C++
    kernels (without the fused residual and ReLU), the others Triton only on the GPU."""
    return select("depthwise_conv2d" if _depthwise(g) and not epilogue else "conv2d", t)


# ---------------------------------------------------------------- registered ops


def _conv2d_checked(input, weight, bias, stride, padding, dilation, groups):
    _check_tensor(input, "input", 4)
    _check_tensor(weight, "weight", 4, input)
    if bias is not None:
        _check_tensor(bias, "bias", 1, input)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have weight.shape[0] = {weight.shape[0]} elements, got {bias.shape[0]}")
    return _geometry(input.shape, weight.shape, stride, padding, dilation, groups)


def _fused_checked(input, weight, bias, residual, relu, stride, padding, dilation, groups):
    g = _conv2d_checked(input, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        _check_tensor(residual, "residual", 4, input)
        if tuple(residual.shape) != g.output_shape():
            raise ValueError(f"residual must have the output's shape {list(g.output_shape())}, got "
                             f"{list(residual.shape)}")
    return g


def _fused_impl(input, weight, bias, residual, relu, stride, padding, dilation, groups):
    g = _fused_checked(input, weight, bias, residual, relu, stride, padding, dilation, groups)
    return _forward(input, weight, bias, residual, relu, stride, padding, dilation, groups, g)


def _fused_fake(input, weight, bias, residual, relu, stride, padding, dilation, groups):
    g = _fused_checked(input, weight, bias, residual, relu, stride, padding, dilation, groups)
    return _empty(g.output_shape(), input, memory_format(input, weight))


def _forward(input, weight, bias, residual, relu, stride, padding, dilation, groups, g, stats=None):
    """The output; with stats = (mean, var), also its per-channel batch statistics, written into them from
    the output tiles (the CPU's channels_last GEMM kernels only: see _tile_stats)."""
    backend = _select(input, g, residual is not None or relu)
    fmt = memory_format(input, weight)
    out = _empty(g.output_shape(), input, fmt)
    if backend == TRITON:
        triton("conv2d").conv2d_forward(input, weight, bias, (g.sh, g.sw), tuple(padding), tuple(dilation), groups,
                                        out, residual=residual, relu=relu)
    elif out.numel():
        x, b = input.contiguous(memory_format=fmt), None if bias is None else bias.contiguous()
        if backend == CUDA:
            _C.depthwise_forward_cuda(x, weight, b, out, g, cuda_stream(out))
        else:
            r = None if residual is None else residual.contiguous(memory_format=fmt)
            _C.conv2d_forward_cpu(x, weight, b, r, relu, out, g, num_threads(), *(stats or (None, None)))
    return out


# Outputs from this size up take their statistics from the tiles in conv2d_batch_norm: smaller ones are still
# in the cache when batch norm's own statistics pass reads them, and there the tiles' statistics cost as much
# as they saved (ResNet-50 at batch 8, channels_last: 0.98-1.01x layer by layer, the training step's forward
# 3% slower with every layer taking them).
TILE_STATS_BYTES = 16 << 20


def _tile_stats(input, weight, g) -> bool:
    """Whether the forward can take its output's batch statistics from the tiles: the CPU's channels_last GEMM
    kernels, on a non-empty output."""
    return (_select(input, g) == CPU and memory_format(input, weight) == torch.channels_last
            and not _depthwise(g) and math.prod(g.output_shape()) > 0)


def _stats_impl(input, weight, bias, stride, padding, dilation, groups):
    g = _conv2d_checked(input, weight, bias, stride, padding, dilation, groups)
    stats = _stats_dtype(input.dtype)
    mean, var = input.new_empty((g.out_channels,), dtype=stats), input.new_empty((g.out_channels,), dtype=stats)
    if _tile_stats(input, weight, g):
        return _forward(input, weight, bias, None, False, stride, padding, dilation, groups, g, (mean, var)), mean, var
    out = _forward(input, weight, bias, None, False, stride, padding, dilation, groups, g)
    if out.numel():  # a pass after the convolution
        v, m = torch.var_mean(out.to(stats), dim=(0, 2, 3), correction=0)
        return out, mean.copy_(m), var.copy_(v)
    return out, mean.fill_(math.nan), var.fill_(math.nan)  # no values: undefined, as batch norm's


def _stats_fake(input, weight, bias, stride, padding, dilation, groups):
    out = _conv2d_fake(input, weight, bias, stride, padding, dilation, groups)
    stats = input.new_empty((weight.shape[0],), dtype=_stats_dtype(input.dtype))
    return out, stats, stats.clone()


def _conv2d_impl(input, weight, bias, stride, padding, dilation, groups):
    g = _conv2d_checked(input, weight, bias, stride, padding, dilation, groups)
    return _forward(input, weight, bias, None, False, stride, padding, dilation, groups, g)


def _conv2d_fake(input, weight, bias, stride, padding, dilation, groups):
    g = _conv2d_checked(input, weight, bias, stride, padding, dilation, groups)
    return _empty(g.output_shape(), input, memory_format(input, weight))


def _input_grad_checked(grad_output, weight, input_size, stride, padding, dilation, groups):
    _check_tensor(grad_output, "grad_output", 4)
    _check_tensor(weight, "weight", 4, grad_output)
    h, w = input_size
    g = _geometry((grad_output.shape[0], weight.shape[1] * groups, h, w), weight.shape, stride, padding, dilation,
                  groups)
    if tuple(grad_output.shape) != g.output_shape():
        raise ValueError(f"grad_output must have shape [N, {g.out_channels}, {g.out_h}, {g.out_w}] for input size "
                         f"{h}x{w}, "
                         f"got {list(grad_output.shape)}")
    return g


# ---------------------------------------------------------------- strided gradients by stride phases
#
# On the CPU the gradients of a stride-1 convolution run without a column matrix (the input gradient is
# a forward convolution, the weight gradient reads the input in place); a strided one would build and
# scatter kh * kw times its input. Split by stride phase instead: input row h = s * o + i - p has phase
# q = (i - p) mod s, and the taps i of one phase (every s-th) read the phase image x[q::s] at consecutive
# offsets. Each phase (q, r) is then a stride-1 convolution of the phase image, padded or cropped so
# that its 'valid' output is the layer's, with the kernel's taps [q0::s, r0::s]: its gradients are the
# fast stride-1 ones, and the phases' results tile the strided gradients exactly (each tap and each input
# pixel belongs to one phase). NCHW only: measured on ResNet-50's strided layers (2 cores), NCHW's 1x1
# weight gradients ran 2-3x faster and its input gradients 1.1-1.7x, while channels_last, whose strided
# path gathers pixel rows without a column matrix, lost as often as it won. Layers with few channels
# (the 3-channel stem) keep the direct path too: a GEMM with 3 rows wastes the tile.


class _Phase(NamedTuple):
    first: int  # the first tap of the phase
    taps: int  # how many
    before: int  # padding before the phase image (negative: rows cropped)
    after: int


def _phase(size, out, kernel, stride, padding, q) -> _Phase:
    first = (q + padding) % stride
    taps = len(range(first, kernel, stride))
    shift = (first - padding - q) // stride  # phase row read by output 0 through the first tap
    length = len(range(q, size, stride))
    return _Phase(first, taps, -shift, out + taps - 1 - length + shift)


def _by_phases(g, fmt) -> bool:
    return (fmt == torch.contiguous_format and (g.sh > 1 or g.sw > 1) and g.dh == 1 and g.dw == 1
            and not _depthwise(g) and min(g.channels, g.out_channels) // g.groups >= 16)


def _phases(g):
    """Each (row phase, column phase) of a strided geometry, with the two axes' _Phase."""
    for q in range(g.sh):
        for r in range(g.sw):
            a = _phase(g.height, g.out_h, g.kh, g.sh, g.ph, q)
            b = _phase(g.width, g.out_w, g.kw, g.sw, g.pw, r)
            yield q, r, a, b


def _phase_geometry(g, a, b):
    shape = (g.batch, g.channels, g.out_h + a.taps - 1, g.out_w + b.taps - 1)
    return _geometry(shape, (g.out_channels, g.channels // g.groups, a.taps, b.taps), (1, 1), (0, 0), (1, 1),
                     g.groups)


def _input_grad_by_phases(go, weight, out, g):
    nt = num_threads()
    for q, r, a, b in _phases(g):
        target = out[:, :, q::g.sh, r::g.sw]
        if not (a.taps and b.taps):
            target.zero_()  # no tap reads these pixels
            continue
        pg = _phase_geometry(g, a, b)
        w = weight[:, :, a.first::g.sh, b.first::g.sw].contiguous()
        gp = _empty(pg.input_shape(), go, torch.contiguous_format)
        _C.conv2d_input_grad_cpu(go, w, gp, pg, nt)
        target.copy_(torch.nn.functional.pad(gp, (-b.before, -b.after, -a.before, -a.after)))


def _weight_grad_by_phases(go, x, out, g):
    nt = num_threads()
    for q, r, a, b in _phases(g):
        if not (a.taps and b.taps):
            continue
        pg = _phase_geometry(g, a, b)
        xp = torch.nn.functional.pad(x[:, :, q::g.sh, r::g.sw], (b.before, b.after, a.before, a.after))
        gw = _empty((g.out_channels, g.channels // g.groups, a.taps, b.taps), go, torch.contiguous_format)
        _C.conv2d_weight_grad_cpu(go, xp.contiguous(), gw, pg, nt)
        out[:, :, a.first::g.sh, b.first::g.sw] = gw


def _input_grad_impl(grad_output, weight, input_size, stride, padding, dilation, groups):
    g = _input_grad_checked(grad_output, weight, input_size, stride, padding, dilation, groups)
    backend = _select(grad_output, g)
    fmt = memory_format(grad_output, weight)
    out = _empty(g.input_shape(), grad_output, fmt)  # both layouts natively, every backend
    if backend == TRITON:
        triton("conv2d").conv2d_input_grad(grad_output, weight, (g.sh, g.sw), tuple(padding), tuple(dilation), groups,
                                           out)
    elif out.numel():
        go = grad_output.contiguous(memory_format=fmt)
        if backend == CUDA:
            _C.depthwise_input_grad_cuda(go, weight, out, g, cuda_stream(out))
        elif _by_phases(g, fmt) and go.numel():
            _input_grad_by_phases(go, weight, out, g)
        else:
            _C.conv2d_input_grad_cpu(go, weight, out, g, num_threads())
    return out


def _input_grad_fake(grad_output, weight, input_size, stride, padding, dilation, groups):
    g = _input_grad_checked(grad_output, weight, input_size, stride, padding, dilation, groups)
    return _empty(g.input_shape(), grad_output, memory_format(grad_output, weight))


def _weight_grad_checked(grad_output, input, weight_size, stride, padding, dilation, groups):
    _check_tensor(grad_output, "grad_output", 4)
    _check_tensor(input, "input", 4, grad_output)
    g = _geometry(input.shape, weight_size, stride, padding, dilation, groups)
    if tuple(grad_output.shape) != g.output_shape():
        raise ValueError(f"grad_output must have shape {list(g.output_shape())}, got {list(grad_output.shape)}")
    return g


def _weight_grad_impl(grad_output, input, weight_size, stride, padding, dilation, groups):
    g = _weight_grad_checked(grad_output, input, weight_size, stride, padding, dilation, groups)
    backend = _select(grad_output, g)
    out = _empty(list(weight_size), grad_output, torch.contiguous_format)
    if backend == TRITON:
        triton("conv2d").conv2d_weight_grad(grad_output, input, (g.sh, g.sw), tuple(padding), tuple(dilation), groups,
                                            out)
        return out
    fmt = memory_format(grad_output, input)
    go, x = grad_output.contiguous(memory_format=fmt), input.contiguous(memory_format=fmt)
    if backend == CUDA:
        _C.depthwise_weight_grad_cuda(go, x, out, g, cuda_stream(out))
    elif _by_phases(g, fmt) and go.numel() and x.numel():
        _weight_grad_by_phases(go, x, out, g)
    else:
        _C.conv2d_weight_grad_cpu(go, x, out, g, num_threads())
    return out


def _weight_grad_fake(grad_output, input, weight_size, stride, padding, dilation, groups):
    _weight_grad_checked(grad_output, input, weight_size, stride, padding, dilation, groups)
    return _empty(list(weight_size), grad_output, torch.contiguous_format)


# Every op is bilinear: with y = conv(x, w), <gy, conv(x, w)> = <input_grad(gy, w), x> = <weight_grad(gy, x), w>,
# so each op's gradients are the other two.
def _conv2d_setup(ctx, inputs, output):
    input, weight, bias, *ctx.args = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None


def _conv2d_backward(ctx, grad):
    input, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx = OPS.conv2d_input_grad(grad, weight, list(input.shape[2:]), *ctx.args) if need_x else None
    gw = OPS.conv2d_weight_grad(grad, input, list(weight.shape), *ctx.args) if need_w else None
    gb = grad.sum((0, 2, 3)) if ctx.has_bias and need_b else None
    return gx, gw, gb, None, None, None, None


def _stats_setup(ctx, inputs, output):
    _conv2d_setup(ctx, inputs, output[0])
    ctx.mark_non_differentiable(*output[1:])


def _stats_backward(ctx, grad, _grad_mean, _grad_var):
    return _conv2d_backward(ctx, grad)


def _fused_setup(ctx, inputs, output):
    input, weight, bias, residual, relu, *ctx.args = inputs
    ctx.save_for_backward(input, weight, output if relu else None)
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None


def _fused_backward(ctx, grad):
    input, weight, output = ctx.saved_tensors
    if output is not None:  # through the ReLU: torch.relu's gradient is zero where its output is
        grad = grad * (output > 0)
    need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
    gx = OPS.conv2d_input_grad(grad, weight, list(input.shape[2:]), *ctx.args) if need_x else None
    gw = OPS.conv2d_weight_grad(grad, input, list(weight.shape), *ctx.args) if need_w else None
    gb = grad.sum((0, 2, 3)) if ctx.has_bias and need_b else None
    gr = grad if ctx.has_residual and need_r else None
    return gx, gw, gb, gr, None, None, None, None, None


def _input_grad_setup(ctx, inputs, output):
    grad_output, weight, ctx.size, *ctx.args = inputs
    ctx.save_for_backward(grad_output, weight)


def _input_grad_backward(ctx, grad):
    grad_output, weight = ctx.saved_tensors
    need_g, need_w = ctx.needs_input_grad[:2]
    gg = OPS.conv2d(grad, weight, None, *ctx.args) if need_g else None
    gw = OPS.conv2d_weight_grad(grad_output, grad, list(weight.shape), *ctx.args) if need_w else None
    return gg, gw, None, None, None, None, None


def _weight_grad_setup(ctx, inputs, output):
    grad_output, input, _, *ctx.args = inputs
    ctx.save_for_backward(grad_output, input)


def _weight_grad_backward(ctx, grad):
    grad_output, input = ctx.saved_tensors
    need_g, need_x = ctx.needs_input_grad[:2]
    gg = OPS.conv2d(input, grad, None, *ctx.args) if need_g else None
    gx = OPS.conv2d_input_grad(grad_output, grad, list(input.shape[2:]), *ctx.args) if need_x else None
    return gg, gx, None, None, None, None, None


_ARGS = "int[2] stride, int[2] padding, int[2] dilation, int groups"
define(f"conv2d(Tensor input, Tensor weight, Tensor? bias, {_ARGS}) -> Tensor",
       impl=_conv2d_impl, fake=_conv2d_fake, backward=_conv2d_backward, setup_context=_conv2d_setup,
       autocast=LOWER)  # F.conv2d's policy
# conv2d and its output's per-channel batch statistics (mean, biased var; not differentiated): from the output
# tiles on the CPU's channels_last GEMM kernels, by a pass after the convolution elsewhere.
define(f"conv2d_bn_stats(Tensor input, Tensor weight, Tensor? bias, {_ARGS}) -> (Tensor, Tensor, Tensor)",
       impl=_stats_impl, fake=_stats_fake, backward=_stats_backward, setup_context=_stats_setup)
define(f"conv2d_fused(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, bool relu, {_ARGS}) -> Tensor",
       impl=_fused_impl, fake=_fused_fake, backward=_fused_backward, setup_context=_fused_setup,
       autocast=LOWER)
define(f"conv2d_input_grad(Tensor grad_output, Tensor weight, int[2] input_size, {_ARGS}) -> Tensor",
       impl=_input_grad_impl, fake=_input_grad_fake, backward=_input_grad_backward,
       setup_context=_input_grad_setup, autocast=LOWER)  # F.conv_transpose2d's
define(f"conv2d_weight_grad(Tensor grad_output, Tensor input, int[4] weight_size, {_ARGS}) -> Tensor",
       impl=_weight_grad_impl, fake=_weight_grad_fake, backward=_weight_grad_backward,
       setup_context=_weight_grad_setup)


# ---------------------------------------------------------------- public functions


def _unbatched(input, name: str):
    """(4-D input, whether it was 3-D): like F.conv2d, an unbatched [C, H, W] input gets a batch of one."""
    if isinstance(input, Tensor) and input.dim() == 3:
        return input.unsqueeze(0), True
    return input, False


def _same_padding(input: Tensor, kernel, stride, dilation):
    """padding='same': the symmetric part as padding, and the odd extra pixel (F.conv2d puts it at the
    bottom and right) padded into the input. stride must be 1, as for F.conv2d."""
    if stride != (1, 1):
        raise ValueError("padding='same' is not supported for strided convolutions (as in F.conv2d)")
    total = [d * (k - 1) for d, k in zip(dilation, kernel)]
    if total[0] % 2 or total[1] % 2:
        input = torch.nn.functional.pad(input, (0, total[1] % 2, 0, total[0] % 2))
    return input, (total[0] // 2, total[1] // 2)


def conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
           groups: int = 1) -> Tensor:
    """F.conv2d: input [N, C, H, W] or [C, H, W], weight [Cout, C/groups, kh, kw], padding an int, a pair,
    'same' or 'valid'."""
    if autocast_enabled():
        input, weight, bias = autocast_args("conv2d", input, weight, bias)
    input, unbatched = _unbatched(input, "input")
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            _check_tensor(input, "input", 4)
            _check_tensor(weight, "weight", 4, input)
            input, padding = _same_padding(input, weight.shape[2:], stride, dilation)
        else:
            raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
    else:
        padding = pair(padding, "padding")
    out = OPS.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return out.squeeze(0) if unbatched else out


def conv2d_fused(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                 groups: int = 1, *, residual: Tensor | None = None, relu: bool = False) -> Tensor:
    """relu?(F.conv2d(input, weight, bias, ...) + residual) in one pass: the bias, the residual add and
    the ReLU are applied as each output element is stored, and rounded once (ResNet's junction,
    relu(conv(x) + identity), without the two extra passes over the activations). Same arguments as
    conv2d; residual has the output's shape."""
    if autocast_enabled():
        input, weight, bias, residual = autocast_args("conv2d_fused", input, weight, bias, residual)
    input, unbatched = _unbatched(input, "input")
    if unbatched and isinstance(residual, Tensor):
        residual = residual.unsqueeze(0)
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    padding = pair(padding, "padding")
    out = OPS.conv2d_fused(input, weight, bias, residual, bool(relu), stride, padding, dilation, groups)
    return out.squeeze(0) if unbatched else out


def conv_transpose2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                     output_padding=0, groups: int = 1, dilation=1) -> Tensor:
    """F.conv_transpose2d: input [N, Cin, H, W] or [Cin, H, W], weight [Cin, Cout/groups, kh, kw]. It is
    the input gradient of the convolution whose weight this is: a GEMM then a col2im scatter."""
    if autocast_enabled():
        input, weight, bias = autocast_args("conv2d_input_grad", input, weight, bias)
    input, unbatched = _unbatched(input, "input")
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    output_padding = pair(output_padding, "output_padding")
    _check_tensor(input, "input", 4)
    _check_tensor(weight, "weight", 4, input)
    if not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if input.shape[1] != weight.shape[0]:
        raise ValueError(f"input has {input.shape[1]} channels, but weight {list(weight.shape)} expects "
                         f"{weight.shape[0]} (weight.shape[0])")
    for op, s, d in zip(output_padding, stride, dilation):
        if op < 0 or op >= max(s, d):
            raise ValueError(f"output_padding must be non-negative and smaller than stride or dilation, got "
                             f"{output_padding} with stride {stride} and dilation {dilation}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"stride and dilation must be positive and padding non-negative, got stride {stride}, "
                         f"dilation {dilation}, padding {padding}")
    size = [(n - 1) * s - 2 * p + d * (k - 1) + 1
            for n, s, p, d, k in zip(input.shape[2:], stride, padding, dilation, weight.shape[2:])]
    if min(size) <= 0:
        raise ValueError(f"the output would be empty ({size[0]}x{size[1]}): padding {padding} is too large")
    # Output rows past `reach` (output_padding >= stride, allowed when dilation is larger) get no input.
    reach = [n + min(op, s - 1) for n, op, s in zip(size, output_padding, stride)]
    out = OPS.conv2d_input_grad(input, weight, reach, stride, padding, dilation, groups)
    extra = [n + op - r for n, op, r in zip(size, output_padding, reach)]
    if extra[0] or extra[1]:
        out = torch.nn.functional.pad(out, (0, extra[1], 0, extra[0]))
    if bias is not None:
        _check_tensor(bias, "bias", 1, input)
        if bias.shape[0] != out.shape[1]:
            raise ValueError(f"bias must have {out.shape[1]} elements (the output channels), got {bias.shape[0]}")
        out = out + bias.view(1, -1, 1, 1)
    return out.squeeze(0) if unbatched else out
