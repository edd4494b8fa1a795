"""Non-maximum suppression: drop-in nms and batched_nms for torchvision.ops, and a fixed-shape,
sync-free batched_nms_padded for detectors, CUDA graphs and torch.compile.

Semantics shared by every backend (and tested):
- Boxes are (x1, y1, x2, y2). IoU is computed exactly as torchvision computes it on the CPU, areas not
  clamped, so zero-area, inverted and NaN boxes behave as there: their IoU with any box is 0 or NaN, so
  they neither suppress nor are suppressed.
- A box is suppressed when its IoU with a kept, higher-scoring box is *greater than* iou_threshold.
- Ties in score: the lower index comes first (torchvision's CPU order; its CUDA kernel makes no promise).
- NaN scores rank above every number, as torch.sort ranks them (and torchvision does). In
  batched_nms_padded a NaN score never passes score_threshold, so it never becomes a detection.
- float16 and bfloat16 boxes are compared in float32 (torchvision's CPU kernel rejects them; its CUDA
  kernel also computes in float32); float64 in float64.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from fastcv import _C
from fastcv._backend import CPU, CUDA, FLOATING, cuda_stream, num_threads, select, triton
from fastcv._library import FP32, OPS, define

__all__ = ["nms", "batched_nms", "batched_nms_padded", "Detections"]

_INTEGER = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


# ---------------------------------------------------------------- argument checks


def _check_tensor(t, arg: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")


def _check_boxes_scores(boxes: Tensor, scores: Tensor, box_shape: str, score_dims: int) -> None:
    _check_tensor(boxes, "boxes")
    _check_tensor(scores, "scores")
    if boxes.dtype not in FLOATING:
        raise TypeError(f"boxes must be float32, float64, float16 or bfloat16, got {boxes.dtype}")
    if boxes.dim() != len(box_shape.split(",")) or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [{box_shape}] as (x1, y1, x2, y2), got {list(boxes.shape)}")
    if scores.dtype != boxes.dtype:
        raise TypeError(f"scores must have the dtype of boxes ({boxes.dtype}), got {scores.dtype}")
    if scores.dim() != score_dims or scores.shape[: boxes.dim() - 1] != boxes.shape[:-1]:
        want = "[N]" if score_dims == 1 else "[B, N, C]"
        raise ValueError(
            f"scores must have shape {want} matching boxes {list(boxes.shape)}, got {list(scores.shape)}"
        )
    if scores.device != boxes.device:
        raise ValueError(f"scores must be on the device of boxes ({boxes.device}), got {scores.device}")


def _check_fraction(value, arg: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{arg} must be a float in [0, 1], got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:  # also false for NaN
        raise ValueError(f"{arg} must be in [0, 1], got {value}")


def _check_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> None:
    _check_boxes_scores(boxes, scores, "N, 4", 1)
    _check_fraction(iou_threshold, "iou_threshold")


def _check_idxs(idxs: Tensor, boxes: Tensor) -> None:
    _check_tensor(idxs, "idxs")
    if idxs.dtype not in _INTEGER:
        raise TypeError(f"idxs must be an integer tensor of class indices, got {idxs.dtype}")
    if idxs.dim() != 1 or idxs.shape[0] != boxes.shape[0]:
        raise ValueError(f"idxs must have shape [N] with N = {boxes.shape[0]} (one per box), got {list(idxs.shape)}")
    if idxs.device != boxes.device:
        raise ValueError(f"idxs must be on the device of boxes ({boxes.device}), got {idxs.device}")


def _check_padded(boxes, scores, iou_threshold, score_threshold, max_detections, pre_nms_top_k) -> None:
    if isinstance(boxes, Tensor) and boxes.dim() == 4:  # a box per (box, class) pair
        _check_boxes_scores(boxes[:, :, 0], scores, "B, N, 4", 3)
        if boxes.shape[2] != scores.shape[2]:
            raise ValueError(f"boxes of shape [B, N, C, 4] must have the C = {scores.shape[2]} of scores, "
                             f"got {list(boxes.shape)}")
    else:
        _check_boxes_scores(boxes, scores, "B, N, 4", 3)
    _check_fraction(iou_threshold, "iou_threshold")
    if isinstance(score_threshold, bool) or not isinstance(score_threshold, (int, float)):
        raise TypeError(f"score_threshold must be a float, got {type(score_threshold).__name__}")
    if math.isnan(score_threshold):
        raise ValueError("score_threshold must not be NaN")
    for value, arg in ((max_detections, "max_detections"), (pre_nms_top_k, "pre_nms_top_k")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{arg} must be an int, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{arg} must be >= 0, got {value}")


def _gpu_pass(boxes: Tensor, labels: Tensor | None, iou_threshold: float, n_valid: Tensor | None, max_keep: int):
    """GPU: mask kernel + suppression pass over sorted boxes [B,K,4]. Returns keep [B,M] (positions in
    [0,K), -1 after the kept ones) and count [B], without synchronising. CUDA C++ kernels when built,
    else Triton's (any device Triton runs on: the CPU too, under TRITON_INTERPRET=1)."""
    batch, k = boxes.shape[:2]
    words = (k + 63) // 64
    device = boxes.device
    mask = torch.empty((batch, k, words), dtype=torch.int64, device=device)
    removed = torch.zeros((batch, words), dtype=torch.int64, device=device)
    keep = torch.empty((batch, max_keep), dtype=torch.int64, device=device)
    count = torch.empty((batch,), dtype=torch.int64, device=device)
    if select("nms", boxes) == CUDA:
        stream = cuda_stream(boxes)
        _C.nms_mask_cuda(boxes, labels, iou_threshold, mask, stream)
        _C.nms_keep_cuda(mask, n_valid, removed, keep, count, stream)
    else:
        triton("nms").nms_mask(boxes, labels, iou_threshold, mask)
        triton("nms").nms_keep(mask, n_valid, removed, keep, count)
    return keep, count


def _nms_cpu(boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float) -> Tensor:
    keep = torch.empty((boxes.shape[0],), dtype=torch.int64)
    count = _C.nms_cpu(boxes, scores, idxs, iou_threshold, keep, num_threads())
    return keep[:count]


def _nms_gpu(boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float) -> Tensor:
    if boxes.shape[0] == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    # CUDA's sort ranks a NaN with its sign bit set below every number (the CPU's ranks it with NaN, as
    # torchvision's order does): every NaN becomes the positive one first (abs() does not clear the sign
    # of a float64 NaN on CUDA).
    key = torch.where(torch.isnan(scores), math.nan, scores)
    order = torch.sort(key, descending=True, stable=True).indices
    sorted_boxes = boxes.index_select(0, order).unsqueeze(0).contiguous()
    labels = None if idxs is None else idxs.index_select(0, order).unsqueeze(0).contiguous()
    keep, count = _gpu_pass(sorted_boxes, labels, iou_threshold, None, boxes.shape[0])
    return order[keep[0, : int(count[0])]]  # the output's length is data-dependent: one sync


# ---------------------------------------------------------------- nms and batched_nms


def _kept(boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float) -> Tensor:
    """The kernel of both ops (idxs None: plain nms), in batched_nms's argument order."""
    _check_nms(boxes, scores, iou_threshold)
    if idxs is not None:
        _check_idxs(idxs, boxes)
        idxs = idxs.to(torch.int64)
    run = _nms_cpu if select("nms", boxes) == CPU else _nms_gpu
    return run(boxes, scores, idxs, iou_threshold)


def _kept_fake(boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float) -> Tensor:
    _check_nms(boxes, scores, iou_threshold)
    if idxs is not None:
        _check_idxs(idxs, boxes)
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


def _nms_impl(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    return _kept(boxes, scores, None, iou_threshold)


def _nms_fake(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    return _kept_fake(boxes, scores, None, iou_threshold)


define(
    "nms(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor",
    impl=_nms_impl,
    fake=_nms_fake,
    autocast=FP32,  # torchvision's nms: float32 boxes and scores
)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Drop-in for torchvision.ops.nms.

    Args:
        boxes: Tensor[N, 4] (x1, y1, x2, y2), float32, float64, float16 or bfloat16.
        scores: Tensor[N], the dtype and device of boxes.
        iou_threshold: in [0, 1]; boxes with IoU > iou_threshold with a kept box are discarded.

    Returns:
        int64 Tensor of the kept indices, by decreasing score (see the module notes on ties and NaN).
    """
    return OPS.nms(boxes, scores, iou_threshold)


define(
    "batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold) -> Tensor",
    impl=_kept,
    fake=_kept_fake,
    autocast=FP32,  # torchvision's nms: float32 boxes and scores
)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Drop-in for torchvision.ops.batched_nms: NMS within each category, never across.

    All categories run in one call (in parallel on the CPU, in one launch on CUDA); the boxes are never
    offset, so results do not depend on coordinate rounding. idxs: Tensor[N] of integer category ids.
    Returns the kept indices by decreasing score.
    """
    return OPS.batched_nms(boxes, scores, idxs, iou_threshold)


# ---------------------------------------------------------------- batched_nms_padded


def _padded_impl(boxes, scores, iou_threshold, score_threshold, max_detections, pre_nms_top_k):
    _check_padded(boxes, scores, iou_threshold, score_threshold, max_detections, pre_nms_top_k)
    batch, n, classes = scores.shape
    k = min(pre_nms_top_k, n * classes)
    device = boxes.device
    if k == 0 or max_detections == 0:
        none = torch.full((batch, max_detections), -1, dtype=torch.int64, device=device)
        return none, none.clone(), torch.zeros((batch,), dtype=torch.int64, device=device)
    class_boxes = boxes.dim() == 4
    rows = boxes.flatten(1, 2) if class_boxes else boxes  # [B, N * C, 4]: row box * C + class
    if select("nms", boxes) == CPU:
        indices = torch.empty((batch, max_detections), dtype=torch.int64)
        labels = torch.empty_like(indices)
        count = torch.empty((batch,), dtype=torch.int64)
        # torch compares scores with a Python float in the scores' dtype; so does the kernel.
        threshold = torch.tensor(score_threshold, dtype=scores.dtype).item()
        _C.batched_nms_padded_cpu(
            rows, scores, iou_threshold, threshold, k, class_boxes,
            indices, labels, count, num_threads(),
        )
        return indices, labels, count
    return _padded_gpu(rows, class_boxes, scores, iou_threshold, score_threshold, max_detections, k)


def _padded_gpu(rows, class_boxes, scores, iou_threshold, score_threshold, max_detections, k):
    """The GPU path: candidate selection with torch ops (no sync), then one mask and one suppression
    launch for every image and class. rows: the boxes, [B, N * C, 4] when class_boxes, else [B, N, 4]."""
    batch, n, classes = scores.shape
    # Candidates: the k best (box, class) pairs above score_threshold, best first; NaN never passes.
    flat = scores.reshape(batch, n * classes)
    passed = flat > score_threshold
    top = flat.masked_fill(~passed, -math.inf).topk(k, dim=1).indices
    n_valid = passed.sum(dim=1).clamp_(max=k)
    box_index = torch.div(top, classes, rounding_mode="floor")
    labels = top - box_index * classes
    row = top if class_boxes else box_index
    cand_boxes = rows.gather(1, row.unsqueeze(-1).expand(batch, k, 4)).contiguous()
    keep, count = _gpu_pass(cand_boxes, labels.contiguous(), iou_threshold, n_valid, max_detections)
    kept = keep >= 0
    position = keep.clamp(min=0)
    indices = torch.where(kept, box_index.gather(1, position), -1)
    return indices, torch.where(kept, labels.gather(1, position), -1), count


def _padded_fake(boxes, scores, iou_threshold, score_threshold, max_detections, pre_nms_top_k):
    _check_padded(boxes, scores, iou_threshold, score_threshold, max_detections, pre_nms_top_k)
    batch = boxes.shape[0]
    padded = boxes.new_empty((batch, max_detections), dtype=torch.int64)
    return padded, torch.empty_like(padded), boxes.new_empty((batch,), dtype=torch.int64)


define(
    "batched_nms_padded(Tensor boxes, Tensor scores, float iou_threshold, float score_threshold, "
    "int max_detections, int pre_nms_top_k) -> (Tensor, Tensor, Tensor)",
    impl=_padded_impl,
    fake=_padded_fake,
    autocast=FP32,  # torchvision's nms: float32 boxes and scores
)


class Detections(NamedTuple):
    """batched_nms_padded's result; every tensor has B rows and max_detections columns but `counts`."""

    boxes: Tensor  # [B, M, 4], zeros after the count
    scores: Tensor  # [B, M], zeros after the count
    labels: Tensor  # [B, M] int64 class index, -1 after the count
    indices: Tensor  # [B, M] int64 index into boxes' N dimension, -1 after the count
    counts: Tensor  # [B] int64, the number of detections per image


def batched_nms_padded(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    score_threshold: float,
    max_detections: int,
    pre_nms_top_k: int = 1000,
) -> Detections:
    """Post-processing for a batch of detector outputs, with fixed output shapes and no host sync.

    For each image b, the same as this loop over torchvision (for distinct scores):

        s = scores[b].flatten()                      # (box, class) pairs, index box * C + class
        cand = (s > score_threshold).nonzero()       # NaN never passes
        cand = cand[s[cand].topk(min(pre_nms_top_k, len(cand))).indices]
        keep = torchvision.ops.batched_nms(boxes[b][cand // C], s[cand], cand % C, iou_threshold)
                                                     # boxes [B, N, C, 4]: boxes[b].flatten(0, 1)[cand]
        keep = keep[:max_detections]

    Args:
        boxes: Tensor[B, N, 4] (x1, y1, x2, y2), shared by every class, or Tensor[B, N, C, 4], a box per
            class (a detector's per-class box regression: pair (n, c) uses boxes[b, n, c] above).
        scores: Tensor[B, N, C], per-class scores, the dtype and device of boxes.
        iou_threshold: in [0, 1].
        score_threshold: pairs with score <= score_threshold are never detections.
        max_detections: M, the padded length of every output.
        pre_nms_top_k: how many best pairs per image enter NMS (bounds the work and memory).

    Returns:
        Detections(boxes [B,M,4], scores [B,M], labels [B,M], indices [B,M], counts [B]), best first.
        boxes and scores are gathered with torch ops, so gradients flow back to the inputs.
    """
    indices, labels, counts = OPS.batched_nms_padded(
        boxes, scores, iou_threshold, score_threshold, max_detections, pre_nms_top_k
    )
    if scores.numel() == 0:  # nothing to gather from (N or C is 0): every row is padding
        return Detections(boxes.new_zeros((*indices.shape, 4)), scores.new_zeros(indices.shape), labels, indices, counts)
    kept = indices >= 0
    index = indices.clamp(min=0)
    if boxes.dim() == 4:  # the kept pair's own box: row index * C + label of [B, N * C, 4]
        rows, row = boxes.flatten(1, 2), index * scores.shape[2] + labels.clamp(min=0)
    else:
        rows, row = boxes, index
    out_boxes = rows.gather(1, row.unsqueeze(-1).expand(*index.shape, 4))
    out_boxes = torch.where(kept.unsqueeze(-1), out_boxes, 0)
    flat = scores.flatten(1).gather(1, index * scores.shape[2] + labels.clamp(min=0))
    out_scores = torch.where(kept, flat, 0)
    return Detections(out_boxes, out_scores, labels, indices, counts)
