"""Triton NMS kernels: the IoU bitmask and the suppression pass, the same algorithm as
csrc/ops/nms/nms_cuda.cu. fastcv.ops uses them on GPUs when the CUDA kernels were not built (or with
FASTCV_GPU_BACKEND=triton), so a build without nvcc still runs NMS on the GPU; the tests run them on
the CPU under TRITON_INTERPRET=1.

Launchers take sorted boxes [B, K, 4] and fill caller-allocated outputs; no autograd here.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl


@triton.jit
def _max_first(a, b):
    # std::max(a, b) as torchvision calls it: (a < b) ? b : a, NaN handling included.
    return tl.where(a < b, b, a)


@triton.jit
def _min_first(a, b):
    # std::min(a, b): (b < a) ? b : a.
    return tl.where(b < a, b, a)


@triton.jit
def nms_mask_kernel(boxes_ptr, labels_ptr, threshold_ptr, mask_ptr, k, words,
                    HAS_LABELS: tl.constexpr, DOUBLE: tl.constexpr):
    col_blk = tl.program_id(0)
    row_blk = tl.program_id(1)
    img = tl.program_id(2).to(tl.int64)
    if col_blk >= row_blk:  # the suppression pass reads only the upper triangle
        compute = tl.float64 if DOUBLE else tl.float32
        rows = row_blk * 64 + tl.arange(0, 64)
        cols = col_blk * 64 + tl.arange(0, 64)
        row_ok = rows < k
        col_ok = cols < k
        base = boxes_ptr + img * k * 4
        rx1 = tl.load(base + rows * 4 + 0, mask=row_ok, other=0).to(compute)
        ry1 = tl.load(base + rows * 4 + 1, mask=row_ok, other=0).to(compute)
        rx2 = tl.load(base + rows * 4 + 2, mask=row_ok, other=0).to(compute)
        ry2 = tl.load(base + rows * 4 + 3, mask=row_ok, other=0).to(compute)
        cx1 = tl.load(base + cols * 4 + 0, mask=col_ok, other=0).to(compute)
        cy1 = tl.load(base + cols * 4 + 1, mask=col_ok, other=0).to(compute)
        cx2 = tl.load(base + cols * 4 + 2, mask=col_ok, other=0).to(compute)
        cy2 = tl.load(base + cols * 4 + 3, mask=col_ok, other=0).to(compute)
        r_area = (rx2 - rx1) * (ry2 - ry1)
        c_area = (cx2 - cx1) * (cy2 - cy1)
        # torchvision's operations in its order; rows are the higher-scoring boxes.
        w = _min_first(rx2[:, None], cx2[None, :]) - _max_first(rx1[:, None], cx1[None, :])
        h = _min_first(ry2[:, None], cy2[None, :]) - _max_first(ry1[:, None], cy1[None, :])
        w = _max_first(tl.zeros_like(w), w)
        h = _max_first(tl.zeros_like(h), h)
        inter = w * h
        union = r_area[:, None] + c_area[None, :] - inter
        if DOUBLE:
            iou = inter / union  # float64 division is IEEE-rounded already
        else:
            iou = tl.div_rn(inter, union)  # correctly rounded, as on the CPU, not the fast approximation
        threshold = tl.load(threshold_ptr)
        hit = (iou > threshold) & (cols[None, :] > rows[:, None]) & col_ok[None, :]
        if HAS_LABELS:
            r_label = tl.load(labels_ptr + img * k + rows, mask=row_ok, other=0)
            c_label = tl.load(labels_ptr + img * k + cols, mask=col_ok, other=0)
            hit = hit & (r_label[:, None] == c_label[None, :])
        bit = tl.full([1, 64], 1, tl.int64) << tl.arange(0, 64).to(tl.int64)[None, :]
        bits = tl.sum(tl.where(hit, bit, 0), axis=1)  # distinct powers of two: the sum is the OR
        tl.store(mask_ptr + (img * k + rows) * words + col_blk, bits, mask=row_ok)


@triton.jit
def nms_keep_kernel(mask_ptr, n_valid_ptr, removed_ptr, keep_ptr, count_ptr, k, words, max_keep,
                    HAS_N_VALID: tl.constexpr, BLOCK_W: tl.constexpr):
    img = tl.program_id(0).to(tl.int64)
    m = mask_ptr + img * k * words
    rem = removed_ptr + img * words
    out = keep_ptr + img * max_keep
    n = k
    if HAS_N_VALID:
        n = tl.minimum(tl.maximum(tl.load(n_valid_ptr + img), 0), k)
    total = 0
    blk = 0
    while (blk * 64 < n) & (total < max_keep):
        base = blk * 64
        r = tl.load(rem + blk)
        t = 0
        while (t < 64) & (base + t < n) & (total < max_keep):
            if ((r >> t) & 1) == 0:
                tl.store(out + total, base + t)
                total += 1
                row = m + (base + t) * words
                r = r | tl.load(row + blk)
                for w0 in range(blk + 1, words, BLOCK_W):  # fold the kept row into the words ahead
                    offs = w0 + tl.arange(0, BLOCK_W)
                    ok = offs < words
                    acc = tl.load(rem + offs, mask=ok, other=0) | tl.load(row + offs, mask=ok, other=0)
                    tl.store(rem + offs, acc, mask=ok)
                tl.debug_barrier()  # the next scalar load of rem may read what other threads stored
            t += 1
        blk += 1
    for p0 in range(0, max_keep, BLOCK_W):
        offs = p0 + tl.arange(0, BLOCK_W)
        tl.store(out + offs, tl.full([BLOCK_W], -1, tl.int64), mask=(offs >= total) & (offs < max_keep))
    tl.store(count_ptr + img, total)


def compute_threshold(iou_threshold: float, dtype: torch.dtype) -> float:
    """The threshold the kernels compare float32 IoUs with: the largest float32 not above
    iou_threshold, so that `iou > t` in float32 equals torchvision's `iou > iou_threshold` in double."""
    if dtype == torch.float64:
        return iou_threshold
    f = np.float32(iou_threshold)
    if float(f) > iou_threshold:
        f = np.nextafter(f, np.float32(-np.inf))
    return float(f)


def nms_mask(boxes: torch.Tensor, labels: torch.Tensor | None, iou_threshold: float, mask: torch.Tensor) -> None:
    """boxes [B,K,4] sorted by score (contiguous), labels [B,K] int64 or None -> mask [B,K,ceil(K/64)]."""
    batch, k = boxes.shape[:2]
    words = mask.shape[2]
    if batch == 0 or k == 0:
        return
    double = boxes.dtype == torch.float64
    threshold = torch.full((1,), compute_threshold(iou_threshold, boxes.dtype),
                           dtype=torch.float64 if double else torch.float32, device=boxes.device)
    nms_mask_kernel[(words, words, batch)](
        boxes, labels if labels is not None else boxes, threshold, mask, k, words,
        HAS_LABELS=labels is not None, DOUBLE=double, enable_fp_fusion=False,
    )


def nms_keep(mask: torch.Tensor, n_valid: torch.Tensor | None, removed: torch.Tensor, keep: torch.Tensor,
             count: torch.Tensor) -> None:
    """The suppression pass over nms_mask's mask; the same contract as fastcv._C.nms_keep_cuda."""
    batch, k, words = mask.shape
    if batch == 0:
        return
    nms_keep_kernel[(batch,)](
        mask, n_valid if n_valid is not None else count, removed, keep, count, k, words, keep.shape[1],
        HAS_N_VALID=n_valid is not None, BLOCK_W=64, num_warps=2,
    )
