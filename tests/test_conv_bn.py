"""fastcv.ops.conv2d_batch_norm (conv -> batch norm [-> + residual] [-> relu], the statistics of channels_last
outputs taken from the convolution's tiles) against F.conv2d -> F.batch_norm -> add -> relu."""
import pytest
import torch
import torch.nn.functional as F

import fastcv
from fastcv import _C, ops
from fastcv.ops import conv_bn
from fastcv.ops.conv import Conv2dGeometry
from helpers import assert_same_for_thread_counts

# Every test runs under each CPU instruction set this machine supports (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_isa")


@pytest.fixture(autouse=True)
def tile_statistics_at_every_size(monkeypatch):
    """conv2d_batch_norm takes the tiles' statistics on large outputs only: here on every channels_last one
    (planar layouts still take batch norm's, and test_the_size_threshold checks the default)."""
    monkeypatch.setattr(conv_bn, "TILE_STATS_BYTES", 0)

# N, C, H, W, Cout, kernel, stride, padding, groups
SHAPES = [
    (2, 8, 9, 11, 16, 3, 1, 1, 1),
    (3, 16, 14, 14, 40, 1, 1, 0, 1),  # 1x1; 40 channels: not a multiple of the tile
    (2, 16, 15, 13, 32, 3, 2, 1, 1),  # strided
    (2, 8, 10, 10, 16, 3, 1, 1, 2),  # grouped
    (2, 8, 10, 10, 16, 3, 1, 1, 8),  # depthwise (its own kernel; batch norm's statistics pass)
    (1, 3, 23, 23, 16, 7, 2, 3, 1),  # the stem, one image
    (5, 8, 30, 30, 24, 3, 1, 1, 1),  # several pixel blocks an image
]


def _inputs(shape, dtype, channels_last, seed=0):
    n, c, h, w, cout, k, s, p, groups = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(cout, c // groups, k, k, generator=g, dtype=torch.float64) / k
    bias, gamma, beta = (torch.randn(cout, generator=g, dtype=torch.float64) for _ in range(3))
    size = [(d + 2 * p - k) // s + 1 for d in (h, w)]
    residual = torch.randn(n, cout, *size, generator=g, dtype=torch.float64)
    if channels_last:
        x, residual = x.to(memory_format=torch.channels_last), residual.to(memory_format=torch.channels_last)
    tensors = [t.to(dtype) for t in (x, weight, bias, residual)]
    params = [t.to(torch.float64 if dtype == torch.float64 else torch.float32) for t in (gamma, beta)]
    return tensors, params, dict(stride=s, padding=p, groups=groups)


def _reference(x, weight, bias, gamma, beta, residual, relu, running, kw, training=True, momentum=0.1):
    y = F.conv2d(x, weight, bias, kw["stride"], kw["padding"], 1, kw["groups"])
    z = F.batch_norm(y, *running, gamma, beta, training, momentum, 1e-5)
    if residual is not None:
        z = z + residual
    return torch.relu(z) if relu else z


def _run_both(shape, dtype, channels_last, relu, with_residual):
    """(ours, reference): output, running mean and var, and the gradients of every input, for one backward of
    the same upstream gradient; the reference in float64 from the same (rounded) values."""
    (x, weight, bias, residual), (gamma, beta), kw = _inputs(shape, dtype, channels_last)
    residual = residual if with_residual else None
    results = []
    for ours in (True, False):
        cast = (lambda t: t) if ours else (lambda t: t.double())
        leaves = [cast(t).detach().requires_grad_() for t in (x, weight, bias, gamma, beta)]
        res = None if residual is None else cast(residual).detach().requires_grad_()
        running = [cast(torch.linspace(-1, 1, weight.shape[0], dtype=gamma.dtype)),
                   cast(torch.linspace(0.5, 2, weight.shape[0], dtype=gamma.dtype))]
        if ours:
            xl, wl, bl, gl, bel = leaves
            out = ops.conv2d_batch_norm(xl, wl, bl, *running, gl, bel, True, 0.1, 1e-5, kw["stride"], kw["padding"],
                                        1, kw["groups"], residual=res, relu=relu)
        else:
            out = _reference(*leaves[:3], *leaves[3:], res, relu, running, kw)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        out.backward(upstream.to(out.dtype))
        grads = [t.grad for t in leaves] + ([res.grad] if res is not None else [])
        results.append((out, *running, *grads))
    return results


def _assert_close(ours, ref, dtype, what, scale=None):
    """float64: the kernels' sums carry about K u of their terms' magnitudes (K <= 9 * 16 terms here), and
    normalising divides by standard deviations near 1: 1e-10 of the largest value (or of `scale`, the terms'
    size) leaves a margin of 10^3 and still catches a statistic off by one value. float32 / bfloat16: the same
    argument with their u (and bfloat16's rounding of the convolution's output, 2^-8, before it is
    normalised)."""
    if scale is None:
        scale = ref.abs().max().item() if ref.numel() else 1.0
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype] * max(scale, 1.0)
    torch.testing.assert_close(ours.double(), ref.double(), rtol=0, atol=tol, msg=lambda m: f"{what}: {m}")


NAMES = ["output", "running_mean", "running_var", "grad input", "grad weight", "grad bias", "grad bn_weight",
         "grad bn_bias", "grad residual"]


def _assert_all_close(ours, ref, dtype, names=NAMES):
    """The convolution's bias gradient is zero in exact arithmetic (batch norm removes the mean), a sum of
    terms the size of the batch norm bias gradient's: its error is measured against those."""
    for a, b, what in zip(ours, ref, names):
        scale = ref[NAMES.index("grad bn_bias")].abs().max().item() if what == "grad bias" else None
        _assert_close(a, b, dtype, what, scale)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu,with_residual", [(False, False), (True, False), (True, True)])
def test_matches_the_unfused_sequence_float64(shape, channels_last, relu, with_residual):
    ours, ref = _run_both(shape, torch.float64, channels_last, relu, with_residual)
    _assert_all_close(ours, ref, torch.float64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert ours[0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[4], SHAPES[6]])
def test_matches_the_unfused_sequence_reduced_precision(shape, dtype, channels_last):
    ours, ref = _run_both(shape, dtype, channels_last, True, True)
    assert ours[0].dtype == dtype
    # bfloat16: the forward (output and running statistics); its gradients are the separate ops' own
    _assert_all_close(ours if dtype == torch.float32 else ours[:3], ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_tile_statistics_are_the_outputs(dtype):
    """The channels_last kernels' statistics, read straight from the binding, against the output they stored
    (the stored values, rounded to dtype, are what a batch norm would read)."""
    (x, weight, bias, _), _, kw = _inputs((3, 16, 12, 13, 40, 3, 1, 1, 1), dtype, True, seed=2)
    g = Conv2dGeometry(3, 16, 12, 13, 40, 1, 3, 3, 1, 1, 1, 1, 1, 1, 12, 13)
    out = torch.empty(3, 40, 12, 13, dtype=dtype).to(memory_format=torch.channels_last)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    mean, var = torch.empty(40, dtype=stats), torch.empty(40, dtype=stats)
    _C.conv2d_forward_cpu(x, weight, bias, None, False, out, g, torch.get_num_threads(), mean, var)
    torch.testing.assert_close(out, F.conv2d(x.double(), weight.double(), bias.double(), padding=1).to(dtype),
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    ref_var, ref_mean = torch.var_mean(out.double(), dim=(0, 2, 3), correction=0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5  # two-pass moments in the compute type, merged in double
    torch.testing.assert_close(mean.double(), ref_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(var.double(), ref_var, rtol=tol, atol=tol)


def test_tile_statistics_of_an_empty_output_are_nan():
    x, w = torch.randn(0, 4, 6, 6).to(memory_format=torch.channels_last), torch.randn(8, 4, 3, 3)
    g = Conv2dGeometry(0, 4, 6, 6, 8, 1, 3, 3, 1, 1, 1, 1, 1, 1, 6, 6)
    mean, var = torch.zeros(8), torch.zeros(8)
    _C.conv2d_forward_cpu(x, w, None, None, False, torch.empty(0, 8, 6, 6).to(memory_format=torch.channels_last),
                          g, 1, mean, var)
    assert mean.isnan().all() and var.isnan().all()


def test_tile_statistics_are_only_for_channels_last_gemm_outputs():
    x, w = torch.randn(2, 4, 6, 6), torch.randn(8, 4, 3, 3)
    g = Conv2dGeometry(2, 4, 6, 6, 8, 1, 3, 3, 1, 1, 1, 1, 1, 1, 6, 6)
    mean, var = torch.empty(8), torch.empty(8)
    with pytest.raises(ValueError, match="channels_last GEMM"):
        _C.conv2d_forward_cpu(x, w, None, None, False, torch.empty(2, 8, 6, 6), g, 1, mean, var)
    out = torch.empty(2, 8, 6, 6).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="var"):
        _C.conv2d_forward_cpu(x.to(memory_format=torch.channels_last), w, None, None, False, out, g, 1, mean,
                              torch.empty(8, dtype=torch.float64))


@pytest.mark.parametrize("channels_last", [False, True])
def test_results_do_not_depend_on_the_thread_count(channels_last):
    """The tile statistics' pixel blocks are cut the same way for any thread count and merge in a fixed
    order: bit-identical outputs, statistics and gradients."""
    (x, weight, bias, residual), (gamma, beta), kw = _inputs((3, 24, 15, 13, 40, 3, 1, 1, 1), torch.float32,
                                                             channels_last, seed=3)

    def run():
        xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
        rm, rv = torch.zeros(40), torch.ones(40)
        out = ops.conv2d_batch_norm(xr, wr, bias, rm, rv, gamma, beta, True, padding=1, residual=residual, relu=True)
        out.backward(torch.ones_like(out))
        return out, rm, rv, xr.grad, wr.grad

    assert_same_for_thread_counts(run)


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck(channels_last):
    (x, weight, bias, residual), (gamma, beta), kw = _inputs((2, 4, 5, 6, 6, 3, 1, 1, 2), torch.float64,
                                                             channels_last, seed=4)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias, gamma, beta, residual))

    def f(x, w, b, g, be, r):
        return ops.conv2d_batch_norm(x, w, b, None, None, g, be, True, padding=1, groups=2, residual=r, relu=True)

    assert torch.autograd.gradcheck(f, inputs)


def test_opcheck():
    """conv2d_bn_stats, and batch_norm_train given those statistics (what conv2d_batch_norm chains)."""
    for channels_last, dtype in ((False, torch.float64), (True, torch.float64), (True, torch.float32)):
        (x, weight, bias, residual), (gamma, beta), _ = _inputs((2, 4, 6, 5, 6, 3, 1, 1, 1), dtype, channels_last,
                                                                seed=5)
        args = ([1, 1], [1, 1], [1, 1], 1)
        torch.library.opcheck(torch.ops.fastcv.conv2d_bn_stats,
                              tuple(t.requires_grad_() for t in (x, weight, bias)) + args)
        y, mean, var = torch.ops.fastcv.conv2d_bn_stats(x.detach(), weight.detach(), bias.detach(), *args)
        torch.library.opcheck(torch.ops.fastcv.batch_norm_train,
                              (y.requires_grad_(), gamma.requires_grad_(), beta, residual, True, 1e-5, mean, var))


def test_statistics_of_every_backend_and_layout():
    """conv2d_bn_stats returns its output's statistics whichever way they are computed (tiles, or a pass after
    for planar and depthwise layers)."""
    for shape, channels_last in ((SHAPES[0], False), (SHAPES[0], True), (SHAPES[4], True)):
        (x, weight, bias, _), _, kw = _inputs(shape, torch.float64, channels_last, seed=9)
        out, mean, var = torch.ops.fastcv.conv2d_bn_stats(x, weight, bias, [kw["stride"]] * 2, [kw["padding"]] * 2,
                                                          [1, 1], kw["groups"])
        ref_var, ref_mean = torch.var_mean(out, dim=(0, 2, 3), correction=0)
        torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var, ref_var, rtol=1e-12, atol=1e-12)


def test_torch_compile_matches_eager():
    (x, weight, _, _), (gamma, beta), _ = _inputs((2, 4, 8, 8, 6, 3, 1, 1, 1), torch.float32, True, seed=6)
    stats = [[torch.zeros(6), torch.ones(6)] for _ in range(2)]

    def f(x, rm, rv):
        return ops.conv2d_batch_norm(x, weight, None, rm, rv, gamma, beta, True, padding=1, relu=True)

    compiled = torch.compile(f, fullgraph=True)(x, *stats[0])
    torch.testing.assert_close(compiled, f(x, *stats[1]))
    torch.testing.assert_close(stats[0], stats[1])


def test_evaluation_mode_and_cumulative_momentum():
    (x, weight, bias, _), (gamma, beta), kw = _inputs((2, 4, 7, 7, 6, 3, 1, 1, 1), torch.float64, True, seed=7)
    rm, rv = torch.linspace(-1, 1, 6, dtype=torch.float64), torch.linspace(0.5, 2, 6, dtype=torch.float64)
    out = ops.conv2d_batch_norm(x, weight, bias, rm, rv, gamma, beta, False, padding=1)
    torch.testing.assert_close(out, _reference(x, weight, bias, gamma, beta, None, False, (rm, rv), kw, False))
    # momentum=None: nn.BatchNorm's cumulative average, counting batches in num_batches_tracked
    mine, theirs = (torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)), \
        (torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64))
    counter = torch.tensor(1)
    for _ in range(2):
        ops.conv2d_batch_norm(x, weight, bias, *mine, gamma, beta, True, None, padding=1,
                              num_batches_tracked=counter)
    _reference(x, weight, bias, gamma, beta, None, False, theirs, kw, True, momentum=1 / 2)
    _reference(x, weight, bias, gamma, beta, None, False, theirs, kw, True, momentum=1 / 3)
    assert counter.item() == 3
    torch.testing.assert_close(mine, theirs)


def test_empty_batch_leaves_the_running_statistics():
    rm, rv = torch.zeros(6), torch.ones(6)
    out = ops.conv2d_batch_norm(torch.randn(0, 4, 8, 8).to(memory_format=torch.channels_last),
                                torch.randn(6, 4, 3, 3), None, rm, rv, training=True, padding=1)
    assert out.shape == (0, 6, 8, 8)
    assert torch.equal(rm, torch.zeros(6)) and torch.equal(rv, torch.ones(6))


def test_autocast_runs_the_convolution_in_the_autocast_dtype():
    (x, weight, _, _), (gamma, beta), _ = _inputs((2, 4, 8, 8, 6, 3, 1, 1, 1), torch.float32, True, seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = ops.conv2d_batch_norm(x, weight, None, None, None, gamma, beta, True, padding=1)
        theirs = F.batch_norm(F.conv2d(x, weight, None, padding=1), None, None, gamma, beta, True)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("case", ["bn_weight", "residual", "running", "one value", "eps"])
def test_bad_input_raises_without_updating(case):
    x, w = torch.randn(2, 4, 6, 6), torch.randn(8, 4, 3, 3)
    rm, rv = torch.zeros(8), torch.ones(8)
    kwargs = dict(running_mean=rm, running_var=rv, bn_weight=None, training=True, padding=1)
    match = {"bn_weight": r"bn_weight must be a Tensor\[8\]", "residual": "residual must have the shape of the convolution's output", "running": "both be given",
             "one value": "more than 1 value per channel", "eps": "eps"}[case]
    if case == "bn_weight":
        kwargs["bn_weight"] = torch.ones(4)
    elif case == "residual":
        kwargs["residual"] = torch.randn(2, 8, 5, 5)
    elif case == "running":
        kwargs["running_var"] = None
    elif case == "one value":
        x = torch.randn(1, 4, 3, 3)
        kwargs["padding"] = 0
    else:
        kwargs["eps"] = 0.0
    with pytest.raises(ValueError, match=match):
        ops.conv2d_batch_norm(x, w, None, **kwargs)
    assert torch.equal(rm, torch.zeros(8)) and torch.equal(rv, torch.ones(8))


def test_converted_resnet_block_trains_through_the_fused_op(monkeypatch):
    """fastcv.convert's training-mode chains and fastcv.models' blocks call conv2d_batch_norm."""
    import torchvision

    calls = []
    original = ops.conv2d_batch_norm
    monkeypatch.setattr(ops, "conv2d_batch_norm", lambda *a, **k: calls.append(1) or original(*a, **k))
    block = torchvision.models.resnet.Bottleneck(16, 4).train()
    converted = fastcv.convert(block, fuse=True)
    x = torch.randn(2, 16, 8, 8).to(memory_format=torch.channels_last)
    out = converted(x)
    assert len(calls) == 3
    torch.testing.assert_close(out, block(x), rtol=1e-4, atol=1e-4)


def test_the_size_threshold(monkeypatch):
    """By default only outputs of TILE_STATS_BYTES or more take the tiles' statistics."""
    calls = []
    original = conv_bn.OPS.conv2d_bn_stats
    monkeypatch.setattr(conv_bn.OPS, "conv2d_bn_stats", lambda *a: calls.append(a) or original(*a))
    x, w = torch.randn(2, 4, 16, 16).to(memory_format=torch.channels_last), torch.randn(8, 4, 3, 3)
    for threshold, expected in ((2 * 8 * 16 * 16 * 4 + 1, 0), (2 * 8 * 16 * 16 * 4, 1)):
        monkeypatch.setattr(conv_bn, "TILE_STATS_BYTES", threshold)
        ops.conv2d_batch_norm(x, w, None, None, None, training=True, padding=1)
        assert len(calls) == expected
