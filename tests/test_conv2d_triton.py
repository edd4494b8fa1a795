"""The Triton implicit-GEMM convolution (kernels/conv2d.py): forward with its fused epilogue, input
gradient and weight gradient against F.conv2d and its autograd in float64 on the CPU. On the CPU through
the interpreter (small shapes), on the GPU compiled."""
import pytest
import torch
import torch.nn.functional as F

from conftest import triton_device
from helpers import assert_sums_close, conv2d_reference
from fastcv.kernels import conv2d as triton_conv
from fastcv.ops._args import memory_format


@pytest.fixture
def device():
    return triton_device()


@pytest.fixture(autouse=True)
def ieee_float32(monkeypatch):
    # TF32 is PyTorch's default for cuDNN convolutions, so the kernel would use it on a GPU too; the
    # float32 tolerances here are for full precision. (The interpreter computes in float32 either way.)
    # The switch itself is tested below; monkeypatch cannot restore torch's lazily served attribute.
    monkeypatch.setattr(triton_conv, "_allow_tf32", lambda: False)


# (N, C, H, W, Cout, kernel, stride, padding, dilation, groups)
CASES = {
    "3x3_odd": (2, 3, 7, 9, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "stride2": (2, 4, 9, 8, 6, (3, 3), (2, 2), (1, 1), (1, 1), 1),
    "stride_gt_kernel": (1, 3, 10, 11, 4, (2, 2), (3, 3), (0, 1), (1, 1), 1),
    "asymmetric": (2, 4, 9, 8, 6, (3, 2), (2, 3), (1, 0), (2, 1), 2),
    "dilation2": (2, 4, 9, 9, 4, (3, 3), (1, 1), (2, 2), (2, 2), 1),
    "groups2": (2, 4, 7, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2),
    "depthwise": (2, 4, 8, 7, 4, (3, 3), (2, 2), (1, 1), (1, 1), 4),
    "depthwise_x2": (1, 3, 6, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 3),
    "1x1": (2, 5, 6, 7, 3, (1, 1), (1, 1), (0, 0), (1, 1), 1),
    "1x1_stride2": (1, 6, 7, 7, 4, (1, 1), (2, 2), (0, 0), (1, 1), 1),
    "stem_7x7_s2": (1, 3, 13, 13, 4, (7, 7), (2, 2), (3, 3), (1, 1), 1),
    "wide_channels": (1, 20, 5, 5, 18, (3, 3), (1, 1), (1, 1), (1, 1), 1),  # several K and N blocks
}

# How many unit roundoffs u of the compute dtype (float32, or float64 for float64 inputs) each result
# may be off, relative to the sum of its terms' absolute values (helpers.assert_sums_close), on top of
# the final rounding of float16 / bfloat16 results: as for the C++ kernels (tests/test_conv2d.py).
# Measured under the interpreter: 2.4 u at most (float32; float64 1.6 u). float16 / bfloat16 results sit
# within their final rounding, which the interpreter does by truncation for bfloat16 (final_ulps).
SUM_UNITS = 16


def make_case(case, dtype, channels_last, seed=0):
    """Inputs in `dtype` and float64 references computed from those same (rounded) values, so only the
    kernel's own arithmetic is measured: (output, input gradient, weight gradient), each a pair of the
    value and its sums of |terms|."""
    n, c, h, w, cout, k, stride, padding, dilation, groups = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    weight = torch.randn(cout, c // groups, *k, generator=g).to(dtype)
    bias = torch.randn(cout, generator=g).to(dtype)
    y = F.conv2d(x.double(), weight.double(), bias.double(), stride, padding, dilation, groups)
    grad_out = torch.randn(y.shape, generator=g).to(dtype)
    refs, mags = conv2d_reference(x, weight, bias, grad_out, stride=stride, padding=padding, dilation=dilation,
                                  groups=groups)
    if channels_last:
        x, grad_out = x.to(memory_format=torch.channels_last), grad_out.to(memory_format=torch.channels_last)
    args = (stride, padding, dilation, groups)
    return x, weight, bias, grad_out, args, tuple(zip(refs[:3], mags[:3]))


def assert_matches(actual, expected, dtype):
    """Within SUM_UNITS of the float64 reference; expected: (value, sums of |terms|)."""
    assert actual.dtype == dtype
    assert_sums_close(actual, *expected, dtype, SUM_UNITS, final_ulps=final_ulps(actual, dtype))


def final_ulps(actual, dtype):
    """The interpreter converts float32 to bfloat16 by truncation (a GPU rounds to nearest): one ulp."""
    return 1.0 if dtype == torch.bfloat16 and actual.device.type == "cpu" else 0.5


def assert_layout(t, channels_last):
    assert t.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# The launchers fill outputs their caller allocates: these allocate them as fastcv.ops.conv does.


def _size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def forward(x, weight, bias, stride, padding, dilation, groups, **epilogue):
    size = [_size(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i]) for i in range(2)]
    out = torch.empty((x.shape[0], weight.shape[0], *size), dtype=x.dtype, device=x.device,
                      memory_format=memory_format(x, weight))
    triton_conv.conv2d_forward(x, weight, bias, stride, padding, dilation, groups, out, **epilogue)
    return out


def input_grad(grad_out, weight, input_shape, stride, padding, dilation, groups):
    out = torch.empty(tuple(input_shape), dtype=grad_out.dtype, device=grad_out.device,
                      memory_format=memory_format(grad_out, weight))
    triton_conv.conv2d_input_grad(grad_out, weight, stride, padding, dilation, groups, out)
    return out


def weight_grad(grad_out, x, weight_shape, stride, padding, dilation, groups, splits=None):
    out = torch.empty(tuple(weight_shape), dtype=x.dtype, device=x.device)
    triton_conv.conv2d_weight_grad(grad_out, x, stride, padding, dilation, groups, out, splits)
    return out


def on(device, *tensors):
    # .to() keeps the memory format (channels_last stays channels_last)
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name", list(CASES))
def test_forward_float32(device, name, channels_last):
    x, weight, bias, _, args, (y, _, _) = make_case(CASES[name], torch.float32, channels_last)
    x, weight, bias = on(device, x, weight, bias)
    out = forward(x, weight, bias, *args)
    assert_layout(out, channels_last)
    assert_matches(out, y, torch.float32)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name", list(CASES))
def test_input_grad_float32(device, name, channels_last):
    x, weight, _, grad_out, args, (_, grad_x, _) = make_case(CASES[name], torch.float32, channels_last)
    weight, grad_out = on(device, weight, grad_out)
    out = input_grad(grad_out, weight, x.shape, *args)
    assert_layout(out, channels_last)
    assert_matches(out, grad_x, torch.float32)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name", list(CASES))
def test_weight_grad_float32(device, name, channels_last):
    x, weight, _, grad_out, args, (_, _, grad_w) = make_case(CASES[name], torch.float32, channels_last)
    x, grad_out = on(device, x, grad_out)
    out = weight_grad(grad_out, x, weight.shape, *args)
    assert out.is_contiguous()
    assert_matches(out, grad_w, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name,channels_last", [("stride2", True), ("asymmetric", False), ("depthwise", True)])
def test_other_dtypes(device, dtype, name, channels_last):
    x, weight, bias, grad_out, args, (y, grad_x, grad_w) = make_case(CASES[name], dtype, channels_last, seed=1)
    x, weight, bias, grad_out = on(device, x, weight, bias, grad_out)
    assert_matches(forward(x, weight, bias, *args), y, dtype)
    assert_matches(input_grad(grad_out, weight, x.shape, *args), grad_x, dtype)
    assert_matches(weight_grad(grad_out, x, weight.shape, *args), grad_w, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("use_bias,use_residual,relu", [(True, True, True), (False, True, False), (True, False, True)])
def test_fused_epilogue(device, dtype, use_bias, use_residual, relu):
    """relu(conv + bias + residual) in one pass against the unfused float64 sequence; the residual is a
    non-contiguous view and the input channels_last, so every operand is read through its strides."""
    x, weight, bias, _, args, _ = make_case(CASES["stride2"], dtype, True, seed=2)
    g = torch.Generator().manual_seed(3)
    (y_ref, *_), (mag, *_) = conv2d_reference(x, weight, bias if use_bias else None, None, stride=args[0],
                                              padding=args[1], dilation=args[2], groups=args[3])
    residual = torch.randn(y_ref.shape[:2] + y_ref.shape[:1:-1], generator=g).to(dtype).transpose(2, 3)
    if use_residual:
        y_ref, mag = y_ref + residual.double(), mag + residual.double().abs()
    if relu:  # moves no value by more than its argument moved
        y_ref = torch.relu(y_ref)
    x, weight, bias, residual = on(device, x, weight, bias, residual)
    out = forward(x, weight, bias if use_bias else None, *args,
                                     residual=residual if use_residual else None, relu=relu)
    assert_layout(out, True)
    assert_matches(out, (y_ref, mag), dtype)
    if relu:
        assert (out >= 0).all() and (out == 0).any()  # the clamp really happened


def test_arbitrary_strides(device):
    """Sliced input and a permuted weight: neither NCHW- nor channels_last-contiguous."""
    n, c, h, w, cout, k, *args = CASES["asymmetric"]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, c, h, 2 * w, generator=g)[..., ::2]
    weight = torch.randn(k[1], cout, c // args[-1], k[0], generator=g).permute(1, 2, 3, 0)
    (y, *_), (mag, *_) = conv2d_reference(x, weight, None, None, stride=args[0], padding=args[1],
                                          dilation=args[2], groups=args[3])
    out = forward(*on(device, x, weight), None, *args)
    assert out.is_contiguous()
    assert_matches(out, (y, mag), torch.float32)


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_weight_grad_split_k(device, splits):
    """Split-K partial sums add up to the same gradient, bit for bit the same on every run."""
    x, weight, _, grad_out, args, (_, _, grad_w) = make_case(CASES["dilation2"], torch.float32, True, seed=5)
    x, grad_out = on(device, x, grad_out)
    first = weight_grad(grad_out, x, weight.shape, *args, splits=splits)
    again = weight_grad(grad_out, x, weight.shape, *args, splits=splits)
    assert first.is_contiguous()
    assert_matches(first, grad_w, torch.float32)
    assert torch.equal(first, again)


def test_empty_batch(device):
    x, weight, bias, grad_out, args, _ = make_case(CASES["stride2"], torch.float32, False)
    x, grad_out = x[:0], grad_out[:0]
    x, weight, bias, grad_out = on(device, x, weight, bias, grad_out)
    out = forward(x, weight, bias, *args)
    assert out.shape == (0, 6, 5, 4)
    assert input_grad(grad_out, weight, x.shape, *args).shape == x.shape
    grad_w = weight_grad(grad_out, x, weight.shape, *args)
    assert torch.equal(grad_w.cpu(), torch.zeros(weight.shape))


def test_zero_input_channels(device):
    """No channels to reduce: the output is the epilogue alone (bias, residual, ReLU), [N, Cout, oh, ow].
    (F.conv2d itself returns a [N, 0, oh, ow] tensor here.)"""
    x = torch.randn(2, 0, 5, 4, device=device)
    weight = torch.randn(3, 0, 3, 3, device=device)
    bias = torch.tensor([1.0, -2.0, 0.5], device=device)
    residual = torch.ones(2, 3, 3, 2, device=device)
    out = forward(x, weight, bias, (1, 1), (0, 0), (1, 1), 1, residual=residual, relu=True)
    expected = torch.tensor([2.0, 0.0, 1.5]).view(1, 3, 1, 1).expand(2, 3, 3, 2)
    assert torch.equal(out.cpu(), expected)
    grad_out = torch.randn(2, 3, 3, 2, device=device)
    assert input_grad(grad_out, weight, x.shape, (1, 1), (0, 0), (1, 1), 1).shape == x.shape
    assert weight_grad(grad_out, x, weight.shape, (1, 1), (0, 0), (1, 1), 1).shape == weight.shape


def test_tf32_follows_cudnn_conv_switch(monkeypatch):
    monkeypatch.undo()  # the real switch, not the fixture's stand-in
    conv = torch.backends.cudnn.conv
    saved = conv.fp32_precision
    try:
        conv.fp32_precision = "tf32"
        assert triton_conv._dot_args(torch.float32)["PRECISION"] == "tf32"
        assert triton_conv._dot_args(torch.float16)["PRECISION"] == "ieee"  # TF32 is a float32 matter only
        assert triton_conv._dot_args(torch.float64)["PRECISION"] == "ieee"
        conv.fp32_precision = "ieee"
        assert triton_conv._dot_args(torch.float32)["PRECISION"] == "ieee"
    finally:
        conv.fp32_precision = saved


@pytest.mark.parametrize("stride", [(1, 10**8), (10**8, 1), (10**8, 10**8)])
def test_huge_stride_through_the_op_layers_geometry(device, stride):
    """A stride larger than the padded input leaves one output along its axis; the op layer
    (fastcv.ops.conv._geometry) hands the kernels the smallest stride that does the same (the input
    gradient's grid has sh * sw stride phases). The kernels with that stride against F.conv2d with the
    huge one."""
    from fastcv.ops import conv as conv_op

    n, c, h, w, cout, k = 1, 4, 6, 7, 5, (3, 2)
    padding, dilation, groups = (1, 0), (1, 2), 2
    g = torch.Generator().manual_seed(6)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(cout - 1, c // groups, *k, generator=g)
    geometry = conv_op._geometry(x.shape, weight.shape, stride, padding, dilation, groups)
    kernel_stride = (geometry.sh, geometry.sw)
    assert max(kernel_stride) < 10 and [geometry.out_h, geometry.out_w] == [1 if s > 1 else v
                                                                           for s, v in zip(stride, (6, 5))]
    y = F.conv2d(x.double(), weight.double(), None, stride, padding, dilation, groups)
    grad_out = torch.randn(y.shape, generator=g)
    refs, mags = conv2d_reference(x, weight, None, grad_out, stride=stride, padding=padding, dilation=dilation,
                                  groups=groups)
    args = (kernel_stride, padding, dilation, groups)
    x, weight, grad_out = on(device, x, weight, grad_out)
    assert_matches(forward(x, weight, None, *args), (refs[0], mags[0]), torch.float32)
    assert_matches(input_grad(grad_out, weight, x.shape, *args), (refs[1], mags[1]),
                   torch.float32)
    assert_matches(weight_grad(grad_out, x, weight.shape, *args), (refs[2], mags[2]),
                   torch.float32)


@pytest.mark.parametrize("weight_channels_last", [False, True], ids=["weight_nchw", "weight_nhwc"])
def test_public_op_on_triton(weight_channels_last):
    """fastcv.ops.conv2d's Triton path (forward and both gradients, through the op's allocation of the
    outputs in PyTorch's memory format) on CPU tensors under the interpreter, against F.conv2d in float64."""
    from fastcv import ops
    from fastcv._backend import forced
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 4, 7, 6, generator=g, requires_grad=True)
    weight = torch.randn(6, 2, 3, 3, generator=g)
    if weight_channels_last:
        weight = weight.to(memory_format=torch.channels_last)
    weight.requires_grad_()
    with forced(backend="triton"):
        y = ops.conv2d(x, weight, None, stride=(2, 1), padding=1, groups=2)
        grad = torch.randn(y.shape, generator=g)
        gx, gw = torch.autograd.grad(y, (x, weight), grad)
    ref = F.conv2d(x.double(), weight.double(), None, (2, 1), 1, 1, 2)
    ref_gx, ref_gw = torch.autograd.grad(ref, (x, weight), grad.double())
    assert y.is_contiguous(memory_format=torch.channels_last if weight_channels_last else torch.contiguous_format)
    for got, want in ((y, ref), (gx, ref_gx), (gw, ref_gw)):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5)  # float32 sums, <= 42 terms


def test_conv2d_batch_norm_on_triton():
    """The convolution -> batch norm chain on the Triton kernels (no tile statistics there: conv2d_bn_stats
    takes a pass after, batch norm's training forward the rest), against F.conv2d -> F.batch_norm in float64."""
    from fastcv import ops
    from fastcv._backend import forced
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 4, 7, 6, generator=g).to(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(6, 4, 3, 3, generator=g, requires_grad=True)
    gamma, beta = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    mine = [torch.zeros(6), torch.ones(6)]
    theirs = [torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)]
    with forced(backend="triton"):
        y = ops.conv2d_batch_norm(x, weight, None, *mine, gamma, beta, True, padding=1, relu=True)
        grad = torch.randn(y.shape, generator=g)
        gx, gw = torch.autograd.grad(y, (x, weight), grad)
        _, mean, var = torch.ops.fastcv.conv2d_bn_stats(x.detach(), weight.detach(), None, [1, 1], [1, 1], [1, 1], 1)
    conv = F.conv2d(x.double(), weight.double(), None, 1, 1)
    ref = torch.relu(F.batch_norm(conv, *theirs, gamma.double(), beta.double(), True))
    ref_gx, ref_gw = torch.autograd.grad(ref, (x, weight), grad.double())
    ref_var, ref_mean = torch.var_mean(conv, dim=(0, 2, 3), correction=0)
    for got, want in ((y, ref), (gx, ref_gx), (gw, ref_gw), (mine[0], theirs[0]), (mine[1], theirs[1]),
                      (mean, ref_mean), (var, ref_var)):
        torch.testing.assert_close(got.double(), want.detach().double(), rtol=1e-4, atol=1e-4)  # float32, normalised
