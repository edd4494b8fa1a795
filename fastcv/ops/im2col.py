"""im2col and col2im: F.unfold and F.fold, each the other's gradient, for a whole batch in one call.

Semantics are F.unfold's and F.fold's (tested against them): input [N, C, H, W] or unbatched
[C, H, W]; kernel_size, dilation, padding and stride as ints or pairs; columns [N, C*kh*kw, L] with
row (c * kh + i) * kw + j and column oh * out_w + ow. col2im sums overlapping blocks.

Backends: CPU C++ (threads over image planes; col2im owns planes, so it is deterministic) and CUDA
C++ (one launch for the whole batch; col2im gathers per image element, also deterministic; compiles,
untested on a GPU). No Triton kernel: the Triton convolution of issue 4 will not need a column buffer.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastcv import _C
from fastcv._backend import CUDA, FLOATING, cuda_stream, num_threads, select
from fastcv._library import OPS, define
from fastcv.ops._args import pair

__all__ = ["im2col", "col2im"]


class Im2colGeometry(NamedTuple):
    """An image's and its blocks' sizes, as the kernels take them: csrc/ops/im2col/im2col.h's Geometry,
    field for field (the binding checks the names)."""
    channels: int
    height: int
    width: int
    kh: int
    kw: int
    dh: int
    dw: int
    ph: int
    pw: int
    sh: int
    sw: int
    out_h: int
    out_w: int


def _geometry(channels, height, width, kernel_size, dilation, padding, stride) -> Im2colGeometry:
    """The geometry, validated with F.unfold's rules."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = kernel_size, dilation, padding, stride
    for name, sizes, low in (("kernel_size", (kh, kw), 1), ("dilation", (dh, dw), 1), ("stride", (sh, sw), 1),
                            ("padding", (ph, pw), 0)):
        if min(sizes) < low:
            raise ValueError(f"{name} must be {'positive' if low else 'non-negative'}, got {sizes}")
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if out_h <= 0 or out_w <= 0:
        raise ValueError(
            f"the dilated kernel ({dh * (kh - 1) + 1}x{dw * (kw - 1) + 1}) is larger than the padded input "
            f"({height + 2 * ph}x{width + 2 * pw})")
    return Im2colGeometry(channels, height, width, kh, kw, dh, dw, ph, pw, sh, sw, out_h, out_w)


def _check_floating(t: Tensor, arg: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOATING:
        raise TypeError(f"{arg} must be float32, float64, float16 or bfloat16, got {t.dtype}")


# ---------------------------------------------------------------- registered ops (4-D / 3-D only)


def _im2col_geometry(input, kernel_size, dilation, padding, stride):
    _check_floating(input, "input")
    if input.dim() != 4:
        raise ValueError(f"input must be a Tensor[N, C, H, W] (or [C, H, W]), got {list(input.shape)}")
    return _geometry(*input.shape[1:], kernel_size, dilation, padding, stride)


def _im2col_impl(input, kernel_size, dilation, padding, stride):
    g = _im2col_geometry(input, kernel_size, dilation, padding, stride)
    out = torch.empty((input.shape[0], g.channels * g.kh * g.kw, g.out_h * g.out_w), dtype=input.dtype,
                      device=input.device)
    if out.numel() == 0:
        pass
    elif select("im2col", input) == CUDA:  # raises if the build has no CUDA kernels for this GPU
        _C.im2col_cuda(input.contiguous(), g, out, cuda_stream(out))
    else:
        _C.im2col_cpu(input.contiguous(), g, out, num_threads())
    return out


def _im2col_fake(input, kernel_size, dilation, padding, stride):
    g = _im2col_geometry(input, kernel_size, dilation, padding, stride)
    return input.new_empty((input.shape[0], g.channels * g.kh * g.kw, g.out_h * g.out_w))


def _col2im_geometry(input, output_size, kernel_size, dilation, padding, stride):
    _check_floating(input, "input")
    if input.dim() != 3:
        raise ValueError(f"input must be a Tensor[N, C*kh*kw, L] (or [C*kh*kw, L]), got {list(input.shape)}")
    kh, kw = kernel_size
    if input.shape[1] % (kh * kw):
        raise ValueError(f"input.shape[1] ({input.shape[1]}) must be divisible by the kernel's {kh}x{kw} = {kh * kw}")
    g = _geometry(input.shape[1] // (kh * kw), *output_size, kernel_size, dilation, padding, stride)
    if input.shape[2] != g.out_h * g.out_w:
        raise ValueError(f"input.shape[2] must be the number of blocks, {g.out_h}x{g.out_w} = {g.out_h * g.out_w} for "
                         f"output_size {tuple(output_size)}, got {input.shape[2]}")
    return g


def _col2im_impl(input, output_size, kernel_size, dilation, padding, stride):
    g = _col2im_geometry(input, output_size, kernel_size, dilation, padding, stride)
    out = torch.empty((input.shape[0], g.channels, g.height, g.width), dtype=input.dtype, device=input.device)
    if out.numel() == 0:
        pass
    elif select("im2col", input) == CUDA:
        _C.col2im_cuda(input.contiguous(), g, out, cuda_stream(out))
    else:
        _C.col2im_cpu(input.contiguous(), g, out, num_threads())
    return out


def _col2im_fake(input, output_size, kernel_size, dilation, padding, stride):
    g = _col2im_geometry(input, output_size, kernel_size, dilation, padding, stride)
    return input.new_empty((input.shape[0], g.channels, g.height, g.width))


# Each is the other's gradient (both are linear), so double backward works too.
def _im2col_setup(ctx, inputs, output):
    input, *ctx.args = inputs
    ctx.size = list(input.shape[2:])


def _im2col_backward(ctx, grad):
    return OPS.col2im(grad, ctx.size, *ctx.args), None, None, None, None


def _col2im_setup(ctx, inputs, output):
    _, _, *ctx.args = inputs


def _col2im_backward(ctx, grad):
    return OPS.im2col(grad, *ctx.args), None, None, None, None, None


# No autocast policy: F.unfold and F.fold (aten's im2col, col2im) are on none of autocast's lists.
define("im2col(Tensor input, int[2] kernel_size, int[2] dilation, int[2] padding, int[2] stride) -> Tensor",
       impl=_im2col_impl, fake=_im2col_fake,
       backward=_im2col_backward, setup_context=_im2col_setup)
define("col2im(Tensor input, int[2] output_size, int[2] kernel_size, int[2] dilation, int[2] padding, "
       "int[2] stride) -> Tensor", impl=_col2im_impl, fake=_col2im_fake,
       backward=_col2im_backward, setup_context=_col2im_setup)


# ---------------------------------------------------------------- public functions


def im2col(input: Tensor, kernel_size, dilation=1, padding=0, stride=1) -> Tensor:
    """F.unfold: input [N, C, H, W] or [C, H, W] -> [N, C*kh*kw, L] (or [C*kh*kw, L])."""
    args = [pair(v, a) for v, a in ((kernel_size, "kernel_size"), (dilation, "dilation"), (padding, "padding"),
                                     (stride, "stride"))]
    if isinstance(input, Tensor) and input.dim() == 3:
        return OPS.im2col(input.unsqueeze(0), *args).squeeze(0)
    return OPS.im2col(input, *args)


def col2im(input: Tensor, output_size, kernel_size, dilation=1, padding=0, stride=1) -> Tensor:
    """F.fold: input [N, C*kh*kw, L] or [C*kh*kw, L] -> [N, C, H, W] (or [C, H, W]), overlaps summed."""
    args = [pair(v, a) for v, a in ((output_size, "output_size"), (kernel_size, "kernel_size"),
                                     (dilation, "dilation"), (padding, "padding"), (stride, "stride"))]
    if isinstance(input, Tensor) and input.dim() == 2:
        return OPS.col2im(input.unsqueeze(0), *args).squeeze(0)
    return OPS.col2im(input, *args)
