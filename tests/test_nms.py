"""fastcv.ops.nms / batched_nms / batched_nms_padded against torchvision.ops, on every backend built."""
import math
import multiprocessing
import types

import pytest
import torch
import torchvision

from fastcv import _C, _backend, ops
from fastcv._backend import forced
from fastcv.benchmarks.nms import distinct_scores, random_boxes, reference_padded
from helpers import check_padded, padded_inputs, reference_batched, reference_nms

# Every test runs under each CPU instruction set this machine supports (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_isa")

# ---------------------------------------------------------------- nms: random cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 17, 200, 1000])
@pytest.mark.parametrize("iou_threshold", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_nms_matches_torchvision(device, dtype, n, iou_threshold):
    g = torch.Generator().manual_seed(n * 31 + int(iou_threshold * 10))
    n = min(n, 256) if dtype == torch.bfloat16 else n
    boxes = random_boxes(n, dtype=dtype, device=device, generator=g)
    scores = distinct_scores(n, dtype=dtype, device=device, generator=g)
    keep = ops.nms(boxes, scores, iou_threshold)
    assert keep.dtype == torch.int64 and keep.device.type == device
    torch.testing.assert_close(keep.cpu(), reference_nms(boxes, scores, iou_threshold), rtol=0, atol=0)


def test_nms_large_matches_torchvision(device):
    # Many blocks and chunks: exercises the blocked parallel pass and its thread split.
    g = torch.Generator().manual_seed(7)
    boxes = random_boxes(6000, size=1000.0, max_wh=100.0, device=device, generator=g)
    scores = distinct_scores(6000, device=device, generator=g)
    for threshold in (0.2, 0.5):
        keep = ops.nms(boxes, scores, threshold)
        assert torch.equal(keep.cpu(), reference_nms(boxes, scores, threshold))


def special_boxes(n, g, dtype):
    """Many chunks' worth of boxes that stress the x1-range pruning of the CPU kernel: infinite and NaN
    coordinates, inverted and empty boxes, boxes spanning everything, runs of equal x1, negatives."""
    boxes = random_boxes(n, size=400.0, max_wh=60.0, generator=g, dtype=torch.float64) - 100.0
    kind = torch.randint(0, 12, (n,), generator=g)
    inf, nan = math.inf, math.nan
    boxes[kind == 0] = torch.tensor([-inf, 0.0, 50.0, 50.0], dtype=torch.float64)
    boxes[kind == 1] = torch.tensor([0.0, 0.0, inf, 30.0], dtype=torch.float64)
    boxes[kind == 2, 0] = nan
    boxes[kind == 3] = boxes[kind == 3][:, [2, 3, 0, 1]]  # inverted
    boxes[kind == 4, 2] = boxes[kind == 4, 0]  # zero width
    boxes[kind == 5] = torch.tensor([-1e4, -1e4, 1e4, 1e4], dtype=torch.float64)  # covers everything
    boxes[kind == 6, 0] = 17.0  # a run of equal x1
    boxes[kind == 6, 2] = 17.0 + torch.rand(int((kind == 6).sum()), generator=g, dtype=torch.float64) * 40
    boxes[kind == 7] = boxes[kind == 7] * 1e-3  # tiny boxes near the origin
    return boxes.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("iou_threshold", [0.0, 0.3, 0.7])
def test_nms_large_special_boxes(device, dtype, iou_threshold):
    g = torch.Generator().manual_seed(int(iou_threshold * 10) + 100)
    boxes = special_boxes(5000, g, dtype).to(device)
    scores = distinct_scores(5000, dtype=dtype, device=device, generator=g)
    keep = ops.nms(boxes, scores, iou_threshold)
    assert torch.equal(keep.cpu(), reference_nms(boxes, scores, iou_threshold))


def test_nms_all_boxes_share_x1(device):
    g = torch.Generator().manual_seed(12)
    boxes = random_boxes(3000, generator=g, device=device)
    boxes[:, 0] = 5.0  # one bucket only: x1 gives no order
    scores = distinct_scores(3000, device=device, generator=g)
    assert torch.equal(ops.nms(boxes, scores, 0.4).cpu(), reference_nms(boxes, scores, 0.4))


def test_nms_same_result_for_any_thread_count():
    g = torch.Generator().manual_seed(3)
    boxes, scores = random_boxes(3000, generator=g), distinct_scores(3000, generator=g)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(ops.nms(boxes, scores, 0.5))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_nms_noncontiguous_inputs(device):
    g = torch.Generator().manual_seed(11)
    base = random_boxes(300, device=device, generator=g)
    scores_base = distinct_scores(600, device=device, generator=g)
    boxes = base.t().contiguous().t()  # column-major [N,4]
    scores = scores_base[::2]
    assert not boxes.is_contiguous() and not scores.is_contiguous()
    assert torch.equal(ops.nms(boxes, scores, 0.5).cpu(), reference_nms(boxes, scores, 0.5))


# ---------------------------------------------------------------- nms: hand-made cases


def _t(rows, device, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype, device=device)


def test_nms_empty(device):
    keep = ops.nms(torch.empty(0, 4, device=device), torch.empty(0, device=device), 0.5)
    assert keep.shape == (0,) and keep.dtype == torch.int64


def test_nms_one_box(device):
    assert ops.nms(_t([[0, 0, 1, 1]], device), _t([0.3], device), 0.5).tolist() == [0]


def test_nms_identical_boxes_keep_the_best(device):
    boxes = _t([[1, 1, 5, 5]] * 4, device)
    assert ops.nms(boxes, _t([0.1, 0.9, 0.5, 0.7], device), 0.5).tolist() == [1]
    # IoU is exactly 1, which is not greater than a threshold of 1: nothing is suppressed.
    assert ops.nms(boxes, _t([0.1, 0.9, 0.5, 0.7], device), 1.0).tolist() == [1, 3, 2, 0]


def test_nms_nested_boxes(device):
    boxes = _t([[0, 0, 10, 10], [2, 2, 8, 8], [4, 4, 6, 6]], device)  # IoUs with the outer: 0.36, 0.04
    scores = _t([0.9, 0.8, 0.7], device)
    assert ops.nms(boxes, scores, 0.3).tolist() == [0, 2]
    assert ops.nms(boxes, scores, 0.03).tolist() == [0]
    assert ops.nms(boxes, scores, 0.5).tolist() == [0, 1, 2]


def test_nms_threshold_zero_suppresses_any_overlap(device):
    boxes = _t([[0, 0, 2, 2], [1.99, 1.99, 4, 4], [2, 2, 3, 3], [10, 10, 11, 11]], device)
    scores = _t([0.9, 0.8, 0.7, 0.6], device)
    # Box 2 only touches box 0 (zero intersection) and is suppressed by box 1, which box 0 removed.
    assert ops.nms(boxes, scores, 0.0).tolist() == [0, 2, 3]
    assert ops.nms(boxes, scores, 0.0).tolist() == reference_nms(boxes, scores, 0.0).tolist()


def test_nms_all_suppressed_but_one(device):
    boxes = _t([[0, 0, 10, 10]] + [[0.1 * i, 0, 10 + 0.1 * i, 10] for i in range(1, 20)], device)
    scores = torch.linspace(0.1, 0.9, 20, device=device)
    assert ops.nms(boxes, scores, 0.5).tolist() == [19]


def test_nms_zero_area_and_inverted_boxes(device):
    boxes = _t([[0, 0, 0, 0], [0, 0, 0, 0], [5, 5, 1, 1], [1, 1, 5, 5], [2, 2, 2, 9], [0, 0, 4, 4]], device)
    scores = _t([0.9, 0.85, 0.8, 0.7, 0.6, 0.5], device)
    for threshold in (0.0, 0.1, 0.5):
        keep = ops.nms(boxes, scores, threshold)
        assert keep.tolist() == reference_nms(boxes, scores, threshold).tolist()


def test_nms_ties_lower_index_first(device):
    boxes = _t([[0, 0, 1, 1], [5, 5, 6, 6], [10, 10, 11, 11], [0, 0, 1, 1]], device)
    scores = _t([0.5, 0.5, 0.9, 0.5], device)
    assert ops.nms(boxes, scores, 0.5).tolist() == [2, 0, 1]  # box 3 ties with box 0, and loses


def test_nms_nan_scores_rank_first_as_in_torchvision(device):
    g = torch.Generator().manual_seed(5)
    boxes = random_boxes(100, device=device, generator=g)
    scores = distinct_scores(100, device=device, generator=g)
    scores[[3, 50, 97]] = math.nan
    keep = ops.nms(boxes, scores, 0.5)
    assert keep[:1].tolist() == [3]  # NaNs first, in index order (boxes 50, 97 may be suppressed)
    assert keep.tolist() == reference_nms(boxes, scores, 0.5).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_nms_order_of_special_scores_as_in_torchvision(device, dtype):
    # Signed zeros tie, -NaN ranks with NaN, infinities and negatives in their places.
    values = [-0.0, 0.0, -math.inf, math.inf, -math.nan, math.nan, -1.5, 2.0, 0.0, -0.0, 1e-30, -1e-30]
    scores = torch.tensor(values, dtype=torch.float64)
    scores[4] = -scores[5].abs()  # a NaN with its sign bit set
    boxes = torch.tensor([[10.0 * i, 0, 10.0 * i + 5, 5] for i in range(len(values))])  # disjoint
    keep = ops.nms(boxes.to(dtype).to(device), scores.to(dtype).to(device), 0.5)
    assert keep.tolist() == torchvision.ops.nms(boxes.double(), scores.to(dtype).double(), 0.5).tolist()


def test_nms_nan_and_inf_boxes_as_in_torchvision(device):
    boxes = _t([[0, 0, 10, 10], [math.nan, 0, 10, 10], [0, 0, math.inf, 10], [1, 1, 10, 10]], device)
    scores = _t([0.9, 0.8, 0.7, 0.6], device)
    assert ops.nms(boxes, scores, 0.5).tolist() == reference_nms(boxes, scores, 0.5).tolist()


def test_nms_threshold_compares_like_torchvision_in_double():
    # IoU 1/3 in float32 is 0.3333333432674408 > 1/3 as a double: suppressed at threshold 1/3 exactly.
    boxes = _t([[0, 0, 2, 1], [1, 0, 3, 1]], "cpu")
    scores = _t([0.9, 0.8], "cpu")
    for threshold in (1 / 3, 0.33333334, 0.3333333432674408, 0.33333335):
        assert ops.nms(boxes, scores, threshold).tolist() == reference_nms(boxes, scores, threshold).tolist()


# ---------------------------------------------------------------- batched_nms


@pytest.mark.parametrize("classes", [1, 3, 80])
@pytest.mark.parametrize("n", [0, 1, 50, 2000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_batched_nms_matches_torchvision(device, classes, n, dtype):
    g = torch.Generator().manual_seed(n + classes)
    boxes = random_boxes(n, dtype=dtype, device=device, generator=g)
    scores = distinct_scores(n, dtype=dtype, device=device, generator=g)
    idxs = torch.randint(0, classes, (n,), generator=g).to(device)
    keep = ops.batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(keep.cpu(), reference_batched(boxes, scores, idxs, 0.5))


def test_batched_nms_any_integer_ids(device):
    # torchvision offsets boxes by id * (max coordinate + 1) for small inputs, which loses precision for
    # large ids; fastcv never offsets, so it matches torchvision's exact per-class loop instead.
    from torchvision.ops.boxes import _batched_nms_vanilla

    g = torch.Generator().manual_seed(2)
    boxes = random_boxes(500, device=device, generator=g)
    scores = distinct_scores(500, device=device, generator=g)
    ids = torch.tensor([-7, 3, 10**12], device=device)[torch.randint(0, 3, (500,), generator=g).to(device)]
    expected = _batched_nms_vanilla(boxes.cpu(), scores.cpu(), ids.cpu(), 0.4)
    assert torch.equal(ops.batched_nms(boxes, scores, ids, 0.4).cpu(), expected)
    small = ids.remainder(100).to(torch.int32)
    assert torch.equal(ops.batched_nms(boxes, scores, small, 0.4).cpu(), reference_batched(boxes, scores, small, 0.4))


def test_batched_nms_classes_do_not_interact(device):
    boxes = _t([[0, 0, 10, 10]] * 3, device)
    scores = _t([0.9, 0.8, 0.7], device)
    assert ops.batched_nms(boxes, scores, torch.tensor([0, 1, 0], device=device), 0.5).tolist() == [0, 1]


# ---------------------------------------------------------------- batched_nms_padded


@pytest.mark.parametrize(
    "batch,n,classes,max_det,top_k,score_thr",
    [
        (3, 200, 5, 50, 1000, 0.05),
        (2, 300, 1, 300, 300, 0.0),
        (4, 100, 20, 10, 500, 0.5),  # max_detections cuts the kept list
        (2, 100, 20, 100, 30, 0.05),  # top-k cuts the candidates below max_detections
        (1, 50, 3, 20, 1000, 0.999),  # almost nothing passes the score threshold
        (2, 40, 2, 5, 1000, 1.0),  # nothing passes
    ],
)
@pytest.mark.parametrize("class_boxes", [False, True], ids=["shared_boxes", "class_boxes"])
def test_batched_nms_padded_matches_per_image_torchvision(device, batch, n, classes, max_det, top_k, score_thr,
                                                          class_boxes):
    boxes, scores = padded_inputs(batch, n, classes, device, seed=n + classes, class_boxes=class_boxes)
    result = ops.batched_nms_padded(boxes, scores, 0.5, score_thr, max_det, top_k)
    check_padded(result, reference_padded(boxes.cpu(), scores.cpu(), 0.5, score_thr, max_det, top_k), boxes, scores, max_det)


def test_batched_nms_padded_class_boxes_differ_from_shared():
    """Per-class boxes are really read per class: with each class's boxes moved apart, nothing overlaps across
    pairs of one box index, and the result is not that of the shared boxes."""
    boxes, scores = padded_inputs(1, 60, 3, "cpu", dtype=torch.float64, seed=3)  # float64: shifts round off nothing
    shifted = torch.stack([boxes + 1000.0 * c for c in range(3)], dim=2)  # [1, 60, 3, 4]: class c far away
    shared = ops.batched_nms_padded(boxes, scores, 0.3, 0.0, 180)
    per_class = ops.batched_nms_padded(shifted, scores, 0.3, 0.0, 180)
    assert torch.equal(per_class.counts, shared.counts)  # classes never suppress each other either way
    assert torch.equal(per_class.indices, shared.indices) and torch.equal(per_class.labels, shared.labels)
    c = int(shared.counts[0])
    offset = 1000.0 * shared.labels[0, :c].unsqueeze(-1)
    torch.testing.assert_close(per_class.boxes[0, :c], shared.boxes[0, :c] + offset, rtol=0, atol=1e-9)
    # the same boxes but for one class whose boxes all coincide: that class keeps one detection
    collapsed = boxes.unsqueeze(2).repeat(1, 1, 3, 1)
    collapsed[:, :, 1] = torch.tensor([10.0, 10.0, 50.0, 50.0], dtype=torch.float64)
    result = ops.batched_nms_padded(collapsed, scores, 0.3, 0.0, 180)
    assert int((result.labels[0] == 1).sum()) == 1
    assert int(result.counts[0]) == c - int((shared.labels[0, :c] == 1).sum()) + 1


def test_batched_nms_padded_one_large_image_any_thread_count(device):
    # One image with many (box, class) pairs: the CPU splits its candidate scan across threads.
    boxes, scores = padded_inputs(1, 2000, 80, device, seed=21)
    expected = reference_padded(boxes.cpu(), scores.cpu(), 0.5, 0.3, 150, 400)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            result = ops.batched_nms_padded(boxes, scores, 0.5, 0.3, 150, 400)
            check_padded(result, expected, boxes, scores, 150)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_batched_nms_padded_dtypes(device, dtype):
    boxes, scores = padded_inputs(2, 60, 4, device, dtype=dtype, seed=1)
    result = ops.batched_nms_padded(boxes, scores, 0.45, 0.1, 40, 200)
    assert result.boxes.dtype == result.scores.dtype == dtype
    check_padded(result, reference_padded(boxes.cpu().float(), scores.cpu().float(), 0.45, 0.1, 40, 200), boxes, scores, 40)


def test_batched_nms_padded_empty(device):
    for batch, n, classes in ((0, 10, 3), (2, 0, 3), (2, 10, 0)):
        boxes, scores = torch.zeros(batch, n, 4, device=device), torch.zeros(batch, n, classes, device=device)
        result = ops.batched_nms_padded(boxes, scores, 0.5, 0.1, 7)
        assert result.boxes.shape == (batch, 7, 4) and result.counts.tolist() == [0] * batch
        assert (result.indices == -1).all()
    result = ops.batched_nms_padded(*padded_inputs(2, 10, 3, device), 0.5, 0.0, 0)
    assert result.indices.shape == (2, 0) and result.counts.tolist() == [0, 0]


def test_batched_nms_padded_nan_scores_never_detected(device):
    boxes, scores = padded_inputs(1, 30, 2, device)
    scores[0, :5] = math.nan
    result = ops.batched_nms_padded(boxes, scores, 0.5, 0.0, 60)
    assert not (result.indices[0, : result.counts[0]] < 5).any()
    check_padded(result, reference_padded(boxes.cpu(), scores.cpu(), 0.5, 0.0, 60, 1000), boxes, scores, 60)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batched_nms_padded_score_threshold_in_scores_dtype(device, dtype):
    # torch compares a float32/float16 tensor with a Python float in the tensor's dtype: a score equal
    # to the rounded threshold does not pass, one a step above does.
    at = torch.tensor(0.1, dtype=dtype)
    above = torch.nextafter(at, torch.tensor(1.0, dtype=dtype)) if dtype == torch.float32 else at + 0.0001
    boxes = torch.tensor([[[0, 0, 1, 1], [5, 5, 6, 6]]], dtype=dtype, device=device)
    scores = torch.stack([at, above]).reshape(1, 2, 1).to(device)
    result = ops.batched_nms_padded(boxes, scores, 0.5, 0.1, 4)
    assert result.indices[0].tolist() == [1, -1, -1, -1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["default", "triton"])
def test_batched_nms_padded_in_cuda_graph(backend):
    # No host sync and no data-dependent shape: the whole op can be captured and replayed.
    with forced(backend="triton" if backend == "triton" else None):
        _check_cuda_graph_capture()


def _check_cuda_graph_capture():
    static_boxes, static_scores = padded_inputs(2, 64, 3, "cuda", seed=1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (allocator, Triton compilation)
        for _ in range(2):
            ops.batched_nms_padded(static_boxes, static_scores, 0.5, 0.1, 20)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = ops.batched_nms_padded(static_boxes, static_scores, 0.5, 0.1, 20)
    boxes, scores = padded_inputs(2, 64, 3, "cuda", seed=2)
    static_boxes.copy_(boxes)
    static_scores.copy_(scores)
    graph.replay()
    check_padded(result, reference_padded(boxes.cpu(), scores.cpu(), 0.5, 0.1, 20, 1000), boxes, scores, 20)


@pytest.mark.parametrize("class_boxes", [False, True], ids=["shared_boxes", "class_boxes"])
def test_batched_nms_padded_gradients_reach_inputs(device, class_boxes):
    boxes, scores = padded_inputs(2, 40, 3, device, dtype=torch.float64, class_boxes=class_boxes)
    boxes.requires_grad_(True)
    scores.requires_grad_(True)
    result = ops.batched_nms_padded(boxes, scores, 0.5, 0.2, 10)
    (result.boxes.sum() + result.scores.sum()).backward()
    for b in range(2):
        c = result.counts[b]
        if class_boxes:  # exactly the kept pairs' boxes get gradients
            touched = torch.zeros(40, 3, dtype=torch.bool, device=device)
            touched[result.indices[b, :c], result.labels[b, :c]] = True
            assert torch.equal(boxes.grad[b].abs().sum(-1) > 0, touched)
        else:
            idx = result.indices[b, :c]
            assert torch.equal(boxes.grad[b].abs().sum(1) > 0, torch.isin(torch.arange(40, device=device), idx))
    assert scores.grad.sum().item() == result.counts.sum().item()


# ---------------------------------------------------------------- bad input


def bad_input_cases():
    b, s = torch.rand(5, 4), torch.rand(5)
    return [
        (lambda: ops.nms(torch.rand(5, 3), s, 0.5), ValueError, "boxes must have shape \\[N, 4\\]"),
        (lambda: ops.nms(torch.rand(20), s, 0.5), ValueError, "boxes must have shape"),
        (lambda: ops.nms(b, torch.rand(4), 0.5), ValueError, "scores must have shape \\[N\\]"),
        (lambda: ops.nms(b, torch.rand(5, 1), 0.5), ValueError, "scores must have shape"),
        (lambda: ops.nms(b.to(torch.int64), s, 0.5), TypeError, "boxes must be float32"),
        (lambda: ops.nms(b, s.double(), 0.5), TypeError, "scores must have the dtype of boxes"),
        (lambda: ops.nms(b, s.to("meta"), 0.5), ValueError, "scores must be on the device of boxes"),
        (lambda: ops.nms(b, s, -0.1), ValueError, "iou_threshold must be in \\[0, 1\\]"),
        (lambda: ops.nms(b, s, 1.5), ValueError, "iou_threshold must be in \\[0, 1\\]"),
        (lambda: ops.nms(b, s, math.nan), ValueError, "iou_threshold must be in \\[0, 1\\], got nan"),
        (lambda: ops.nms(b.numpy(), s, 0.5), TypeError, "boxes must be a torch.Tensor, got ndarray"),
        (lambda: ops.batched_nms(b, s, torch.zeros(4, dtype=torch.int64), 0.5), ValueError, "idxs must have shape \\[N\\]"),
        (lambda: ops.batched_nms(b, s, torch.zeros(5), 0.5), TypeError, "idxs must be an integer tensor"),
        (lambda: ops.batched_nms(b, s, torch.zeros(5, dtype=torch.int64, device="meta"), 0.5), ValueError, "idxs must be on the device"),
        (lambda: ops.batched_nms_padded(b, s, 0.5, 0.1, 10), ValueError, "boxes must have shape \\[B, N, 4\\]"),
        (lambda: ops.batched_nms_padded(b[None], s[None], 0.5, 0.1, 10), ValueError, "scores must have shape \\[B, N, C\\]"),
        (lambda: ops.batched_nms_padded(b[None, :, None].expand(-1, -1, 2, -1), s[None, :, None], 0.5, 0.1, 10), ValueError,
         "boxes of shape \\[B, N, C, 4\\] must have the C = 1 of scores"),
        (lambda: ops.batched_nms_padded(b[None], torch.rand(1, 4, 3), 0.5, 0.1, 10), ValueError, "scores must have shape"),
        (lambda: ops.batched_nms_padded(b[None], s[None, :, None], 0.5, math.nan, 10), ValueError, "score_threshold must not be NaN"),
        (lambda: ops.batched_nms_padded(b[None], s[None, :, None], 0.5, 0.1, -1), ValueError, "max_detections must be >= 0"),
        (lambda: ops.batched_nms_padded(b[None], s[None, :, None], 0.5, 0.1, 10, -5), ValueError, "pre_nms_top_k must be >= 0"),
        (lambda: ops.batched_nms_padded(b[None], s[None, :, None], 2.0, 0.1, 10), ValueError, "iou_threshold must be in"),
    ]


@pytest.mark.parametrize("case", range(len(bad_input_cases())))
def test_bad_input_raises_clear_error(case):
    call, error, message = bad_input_cases()[case]
    with pytest.raises(error, match=message):
        call()


def test_compiled_module_checks_its_arguments():
    # Callers that bypass the Python checks still get an exception naming the argument, not a crash.
    boxes, scores, keep = torch.rand(5, 3), torch.rand(5), torch.empty(5, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"boxes must have shape \[\*, 4\], got \[5, 3\]"):
        _C.nms_cpu(boxes, scores, None, 0.5, keep, 1)
    with pytest.raises(ValueError, match="keep must be int64"):
        _C.nms_cpu(torch.rand(5, 4), scores, None, 0.5, scores, 1)


def test_no_cuda_build_or_triton_gives_clear_error(monkeypatch):
    # On a GPU without CUDA kernels, nms runs Triton's; without triton either, a clear error.
    monkeypatch.setattr(_backend, "CUDA_BUILT", False)
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    monkeypatch.setattr(_backend, "_choices", {})
    gpu_tensor = types.SimpleNamespace(is_cpu=False, is_cuda=True, device=torch.device("cuda", 0))
    with pytest.raises(RuntimeError, match=r"no CUDA kernels in this build\), which need the triton package"):
        _backend.select("nms", gpu_tensor)


# ---------------------------------------------------------------- registration: opcheck, compile, autocast


def opcheck_cases(device):
    g = torch.Generator().manual_seed(0)
    boxes = random_boxes(64, device=device, generator=g)
    scores = distinct_scores(64, device=device, generator=g)
    idxs = torch.randint(0, 4, (64,), generator=g).to(device)
    padded = padded_inputs(2, 32, 3, device)
    return [
        (torch.ops.fastcv.nms.default, (boxes, scores, 0.5)),
        (torch.ops.fastcv.nms.default, (boxes[:0], scores[:0], 0.5)),
        (torch.ops.fastcv.batched_nms.default, (boxes, scores, idxs, 0.5)),
        (torch.ops.fastcv.batched_nms_padded.default, (*padded, 0.5, 0.1, 16, 100)),
        (torch.ops.fastcv.batched_nms_padded.default, (*padded_inputs(2, 32, 3, device, class_boxes=True), 0.5, 0.1,
                                                       16, 100)),
    ]


@pytest.mark.parametrize("case", range(4))
def test_opcheck(device, case):
    op, args = opcheck_cases(device)[case]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_padded(device):
    boxes, scores = padded_inputs(2, 64, 3, device)

    def postprocess(boxes, scores):
        det = ops.batched_nms_padded(boxes, scores, 0.5, 0.1, 20)
        return det.boxes * 2, det.counts

    compiled = torch.compile(postprocess, fullgraph=True)
    out_boxes, counts = compiled(boxes, scores)
    ref_boxes, ref_counts = postprocess(boxes, scores)
    assert torch.equal(out_boxes, ref_boxes) and torch.equal(counts, ref_counts)


def test_compile_fullgraph_nms_dynamic_output(device):
    # nms's output length depends on the data, so the graph needs dynamic output shapes (as for
    # torchvision.ops.nms or torch.nonzero).
    g = torch.Generator().manual_seed(1)
    boxes, scores = random_boxes(100, device=device, generator=g), distinct_scores(100, device=device, generator=g)
    idxs = torch.randint(0, 3, (100,), generator=g).to(device)

    def select(boxes, scores, idxs):
        keep = ops.nms(boxes, scores, 0.5)
        keep2 = ops.batched_nms(boxes, scores, idxs, 0.5)
        return boxes[keep] + 1, keep2

    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        out, keep2 = torch.compile(select, fullgraph=True, backend="aot_eager")(boxes, scores, idxs)
    ref, ref2 = select(boxes, scores, idxs)
    assert torch.equal(out, ref) and torch.equal(keep2, ref2)


def test_autocast_casts_to_float32(device):
    g = torch.Generator().manual_seed(4)
    boxes = random_boxes(200, device=device, generator=g)
    scores = distinct_scores(200, dtype=torch.bfloat16, device=device, generator=g)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        keep = ops.nms(boxes, scores, 0.5)  # boxes float32, scores bfloat16: autocast unifies them
    assert torch.equal(keep.cpu(), reference_nms(boxes, scores.float(), 0.5))


# ---------------------------------------------------------------- process safety


_FORK_INPUTS = {}


def _nms_in_child(queue):
    # Only fastcv runs here: torch's own OpenMP pool is not usable after fork (a torch limitation).
    queue.put(ops.nms(*_FORK_INPUTS["args"], 0.5).tolist())


def test_thread_pool_survives_fork():
    g = torch.Generator().manual_seed(9)
    _FORK_INPUTS["args"] = (random_boxes(5000, generator=g), distinct_scores(5000, generator=g))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = ops.nms(*_FORK_INPUTS["args"], 0.5).tolist()  # the parent's pool now has its threads
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_nms_in_child, args=(queue,))
        child.start()
        result = queue.get(timeout=60)
        child.join(timeout=60)
    finally:
        torch.set_num_threads(before)
    assert child.exitcode == 0 and result == expected


def test_nms_accepts_inputs_that_require_grad(device):
    # Detection heads call NMS on boxes and scores inside the autograd graph.
    g = torch.Generator().manual_seed(13)
    boxes = random_boxes(80, device=device, generator=g).requires_grad_(True)
    scores = distinct_scores(80, device=device, generator=g).requires_grad_(True)
    keep = ops.nms(boxes, scores, 0.5)
    assert not keep.requires_grad
    assert torch.equal(keep.cpu(), reference_nms(boxes.detach(), scores.detach(), 0.5))
    idxs = torch.zeros(80, dtype=torch.int64, device=device)
    assert torch.equal(ops.batched_nms(boxes, scores, idxs, 0.5), keep)


def test_concurrent_calls_from_python_threads():
    # Kernels release the GIL; a second caller while the pool is busy runs on its own thread.
    import concurrent.futures

    g = torch.Generator().manual_seed(14)
    inputs = [(random_boxes(4000, generator=g), distinct_scores(4000, generator=g)) for _ in range(6)]
    expected = [ops.nms(b, s, 0.5) for b, s in inputs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda bs: ops.nms(*bs, 0.5), inputs * 3))
    assert all(torch.equal(r, expected[i % 6]) for i, r in enumerate(results))
