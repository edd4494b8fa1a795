"""fastcv.ops.conv2d / conv_transpose2d and fastcv.nn.Conv2d / ConvTranspose2d against PyTorch (CPU C++
kernels; the Triton kernels have tests/test_conv2d_triton.py, depthwise tests/test_conv2d_depthwise.py)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastcv.nn
from fastcv import ops
from helpers import assert_same_for_thread_counts, assert_sums_close, conv2d_reference

# How many unit roundoffs u of the compute dtype (float32, or float64 for float64 inputs) each result
# may be off, relative to the sum of its terms' absolute values (see helpers.assert_sums_close: K u for
# a K-term sum at worst, a few u for sums of terms of either sign). Measured on the CPU over these
# tests: 4.3 u at most (float32 gradients; float64 3.6 u, float16 / bfloat16 0.5 u beyond their final
# rounding). 16 leaves a margin of almost 4 (a bound of 1e-4 of the largest value would allow
# 1e-4 / 2**-24 = 1700 u, and catch almost nothing).
SUM_UNITS = 16

# Every test runs under each CPU instruction set this machine supports (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_isa")

# N, C, H, W, Cout, kernel, stride, padding, dilation, groups
SHAPES = [
    (2, 6, 9, 11, 4, 3, 1, 1, 1, 1),
    (2, 6, 9, 11, 4, (3, 2), (1, 1), (1, 0), (1, 2), 2),  # asymmetric, dilated, grouped
    (1, 16, 13, 13, 32, 1, 1, 0, 1, 1),  # 1x1
    (2, 16, 13, 13, 8, 1, 2, 0, 1, 1),  # 1x1 stride 2 (ResNet's downsampling shortcut)
    (3, 3, 20, 17, 7, 7, 2, 3, 1, 1),  # the stem
    (2, 4, 9, 8, 6, (2, 3), (3, 2), (1, 2), 1, 1),  # stride larger than the kernel
    (2, 3, 5, 6, 4, 1, 1, 2, 1, 1),  # padding larger than the kernel
    (2, 3, 7, 6, 4, 3, 1, (2, 3), 2, 1),
    (1, 40, 7, 9, 300, 3, 1, 1, 1, 1),  # depth > one 256-deep block, rows split across threads
    (2, 8, 6, 6, 16, 3, 1, 1, 1, 4),  # ResNeXt-like groups
    # stride 1 over more than one 256-pixel depth block of the weight gradient's GEMM (blocks that start
    # mid-row), channels not a multiple of the tile's rows
    (2, 12, 20, 19, 10, 3, 1, 1, 1, 1),
    (2, 20, 17, 18, 8, 1, 1, 0, 1, 1),
    (1, 40, 6, 7, 72, 1, 1, 0, 1, 1),  # 1x1 with more than one tile of columns on either side
    (2, 8, 5, 7, 12, 1, 1, 0, 1, 2),  # grouped 1x1
    (1, 256, 3, 5, 530, 1, 1, 0, 1, 1),  # channels_last: output channels in two blocks, the last one partial
    (0, 4, 8, 8, 4, 3, 1, 1, 1, 1),  # empty batch
]


def _args(shape):
    n, c, h, w, cout, k, s, p, d, groups = shape
    k = (k, k) if isinstance(k, int) else k
    return (n, c, h, w), (cout, c // groups, *k), dict(stride=s, padding=p, dilation=d, groups=groups)


def _inputs(shape, dtype, seed=0):
    xs, ws, kw = _args(shape)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(xs, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(ws, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(ws[0], generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, kw


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_pytorch_float64(shape, channels_last):
    x, w, b, kw = _inputs(shape, torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out = ops.conv2d(x, w, b, **kw)
    (ref, *_), (mag, *_) = conv2d_reference(x, w, b, None, **kw)
    assert_sums_close(out, ref, mag, torch.float64, SUM_UNITS)
    fmt = torch.channels_last if channels_last and x.shape[0] else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[3], SHAPES[4], SHAPES[8]])
def test_forward_dtypes(shape, dtype, channels_last):
    """Reduced precision computes in float32 and rounds once: compared with the float64 convolution of
    the same rounded inputs."""
    x, w, b, kw = _inputs(shape, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out = ops.conv2d(x, w, b, **kw)
    assert out.dtype == dtype
    (ref, *_), (mag, *_) = conv2d_reference(x, w, b, None, **kw)
    assert_sums_close(out, ref, mag, dtype, SUM_UNITS)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_pytorch(shape, channels_last):
    """float32 gradients against float64 ones of the same values (F.conv2d's own float32 gradients are
    off by as much as ours)."""
    x, w, b, kw = _inputs(shape, torch.float32, seed=1)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    out = ops.conv2d(xr, wr, br, **kw)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    out.backward(grad)
    refs, mags = conv2d_reference(x, w, b, grad, **kw)
    for name, ours, ref, mag in zip(("output", "grad_input", "grad_weight", "grad_bias"),
                                    (out, xr.grad, wr.grad, br.grad), refs, mags):
        assert_sums_close(ours, ref, mag, torch.float32, SUM_UNITS, name)


# Strided layers with 16+ channels a group: NCHW gradients run as one stride-1 convolution per stride
# phase (fastcv/ops/conv.py); channels_last keeps the direct path, checked here alike.
PHASED = [
    (2, 32, 15, 13, 24, 3, 2, 1, 1, 1),  # ResNet's 3x3/2, odd sizes (phases of unequal length)
    (2, 32, 14, 14, 48, 1, 2, 0, 1, 1),  # the 1x1/2 shortcut: one phase has every tap
    (1, 32, 17, 16, 32, 3, (2, 3), (1, 0), 1, 2),  # grouped, a stride and padding per axis
    (2, 16, 11, 12, 16, (5, 4), (3, 2), (2, 1), 1, 1),  # several taps a phase, padding cropped and added
    (1, 16, 5, 5, 16, 3, 4, 1, 1, 1),  # stride larger than the kernel: phases no tap reads (zero gradient)
    (1, 16, 3, 9, 16, 3, 2, 1, 1, 1),  # a single output row
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", PHASED)
def test_strided_gradients_by_phases_match_pytorch(shape, channels_last, dtype):
    x, w, b, kw = _inputs(shape, dtype, seed=6)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    xr, wr = (t.detach().clone().requires_grad_() for t in (x, w))
    out = ops.conv2d(xr, wr, None, **kw)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=dtype)
    out.backward(grad)
    (_, gx, gw, _), (_, mx, mw, _) = conv2d_reference(x, w, None, grad, **kw)
    assert_sums_close(xr.grad, gx, mx, dtype, SUM_UNITS, "grad_input")
    assert_sums_close(wr.grad, gw, mw, dtype, SUM_UNITS, "grad_weight")
    assert xr.grad.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("channels_last", [False, True])
def test_weight_gradient_of_small_images_sums_row_blocks_over_the_batch(channels_last):
    """Under 128 pixels an image, the stride-1 weight gradient cuts its GEMM rows (9 taps x 64 channels
    here, against 512 outputs) into several C blocks, each summed over the whole batch."""
    x, w, b, kw = _inputs((3, 64, 5, 6, 512, 3, 1, 1, 1, 1), torch.float32, seed=9)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    xr, wr = (t.detach().clone().requires_grad_() for t in (x, w))
    out = ops.conv2d(xr, wr, None, **kw)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(10))
    out.backward(grad)
    (_, _, gw, _), (_, _, mw, _) = conv2d_reference(x, w, None, grad, **kw)
    assert_sums_close(wr.grad, gw, mw, torch.float32, SUM_UNITS, "grad_weight")


def test_strided_gradients_by_phases_gradcheck():
    x, w, b, kw = _inputs((1, 16, 7, 6, 16, 3, 2, 1, 1, 1), torch.float64, seed=8)
    inputs = tuple(t.requires_grad_() for t in (x, w))
    assert torch.autograd.gradcheck(lambda *a: ops.conv2d(*a, **kw), inputs)


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[5], SHAPES[7]])
def test_gradcheck_and_gradgradcheck(shape):
    x, w, b, kw = _inputs(shape, torch.float64, seed=2)
    x, w, b = (t[:1].clone() if t is x else t for t in (x, w, b))
    inputs = tuple(t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: ops.conv2d(*a, **kw), inputs)
    assert torch.autograd.gradgradcheck(lambda *a: ops.conv2d(*a, **kw), inputs)


@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_is_deterministic_across_thread_counts(channels_last):
    """Threads own output blocks, input channels and weight-gradient rows or columns: the same sums in the
    same order for any thread count (and no uninitialised reads: this shape reads the padded planes' slack)."""
    x, w, b, kw = _inputs((3, 24, 15, 13, 40, 3, 1, 2, 2, 1), torch.float32, seed=3)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)

    def run():
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = ops.conv2d(xr, wr, b, **kw)
        out.backward(torch.ones_like(out))
        return out, xr.grad, wr.grad

    assert_same_for_thread_counts(run)


@pytest.mark.filterwarnings("ignore:Using padding=.same.")
def test_padding_same_valid_and_unbatched():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 10, 9, generator=g, dtype=torch.float64)
    for k, d in ((3, 1), (4, 1), ((2, 5), (3, 1)), (3, 2)):
        kk = (k, k) if isinstance(k, int) else k
        w = torch.randn(5, 3, *kk, generator=g, dtype=torch.float64)
        for padding in ("same", "valid"):
            out = ops.conv2d(x, w, padding=padding, dilation=d)
            (ref, *_), (mag, *_) = conv2d_reference(x, w, None, None, padding=padding, dilation=d)
            assert_sums_close(out, ref, mag, torch.float64, SUM_UNITS)
            assert out.dim() == 3


def test_noncontiguous_input_and_weight():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 11, 5, 9, generator=g).transpose(1, 3)[:, ::2]  # [2, 5, 5, 11] with odd strides
    w = torch.randn(5, 3, 4, 3, generator=g).transpose(0, 1)  # [3, 5, 4, 3], a transposed view
    (ref, *_), (mag, *_) = conv2d_reference(x, w, None, None, padding=1)
    assert_sums_close(ops.conv2d(x, w, padding=1), ref, mag, torch.float32, SUM_UNITS)


HUGE = 10**8
# input shape, weight shape, stride, padding, dilation, groups: one output along each strided axis
HUGE_STRIDES = [
    ((1, 4, 25, 5), (3, 4, 3, 2), (1, HUGE), (1, 1), (1, 1), 1),  # horizontal
    ((1, 4, 5, 25), (3, 4, 2, 3), (HUGE, 1), (1, 1), (1, 1), 1),  # vertical
    ((2, 4, 5, 6), (4, 2, 3, 2), (HUGE, HUGE), (0, 2), (1, 2), 2),  # both, grouped and dilated
    ((1, 4, 25, 5), (8, 1, 3, 3), (1, HUGE), (1, 1), (1, 1), 4),  # depthwise, two outputs per channel
    ((1, 4, 5, 25), (8, 1, 3, 3), (HUGE, 2), (1, 1), (1, 1), 4),
]
# conv_transpose2d: input shape, weight shape, stride, padding (one input along each strided axis)
HUGE_TRANSPOSED = [
    ((1, 4, 5, 1), (4, 6, 3, 3), (1, HUGE), (1, 1)),
    ((1, 4, 1, 5), (4, 6, 3, 3), (HUGE, 1), (0, 1)),
    ((2, 4, 1, 1), (4, 3, 2, 3), (HUGE, HUGE), (0, 0)),
]


def check_huge_strides(device):
    """conv2d and conv_transpose2d with strides of 10**8 (larger than the padded input: one output, or
    one input for the transpose, along that axis) against F.conv2d / F.conv_transpose2d in float64,
    forward and gradients, in both layouts."""
    g = torch.Generator().manual_seed(17)
    calls = [(ops.conv2d, F.conv2d, x, w, dict(stride=s, padding=p, dilation=d, groups=gr))
             for x, w, s, p, d, gr in HUGE_STRIDES]
    calls += [(ops.conv_transpose2d, F.conv_transpose2d, x, w, dict(stride=s, padding=p))
              for x, w, s, p in HUGE_TRANSPOSED]
    for ours, theirs, x_shape, w_shape, kw in calls:
        x = torch.randn(x_shape, generator=g, dtype=torch.float64)
        w = torch.randn(w_shape, generator=g, dtype=torch.float64)
        b = torch.randn(w_shape[0] if ours is ops.conv2d else w_shape[1] * kw.get("groups", 1), generator=g,
                        dtype=torch.float64)
        grad = torch.randn(theirs(x, w, b, **kw).shape, generator=g, dtype=torch.float64)
        refs, mags = conv2d_reference(x, w, b, grad, conv=theirs, **kw)
        for fmt in (torch.contiguous_format, torch.channels_last):
            xd, wd, bd = (t.detach().clone().to(device).requires_grad_()
                          for t in (x.contiguous(memory_format=fmt), w, b))
            out = ours(xd, wd, bd, **kw)
            out.backward(grad.to(device))
            for name, value, ref, mag in zip(("output", "grad_input", "grad_weight", "grad_bias"),
                                             (out, xd.grad, wd.grad, bd.grad), refs, mags):
                assert_sums_close(value, ref, mag, torch.float64, SUM_UNITS, f"{x_shape} {kw} {fmt}: {name}")


def test_huge_strides_match_pytorch(device):
    check_huge_strides(device)


def test_memory_does_not_grow_with_the_stride():
    """The same calls with the process's address space limited to 1 GiB more than it has: buffers
    sized by the stride (a stride-phase row of the padded input of stride x columns or more, which
    asked for tens of GB at a stride of 10**8) fail with MemoryError."""
    resource = pytest.importorskip("resource")
    with open("/proc/self/statm") as f:
        in_use = int(f.read().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = in_use + (1 << 30)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        check_huge_strides("cpu")
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# N, Cin, H, W, Cout, kernel, stride, padding, output_padding, groups, dilation
TRANSPOSED = [
    (2, 4, 5, 6, 3, 3, 2, 1, 1, 1, 1),  # FCN-style x2 upsampling
    (1, 6, 4, 4, 4, 4, 2, 1, 0, 2, 1),
    (2, 3, 5, 4, 2, (3, 2), (3, 2), (0, 1), (2, 1), 1, (1, 2)),
    (1, 2, 3, 3, 2, 3, 1, 0, 0, 1, 3),  # dilation 3
    (1, 2, 3, 3, 2, 2, 2, 0, 2, 1, 3),  # output_padding >= stride (allowed since dilation is larger)
    (0, 2, 3, 3, 2, 3, 2, 1, 1, 1, 1),
]


@pytest.mark.parametrize("shape", TRANSPOSED)
def test_conv_transpose2d_matches_pytorch(shape):
    n, cin, h, w_, cout, k, s, p, op, groups, d = shape
    k = (k, k) if isinstance(k, int) else k
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, cin, h, w_, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(cin, cout // groups, *k, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(cout, generator=g, dtype=torch.float64, requires_grad=True)
    kw = dict(stride=s, padding=p, output_padding=op, groups=groups, dilation=d)
    out = ops.conv_transpose2d(x, w, b, **kw)
    (ref, *_), (mag, *_) = conv2d_reference(x, w, b, None, conv=F.conv_transpose2d, **kw)
    assert_sums_close(out, ref, mag, torch.float64, SUM_UNITS)
    if n:
        assert torch.autograd.gradcheck(lambda *a: ops.conv_transpose2d(*a, **kw), (x, w, b))


def _float_nhwc(t):
    t = t.detach().float()
    return (t.to(memory_format=torch.channels_last) if t.dim() == 4 else t).requires_grad_()


def test_opcheck():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 4, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    args = ([2, 1], [1, 0], [1, 2], 2)
    out = torch.ops.fastcv.conv2d(x, w, b, *args)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64, requires_grad=True)
    for op, inputs in ((torch.ops.fastcv.conv2d, (x, w, b, *args)),
                       (torch.ops.fastcv.conv2d_input_grad, (gout, w, [7, 6], *args)),
                       (torch.ops.fastcv.conv2d_weight_grad, (gout, x, list(w.shape), *args))):
        torch.library.opcheck(op, inputs)
        as_float_nhwc = tuple(_float_nhwc(t) if isinstance(t, torch.Tensor) else t for t in inputs)
        torch.library.opcheck(op, as_float_nhwc)


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 4, 8, 8, generator=g)
    w = torch.randn(5, 4, 3, 3, generator=g)

    def f(x, w):
        return ops.conv_transpose2d(torch.relu(ops.conv2d(x, w, padding=1)), w, padding=1)

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, w), f(x, w))


def test_autocast_casts_like_f_conv2d():
    g = torch.Generator().manual_seed(16)
    x, w = torch.randn(1, 3, 8, 8, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, theirs = ops.conv2d(x, w), F.conv2d(x, w)
    assert out.dtype == theirs.dtype == torch.bfloat16
    (ref, *_), (mag, *_) = conv2d_reference(x.bfloat16(), w.bfloat16(), None, None)  # what autocast computes
    assert_sums_close(out, ref, mag, torch.bfloat16, SUM_UNITS)


def test_bad_input_raises_clear_errors():
    x, w = torch.randn(1, 4, 8, 8), torch.randn(6, 4, 3, 3)
    cases = [
        (lambda: ops.conv2d(x, torch.randn(6, 3, 3, 3)), ValueError, "input has 4 channels"),
        (lambda: ops.conv2d(x, torch.randn(6, 2, 3, 3), groups=3), ValueError, "input has 4 channels"),
        (lambda: ops.conv2d(x, torch.randn(5, 2, 3, 3), groups=2), ValueError, "divisible by groups"),
        (lambda: ops.conv2d(x, w, groups=0), ValueError, "groups must be a positive"),
        (lambda: ops.conv2d(x, torch.randn(6, 4, 11, 3)), ValueError, "larger than the padded input"),
        (lambda: ops.conv2d(x, w, stride=0), ValueError, "stride must be positive"),
        (lambda: ops.conv2d(x, w, dilation=(1, -1)), ValueError, "dilation must be positive"),
        (lambda: ops.conv2d(x, w, padding=-1), ValueError, "padding must be non-negative"),
        (lambda: ops.conv2d(x, w, padding="full"), ValueError, "'same' or 'valid'"),
        (lambda: ops.conv2d(x, w, stride=2, padding="same"), ValueError, "strided"),
        (lambda: ops.conv2d(x[0, 0], w), ValueError, "input must be a 4-D"),
        (lambda: ops.conv2d(x, w[0]), ValueError, "weight must be a 4-D"),
        (lambda: ops.conv2d(x, w.double()), TypeError, "weight has dtype torch.float64"),
        (lambda: ops.conv2d(x.int(), w), TypeError, "input must be float32"),
        (lambda: ops.conv2d(x, w, torch.randn(5)), ValueError, "bias must have weight.shape"),
        (lambda: ops.conv2d(x, w, stride=(1, 2, 3)), TypeError, "stride must be an int or a pair"),
        (lambda: ops.conv2d(x.to("meta"), w), ValueError, "weight is on cpu"),
        (lambda: ops.conv_transpose2d(x, w), ValueError, "expects 6"),
        (lambda: ops.conv_transpose2d(x, torch.randn(4, 2, 3, 3), stride=2, output_padding=2), ValueError,
         "output_padding must be"),
        (lambda: ops.conv_transpose2d(x, torch.randn(4, 2, 3, 3), padding=5), ValueError, "too large"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def _assert_module_matches(ours, ref, x, **call):
    """ours(x) against the torch module `ref` run in float64, with the sums of |terms| from the same
    module with |weight| and |bias| on |x| (padding modes commute with abs)."""
    ref64 = copy.deepcopy(ref).double()
    expected = ref64(x.double(), **call)
    with torch.no_grad():
        for p in ref64.parameters():
            p.abs_()
    assert_sums_close(ours(x, **call), expected, ref64(x.double().abs(), **call), x.dtype, SUM_UNITS)


def test_modules_are_drop_ins():
    torch.manual_seed(10)
    ref = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=True)
    ours = fastcv.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=True)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 4, 9, 10)
    _assert_module_matches(ours, ref, x)
    for mode in ("reflect", "circular", "replicate"):
        ref = torch.nn.Conv2d(4, 3, 3, padding=2, padding_mode=mode)
        ours = fastcv.nn.Conv2d(4, 3, 3, padding=2, padding_mode=mode)
        ours.load_state_dict(ref.state_dict())
        _assert_module_matches(ours, ref, x)
    ref = torch.nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1)
    ours = fastcv.nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1)
    ours.load_state_dict(ref.state_dict())
    _assert_module_matches(ours, ref, x)
    _assert_module_matches(ours, ref, x, output_size=(19, 21))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("relu,with_residual", [(True, True), (True, False), (False, True)])
def test_conv2d_fused_matches_the_unfused_sequence(relu, with_residual, channels_last):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 6, 9, 8, generator=g, dtype=torch.float64)
    w = torch.randn(8, 3, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    r = torch.randn(2, 8, 5, 4, generator=g, dtype=torch.float64) if with_residual else None
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    kw = dict(stride=2, padding=1, groups=2)

    def check(out, x, w, b, r):  # relu moves no value by more than its argument moved
        (ref, *_), (mag, *_) = conv2d_reference(x, w, b, None, **kw)
        if r is not None:
            ref, mag = ref + r.double(), mag + r.double().abs()
        assert_sums_close(out, torch.relu(ref) if relu else ref, mag, out.dtype, SUM_UNITS)

    check(ops.conv2d_fused(x, w, b, residual=r, relu=relu, **kw), x, w, b, r)
    inputs = tuple(t.requires_grad_() for t in (x, w, b) + ((r,) if with_residual else ()))
    fn = (lambda x, w, b, r=None: ops.conv2d_fused(x, w, b, residual=r, relu=relu, **kw))
    assert torch.autograd.gradcheck(fn, inputs)
    # bfloat16: one rounding at the end, against float64 of the rounded inputs
    args = [t.detach().bfloat16() for t in (x, w, b)]
    rb = r.detach().bfloat16() if with_residual else None
    check(ops.conv2d_fused(*args, residual=rb, relu=relu, **kw), *args, rb)


def test_conv2d_fused_opcheck_and_bad_residual():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 4, 6, 6, generator=g, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, generator=g, requires_grad=True)
    r = torch.randn(2, 4, 6, 6, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.fastcv.conv2d_fused, (x, w, None, r, True, [1, 1], [1, 1], [1, 1], 1))
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        ops.conv2d_fused(x, w, padding=1, residual=r[:, :2])


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d_fused_depthwise(channels_last):
    """Depthwise layers take their own kernel, then the residual and ReLU in a second pass."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 6, 7, 9, generator=g, dtype=torch.float64)
    w = torch.randn(6, 1, 3, 3, generator=g, dtype=torch.float64)
    b, r = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(2, 6, 7, 9, generator=g, dtype=torch.float64)
    if channels_last:
        x, r = x.to(memory_format=torch.channels_last), r.to(memory_format=torch.channels_last)
    out = ops.conv2d_fused(x, w, b, padding=1, groups=6, residual=r, relu=True)
    (ref, *_), (mag, *_) = conv2d_reference(x, w, b, None, padding=1, groups=6)
    assert_sums_close(out, torch.relu(ref + r), mag + r.abs(), torch.float64, SUM_UNITS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[4], SHAPES[9]])
def test_gpu_ops_match_pytorch(device, shape, dtype, monkeypatch):
    """The op layer on each device (on a GPU: the Triton kernels), forward and gradients, channels_last,
    against PyTorch's float64 results on the CPU."""
    from fastcv.kernels import conv2d as triton_conv

    monkeypatch.setattr(triton_conv, "_allow_tf32", lambda: False)  # full float32 on the GPU
    x, w, b, kw = _inputs(shape, dtype, seed=14)
    grad = torch.randn(F.conv2d(x.double(), w.double(), b.double(), **kw).shape,
                       generator=torch.Generator().manual_seed(15)).to(dtype)
    refs, mags = conv2d_reference(x, w, b, grad, **kw)  # from the same rounded values, gradient included
    xd, wd, bd = (t.to(device).requires_grad_() for t in (x.to(memory_format=torch.channels_last), w, b))
    out = ops.conv2d(xd, wd, bd, **kw)
    out.backward(grad.to(device))
    for name, ours, ref, mag in zip(("output", "grad_input", "grad_weight", "grad_bias"),
                                    (out, xd.grad, wd.grad, bd.grad), refs, mags):
        assert_sums_close(ours, ref, mag, dtype, SUM_UNITS, name)
