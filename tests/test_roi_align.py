"""fastcv.ops.roi_align against torchvision.ops.roi_align: forward and gradients (CPU so far)."""
import math

import pytest
import torch
import torchvision

from fastcv import nn as fnn
from fastcv import ops
from helpers import assert_sums_close, make_rois

# The CUDA tests' tolerances (not re-measured: no GPU in the audit that tightened the CPU ones).
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# Gradient sums in another order than torchvision's: how many unit roundoffs of the compute dtype each
# element may be off, relative to its sum of |terms| (helpers.assert_sums_close). Measured: 3.9 u
# (float64, against torchvision's own float64 sums), 0 for the float16 / bfloat16 gradients after their
# rounding; 16 as for the convolutions.
SUM_UNITS = 16


def run_both(x, rois, output_size, scale, sampling_ratio, aligned):
    """fastcv and torchvision outputs and input gradients for the same upstream gradient, and the
    gradient's sums of |terms| (torchvision's for |upstream|: the bilinear weights are not negative)."""
    outs, grads = [], []
    for fn in (ops.roi_align, torchvision.ops.roi_align):
        xi = x.detach().clone().requires_grad_(True)
        out = fn(xi, rois, output_size, scale, sampling_ratio, aligned)
        upstream = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        (out * upstream).sum().backward()
        outs.append(out.detach())
        grads.append(xi.grad)
    xi = x.detach().clone().requires_grad_(True)
    out = torchvision.ops.roi_align(xi, rois, output_size, scale, sampling_ratio, aligned)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape).abs()).sum().backward()
    return outs, grads, xi.grad


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2])
@pytest.mark.parametrize("shape,output_size,scale", [((2, 5, 17, 23), 7, 0.5), ((1, 3, 4, 5), (2, 3), 1.0),
                                                      ((3, 2, 30, 9), (5, 1), 0.25)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_torchvision_float64(aligned, sampling_ratio, shape, output_size, scale, channels_last):
    g = torch.Generator().manual_seed(sum(shape) + sampling_ratio)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    rois = make_rois(13, shape[0], shape[2], shape[3], scale, g)
    (out, ref), (grad, ref_grad), grad_magnitude = run_both(x, rois, output_size, scale, sampling_ratio, aligned)
    # The forward is torchvision's operations in its order (csrc/ops/roi_align/roi_align.h): bit for bit.
    # The gradient sums each input's contributions in another order (deterministic, per input element).
    assert torch.equal(out, ref)
    assert_sums_close(grad, ref_grad, grad_magnitude, torch.float64, SUM_UNITS)
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dtypes_against_float32_reference(dtype, channels_last):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 20, 20, generator=g).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    rois = make_rois(10, 2, 20, 20, 1.0, g, dtype=torch.float32).to(dtype)
    out = ops.roi_align(x, rois, 7, 1.0, 2, True)
    ref = torchvision.ops.roi_align(x.float(), rois.float(), 7, 1.0, 2, True)
    assert out.dtype == dtype
    # torchvision's float32 operations in its order, then (float16 / bfloat16) one rounding: bit for bit.
    assert torch.equal(out, ref.to(dtype))
    xi = x.detach().requires_grad_(True)
    ops.roi_align(xi, rois, 7, 1.0, 2, True).float().sum().backward()
    xr = x.detach().float().requires_grad_(True)
    torchvision.ops.roi_align(xr, rois.float(), 7, 1.0, 2, True).sum().backward()
    assert xi.grad.dtype == dtype
    # Accumulated in float32 in another order, then rounded once; the upstream gradient is all ones,
    # so xr.grad is also each element's sum of |terms|.
    assert_sums_close(xi.grad, xr.grad, xr.grad, dtype, SUM_UNITS)


def test_list_of_boxes_and_module():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 12, 12, generator=g)
    boxes = [torch.tensor([[1.0, 1, 8, 9], [0, 0, 12, 12]]), torch.tensor([[2.0, 3, 5, 11]])]
    ref = torchvision.ops.roi_align(x, boxes, (3, 4), 1.0, 2, True)
    assert torch.equal(ops.roi_align(x, boxes, (3, 4), 1.0, 2, True), ref)
    module = fnn.RoIAlign((3, 4), 1.0, 2, aligned=True)
    assert torch.equal(module(x, boxes), torchvision.ops.RoIAlign((3, 4), 1.0, 2, True)(x, boxes))


def test_empty_boxes():
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(7), requires_grad=True)
    out = ops.roi_align(x, torch.empty(0, 5), 2, 1.0, 2, True)
    assert out.shape == (0, 3, 2, 2)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert ops.roi_align(x, [torch.empty(0, 4)], 2).shape == (0, 3, 2, 2)


def test_gradcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.5, 0.7, 4.2, 5.9], [0, -1.0, 2.0, 3.0, 9.0]], dtype=torch.float64)
    for aligned in (False, True):
        assert torch.autograd.gradcheck(lambda t: ops.roi_align(t, rois, 3, 1.0, 2, aligned), (x,))


def test_backward_is_deterministic_for_any_thread_count():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, 30, 30, generator=g)
    rois = make_rois(200, 2, 30, 30, 1.0, g, dtype=torch.float32)
    before = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2, 3, 2):
            torch.set_num_threads(threads)
            xi = x.clone().requires_grad_(True)
            ops.roi_align(xi, rois, 7, 1.0, -1, True).sum().backward()
            grads.append(xi.grad)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(grads[0], gr) for gr in grads[1:])


def test_opcheck():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 9, 10, generator=g, requires_grad=True)
    rois = make_rois(5, 2, 9, 10, 1.0, g, dtype=torch.float32)
    torch.library.opcheck(torch.ops.fastcv.roi_align.default, (x, rois, 1.0, 3, 3, 2, True))
    grad = torch.randn(5, 3, 3, 3, generator=g)
    torch.library.opcheck(torch.ops.fastcv.roi_align_backward.default, (grad, rois, 1.0, 3, 3, 2, 3, 9, 10, 2, True))


def test_compile_fullgraph():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 16, 16, generator=g)
    rois = make_rois(6, 2, 16, 16, 1.0, g, dtype=torch.float32)

    def pool(x, rois):
        return ops.roi_align(x, rois, 5, 1.0, 2, True).relu().sum(dim=(2, 3))

    torch.testing.assert_close(torch.compile(pool, fullgraph=True, backend="aot_eager")(x, rois), pool(x, rois))


def bad_cases():
    x, rois = torch.randn(2, 3, 8, 8), torch.tensor([[0.0, 1, 1, 4, 4]])
    return [
        (lambda: ops.roi_align(x[0], rois, 2), ValueError, "input must be a Tensor\\[N, C, H, W\\]"),
        (lambda: ops.roi_align(x.long(), rois.long(), 2), TypeError, "input must be float32"),
        (lambda: ops.roi_align(x, rois[:, :4], 2), ValueError, "boxes must be a Tensor\\[K, 5\\]"),
        (lambda: ops.roi_align(x, [rois], 2), ValueError, "boxes\\[0\\] must be a Tensor\\[L, 4\\]"),
        (lambda: ops.roi_align(x, rois.double(), 2), TypeError, "boxes must have the dtype of input"),
        (lambda: ops.roi_align(x, rois.to("meta"), 2), ValueError, "boxes must be on the device of input"),
        (lambda: ops.roi_align(x, rois, 0), ValueError, "output_size must be positive"),
        (lambda: ops.roi_align(x, rois, (2, -1)), ValueError, "output_size must be positive"),
        (lambda: ops.roi_align(x, rois, 2, spatial_scale=0.0), ValueError, "spatial_scale must be a positive"),
        (lambda: ops.roi_align(x, rois, 2, spatial_scale=-1.0), ValueError, "spatial_scale must be a positive"),
        (lambda: ops.roi_align(x, torch.tensor([[2.0, 1, 1, 4, 4]]), 2), ValueError, "batch index\\) is 2.0+, outside \\[0, 2\\)"),
        (lambda: ops.roi_align(x, torch.tensor([[-1.0, 1, 1, 4, 4]]), 2), ValueError, "outside \\[0, 2\\)"),
        (lambda: ops.roi_align(x, torch.tensor([[math.nan, 1, 1, 4, 4]]), 2), ValueError, "batch index"),
        (lambda: ops.roi_align(x, torch.tensor([[0.0, 0, 0, math.inf, 4]]), 2), ValueError, "not finite or too large"),
        (lambda: ops.roi_align(x, rois, 2.5), TypeError, "output_size must be an int or a pair"),
    ]


@pytest.mark.parametrize("case", range(len(bad_cases())))
def test_bad_input(case):
    call, error, message = bad_cases()[case]
    with pytest.raises(error, match=message):
        call()


def test_nan_box_coordinates_with_fixed_sampling_give_zero_not_a_crash():
    x = torch.randn(1, 2, 8, 8)
    out = ops.roi_align(x, torch.tensor([[0.0, math.nan, 1, 4, 4]]), 2, sampling_ratio=2)
    assert torch.equal(out, torch.zeros_like(out))


# ---------------------------------------------------------------- multi_scale_roi_align


def pyramid(dtype=torch.float64, channels_last=False, seed=0, levels=4, channels=6):
    g = torch.Generator().manual_seed(seed)
    from collections import OrderedDict

    feats = OrderedDict()
    for i in range(levels):
        f = torch.randn(2, channels, 100 // 2**i, 136 // 2**i, generator=g, dtype=torch.float64).to(dtype)
        feats[f"p{i}"] = f.to(memory_format=torch.channels_last) if channels_last else f
    image_shapes = [(400, 544), (380, 500)]
    k = 120
    xy = torch.rand(k, 2, generator=g, dtype=torch.float64) * torch.tensor([500.0, 380.0], dtype=torch.float64)
    wh = torch.rand(k, 2, generator=g, dtype=torch.float64) ** 2 * 400 + 1  # every level gets boxes
    b = torch.cat([xy, xy + wh], 1).to(dtype)
    return feats, [b[:70], b[70:]], image_shapes


def run_multi_scale(module_cls, feats, boxes, image_shapes, upstream_seed=1, names=None):
    names = list(feats) if names is None else names
    module = module_cls(names, (7, 5), 2)
    inputs = {k: v.detach().clone().requires_grad_(True) for k, v in feats.items()}
    out = module(inputs, boxes, image_shapes)
    g = torch.Generator().manual_seed(upstream_seed)
    (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)).sum().backward()
    return out.detach(), [inputs[k].grad for k in names]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("levels", [1, 2, 4])
def test_multi_scale_matches_torchvision(channels_last, levels):
    feats, boxes, shapes = pyramid(channels_last=channels_last, levels=levels)
    out, grads = run_multi_scale(fnn.MultiScaleRoIAlign, feats, boxes, shapes)
    ref, ref_grads = run_multi_scale(torchvision.ops.MultiScaleRoIAlign, feats, boxes, shapes)
    assert torch.equal(out, ref)  # bit for bit, the gradients too
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("names", [["p0", "p2"], ["p0", "p3"], ["p1", "p3"], ["p0", "p1", "p3"], ["p0", "p2", "p3"],
                                   ["p2", "p0"], ["p3", "p1", "p0"]])
def test_multi_scale_non_consecutive_levels_match_torchvision(names, dtype):
    """Maps that skip levels (p0 and p2 of this pyramid are levels 2 and 4, as p2 and p4 of an FPN).
    torchvision's LevelMapper clamps each box's level to [k_min, k_max], the levels of the first and
    the last map, and pools the box from the map at position level - k_min: the list position, not the
    level. So boxes can come from a map of another level, and those whose position is past the last
    map get zeros (and give no gradient). The maps are taken in the dict's order, not featmap_names'."""
    feats, boxes, shapes = pyramid(dtype=dtype, seed=9)
    assert [f.shape[2] for f in feats.values()] == [100, 50, 25, 12]  # levels 2, 3, 4, 5 for 400-high images
    out, grads = run_multi_scale(fnn.MultiScaleRoIAlign, feats, boxes, shapes, names=names)
    ref, ref_grads = run_multi_scale(torchvision.ops.MultiScaleRoIAlign, feats, boxes, shapes, names=names)
    assert torch.equal(out, ref)  # bit for bit, the gradients too
    for name, g, r in zip(names, grads, ref_grads):
        assert (g is None) == (r is None), name
        assert g is None or torch.equal(g, r), name
    if names in (["p0", "p2"], ["p0", "p3"]):  # boxes of level 4 are past the last map: zeros, the others not
        empty = (ref.flatten(1) == 0).all(1)
        assert empty.any() and not empty.all()


def test_multi_scale_float32_and_degenerate_boxes():
    feats, boxes, shapes = pyramid(dtype=torch.float32, seed=3)
    boxes[0][:3] = torch.tensor([[50.0, 50, 40, 60], [10, 10, 10, 10], [0, 0, 2000, 2000]])  # inverted, empty, huge
    out, grads = run_multi_scale(fnn.MultiScaleRoIAlign, feats, boxes, shapes)
    ref, ref_grads = run_multi_scale(torchvision.ops.MultiScaleRoIAlign, feats, boxes, shapes)
    assert torch.equal(out, ref)  # bit for bit in float32 too
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)


def test_multi_scale_gradcheck_and_opcheck():
    feats, boxes, shapes = pyramid(levels=3, channels=2, seed=4)
    feats = [f[:, :, :12, :16].detach().clone().requires_grad_(True) for f in feats.values()]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i), dtype=torch.float64), b], 1)
                      for i, b in enumerate(boxes)])[:8] / 8
    scales = [0.25, 0.125, 0.0625]
    fn = lambda *f: ops.multi_scale_roi_align(list(f), rois, 2, 2, scales=scales, canonical_scale=8.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(feats))
    torch.library.opcheck(torch.ops.fastcv.multi_scale_roi_align.default,
                          (feats, rois, scales, 2, 2, 2, False, 8.0, 4))


def test_multi_scale_compile_fullgraph():
    feats, boxes, shapes = pyramid(dtype=torch.float32, levels=3, seed=5)
    features = list(feats.values())

    def pool(features, boxes):
        return ops.multi_scale_roi_align(features, boxes, 7, 2, scales=[0.25, 0.125, 0.0625]).mean(dim=(2, 3))

    compiled = torch.compile(pool, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(features, boxes), pool(features, boxes))


def test_multi_scale_bad_input():
    feats, boxes, shapes = pyramid(dtype=torch.float32, levels=2)
    f = list(feats.values())
    with pytest.raises(ValueError, match="one scale per feature map"):
        ops.multi_scale_roi_align(f, boxes, 7, scales=[0.25])
    with pytest.raises(ValueError, match="image_shapes must list"):
        ops.multi_scale_roi_align(f, boxes, 7)
    with pytest.raises(ValueError, match=r"features\[1\] must match features\[0\]"):
        ops.multi_scale_roi_align([f[0], f[1][:, :3]], boxes, 7, scales=[0.25, 0.125])


# ---------------------------------------------------------------- CUDA (run by bench/device_check.sh on a GPU)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("aligned,sampling_ratio", [(True, 2), (False, -1), (True, 0)])
def test_cuda_matches_cpu(dtype, channels_last, aligned, sampling_ratio):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 16, 25, 31, generator=g, dtype=torch.float64)
    rois = make_rois(40, 2, 25, 31, 0.5, g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x, rois = x.to(dtype).double(), rois.to(dtype).double()  # the reference sees the same rounded inputs
    outs, grads = [], []
    for device, dt in (("cpu", torch.float64), ("cuda", dtype)):
        xi = x.to(device=device, dtype=dt).detach().requires_grad_(True)
        out = ops.roi_align(xi, rois.to(device=device, dtype=dt), (7, 6), 0.5, sampling_ratio, aligned)
        out.float().sum().backward()
        outs.append(out.detach().double().cpu())
        grads.append(xi.grad.double().cpu())
    tol = TOL[dtype] if dtype != torch.float64 else 1e-10
    torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol)
    torch.testing.assert_close(grads[1], grads[0], rtol=tol, atol=tol)


@needs_cuda
@pytest.mark.parametrize("names", [None, ["p0", "p2"]])  # all four levels; two that skip one
def test_cuda_multi_scale_matches_torchvision(names):
    feats, boxes, shapes = pyramid(dtype=torch.float32, seed=8)
    cuda_feats = type(feats)((k, v.cuda()) for k, v in feats.items())
    out, grads = run_multi_scale(fnn.MultiScaleRoIAlign, cuda_feats, [b.cuda() for b in boxes], shapes, names=names)
    ref, ref_grads = run_multi_scale(torchvision.ops.MultiScaleRoIAlign, feats, boxes, shapes, names=names)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    for gr, r in zip(grads, ref_grads):
        assert (gr is None) == (r is None)
        if gr is not None:
            torch.testing.assert_close(gr.cpu(), r, rtol=1e-4, atol=1e-4)


@needs_cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_deterministic_backward(channels_last):
    # torch.use_deterministic_algorithms(True) selects the atomic-free backward: bit-identical across
    # runs, and equal to the atomic one within rounding; multi-level too.
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 32, 40, 52, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x = x.cuda()
    rois = make_rois(300, 2, 40, 52, 0.5, g, dtype=torch.float32).cuda()
    rois[:5, 1:] = rois[:5, [3, 4, 1, 2]]  # inverted boxes too

    def grad_of(deterministic):
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            xi = x.clone().requires_grad_(True)
            out = ops.roi_align(xi, rois, 7, 0.5, -1, True)
            out.backward(torch.linspace(-1, 1, out.numel(), device="cuda").reshape(out.shape))
            return xi.grad
        finally:
            torch.use_deterministic_algorithms(before)

    first, second, atomic = grad_of(True), grad_of(True), grad_of(False)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, atomic, rtol=1e-5, atol=1e-5)
    cpu = x.cpu().requires_grad_(True)
    out = ops.roi_align(cpu, rois.cpu(), 7, 0.5, -1, True)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    torch.testing.assert_close(first.cpu(), cpu.grad, rtol=1e-5, atol=1e-5)


def test_double_backward_raises():
    """No second derivative: a clear error, not silently zero second derivatives."""
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1.0, 6.0, 6.0]], dtype=torch.float64)
    (g,) = torch.autograd.grad(ops.roi_align(x, rois, 2).pow(2).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        g.sum().backward()
