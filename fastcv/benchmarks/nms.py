"""NMS benchmark cases and the torchvision references they are checked against."""
from __future__ import annotations

import torch

from fastcv import ops
from fastcv.benchmarks import Case


def random_boxes(n: int, device: str, seed: int, batch: tuple = ()) -> torch.Tensor:
    """Boxes with corners in a 1000x1000 image and sides up to 100: realistic overlap for NMS."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(*batch, n, 2, generator=g) * 1000
    wh = torch.rand(*batch, n, 2, generator=g) * 100
    return torch.cat([xy, xy + wh], dim=-1).to(device)


def distinct_scores(shape: tuple, device: str, seed: int) -> torch.Tensor:
    """Scores without ties, so that every implementation must give the same order."""
    g = torch.Generator().manual_seed(seed + 1)
    count = 1
    for s in shape:
        count *= s
    return (torch.randperm(count, generator=g).reshape(shape).double() / count).float().to(device)


def reference_padded(boxes, scores, iou_threshold, score_threshold, max_detections, pre_nms_top_k=1000):
    """What batched_nms_padded promises to equal: a per-image loop over torchvision.ops.batched_nms after
    the same score threshold and top-k. Returns the kept (box index, label) per image."""
    import torchvision

    rows = []
    classes = scores.shape[2]
    for b in range(boxes.shape[0]):
        s = scores[b].flatten()
        cand = (s > score_threshold).nonzero().flatten()
        cand = cand[s[cand].topk(min(pre_nms_top_k, cand.numel())).indices]
        keep = torchvision.ops.batched_nms(boxes[b][cand // classes], s[cand], cand % classes, iou_threshold)
        keep = cand[keep[:max_detections]]
        rows.append((keep // classes, keep % classes))
    return rows


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
            make=lambda: (random_boxes(n, device, n), distinct_scores((n,), device, n), threshold),
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
            return random_boxes(n, device, n), distinct_scores((n,), device, n), idxs, 0.5

        return Case(
            "batched_nms", name, make=make,
            fastcv=ops.batched_nms, reference=tv_batched, reference_name="torchvision.ops.batched_nms",
            check=_same_indices, quick=quick,
        )

    out.append(batched_case(1_000, 80, "1,000 boxes, 80 classes"))
    out.append(batched_case(20_000, 80, "20,000 boxes, 80 classes"))

    def padded_case(images, boxes_per_image=5_000, classes=80, quick=True):
        def make():
            return (
                random_boxes(boxes_per_image, device, 3, batch=(images,)),
                distinct_scores((images, boxes_per_image, classes), device, 3),
                0.5, 0.05, 100, 1000,
            )

        return Case(
            "batched_nms_padded", f"{images} image{'s' if images > 1 else ''} x {boxes_per_image:,} boxes x {classes} classes, top 1000",
            make=make, fastcv=lambda *a: ops.batched_nms_padded(*a),
            reference=reference_padded, reference_name="per-image torchvision.ops.batched_nms loop",
            check=_same_padded, quick=quick,
        )

    out.append(padded_case(1))  # single-image inference
    out.append(padded_case(16 if device == "cuda" else 4))
    return out
