"""Inputs, references and checks shared by the test modules. The NMS inputs and the padded NMS
reference that the benchmarks use too live in fastcv.benchmarks.nms."""
import torch

from fastcv.benchmarks.nms import random_boxes


# Unit roundoff u of each dtype: half an ulp of 1, the largest relative error of one rounding.
UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def assert_sums_close(actual, expected, magnitude, dtype, sum_units, what="", final_ulps=0.5):
    """Elementwise check of a kernel's sums of products against `expected`, the float64 result for the
    same (rounded) inputs. `magnitude` holds, per element, the sum of its terms' absolute values (the
    same computation on |inputs|), the scale of its rounding error: a sum of K products accumulated in
    the compute dtype (float64 for float64 inputs, else float32) is off by at most about K u times it,
    and in practice (blocked and pairwise sums, FMA) by a few u. `sum_units` is how many of the compute
    dtype's u are allowed. float16 / bfloat16 results are rounded once more when stored: half an ulp of
    the result (u(dtype) |expected|, and half the smallest subnormal's spacing near zero) on top, or
    final_ulps ulps where the conversion does not round to nearest (the Triton interpreter truncates
    float32 to bfloat16: final_ulps=1)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    expected, magnitude = expected.detach().cpu().double(), magnitude.detach().cpu().double()
    allowed = sum_units * UNIT[compute] * magnitude
    if dtype != compute:
        allowed = allowed + 2 * final_ulps * UNIT[dtype] * (expected.abs() + torch.finfo(dtype).smallest_normal)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.detach().cpu().double() - expected).abs()
    bad = ~(err <= allowed)  # NaN fails too
    if bad.any():
        ratio = (err / allowed).nan_to_num(nan=float("inf"))
        i = int(ratio.flatten().argmax())
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.numel()} elements beyond the bound; worst "
                             f"{err.flatten()[i].item():.3g} > {allowed.flatten()[i].item():.3g} (expected "
                             f"{expected.flatten()[i].item():.6g}, sum of |terms| {magnitude.flatten()[i].item():.3g})")


def sum_units_used(actual, expected, magnitude, dtype):
    """The smallest sum_units assert_sums_close would accept (to measure the kernels' errors)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    expected, magnitude = expected.detach().cpu().double(), magnitude.detach().cpu().double()
    err = (actual.detach().cpu().double() - expected).abs()
    if dtype != compute:
        err = (err - UNIT[dtype] * (expected.abs() + torch.finfo(dtype).smallest_normal)).clamp(min=0)
    if not err.numel():
        return 0.0
    return (err / (UNIT[compute] * magnitude)).nan_to_num(nan=0.0).max().item()


def assert_same_for_thread_counts(run, counts=(1, 2, 3, 2)):
    """run() (a tuple of tensors) under torch.set_num_threads(n) for each n in counts: every result bit for bit
    the same as the first. The thread count is restored afterwards."""
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in counts:
            torch.set_num_threads(threads)
            results.append(run())
    finally:
        torch.set_num_threads(previous)
    for threads, other in zip(counts[1:], results[1:]):
        for i, (a, b) in enumerate(zip(results[0], other)):
            assert torch.equal(a, b), f"result {i} with {threads} threads differs from {counts[0]} threads'"


def conv2d_reference(x, w, b, grad_out, conv=None, **kw):
    """float64 results of conv(x, w, b, **kw) (F.conv2d by default) on the same rounded values: the
    output and the input, weight and bias gradients for grad_out, each with its sums of |terms| (for
    assert_sums_close): the same computation on |x|, |w|, |b| and |grad_out|. b and grad_out may be None."""
    conv = conv or torch.nn.functional.conv2d
    results = []
    for f in (lambda t: t, torch.abs):
        xr, wr = (f(t.detach().cpu().double()).requires_grad_() for t in (x, w))
        br = f(b.detach().cpu().double()).requires_grad_() if b is not None else None
        out = conv(xr, wr, br, **kw)
        grads = [None, None, None]
        if grad_out is not None:
            leaves = [t for t in (xr, wr, br) if t is not None]
            got = torch.autograd.grad(out, leaves, f(grad_out.detach().cpu().double()))
            grads = list(got) + [None] * (3 - len(got))
        results.append((out.detach(), *grads))
    return results  # [(out, grad_x, grad_w, grad_b), (their magnitudes)]


# ---------------------------------------------------------------- NMS

REDUCED = (torch.float16, torch.bfloat16)


def reference_nms(boxes, scores, iou_threshold):
    """torchvision on the CPU; reduced precision compared in float32 (torchvision's CPU kernel has none)."""
    import torchvision  # here, not at the top: the modules of ops whose references are PyTorch's run without it
    if boxes.dtype in REDUCED:
        boxes, scores = boxes.float(), scores.float()
    return torchvision.ops.nms(boxes.cpu(), scores.cpu(), iou_threshold)


def reference_batched(boxes, scores, idxs, iou_threshold):
    """reference_nms per class."""
    import torchvision
    if boxes.dtype in REDUCED:
        boxes, scores = boxes.float(), scores.float()
    return torchvision.ops.batched_nms(boxes.cpu(), scores.cpu(), idxs.cpu(), iou_threshold)


def check_padded(result, expected, boxes, scores, max_detections):
    """batched_nms_padded's result against the rows of fastcv.benchmarks.nms.reference_padded: the kept
    indices, labels, boxes and scores, then the padding."""
    batch = boxes.shape[0]
    assert result.boxes.shape == (batch, max_detections, 4)
    assert result.scores.shape == result.labels.shape == result.indices.shape == (batch, max_detections)
    for b, (idx, lab) in enumerate(expected):
        c = len(idx)
        assert result.counts[b].item() == c
        assert result.indices[b, :c].tolist() == idx.tolist()
        assert result.labels[b, :c].tolist() == lab.tolist()
        assert (result.indices[b, c:] == -1).all() and (result.labels[b, c:] == -1).all()
        own = boxes[b, idx.to(boxes.device)]  # boxes [B, N, C, 4]: each pair's own box
        if boxes.dim() == 4:
            own = own[torch.arange(c, device=boxes.device), lab.to(boxes.device)]
        assert torch.equal(result.boxes[b, :c].cpu(), own.cpu())
        assert torch.equal(result.scores[b, :c].cpu(), scores[b, idx.to(boxes.device), lab.to(boxes.device)].cpu())
        assert (result.boxes[b, c:] == 0).all() and (result.scores[b, c:] == 0).all()


def padded_inputs(batch, n, classes, device, dtype=torch.float32, seed=0, class_boxes=False):
    """Boxes [batch, n, 4] (class_boxes: [batch, n, classes, 4], a box per class) and scores [batch, n, classes]
    without ties within an image."""
    g = torch.Generator().manual_seed(seed)
    per_image = n * classes if class_boxes else n
    boxes = torch.stack([random_boxes(per_image, generator=g, dtype=dtype) for _ in range(batch)]).to(device)
    if class_boxes:
        boxes = boxes.reshape(batch, n, classes, 4)
    scores = torch.stack(
        [torch.randperm(n * classes, generator=g).reshape(n, classes).to(torch.float64) / (n * classes) for _ in range(batch)]
    ).to(dtype=dtype, device=device)
    return boxes, scores


# ---------------------------------------------------------------- RoI Align


def make_rois(k, n, h, w, scale, g, dtype=torch.float64):
    """Boxes in input-image coordinates (the map is scaled by `scale`), some partly or wholly outside."""
    x1 = torch.rand(k, generator=g, dtype=torch.float64) * (w / scale) * 1.2 - 0.1 * w / scale
    y1 = torch.rand(k, generator=g, dtype=torch.float64) * (h / scale) * 1.2 - 0.1 * h / scale
    bw = torch.rand(k, generator=g, dtype=torch.float64) * (w / scale) * 0.6
    bh = torch.rand(k, generator=g, dtype=torch.float64) * (h / scale) * 0.6
    index = torch.randint(0, n, (k,), generator=g).to(torch.float64)
    return torch.stack([index, x1, y1, x1 + bw, y1 + bh], dim=1).to(dtype)
