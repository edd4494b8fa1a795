"""RoI Align: a drop-in for torchvision.ops.roi_align, forward and backward.

Semantics are torchvision's (tested against it): boxes as Tensor[K, 5] (batch index, x1, y1, x2, y2)
or a list of Tensor[L, 4] per image; output_size an int or a pair; adaptive sampling when
sampling_ratio <= 0; the half-pixel shift when aligned; sampling points more than one pixel outside
the map contribute zero. Beyond torchvision: float16 and bfloat16 on the CPU (computed in float32),
channels_last input without a layout copy (the output follows the input's memory format), a
deterministic backward, and clear errors where torchvision reads out of bounds (a batch index outside
the batch) or never finishes (a non-finite box with adaptive sampling).

multi_scale_roi_align pools every box from its FPN level in one call (torchvision's MultiScaleRoIAlign
semantics). Backends: CPU C++ (deterministic backward); CUDA C++ (forward; backward with atomicAdd, or,
under torch.use_deterministic_algorithms(True), a kernel whose threads own row tiles of the gradient
and add in a fixed order: no atomics, no extra memory); Triton (single-level forward, used on GPUs
when the CUDA kernels are not built). Not written yet: a Triton backward.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fastcv import _C
from fastcv._backend import CUDA, FLOATING, TRITON, cuda_stream, num_threads, select, triton
from fastcv._library import FP32, OPS, define, no_second_derivative
from fastcv.ops._args import memory_format, pair

__all__ = ["roi_align", "multi_scale_roi_align"]


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


def _run_forward(features, rois, scales, mapping, pooled_height, pooled_width, sampling_ratio, aligned):
    """Both ops' forward on any backend; mapping: (canonical_scale, canonical_level, k_min, k_max) or None."""
    first = features[0]
    fmt = memory_format(first)
    maps = [f.contiguous(memory_format=fmt) for f in features]
    out = torch.empty((rois.shape[0], first.shape[1], pooled_height, pooled_width), dtype=first.dtype,
                      device=first.device).contiguous(memory_format=fmt)
    if out.numel() == 0:  # no boxes or no channels (torch reports any strides as contiguous then)
        return out
    rois = rois.contiguous()
    backend = select("roi_align" if mapping is None else "multi_scale_roi_align", first)
    if backend == TRITON:
        if first.dtype == torch.float64:
            raise RuntimeError("fastcv's Triton roi_align (used when the CUDA kernels are not built, or not for "
                               "this GPU) takes float32, float16 and bfloat16; `python -m fastcv doctor` says "
                               "how to build them for float64")
        triton("roi_align").roi_align_forward(maps[0], rois, scales[0], pooled_height, pooled_width, sampling_ratio,
                                              aligned, out)
    elif backend == CUDA:
        _C.roi_align_forward_cuda(maps, list(scales), rois, mapping, sampling_ratio, aligned, out, cuda_stream(out))
    elif mapping is None:
        _C.roi_align_forward_cpu(maps[0], rois, scales[0], sampling_ratio, aligned, out, num_threads())
    else:
        _C.multi_scale_roi_align_forward_cpu(maps, list(scales), rois, *mapping,
                                             sampling_ratio, aligned, out, num_threads())
    return out


def _run_backward(grad, rois, scales, mapping, shapes, sampling_ratio, aligned):
    """Both ops' backward on any backend: one gradient per map of shape `shapes[l]` ([N, C, H, W])."""
    fmt = memory_format(grad)
    g = grad.contiguous(memory_format=fmt)
    # Reduced precision accumulates in float32, then rounds once.
    acc_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    grads = [torch.zeros(shape, dtype=acc_dtype, device=grad.device).contiguous(memory_format=fmt) for shape in shapes]
    if g.numel() and all(x.numel() for x in grads):
        rois = rois.contiguous()
        if select("roi_align_backward", grad) == CUDA:
            # torch.use_deterministic_algorithms(True): threads own row tiles of the gradient, no atomics.
            _C.roi_align_backward_cuda(g, list(scales), rois, mapping, sampling_ratio, aligned,
                                       torch.are_deterministic_algorithms_enabled(), grads,
                                       cuda_stream(g))
        elif mapping is None:
            _C.roi_align_backward_cpu(g, rois, scales[0], sampling_ratio, aligned, grads[0], num_threads())
        else:
            _C.multi_scale_roi_align_backward_cpu(g, list(scales), rois, *mapping, sampling_ratio,
                                                  aligned, grads, num_threads())
    return [x.to(grad.dtype) for x in grads]


def _forward_impl(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    _check(input, rois, spatial_scale, pooled_height, pooled_width)
    return _run_forward([input], rois, [spatial_scale], None, pooled_height, pooled_width, sampling_ratio, aligned)


def _forward_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    _check(input, rois, spatial_scale, pooled_height, pooled_width)
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width)).contiguous(
        memory_format=memory_format(input))


def _backward_impl(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width,
                   sampling_ratio, aligned):
    shape = (batch_size, channels, height, width)
    return _run_backward(grad, rois, [spatial_scale], None, [shape], sampling_ratio, aligned)[0]


def _backward_fake(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width,
                   sampling_ratio, aligned):
    return grad.new_empty((batch_size, channels, height, width)).contiguous(memory_format=memory_format(grad))


def _setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.args = (spatial_scale, pooled_height, pooled_width, *input.shape, sampling_ratio, aligned)


def _backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    spatial_scale, ph, pw, n, c, h, w, sampling_ratio, aligned = ctx.args
    grad_input = OPS.roi_align_backward(grad, rois, spatial_scale, ph, pw, n, c, h, w, sampling_ratio, aligned)
    return grad_input, None, None, None, None, None, None


define(
    "roi_align(Tensor input, Tensor rois, float spatial_scale, int pooled_height, int pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    impl=_forward_impl,
    fake=_forward_fake,
    backward=_backward,
    setup_context=_setup_context,
    autocast=FP32,  # as torchvision's roi_align: float32 input and rois, the output in the input's dtype
    autocast_restore=True,
)
define(
    "roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, int pooled_height, int pooled_width, "
    "int batch_size, int channels, int height, int width, int sampling_ratio, bool aligned) -> Tensor",
    impl=_backward_impl,
    fake=_backward_fake,
    backward=no_second_derivative("roi_align"),
)


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


def roi_align(input: Tensor, boxes, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False) -> Tensor:
    """Drop-in for torchvision.ops.roi_align (see the module notes). Returns Tensor[K, C, PH, PW]."""
    ph, pw = pair(output_size, "output_size")
    return OPS.roi_align(input, _rois(boxes, input), float(spatial_scale), ph, pw,
                                      int(sampling_ratio), bool(aligned))


# ---------------------------------------------------------------- multi_scale_roi_align


def _level(scale: float) -> int:
    """The pyramid level of a map of this spatial scale, as torchvision's _setup_scales computes it
    (-log2 in float32, truncated): 2 for a scale of 1/4."""
    return int(-torch.log2(torch.tensor(scale, dtype=torch.float32)).item())


def _mapping(scales, canonical_scale, canonical_level) -> tuple:
    """The level rule's arguments: torchvision's LevelMapper clamps each box's level to [k_min, k_max],
    the levels of the first and the last map, and pools the box from the map at list position
    level - k_min (the kernels give zeros where there is no map: maps that skip levels)."""
    return canonical_scale, canonical_level, _level(scales[0]), _level(scales[-1])


def _check_levels(features, rois, scales, pooled_height, pooled_width) -> None:
    if not isinstance(features, (list, tuple)) or not features:
        raise ValueError("features must be a non-empty list of Tensor[N, C, H, W], one per pyramid level")
    if len(scales) != len(features):
        raise ValueError(f"one scale per feature map is required: {len(features)} maps, {len(scales)} scales")
    first = features[0]
    for level, f in enumerate(features):
        _check(f, rois, scales[level], pooled_height, pooled_width)
        if f.shape[:2] != first.shape[:2] or f.dtype != first.dtype or f.device != first.device:
            raise ValueError(f"features[{level}] must match features[0] in batch, channels, dtype and device")


def _ms_forward_impl(features, rois, scales, pooled_height, pooled_width, sampling_ratio, aligned, canonical_scale,
                     canonical_level):
    _check_levels(features, rois, scales, pooled_height, pooled_width)
    mapping = _mapping(scales, canonical_scale, canonical_level)
    return _run_forward(features, rois, scales, mapping, pooled_height, pooled_width, sampling_ratio, aligned)


def _ms_forward_fake(features, rois, scales, pooled_height, pooled_width, sampling_ratio, aligned, canonical_scale,
                     canonical_level):
    _check_levels(features, rois, scales, pooled_height, pooled_width)
    return features[0].new_empty((rois.shape[0], features[0].shape[1], pooled_height, pooled_width)).contiguous(
        memory_format=memory_format(features[0]))


def _ms_backward_impl(grad, rois, scales, heights, widths, batch_size, channels, sampling_ratio, aligned,
                      canonical_scale, canonical_level):
    mapping = _mapping(scales, canonical_scale, canonical_level)
    shapes = [(batch_size, channels, h, w) for h, w in zip(heights, widths)]
    return _run_backward(grad, rois, scales, mapping, shapes, sampling_ratio, aligned)


def _ms_backward_fake(grad, rois, scales, heights, widths, batch_size, channels, sampling_ratio, aligned,
                      canonical_scale, canonical_level):
    return [grad.new_empty((batch_size, channels, h, w)).contiguous(memory_format=memory_format(grad))
            for h, w in zip(heights, widths)]


def _ms_setup_context(ctx, inputs, output):
    features, rois, scales, _, _, sampling_ratio, aligned, canonical_scale, canonical_level = inputs
    ctx.save_for_backward(rois)
    ctx.args = (list(scales), [f.shape[2] for f in features], [f.shape[3] for f in features], features[0].shape[0],
                features[0].shape[1], sampling_ratio, aligned, canonical_scale, canonical_level)


def _ms_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    grads = OPS.multi_scale_roi_align_backward(grad, rois, *ctx.args)
    return list(grads), None, None, None, None, None, None, None, None


define(
    "multi_scale_roi_align(Tensor[] features, Tensor rois, float[] scales, int pooled_height, int pooled_width, "
    "int sampling_ratio, bool aligned, float canonical_scale, int canonical_level) -> Tensor",
    impl=_ms_forward_impl,
    fake=_ms_forward_fake,
    backward=_ms_backward,
    setup_context=_ms_setup_context,
    autocast=FP32,  # each level as roi_align; the output in features[0]'s dtype (torchvision's)
    autocast_restore=True,
)
define(
    "multi_scale_roi_align_backward(Tensor grad, Tensor rois, float[] scales, int[] heights, int[] widths, "
    "int batch_size, int channels, int sampling_ratio, bool aligned, float canonical_scale, int canonical_level) "
    "-> Tensor[]",
    impl=_ms_backward_impl,
    fake=_ms_backward_fake,
    backward=no_second_derivative("multi_scale_roi_align"),
)


def infer_scales(features, image_shapes) -> list[float]:
    """torchvision's MultiScaleRoIAlign rule: each map's scale is the power of two nearest to its size
    over the largest image size (heights decide; widths are assumed to agree), with torchvision's
    operations (log2 of the float32 ratio, rounded half to even)."""
    if not image_shapes:
        raise ValueError("image_shapes must list each image's (height, width) to infer the levels' scales")
    max_h = max(s[0] for s in image_shapes)
    return [2.0 ** float(torch.tensor(float(f.shape[2]) / float(max_h)).log2().round()) for f in features]


def multi_scale_roi_align(features, boxes, output_size, sampling_ratio: int = -1, image_shapes=None, *,
                          scales=None, canonical_scale: float = 224.0, canonical_level: int = 4,
                          aligned: bool = False) -> Tensor:
    """torchvision.ops.MultiScaleRoIAlign as one call: each box pooled from the FPN level its size picks,
    the level decided per box in the kernel, with no per-level Python loop and no host sync. The rule is
    torchvision's: level k = floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6), clamped
    to [k_min, k_max], the levels of the first and the last map (a map of scale 2^-k is level k), and the
    box is pooled from features[k - k_min]. For maps that skip levels (p2 and p4, say) that is the list
    position, not the level: boxes of level 3 come from p4 and boxes of level 4 get zeros, as in
    torchvision.

    features: the levels, finest first (Tensor[N, C, H_l, W_l] each); boxes: Tensor[K, 5] or a list of
    Tensor[L, 4]; scales: each level's spatial scale, or inferred from image_shapes as torchvision does.
    Returns Tensor[K, C, PH, PW]."""
    features = list(features)
    if scales is None:
        scales = infer_scales(features, image_shapes)
    ph, pw = pair(output_size, "output_size")
    rois = _rois(boxes, features[0])
    if len(features) == 1:  # torchvision pools a single level without the level rule
        return roi_align(features[0], rois, (ph, pw), scales[0], sampling_ratio, aligned)
    return OPS.multi_scale_roi_align(features, rois, [float(s) for s in scales], ph, pw,
                                                  int(sampling_ratio), bool(aligned), float(canonical_scale),
                                                  int(canonical_level))
