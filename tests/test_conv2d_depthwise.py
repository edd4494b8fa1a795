"""Depthwise convolution (groups == in_channels): fastcv.ops.conv2d and its autograd against
F.conv2d in float64 on the same (rounded) values. On the CPU these run the direct kernels of
csrc/ops/conv2d/depthwise_cpu.cpp, on a GPU with a CUDA build those of depthwise_cuda.cu."""
import pytest
import torch
import torch.nn.functional as F

from fastcv import ops
from helpers import assert_sums_close, conv2d_reference

# Every test runs under each CPU instruction set this machine supports (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_isa")

# (N, C, H, W, multiplier, kernel, stride, padding, dilation)
CASES = {
    "3x3": (2, 5, 9, 11, 1, (3, 3), (1, 1), (1, 1), (1, 1)),
    "3x3_s2_x2": (2, 4, 11, 10, 2, (3, 3), (2, 2), (1, 1), (1, 1)),
    "5x5_p2": (1, 3, 13, 12, 1, (5, 5), (1, 1), (2, 2), (1, 1)),
    "5x5_s2_p0": (2, 3, 15, 14, 1, (5, 5), (2, 2), (0, 0), (1, 1)),
    "1x7": (2, 4, 7, 19, 1, (1, 7), (1, 1), (0, 3), (1, 1)),
    "stride_gt_kernel": (1, 3, 14, 13, 2, (3, 3), (4, 4), (1, 0), (1, 1)),
    "dilation2": (2, 4, 12, 13, 1, (3, 3), (1, 1), (2, 2), (2, 2)),
    "s2_d2_x2": (1, 3, 15, 16, 2, (3, 3), (2, 1), (2, 1), (2, 2)),
    "asymmetric": (1, 6, 10, 9, 1, (3, 5), (1, 2), (0, 2), (1, 1)),
    # wider than the vector width in channels and columns (vector, remainder and border paths)
    "wide_3x3": (1, 40, 19, 70, 1, (3, 3), (1, 1), (1, 1), (1, 1)),
    "wide_s2": (1, 36, 21, 67, 1, (3, 3), (2, 2), (1, 1), (1, 1)),
    "wide_7x7": (1, 17, 23, 41, 1, (7, 7), (1, 1), (3, 3), (1, 1)),
    "batch1_5x5": (1, 20, 18, 37, 1, (5, 5), (1, 1), (2, 2), (1, 1)),
    "tall_narrow": (2, 16, 97, 6, 1, (3, 3), (1, 1), (2, 2), (1, 1)),  # mostly border columns
}

# How many unit roundoffs u of the compute dtype (float32, or float64 for float64 inputs) each result
# may be off, relative to the sum of its terms' absolute values (helpers.assert_sums_close), on top of
# the final rounding of float16 / bfloat16 results. Measured on the CPU over these tests: 4.9 u at most
# (float32; float64 3.3 u, float16 / bfloat16 0.3 u beyond their rounding), so a margin of 3.
SUM_UNITS = 16


def make(case, dtype, channels_last, device="cpu", seed=0):
    """Inputs in `dtype` on `device` and float64 references (output, input / weight / bias gradients)
    computed on the CPU from the same rounded values, each with its sums of |terms|."""
    n, c, h, w, mult, kernel, stride, padding, dilation = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    weight = torch.randn(c * mult, 1, *kernel, generator=g).to(dtype)
    bias = torch.randn(c * mult, generator=g).to(dtype)
    y = F.conv2d(x.double(), weight.double(), bias.double(), stride, padding, dilation, c)
    grad_out = torch.randn(y.shape, generator=g).to(dtype)
    refs = conv2d_reference(x, weight, bias, grad_out, stride=stride, padding=padding, dilation=dilation, groups=c)
    if channels_last:
        x, grad_out = x.to(memory_format=torch.channels_last), grad_out.to(memory_format=torch.channels_last)
    x, weight, bias, grad_out = (t.to(device) for t in (x, weight, bias, grad_out))
    return x, weight, bias, grad_out, (stride, padding, dilation, c), refs


def run(x, weight, bias, grad_out, args):
    """fastcv's output and its input, weight and bias gradients through autograd."""
    x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
    y = ops.conv2d(x, weight, bias, *args)
    return (y.detach(), *torch.autograd.grad(y, (x, weight, bias), grad_out))


def assert_close(actual, expected, magnitude, dtype):
    assert actual.dtype == dtype
    assert_sums_close(actual, expected, magnitude, dtype, SUM_UNITS)


def channels_last(t):
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_conv2d(device, name, dtype, layout):
    x, weight, bias, grad_out, args, refs = make(CASES[name], dtype, layout == "nhwc", device)
    results = run(x, weight, bias, grad_out, args)
    for actual, expected, magnitude in zip(results, *refs):
        assert_close(actual, expected, magnitude, dtype)
    y, grad_x = results[:2]
    # The output and the input gradient keep the input's layout (H = W = 1 aside, both count as either).
    assert channels_last(y) == (layout == "nhwc") or y.is_contiguous()
    assert channels_last(grad_x) == (layout == "nhwc")
    assert results[2].is_contiguous()


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("name", ["3x3_s2_x2", "5x5_p2", "wide_3x3", "1x7"])
def test_reduced_precision(device, name, dtype, layout):
    """float16 / bfloat16 accumulate in float32 and round once: within a rounding or two of the exact
    result for the rounded inputs."""
    x, weight, bias, grad_out, args, refs = make(CASES[name], dtype, layout == "nhwc", device, seed=1)
    for actual, expected, magnitude in zip(run(x, weight, bias, grad_out, args), *refs):
        assert_close(actual, expected, magnitude, dtype)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_gradcheck(layout):
    x, weight, bias, _, args, _ = make((2, 3, 7, 8, 2, (3, 3), (2, 1), (1, 2), (1, 1)), torch.float64,
                                       layout == "nhwc")
    inputs = tuple(t.detach().requires_grad_() for t in (x, weight, bias))
    fn = lambda x, w, b: ops.conv2d(x, w, b, *args)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["f32", "f64", "f16", "bf16"])
@pytest.mark.parametrize("name", ["3x3", "3x3_s2_x2", "wide_s2", "wide_7x7", "stride_gt_kernel", "dilation2",
                                  "tall_narrow"])
def test_layouts_agree_bit_for_bit(name, dtype):
    """Every output pixel and input-gradient element sums its terms in the same order whichever path
    computes it (NCHW vector rows and columns, NHWC vector pixels, or the per-pixel functions of
    depthwise.h that CUDA uses everywhere and the CPU at the NCHW borders in float16 / bfloat16 and for
    the input gradient), so the two layouts give identical bits."""
    x, weight, bias, grad_out, args, _ = make(CASES[name], dtype, False, seed=2)
    nchw = run(x, weight, bias, grad_out, args)
    cl = torch.channels_last
    nhwc = run(x.contiguous(memory_format=cl), weight, bias, grad_out.contiguous(memory_format=cl), args)
    assert torch.equal(nchw[0], nhwc[0])
    assert torch.equal(nchw[1], nhwc[1])


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_weight_grad_same_bits_for_any_thread_count(layout):
    x, _, _, grad_out, args, refs = make((4, 24, 21, 23, 1, (3, 3), (1, 1), (1, 1), (1, 1)), torch.float32,
                                         layout == "nhwc", seed=3)
    before = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            grads.append(torch.ops.fastcv.conv2d_weight_grad(grad_out, x, [24, 1, 3, 3], *args))
    finally:
        torch.set_num_threads(before)
    assert_close(grads[0], refs[0][2], refs[1][2], torch.float32)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


def test_same_bits_every_run(device):
    x, weight, bias, grad_out, args, _ = make(CASES["wide_s2"], torch.float32, True, device, seed=4)
    first, again = run(x, weight, bias, grad_out, args), run(x, weight, bias, grad_out, args)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_empty_batch(device, layout):
    x, weight, bias, grad_out, args, _ = make(CASES["3x3_s2_x2"], torch.float32, layout == "nhwc", device)
    y, grad_x, grad_w, grad_b = run(x[:0], weight, bias, grad_out[:0], args)
    assert y.shape == (0, 8, 6, 5) and grad_x.shape == (0, 4, 11, 10)
    assert torch.equal(grad_w.cpu(), torch.zeros(weight.shape)) and torch.equal(grad_b.cpu(), torch.zeros(8))


def test_weight_with_any_strides(device):
    """A permuted weight (neither contiguous layout) is read through its strides."""
    x, weight, bias, grad_out, args, refs = make(CASES["5x5_p2"], torch.float64, False, device, seed=5)
    strided = weight.permute(3, 2, 0, 1).contiguous().permute(2, 3, 1, 0)
    assert not strided.is_contiguous() and torch.equal(strided, weight)
    for actual, expected, magnitude in zip(run(x, strided, bias, grad_out, args), *refs):
        assert_close(actual, expected, magnitude, torch.float64)


def test_opcheck():
    x, weight, bias, grad_out, args, _ = make(CASES["3x3_s2_x2"], torch.float32, True, seed=6)
    stride, padding, dilation, groups = (list(a) if isinstance(a, tuple) else a for a in args)
    rest = (stride, padding, dilation, groups)
    x, weight = x.requires_grad_(), weight.requires_grad_()
    torch.library.opcheck(torch.ops.fastcv.conv2d.default, (x, weight, bias, *rest))
    torch.library.opcheck(torch.ops.fastcv.conv2d_input_grad.default, (grad_out, weight, [11, 10], *rest))
    torch.library.opcheck(torch.ops.fastcv.conv2d_weight_grad.default, (grad_out, x, [8, 1, 3, 3], *rest))
