"""RoI Align: a drop-in for torchvision.ops.roi_align, forward and backward.

Semantics are torchvision's (tested against it): boxes as Tensor[K, 5] (batch index, x1, y1, x2, y2)
or a list of Tensor[L, 4] per image; output_size an int or a pair; adaptive sampling when
sampling_ratio <= 0; the half-pixel shift when aligned; sampling points more than one pixel outside
the map contribute zero. Beyond torchvision: float16 and bfloat16 on the CPU (computed in float32),
channels_last input without a layout copy (the output follows the input's memory format), a
deterministic backward, and clear errors where torchvision reads out of bounds (a batch index outside
the batch) or never finishes (a non-finite box with adaptive sampling).

Backends so far: CPU C++. The CUDA and Triton kernels and multi_scale_roi_align are not written yet.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fastcv import _C
from fastcv._backend import FLOATING, num_threads, view
from fastcv._library import define

__all__ = ["roi_align"]


def _channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _format(t: Tensor) -> torch.memory_format:
    return torch.channels_last if _channels_last(t) else torch.contiguous_format


def _check(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int) -> None:
    if not isinstance(input, Tensor) or input.dim() != 4:
        raise ValueError(f"input must be a Tensor[N, C, H, W], got {getattr(input, 'shape', type(input).__name__)}")
    if input.dtype not in FLOATING:
        raise TypeError(f"input must be float32, float64, float16 or bfloat16, got {input.dtype}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"boxes must be a Tensor[K, 5] (batch index, x1, y1, x2, y2) or a list of Tensor[L, 4], got {list(rois.shape)}")
    if rois.dtype != input.dtype:
        raise TypeError(f"boxes must have the dtype of input ({input.dtype}), got {rois.dtype}")
    if rois.device != input.device:
        raise ValueError(f"boxes must be on the device of input ({input.device}), got {rois.device}")
    if not (math.isfinite(spatial_scale) and spatial_scale > 0):
        raise ValueError(f"spatial_scale must be a positive number, got {spatial_scale}")
    if pooled_height <= 0 or pooled_width <= 0:
        raise ValueError(f"output_size must be positive, got ({pooled_height}, {pooled_width})")


def _forward_impl(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    _check(input, rois, spatial_scale, pooled_height, pooled_width)
    fmt = _format(input)
    x = input.contiguous(memory_format=fmt)
    out = torch.empty((rois.shape[0], input.shape[1], pooled_height, pooled_width), dtype=input.dtype,
                      memory_format=fmt)
    if out.numel() == 0:  # no boxes or no channels (torch reports any strides as contiguous then)
        return out
    _C.roi_align_forward_cpu(view(x), view(rois.contiguous()), spatial_scale, sampling_ratio, aligned, view(out),
                             num_threads())
    return out


def _forward_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    _check(input, rois, spatial_scale, pooled_height, pooled_width)
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width)).contiguous(
        memory_format=_format(input))


def _backward_impl(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width,
                   sampling_ratio, aligned):
    fmt = _format(grad)
    g = grad.contiguous(memory_format=fmt)
    # Reduced precision accumulates in float32, then rounds once.
    acc_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    grad_input = torch.zeros((batch_size, channels, height, width), dtype=acc_dtype).contiguous(memory_format=fmt)
    if g.numel() == 0 or grad_input.numel() == 0:
        return grad_input.to(grad.dtype)
    _C.roi_align_backward_cpu(view(g), view(rois.contiguous()), spatial_scale, sampling_ratio, aligned,
                              view(grad_input), num_threads())
    return grad_input.to(grad.dtype)


def _backward_fake(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width,
                   sampling_ratio, aligned):
    return grad.new_empty((batch_size, channels, height, width)).contiguous(memory_format=_format(grad))


define(
    "roi_align(Tensor input, Tensor rois, float spatial_scale, int pooled_height, int pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    cpu=_forward_impl,
    fake=_forward_fake,
    autocast_to=torch.float32,
)
define(
    "roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, int pooled_height, int pooled_width, "
    "int batch_size, int channels, int height, int width, int sampling_ratio, bool aligned) -> Tensor",
    cpu=_backward_impl,
    fake=_backward_fake,
)


def _setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.args = (spatial_scale, pooled_height, pooled_width, *input.shape, sampling_ratio, aligned)


def _backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    spatial_scale, ph, pw, n, c, h, w, sampling_ratio, aligned = ctx.args
    grad_input = torch.ops.fastcv.roi_align_backward(grad, rois, spatial_scale, ph, pw, n, c, h, w,
                                                     sampling_ratio, aligned)
    return grad_input, None, None, None, None, None, None


torch.library.register_autograd("fastcv::roi_align", _backward, setup_context=_setup_context)


def _rois(boxes, input: Tensor) -> Tensor:
    """torchvision's two box formats -> Tensor[K, 5]."""
    if isinstance(boxes, Tensor):
        return boxes
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(f"boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}")
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes[{i}] must be a Tensor[L, 4] (x1, y1, x2, y2), got {getattr(b, 'shape', b)}")
    if not boxes:
        return input.new_empty((0, 5))
    return torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])


def _pair(output_size) -> tuple[int, int]:
    if isinstance(output_size, int):
        size = (output_size, output_size)
    elif isinstance(output_size, (tuple, list)):
        size = tuple(output_size)
    else:
        size = ()
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in size):
        raise TypeError(f"output_size must be an int or a pair of ints, got {output_size!r}")
    return size


def roi_align(input: Tensor, boxes, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False) -> Tensor:
    """Drop-in for torchvision.ops.roi_align (see the module notes). Returns Tensor[K, C, PH, PW]."""
    ph, pw = _pair(output_size)
    return torch.ops.fastcv.roi_align(input, _rois(boxes, input), float(spatial_scale), ph, pw,
                                      int(sampling_ratio), bool(aligned))
