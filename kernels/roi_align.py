"""Triton RoI Align forward: the same sampling and bilinear weights as csrc/ops/roi_align/roi_align.h.
fastcv.ops uses it on GPUs when the CUDA kernels were not built (or with FASTCV_GPU_BACKEND=triton);
the tests run it on the CPU under TRITON_INTERPRET=1. One program per (box, block of channels): the
bins and sampling points are loops, the channels a vector, so channels_last loads are contiguous.
A box whose batch index is outside the batch gives zeros (nothing is read outside the input).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def roi_align_forward_kernel(input_ptr, rois_ptr, out_ptr, N, C, H, W, spatial_scale, sampling_ratio,
                             s_n, s_c, s_h, s_w, o_k, o_c, o_h, o_w,
                             PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = channels < C
    roi = rois_ptr + k * 5
    index = tl.load(roi).to(tl.float32)
    box_ok = (index >= 0) & (index < N)
    image = tl.where(box_ok, index, 0).to(tl.int64)
    offset = 0.5 if ALIGNED else 0.0
    start_w = tl.load(roi + 1).to(tl.float32) * spatial_scale - offset
    start_h = tl.load(roi + 2).to(tl.float32) * spatial_scale - offset
    roi_w = tl.load(roi + 3).to(tl.float32) * spatial_scale - offset - start_w
    roi_h = tl.load(roi + 4).to(tl.float32) * spatial_scale - offset - start_h
    if not ALIGNED:  # legacy behaviour: boxes at least one pixel wide
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    bin_h = roi_h / PH
    bin_w = roi_w / PW
    grid_h = tl.where(sampling_ratio > 0, sampling_ratio, tl.ceil(roi_h / PH).to(tl.int32))
    grid_w = tl.where(sampling_ratio > 0, sampling_ratio, tl.ceil(roi_w / PW).to(tl.int32))
    grid_h = tl.where(box_ok, grid_h, 0)  # a bad box samples nothing
    grid_w = tl.where(box_ok, grid_w, 0)
    count = tl.maximum(grid_h * grid_w, 1).to(tl.float32)
    base = input_ptr + image * s_n + channels * s_c
    for ph in range(PH):
        for pw in range(PW):
            acc = tl.zeros([BLOCK_C], dtype=tl.float32)
            for iy in range(grid_h):
                y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                for ix in range(grid_w):
                    x = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                    inside = (y >= -1.0) & (y <= H) & (x >= -1.0) & (x <= W)
                    yc = tl.maximum(y, 0.0)
                    xc = tl.maximum(x, 0.0)
                    y_low = yc.to(tl.int32)
                    x_low = xc.to(tl.int32)
                    y_top = y_low >= H - 1
                    x_top = x_low >= W - 1
                    y_low = tl.where(y_top, H - 1, y_low)
                    x_low = tl.where(x_top, W - 1, x_low)
                    y_high = tl.where(y_top, H - 1, y_low + 1)
                    x_high = tl.where(x_top, W - 1, x_low + 1)
                    yc = tl.where(y_top, y_low.to(tl.float32), yc)
                    xc = tl.where(x_top, x_low.to(tl.float32), xc)
                    ly = yc - y_low
                    lx = xc - x_low
                    hy = 1.0 - ly
                    hx = 1.0 - lx
                    ok = tl.where(inside, c_ok, False)  # (a scalar condition broadcast over the channels)
                    v1 = tl.load(base + y_low * s_h + x_low * s_w, mask=ok, other=0).to(tl.float32)
                    v2 = tl.load(base + y_low * s_h + x_high * s_w, mask=ok, other=0).to(tl.float32)
                    v3 = tl.load(base + y_high * s_h + x_low * s_w, mask=ok, other=0).to(tl.float32)
                    v4 = tl.load(base + y_high * s_h + x_high * s_w, mask=ok, other=0).to(tl.float32)
                    acc += hy * hx * v1 + hy * lx * v2 + ly * hx * v3 + ly * lx * v4
            out = out_ptr + k * o_k + channels * o_c + ph * o_h + pw * o_w
            tl.store(out, (acc / count).to(out_ptr.dtype.element_ty), mask=c_ok)


def roi_align_forward(input: torch.Tensor, rois: torch.Tensor, spatial_scale: float, pooled_height: int,
                      pooled_width: int, sampling_ratio: int, aligned: bool, out: torch.Tensor) -> None:
    """input [N,C,H,W] (any strides), rois [K,5] contiguous, out [K,C,PH,PW] (any strides). float32
    arithmetic for float32, float16 and bfloat16 (float64 inputs are not supported here)."""
    k, c = rois.shape[0], input.shape[1]
    if out.numel() == 0:
        return
    block_c = min(64, triton.next_power_of_2(max(c, 1)))
    grid = (k, triton.cdiv(c, block_c))
    roi_align_forward_kernel[grid](
        input, rois, out, input.shape[0], c, input.shape[2], input.shape[3], float(spatial_scale), int(sampling_ratio),
        *input.stride(), *out.stride(), PH=pooled_height, PW=pooled_width, ALIGNED=bool(aligned), BLOCK_C=block_c,
    )
