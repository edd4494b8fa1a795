"""The Triton NMS kernels (kernels/nms.py) through the public ops, forced onto them: on the CPU through
the interpreter (small shapes), on the GPU compiled."""
import importlib
import math

import pytest
import torch
import torchvision

from conftest import triton_device
from fastcv import ops
from fastcv._backend import forced
from fastcv.benchmarks.nms import distinct_scores, random_boxes, reference_padded
from helpers import padded_inputs, reference_batched, reference_nms

nms_impl = importlib.import_module("fastcv.ops.nms")


@pytest.fixture
def device():
    """Where the Triton kernels run: the GPU when there is one, else the CPU under the interpreter."""
    with forced(backend="triton"):
        yield triton_device()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,iou_threshold", [(1, 0.5), (70, 0.0), (70, 0.5), (150, 0.3), (150, 1.0)])
def test_triton_nms_matches_torchvision(device, dtype, n, iou_threshold):
    g = torch.Generator().manual_seed(n + int(10 * iou_threshold))
    boxes = random_boxes(n, dtype=dtype, device=device, generator=g)
    scores = distinct_scores(n, dtype=dtype, device=device, generator=g)
    keep = ops.nms(boxes, scores, iou_threshold)
    assert torch.equal(keep.cpu(), reference_nms(boxes, scores, iou_threshold))


def test_triton_nms_special_boxes(device):
    rows = [[0, 0, 10, 10], [math.nan, 0, 10, 10], [5, 5, 1, 1], [0, 0, 0, 0], [1, 1, 9, 9], [0, 0, math.inf, 10],
            [2, 2, 12, 12], [0, 0, 10, 10]]
    boxes = torch.tensor(rows, dtype=torch.float32, device=device)
    scores = torch.tensor([0.9, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3], device=device)
    for threshold in (0.0, 0.3, 0.6):
        keep = ops.nms(boxes, scores, threshold)
        assert keep.tolist() == torchvision.ops.nms(boxes.cpu(), scores.cpu(), threshold).tolist()


def test_triton_batched_nms(device):
    g = torch.Generator().manual_seed(3)
    boxes = random_boxes(130, device=device, generator=g)
    scores = distinct_scores(130, device=device, generator=g)
    idxs = torch.randint(0, 4, (130,), generator=g).to(device)
    keep = ops.batched_nms(boxes, scores, idxs, 0.4)
    assert torch.equal(keep.cpu(), reference_batched(boxes, scores, idxs, 0.4))


@pytest.mark.parametrize("class_boxes", [False, True], ids=["shared_boxes", "class_boxes"])
def test_triton_batched_nms_padded(device, class_boxes):
    boxes, scores = padded_inputs(3, 40, 3, device, seed=5, class_boxes=class_boxes)
    result = ops.batched_nms_padded(boxes, scores, 0.5, 0.2, 25, 80)
    indices, labels, counts = result.indices, result.labels, result.counts
    expected = reference_padded(boxes.cpu(), scores.cpu(), 0.5, 0.2, 25, 80)
    for b, (idx, lab) in enumerate(expected):
        c = len(idx)
        assert counts[b].item() == c
        assert indices[b, :c].tolist() == idx.tolist() and labels[b, :c].tolist() == lab.tolist()
        assert (indices[b, c:] == -1).all()


def test_triton_max_keep_stops_early(device):
    """The pass takes boxes already sorted best first and keeps at most max_keep: the first max_keep of
    torchvision's result for scores falling with the position, -1 after the kept ones."""
    g = torch.Generator().manual_seed(8)
    boxes = random_boxes(90, device=device, generator=g)
    expected = torchvision.ops.nms(boxes.cpu(), torch.linspace(1, 0, 90), 0.5).tolist()
    assert len(expected) > 5  # so that max_keep=5 cuts the list
    for max_keep in (5, 90):
        keep, count = nms_impl._gpu_pass(boxes.unsqueeze(0).contiguous(), None, 0.5, None, max_keep)
        kept = expected[:max_keep]
        assert count.item() == len(kept)
        assert keep[0].tolist() == kept + [-1] * (max_keep - len(kept))
