"""The Triton batch norm (kernels/batch_norm.py): training and evaluation forward, with the fused
residual and ReLU, and the backward of both, against F.batch_norm and its autograd in float64 on the same
rounded inputs. Planar ([N, C, S] contiguous) and packed (channels_last) views, S == 1, absent weight and
bias, every dtype, several tilings, and a channel whose mean is 1e6 standard deviations from zero. On
the CPU through the interpreter (small shapes), on the GPU compiled."""
import pytest
import torch
import torch.nn.functional as F

from conftest import triton_device
from fastcv.kernels import batch_norm as triton_bn

SHAPES = {"3x5x7": (3, 5, 7), "2x4x33": (2, 4, 33), "s1": (5, 3, 1), "c70": (4, 70, 6)}
LAYOUTS = ["planar", "packed"]
# Largest error allowed, relative to max(1, the reference's largest magnitude) (see assert_matches).
#  - float16 / bfloat16: computed in float32 and rounded once, so within half an ulp (2**-11 and 2**-8
#    relative): twice that, one ulp, which also covers the interpreter's conversion to bfloat16 (by
#    truncation: up to an ulp). Measured under the interpreter: 3.0e-4 and 4.2e-3.
#  - float32 / float64: sums over at most a few hundred values per channel, in tiles and split merges:
#    a few eps * log2(n) relative to the terms. Measured under the interpreter: 5.5e-7 (5 float32 eps)
#    and 3.4e-16; the float32 bound is that of tests/test_batch_norm.py's longer sums, 4e-6 (34 eps).
TOLERANCES = {torch.float32: 4e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float64: 1e-13}
EPS = 1e-5


@pytest.fixture
def device():
    return triton_device()


def stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_layout(t, layout):
    """The [N, C, S] tensor in the planar (contiguous) or packed (channels innermost) layout."""
    return t.contiguous() if layout == "planar" else t.permute(0, 2, 1).contiguous().permute(0, 2, 1)


def make_inputs(shape, dtype, layout, device, seed=0, affine=True, residual=False, spread=(3.0, 2.0)):
    """x, weight, bias, residual and grad_y: [N, C, S] tensors in `dtype` and `layout`, per-channel ones
    in the statistics dtype. Each channel gets its own mean and scale."""
    g = torch.Generator().manual_seed(seed)
    n, c, s = shape
    scale = spread[0] * torch.rand(1, c, 1, generator=g, dtype=torch.float64) + 0.5
    mean = spread[1] * torch.randn(1, c, 1, generator=g, dtype=torch.float64)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + mean
    sd = stats_dtype(dtype)
    weight = torch.randn(c, generator=g, dtype=torch.float64).to(sd) if affine else None
    bias = torch.randn(c, generator=g, dtype=torch.float64).to(sd) if affine else None
    res = torch.randn(shape, generator=g, dtype=torch.float64) if residual else None
    grad_y = torch.randn(shape, generator=g, dtype=torch.float64)

    def prep(t):
        return None if t is None else to_layout(t.to(dtype), layout).to(device)

    return prep(x), (None if weight is None else weight.to(device)), (None if bias is None else bias.to(device)), \
        prep(res), prep(grad_y)


def eval_stats(c, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    sd = stats_dtype(dtype)
    mean = torch.randn(c, generator=g, dtype=torch.float64).to(sd).to(device)
    var = (torch.rand(c, generator=g, dtype=torch.float64) * 4 + 0.1).to(sd).to(device)
    return mean, var


def reference(x, weight, bias, residual, relu, training, grad_y, mean=None, var=None, eps=EPS, kernel_y=None):
    """float64 F.batch_norm [+ residual] [ReLU] on the same rounded values, its output and the gradients
    (x, residual, weight, bias) for grad_y; the batch statistics when training. With kernel_y (the
    kernel's output) the ReLU takes the kernel's mask (where kernel_y > 0): a pre-activation within
    rounding of zero may be masked either way, and one mask lets every gradient be compared;
    ref["dropped"] is then the largest pre-activation the kernel zeroed, for the caller to bound."""
    c = x.shape[1]
    xd = x.detach().cpu().double().requires_grad_()
    wd = (weight.cpu().double() if weight is not None else torch.ones(c, dtype=torch.float64)).requires_grad_()
    bd = (bias.cpu().double() if bias is not None else torch.zeros(c, dtype=torch.float64)).requires_grad_()
    rd = residual.cpu().double().requires_grad_() if residual is not None else None
    if training:
        out = F.batch_norm(xd, None, None, wd, bd, training=True, eps=eps)
    else:
        out = F.batch_norm(xd, mean.cpu().double(), var.cpu().double(), wd, bd, training=False, eps=eps)
    if rd is not None:
        out = out + rd
    if relu and kernel_y is not None:
        mask = (kernel_y.detach().cpu() > 0).double()
        dropped = (out.detach() * (1 - mask)).max().item() / max(1.0, out.detach().abs().max().item())
        out = out * mask
    elif relu:
        out = torch.relu(out)
    inputs = (xd, wd, bd) + ((rd,) if rd is not None else ())
    grads = torch.autograd.grad(out, inputs, grad_y.cpu().double())
    ref = {"y": out.detach(), "grad_x": grads[0], "grad_weight": grads[1], "grad_bias": grads[2]}
    if rd is not None:
        ref["grad_residual"] = grads[3]
    if relu and kernel_y is not None:
        ref["dropped"] = dropped
    xs = x.detach().cpu().double()
    ref["mean"] = xs.mean(dim=(0, 2))
    ref["var"] = xs.var(dim=(0, 2), unbiased=False)
    return ref


def assert_matches(actual, expected, tol, like=None):
    """Close to the float64 reference, the tolerance relative to the reference's magnitude; `like`: the
    tensor whose dtype and strides the result must have."""
    if like is not None:
        assert actual.dtype == like.dtype and actual.stride() == like.stride()
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual.cpu().double(), expected, rtol=tol, atol=tol * scale)


def run_forward(x, weight, bias, residual, relu, training, mean=None, var=None):
    """The launcher under test; returns y (in x's layout) and the statistics it normalised with."""
    y = torch.empty_like(x)
    assert y.stride() == x.stride()
    if training:
        c, sd = x.shape[1], stats_dtype(x.dtype)
        mean = torch.full((c,), float("nan"), dtype=sd, device=x.device)
        var = torch.full((c,), float("nan"), dtype=sd, device=x.device)
        triton_bn.forward_train(x, weight, bias, residual, relu, EPS, y, mean, var)
    else:
        triton_bn.forward_eval(x, mean, var, weight, bias, residual, relu, EPS, y)
    return y, mean, var


def run_backward(grad_y, x, y, mean, var, weight, training, want=("grad_x", "grad_weight", "grad_bias"),
                 residual=False):
    """The backward launcher with NaN-filled outputs for the wanted gradients (None for the rest)."""
    c, sd = x.shape[1], stats_dtype(x.dtype)
    out = {
        "grad_x": torch.full_like(x, float("nan")) if "grad_x" in want else None,
        "grad_residual": torch.full_like(x, float("nan")) if residual and "grad_residual" in want else None,
        "grad_weight": torch.full((c,), float("nan"), dtype=sd, device=x.device) if "grad_weight" in want else None,
        "grad_bias": torch.full((c,), float("nan"), dtype=sd, device=x.device) if "grad_bias" in want else None,
    }
    triton_bn.backward(grad_y, x, y, mean, var, weight, training, EPS, out["grad_x"], out["grad_residual"],
                       out["grad_weight"], out["grad_bias"])
    return {k: v for k, v in out.items() if v is not None}


def check_case(shape, dtype, layout, device, training, affine=True, residual=False, relu=False, seed=0):
    """Forward (training or evaluation), then backward with every gradient, against the reference."""
    tol = TOLERANCES[dtype]
    x, weight, bias, res, grad_y = make_inputs(shape, dtype, layout, device, seed, affine, residual)
    mean = var = None
    if not training:
        mean, var = eval_stats(shape[1], dtype, device)
    y, mean_used, var_used = run_forward(x, weight, bias, res, relu, training, mean, var)
    ref = reference(x, weight, bias, res, relu, training, grad_y, mean, var, kernel_y=y)
    mean, var = mean_used, var_used
    assert_matches(y, ref["y"], tol, like=x)
    assert ref.pop("dropped", 0.0) <= tol, "the fused ReLU zeroed a pre-activation beyond rounding"
    if training:
        assert_matches(mean, ref["mean"], tol)
        assert_matches(var, ref["var"], tol)
    want = ("grad_x", "grad_residual", "grad_weight", "grad_bias")
    grads = run_backward(grad_y, x, y if relu else None, mean, var, weight, training, want, residual)
    assert set(grads) == set(ref) - {"y", "mean", "var"}
    for name, value in grads.items():
        assert_matches(value, ref[name], tol, like=x if value.dim() == 3 else None)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(SHAPES))
def test_forward_train(device, name, layout):
    x, weight, bias, _, _ = make_inputs(SHAPES[name], torch.float32, layout, device)
    ref = reference(x, weight, bias, None, False, True, torch.zeros(SHAPES[name]))
    y, mean, var = run_forward(x, weight, bias, None, False, True)
    assert_matches(y, ref["y"], TOLERANCES[torch.float32], like=x)
    assert_matches(mean, ref["mean"], TOLERANCES[torch.float32])
    assert_matches(var, ref["var"], TOLERANCES[torch.float32])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(SHAPES))
def test_forward_eval(device, name, layout):
    x, weight, bias, _, _ = make_inputs(SHAPES[name], torch.float32, layout, device)
    mean, var = eval_stats(x.shape[1], torch.float32, device)
    ref = reference(x, weight, bias, None, False, False, torch.zeros(SHAPES[name]), mean, var)
    y, _, _ = run_forward(x, weight, bias, None, False, False, mean, var)
    assert_matches(y, ref["y"], TOLERANCES[torch.float32], like=x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["3x5x7", "s1", "c70"])
def test_backward(device, name, layout, training):
    check_case(SHAPES[name], torch.float32, layout, device, training)


# (affine, residual, relu): ResNet's relu(bn(x) + identity), its parts, and no affine parameters
FUSED = {
    "add_relu": (True, True, True),
    "relu": (True, False, True),
    "add": (True, True, False),
    "plain_add_relu": (False, True, True),
    "plain": (False, False, False),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", list(FUSED))
def test_fused(device, variant, training):
    affine, residual, relu = FUSED[variant]
    layout = "packed" if list(FUSED).index(variant) % 2 else "planar"
    check_case(SHAPES["2x4x33"], torch.float32, layout, device, training, affine, residual, relu, seed=2)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_dtypes(device, dtype, layout):
    check_case(SHAPES["3x5x7"], dtype, layout, device, True, residual=True, relu=True, seed=3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_dtypes_eval(device, dtype):
    check_case(SHAPES["2x4x33"], dtype, "packed", device, False, residual=True, relu=True, seed=4)


@pytest.mark.parametrize("tiling", [(16, 64), (16, 1), (4096, 1000)], ids=["tiny_many_splits", "tiny_one_split",
                                                                             "one_tile"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tilings(device, monkeypatch, tiling, layout):
    # Other tile sizes and split counts than the interpreter's default: many splits per channel (the
    # merges then take several chunks), many tiles per program, or one tile for everything.
    monkeypatch.setattr(triton_bn, "_tuning", lambda device, dtype: tiling)
    check_case((4, 6, 9), torch.float32, layout, device, True, residual=True, relu=True, seed=5)


@pytest.mark.parametrize("tiling", [None, (16, 64)], ids=["default", "tiny_tiles"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_extreme_statistics(device, monkeypatch, layout, tiling):
    # Channel 1 has mean 1e4 and standard deviation 1e-2 in float32: the values' rounding step (~1e-3)
    # is a tenth of the deviation, and E[x^2] - E[x]^2 would lose every digit. The variance must match
    # the float64 variance of the same rounded values as closely as any other float32 sum (measured:
    # 7e-7 relative with the tiny tiles), the mean to 8 eps (measured: 7.6e-8).
    if tiling is not None:
        monkeypatch.setattr(triton_bn, "_tuning", lambda device, dtype: tiling)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 33, generator=g, dtype=torch.float64)
    x[:, 1] = 1e4 + 1e-2 * x[:, 1]
    x[:, 2] = -3e3 + 5e-2 * x[:, 2]
    x = to_layout(x.float(), layout).to(device)
    y, mean, var = run_forward(x, None, None, None, False, True)
    xs = x.cpu().double()
    ref_mean, ref_var = xs.mean(dim=(0, 2)), xs.var(dim=(0, 2), unbiased=False)
    assert ref_var[1].sqrt().item() == pytest.approx(1e-2, rel=0.3)
    rel_var = ((var.cpu().double() - ref_var) / ref_var).abs()
    assert rel_var.max().item() < TOLERANCES[torch.float32], rel_var
    rel_mean = ((mean.cpu().double() - ref_mean) / ref_mean.abs().clamp(min=1)).abs()
    assert rel_mean.max().item() < 1e-6, rel_mean


def test_channels_last_4d(device):
    # A channels_last [N, C, H, W] tensor viewed as [N, C, H*W] is the packed layout.
    g = torch.Generator().manual_seed(7)
    x4 = (torch.randn(2, 6, 3, 5, generator=g) * 2 + 1).to(device=device, memory_format=torch.channels_last)
    x = x4.view(2, 6, 15)
    assert x.stride() == (90, 1, 6)
    weight, bias = torch.randn(6, generator=g).to(device), torch.randn(6, generator=g).to(device)
    grad_y = torch.randn(2, 6, 3, 5, generator=g).to(device=device, memory_format=torch.channels_last).view(2, 6, 15)
    ref = reference(x, weight, bias, None, False, True, grad_y)
    y, mean, var = run_forward(x, weight, bias, None, False, True)
    assert_matches(y, ref["y"], TOLERANCES[torch.float32], like=x)
    grads = run_backward(grad_y, x, None, mean, var, weight, True)
    for name, value in grads.items():
        assert_matches(value, ref[name], TOLERANCES[torch.float32])


@pytest.mark.parametrize("training,want", [
    (False, ("grad_bias",)),  # evaluation: the reduction alone
    (False, ("grad_residual",)),  # evaluation: the elementwise pass alone, without the reduction
    (True, ("grad_x",)),  # training: the sums feed grad_x though neither parameter gradient is wanted
    (True, ("grad_weight", "grad_residual")),
])
def test_backward_partial_outputs(device, training, want):
    shape = SHAPES["3x5x7"]
    x, weight, bias, res, grad_y = make_inputs(shape, torch.float32, "packed", device, seed=8, residual=True)
    mean = var = None
    if not training:
        mean, var = eval_stats(shape[1], torch.float32, device)
    y, mean_used, var_used = run_forward(x, weight, bias, res, True, training, mean, var)
    ref = reference(x, weight, bias, res, True, training, grad_y, mean, var, kernel_y=y)
    assert ref["dropped"] <= TOLERANCES[torch.float32]
    grads = run_backward(grad_y, x, y, mean_used, var_used, weight, training, want, residual=True)
    assert set(grads) == set(want)
    for name, value in grads.items():
        assert_matches(value, ref[name], TOLERANCES[torch.float32])


def test_rejects_other_layouts(device):
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(9)).to(device)
    mean, var = eval_stats(3, torch.float32, device)
    with pytest.raises(ValueError, match="input"):  # neither planar nor packed
        triton_bn.forward_eval(x.transpose(0, 2).contiguous().transpose(0, 2), mean, var, None, None, None, False,
                               EPS, torch.empty_like(x))
    with pytest.raises(ValueError, match="output"):  # packed output for a planar input
        triton_bn.forward_eval(x, mean, var, None, None, None, False, EPS, to_layout(torch.empty_like(x), "packed"))
    with pytest.raises(ValueError, match="mean"):  # float64 statistics for a float32 input
        triton_bn.forward_eval(x, mean.double(), var, None, None, None, False, EPS, torch.empty_like(x))
