"""NMS benchmark cases and the torchvision references they are checked against."""
from __future__ import annotations

import math

import torch

from fastcv import ops
from fastcv.benchmarks import Case


# The benchmarks' boxes: corners in a 1000x1000 image and sides up to 100, realistic overlap for NMS.
IMAGE_SIZE, MAX_SIDE = 1000.0, 100.0


def random_boxes(n: int, *, batch: tuple = (), size: float = 100.0, max_wh: float = 20.0,
                 dtype: torch.dtype = torch.float32, device="cpu", generator=None) -> torch.Tensor:
    """n boxes (x1, y1, x2, y2) per batch entry, with corners in [0, size) and sides up to max_wh (the
    defaults give plenty of overlaps), drawn in float64 on the CPU so that every device and dtype gets the
    same boxes, then rounded to dtype."""
    xy = torch.rand(*batch, n, 2, generator=generator, dtype=torch.float64) * size
    wh = torch.rand(*batch, n, 2, generator=generator, dtype=torch.float64) * max_wh
    return torch.cat([xy, xy + wh], dim=-1).to(dtype=dtype, device=device)


def distinct_scores(shape, *, dtype: torch.dtype = torch.float32, device="cpu", generator=None) -> torch.Tensor:
    """Scores in [0, 1) of the given shape (or count) without ties, so that every implementation must give
    the same order: distinct even in float16 (up to 2048 of them) or bfloat16 (up to 256)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    count = math.prod(shape)
    levels = {torch.float16: 2048, torch.bfloat16: 256}.get(dtype, max(count, 1 << 20))
    assert count <= levels, f"{dtype} has no {count} distinct scores at this spacing"
    picks = torch.randperm(levels, generator=generator)[:count].to(torch.float64)
    return (picks / levels).reshape(shape).to(dtype=dtype, device=device)


def reference_padded(boxes, scores, iou_threshold, score_threshold, max_detections, pre_nms_top_k=1000):
    """What batched_nms_padded promises to equal: a per-image loop over torchvision.ops.batched_nms after
    the same score threshold and top-k (in float32 for float16 / bfloat16 inputs); boxes [B, N, 4] or, a box
    per class, [B, N, C, 4]. Returns the kept (box index, label) per image."""
    import torchvision

    rows = []
    classes = scores.shape[2]
    for b in range(boxes.shape[0]):
        s = scores[b].flatten().float()
        cand = (s > score_threshold).nonzero().flatten()
        cand = cand[s[cand].topk(min(pre_nms_top_k, cand.numel())).indices]
        cand_boxes = boxes[b].float().flatten(0, 1)[cand] if boxes.dim() == 4 else boxes[b].float()[cand // classes]
        keep = torchvision.ops.batched_nms(cand_boxes, s[cand], cand % classes, iou_threshold)
        keep = cand[keep[:max_detections]]
        rows.append((keep // classes, keep % classes))
    return rows


def _boxes_and_scores(n: int, device: str, seed: int, images: int | None = None, classes: int | None = None):
    """n boxes and their scores, or per image (boxes [images, n, 4], scores [images, n, classes])."""
    g = torch.Generator().manual_seed(seed)
    batch = () if images is None else (images,)
    boxes = random_boxes(n, batch=batch, size=IMAGE_SIZE, max_wh=MAX_SIDE, device=device, generator=g)
    shape = (n,) if images is None else (images, n, classes)
    return boxes, distinct_scores(shape, device=device, generator=g)


def _same_indices(a, b) -> None:
    assert torch.equal(a.cpu(), b.cpu()), f"kept indices differ ({a.numel()} vs {b.numel()} kept)"


def _same_padded(det, rows) -> None:
    for b, (idx, lab) in enumerate(rows):
        c = len(idx)
        assert det.counts[b].item() == c, f"image {b}: {det.counts[b].item()} detections, torchvision {c}"
        assert torch.equal(det.indices[b, :c].cpu(), idx.cpu()) and torch.equal(det.labels[b, :c].cpu(), lab.cpu())


def _pairs(order_len: int, positions: torch.Tensor) -> float:
    """Pairs the plain greedy algorithm compares: each kept box at sorted position p meets the n-1-p
    boxes after it. fastcv's CPU kernel skips the pairs that cannot overlap, so pairs / time is an
    effective rate, comparable across implementations, not a count of IoUs computed."""
    return float((order_len - 1 - positions).sum())


def _nms_work(args, keep):
    boxes, scores, _ = args
    rank = torch.empty_like(scores, dtype=torch.int64)
    order = torch.sort(scores, descending=True, stable=True).indices
    rank[order] = torch.arange(scores.numel(), device=scores.device)
    return _pairs(scores.numel(), rank[keep]) / 1e9, "G greedy pairs/s"


def cases(device: str) -> list[Case]:
    import torchvision

    tv_nms, tv_batched = torchvision.ops.nms, torchvision.ops.batched_nms
    out = []

    def nms_case(n, threshold, name, quick=True, work=_nms_work):
        return Case(
            "nms", name,
            make=lambda: (*_boxes_and_scores(n, device, n), threshold),
            fastcv=ops.nms, reference=tv_nms, reference_name="torchvision.ops.nms",
            check=_same_indices, work=work, quick=quick,
        )

    out.append(nms_case(10, 0.5, "10 boxes (per-call overhead)", work=None))
    out.append(nms_case(1_000, 0.5, "1,000 boxes"))
    out.append(nms_case(20_000, 0.5, "20,000 boxes"))
    out.append(nms_case(20_000, 1.0, "20,000 boxes, nothing suppressed (all pairs)", quick=False))

    def batched_case(n, classes, name, quick=True):
        def make():
            g = torch.Generator().manual_seed(n + classes)
            idxs = torch.randint(0, classes, (n,), generator=g).to(device)
            return *_boxes_and_scores(n, device, n), idxs, 0.5

        return Case(
            "batched_nms", name, make=make,
            fastcv=ops.batched_nms, reference=tv_batched, reference_name="torchvision.ops.batched_nms",
            check=_same_indices, quick=quick,
        )

    out.append(batched_case(1_000, 80, "1,000 boxes, 80 classes"))
    out.append(batched_case(20_000, 80, "20,000 boxes, 80 classes"))

    def padded_case(images, boxes_per_image=5_000, classes=80, quick=True):
        def make():
            return (*_boxes_and_scores(boxes_per_image, device, 3, images, classes), 0.5, 0.05, 100, 1000)

        return Case(
            "batched_nms_padded", f"{images} image{'s' if images > 1 else ''} x {boxes_per_image:,} boxes x {classes} classes, top 1000",
            make=make, fastcv=lambda *a: ops.batched_nms_padded(*a),
            reference=reference_padded, reference_name="per-image torchvision.ops.batched_nms loop",
            check=_same_padded, quick=quick,
        )

    out.append(padded_case(1))  # single-image inference
    out.append(padded_case(16 if device == "cuda" else 4))
    return out
