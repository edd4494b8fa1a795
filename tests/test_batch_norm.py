"""fastcv.ops.batch_norm, batch_norm_relu, batch_norm_add_relu, fold_batch_norm and fastcv.nn.BatchNorm*d
against F.batch_norm / nn.BatchNorm (references in float64 from the same rounded inputs, so only our own
arithmetic is measured), on every device this machine has."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcv.nn
from conftest import DEVICES
from fastcv.ops import batch_norm, batch_norm_add_relu, batch_norm_relu, fold_batch_norm
from helpers import assert_same_for_thread_counts

# Every test runs under each CPU instruction set this machine supports (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_isa")

# Largest error allowed, relative to max(1, the reference's largest magnitude) (see close()).
#  - float16 / bfloat16: computed in float32 and rounded once, so within half an ulp of the reference
#    (2**-11 and 2**-8 relative; the float32 arithmetic adds orders of magnitude less): twice that.
#    Measured on the CPU: 4.1e-4 and 3.8e-3.
#  - float32 and float64: the statistics and the gradients' sums run over up to 70001 values per channel
#    (the [1, 2, 70001] shape), in blocks, so the error is a few eps * log2(n) relative to the terms'
#    magnitudes. Measured on the CPU: 1.2e-6 (10 float32 eps) and 2.9e-14 (130 float64 eps), both for the
#    weight gradient of that shape; about 3x that is allowed.
TOL = {torch.float64: 1e-13, torch.float32: 4e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}
DTYPES = list(TOL)

# (shape, channels_last)
SHAPES = [
    ((8, 5), False),              # BatchNorm1d on [N, C]
    ((3, 7, 9), False),           # BatchNorm1d on [N, C, L]
    ((4, 3, 5, 6), False),
    ((4, 3, 5, 6), True),
    ((2, 17, 4, 3), True),
    ((2, 3, 4, 5, 6), False),     # BatchNorm3d
    ((2, 3, 4, 5, 6), True),      # channels_last_3d
    ((2, 40, 3, 3), False),       # enough channels to give each thread whole channels
    ((1, 2, 70001), False),       # planes split into segments (a channel longer than one work unit)
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def seeded():
    """Tests that draw from torch's global generator see the same values whatever ran before them."""
    torch.manual_seed(0)


def _fmt(shape, channels_last):
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last if len(shape) == 4 else torch.channels_last_3d


def make(shape, channels_last, dtype, device, scale=3.0, shift=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale + shift).to(dtype)
    return x.to(device=device, memory_format=_fmt(shape, channels_last))


def params(c, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = torch.randn(c, generator=g).to(pdt), torch.randn(c, generator=g).to(pdt)
    rm, rv = torch.randn(c, generator=g).to(pdt), torch.rand(c, generator=g).to(pdt) + 0.5
    return [t.to(device) for t in (w, b, rm, rv)]


def close(actual, expected, dtype, what=""):
    tol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


def reference(x, rm, rv, w, b, training, eps=1e-5, identity=None, relu=False):
    """The unfused PyTorch sequence in float64, with gradients enabled on x, w, b (and identity)."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b, identity)]
    xr, wr, br, ir = leaves
    rm64 = rm.double().clone() if rm is not None else None
    rv64 = rv.double().clone() if rv is not None else None
    y = F.batch_norm(xr, rm64, rv64, wr, br, training, 0.1, eps)
    if ir is not None:
        y = y + ir
    if relu:
        y = F.relu(y)
    return y, leaves, (rm64, rv64)


def through_kernel_mask(y, pre, dtype):
    """The reference pre-activation `pre` (float64) through the fused kernel's own ReLU mask, where its
    output y is positive. Where a pre-activation lies within rounding of zero the kernel's mask and the
    reference's may disagree; with one mask the gradients can be compared everywhere. That the kernel's
    mask is right up to rounding is checked here and by the caller's output check: where the kernel
    output zero the pre-activation is at most the tolerance above zero, and where it kept a value that
    value matches the pre-activation."""
    mask = (y.detach() > 0).double()
    dropped = (pre.detach() * (1 - mask)).max().item() if pre.numel() else 0.0
    limit = TOL[dtype] * max(1.0, pre.detach().abs().max().item()) if pre.numel() else 0.0
    assert dropped <= limit, f"the fused ReLU zeroed a pre-activation of {dropped:.3g} > {limit:.3g}"
    return pre * mask


@pytest.mark.parametrize("shape,channels_last", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_forward_backward(device, shape, channels_last, dtype, training):
    x = make(shape, channels_last, dtype, device)
    w, b, rm, rv = params(shape[1], dtype, device)
    y_ref, (xr, wr, br, _), (rm_ref, rv_ref) = reference(x, rm, rv, w, b, training)
    x1, w1, b1 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    rm1, rv1 = rm.clone(), rv.clone()
    y = batch_norm(x1, rm1, rv1, w1, b1, training)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.stride() == x.stride(), "the output must keep the input's memory format"
    close(y, y_ref, dtype, "output")
    close(rm1, rm_ref, torch.float32 if dtype != torch.float64 else dtype, "running_mean")
    close(rv1, rv_ref, torch.float32 if dtype != torch.float64 else dtype, "running_var")
    g = make(shape, channels_last, dtype, device, 1.0, 0.0, seed=5)
    y.backward(g)
    y_ref.backward(g.double())
    close(x1.grad, xr.grad, dtype, "grad_input")
    close(w1.grad, wr.grad, torch.float32 if dtype != torch.float64 else dtype, "grad_weight")
    close(b1.grad, br.grad, torch.float32 if dtype != torch.float64 else dtype, "grad_bias")


@pytest.mark.parametrize("shape,channels_last", [((4, 6, 5, 7), False), ((4, 6, 5, 7), True), ((9, 4), False)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fused", ["relu", "add_relu"])
def test_fused_against_unfused(device, shape, channels_last, dtype, training, fused):
    x = make(shape, channels_last, dtype, device, 1.0, 0.2)
    identity = make(shape, channels_last, dtype, device, 1.0, 0.0, seed=3) if fused == "add_relu" else None
    w, b, rm, rv = params(shape[1], dtype, device)
    y_ref, (xr, wr, br, ir), _ = reference(x, rm, rv, w, b, training, identity=identity, relu=True)
    x1, w1, b1 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    if fused == "relu":
        y = batch_norm_relu(x1, rm.clone(), rv.clone(), w1, b1, training)
    else:
        i1 = identity.detach().clone().requires_grad_()
        y = batch_norm_add_relu(x1, i1, rm.clone(), rv.clone(), w1, b1, training)
    # Every gradient is compared, through the kernel's own ReLU mask (see through_kernel_mask).
    pre, (xr, wr, br, ir), _ = reference(x, rm, rv, w, b, training, identity=identity)
    y_ref = through_kernel_mask(y, pre, dtype)
    close(y, y_ref, dtype, "output")
    g = make(shape, channels_last, dtype, device, 1.0, 0.0, seed=7)
    y.backward(g)
    y_ref.backward(g.double())
    close(x1.grad, xr.grad, dtype, "grad_input")
    close(w1.grad, wr.grad, torch.float32 if dtype != torch.float64 else dtype, "grad_weight")
    close(b1.grad, br.grad, torch.float32 if dtype != torch.float64 else dtype, "grad_bias")
    if fused == "add_relu":
        close(i1.grad, ir.grad, dtype, "grad_identity")
        assert i1.grad.stride() == identity.stride()


def test_fused_grads_float64_exact_mask(device):
    """In float64 the ReLU masks agree exactly, so every gradient is compared."""
    x = make((3, 4, 5, 6), False, torch.float64, device, 1.0, 0.3)
    identity = make((3, 4, 5, 6), False, torch.float64, device, 1.0, 0.0, seed=4)
    w, b, rm, rv = params(4, torch.float64, device)
    for training in (True, False):
        y_ref, (xr, wr, br, ir), _ = reference(x, rm, rv, w, b, training, identity=identity, relu=True)
        x1, w1, b1, i1 = (t.detach().clone().requires_grad_() for t in (x, w, b, identity))
        y = batch_norm_add_relu(x1, i1, rm.clone(), rv.clone(), w1, b1, training)
        g = torch.randn_like(x)
        y.backward(g)
        y_ref.backward(g)
        for a, r in ((y, y_ref), (x1.grad, xr.grad), (w1.grad, wr.grad), (b1.grad, br.grad), (i1.grad, ir.grad)):
            close(a, r, torch.float64)


def test_no_affine_and_no_running_stats(device):
    x = make((4, 3, 5, 5), True, torch.float32, device)
    for training in (True, False):
        y = batch_norm(x, None, None, None, None, training)  # no running stats: batch statistics always
        close(y, F.batch_norm(x.double(), None, None, training=True), torch.float32)
    w, b, rm, rv = params(3, torch.float32, device)
    close(batch_norm(x, rm, rv, None, b, False), F.batch_norm(x.double(), rm.double(), rv.double(), None, b.double()),
          torch.float32)
    close(batch_norm(x, rm, rv, w, None, True), F.batch_norm(x.double(), rm.double().clone(), rv.double().clone(),
                                                             w.double(), None, True), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_parameters(device, dtype):
    """Parameters in the input's own reduced dtype work too (computed in float32), as in PyTorch."""
    x = make((4, 3, 5, 5), False, dtype, device, 1.0, 0.0)
    w, b, rm, rv = (t.to(dtype) for t in params(3, torch.float32, device))
    w.requires_grad_()
    rm1, rv1 = rm.clone(), rv.clone()
    y = batch_norm(x, rm1, rv1, w, b, True)
    close(y, F.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(), True), dtype)
    assert rm1.dtype == dtype and not torch.equal(rm1, rm)
    y.sum().backward()
    assert w.grad.dtype == dtype


def test_extreme_statistics(device):
    """mean 1e4, standard deviation 1e-2 in float32: an E[x^2] - E[x]^2 formula loses the variance."""
    g = torch.Generator().manual_seed(0)
    for shape, cl in (((16, 3, 40, 40), False), ((16, 3, 40, 40), True), ((50000, 2), False)):
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1e-2 + 1e4).float()
        x = x.to(device=device, memory_format=_fmt(shape, cl))
        rm, rv = torch.zeros(shape[1], device=device), torch.ones(shape[1], device=device)
        y = batch_norm(x, rm, rv, None, None, True, momentum=1.0, eps=1e-12)
        x64 = x.double().transpose(0, 1).reshape(shape[1], -1)
        var = x64.var(1)
        # Relative to the variance: a two-pass or Welford variance loses nothing to the mean (measured: 6e-8,
        # half a float32 eps); E[x^2] - E[x]^2 would have lost all of it.
        assert torch.allclose(rv.double(), var, rtol=1e-6, atol=0), (rv, var)
        assert torch.allclose(rm.double(), x64.mean(1), rtol=0, atol=1e-4)
        # The output itself is normalised: unit variance, mean zero.
        ref = F.batch_norm(x.double(), None, None, training=True, eps=1e-12)
        close(y, ref, torch.float32, "output")  # PyTorch's own float32 kernel: about 3e-2 off


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("module,shape", [("BatchNorm1d", (6, 4)), ("BatchNorm1d", (6, 4, 7)),
                                          ("BatchNorm2d", (3, 4, 5, 5)), ("BatchNorm3d", (2, 4, 3, 3, 3))])
def test_modules_match_torch(device, module, shape, momentum):
    torch.manual_seed(0)
    ref = getattr(nn, module)(4, momentum=momentum).to(device).double()
    ours = getattr(fastcv.nn, module)(4, momentum=momentum).to(device).double()
    assert isinstance(ours, getattr(nn, module))
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    for step in range(4):  # several steps: the running buffers and num_batches_tracked
        x = torch.randn(shape, dtype=torch.float64, device=device) * (step + 1) + step
        close(ours(x), ref(x), torch.float64, "output")
    for name, buf in ref.state_dict().items():
        if buf.is_floating_point():
            close(ours.state_dict()[name], buf, torch.float64, name)
        else:
            assert torch.equal(ours.state_dict()[name], buf), name
    assert ours.num_batches_tracked.item() == 4
    ref.eval(), ours.eval()
    x = torch.randn(shape, dtype=torch.float64, device=device)
    close(ours(x), ref(x), torch.float64, "eval output")


def test_module_without_running_stats(device):
    ref = nn.BatchNorm2d(3, affine=False, track_running_stats=False).to(device)
    ours = fastcv.nn.BatchNorm2d(3, affine=False, track_running_stats=False).to(device)
    assert list(ours.state_dict()) == list(ref.state_dict()) == []
    x = torch.randn(4, 3, 5, 5, device=device)
    for mode in (True, False):
        ref.train(mode), ours.train(mode)
        close(ours(x), ref.double()(x.double()), torch.float32, f"train={mode}")


def test_module_fused_residual(device):
    bn = fastcv.nn.BatchNorm2d(4).to(device)
    x, identity = torch.randn(2, 4, 3, 3, device=device), torch.randn(2, 4, 3, 3, device=device)
    expected = F.relu(nn.BatchNorm2d(4).to(device).double()(x.double()) + identity.double())
    close(bn(x, identity), expected, torch.float32)


def test_functional_momentum_none_counts_batches(device):
    c = 3
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    xs = [torch.randn(8, c, device=device) + k for k in range(3)]
    for x in xs:
        batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=count)
    assert count.item() == 3
    means = torch.stack([x.double().mean(0) for x in xs]).mean(0)  # the cumulative average of the batch means
    close(rm, means, torch.float32)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        batch_norm(xs[0], rm, rv, training=True, momentum=None)


def test_thread_count_does_not_change_results():
    x = make((3, 5, 9, 9), False, torch.float32, "cpu")
    xc = make((64, 5, 3, 3), True, torch.float32, "cpu")

    def run():
        stats = [torch.zeros(5), torch.ones(5), torch.zeros(5), torch.ones(5)]
        return (batch_norm(x, stats[0], stats[1], training=True), batch_norm(xc, stats[2], stats[3], training=True),
                *stats)

    assert_same_for_thread_counts(run, (1, 2, 3))


@pytest.mark.parametrize("training", [True, False])
def test_thread_count_does_not_change_small_plane_passes(training):
    """14x14 planes go to threads in ranges of whole planes (forward, the backward's sums and gradient):
    enough values here for three threads, and the results must not move with their number."""
    x = make((32, 24, 14, 14), False, torch.float32, "cpu")
    grad = make((32, 24, 14, 14), False, torch.float32, "cpu")
    w, b = torch.rand(24) + 0.5, torch.rand(24)

    def run():
        xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
        rm, rv = torch.zeros(24), torch.ones(24)
        y = batch_norm(xr, rm, rv, wr, br, training=training)
        y.backward(grad)
        return y.detach(), xr.grad, wr.grad, br.grad, rm, rv

    assert_same_for_thread_counts(run, (1, 2, 3))


def test_empty_tensors(device):
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    for shape in ((0, 3, 4, 4), (2, 3, 0, 4), (0, 3)):
        x = torch.randn(shape, device=device, requires_grad=True)
        w = torch.ones(3, device=device, requires_grad=True)
        for training in (True, False):
            y = batch_norm(x, rm, rv, w, None, training)
            assert y.shape == x.shape
            y.sum().backward()
            assert torch.equal(w.grad, torch.zeros(3, device=device))
            w.grad = None
    assert torch.equal(rm, torch.zeros(3, device=device)) and torch.equal(rv, torch.ones(3, device=device))
    # No channels at all.
    assert batch_norm(torch.randn(2, 0, 3, device=device), torch.zeros(0, device=device),
                      torch.ones(0, device=device), training=True).shape == (2, 0, 3)


def test_gradcheck():
    x = torch.randn(3, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    xcl = torch.randn(3, 4, 3, 2, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    identity = torch.randn(3, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    for inp in (x, xcl):
        for training in (True, False):
            assert torch.autograd.gradcheck(lambda a, c, d: batch_norm(a, rm.clone(), rv.clone(), c, d, training),
                                            (inp, w, b))
            assert torch.autograd.gradcheck(
                lambda a, c, d: batch_norm_relu(a, rm.clone(), rv.clone(), c, d, training), (inp, w, b))
            assert torch.autograd.gradcheck(
                lambda a, i, c, d: batch_norm_add_relu(a, i, rm.clone(), rv.clone(), c, d, training),
                (inp, identity, w, b))


def test_opcheck():
    x = torch.randn(3, 4, 3, 2)
    xcl = x.to(memory_format=torch.channels_last)
    w, b, identity = torch.rand(4), torch.randn(4), torch.randn(3, 4, 3, 2)
    mean, var = torch.randn(4), torch.rand(4) + 0.5
    ops = torch.ops.fastcv
    for inp in (x, xcl):
        xg, wg, bg = inp.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        for relu in (False, True):
            torch.library.opcheck(ops.batch_norm_train, (xg, wg, bg, None, relu, 1e-5, None, None))
            torch.library.opcheck(ops.batch_norm_eval, (xg, mean, var, wg, bg, None, relu, 1e-5))
        torch.library.opcheck(ops.batch_norm_train, (xg, wg, None, identity.clone().requires_grad_(), True, 1e-3, None,
                                                      None))
        torch.library.opcheck(ops.batch_norm_backward,
                              (torch.randn_like(inp), inp, None, mean, var, w, True, 1e-5, [True, False, True, True]))
        torch.library.opcheck(ops.batch_norm_backward,
                              (torch.randn_like(inp), inp, inp.relu(), mean, var, None, False, 1e-5,
                               [True, True, False, True]))
    torch.library.opcheck(ops.batch_norm_update_running, (torch.zeros(4), torch.ones(4), mean, var.abs(), 0.1, 8))


@pytest.mark.parametrize("running_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("momentum,count", [(0.1, 24), (0.5, 2), (1.0, 5), (0.0, 3), (0.3, 1)])
def test_update_running(device, running_dtype, momentum, count):
    """The running-statistics update against nn.BatchNorm's formula in float64, for buffers of every
    floating dtype, read and written through strides (a buffer can be a view into a larger one). One
    rounding to the buffer's dtype: within one unit of its last place."""
    g = torch.Generator().manual_seed(3)
    stats = torch.float64 if running_dtype == torch.float64 else torch.float32
    mean = torch.randn(5, generator=g).to(device, stats)
    var = (torch.rand(5, generator=g) + 0.1).to(device, stats)
    storage = torch.randn(5, 3, generator=g).to(device, running_dtype)
    rm, rv = storage[:, 0], storage[:, 2]  # stride 3
    rm0, rv0, untouched = rm.double().clone(), rv.double().clone(), storage[:, 1].clone()
    torch.ops.fastcv.batch_norm_update_running(rm, rv, mean, var, momentum, count)
    unbiased = count / (count - 1) if count > 1 else 1.0
    expected_mean = (1 - momentum) * rm0 + momentum * mean.double()
    expected_var = (1 - momentum) * rv0 + momentum * var.double() * unbiased
    eps = torch.finfo(running_dtype).eps
    torch.testing.assert_close(rm.double(), expected_mean, rtol=eps, atol=eps)
    torch.testing.assert_close(rv.double(), expected_var, rtol=eps, atol=eps)
    assert torch.equal(storage[:, 1], untouched), "the update wrote between the buffers' strided elements"


def test_compile():
    bn = fastcv.nn.BatchNorm2d(4)
    fn = torch.compile(lambda x, i: batch_norm_add_relu(x, i, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                                        False), fullgraph=True)
    x, identity = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    bn.eval()
    torch.testing.assert_close(fn(x, identity), F.relu(bn(x) + identity))


def test_fold_batch_norm(device):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1).to(device).double()
    bn = nn.BatchNorm2d(5).to(device).double()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    conv.eval(), bn.eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, device=device)
    fused = fastcv.nn.fuse_conv_bn_eval(conv, bn)
    torch.testing.assert_close(fused(x), bn(conv(x)))
    nobias = nn.Conv2d(3, 5, 3, bias=False).to(device).double().eval()
    torch.testing.assert_close(fastcv.nn.fuse_conv_bn_eval(nobias, bn)(x), bn(nobias(x)))
    tconv = nn.ConvTranspose2d(3, 5, 3, stride=2).to(device).double().eval()
    torch.testing.assert_close(fastcv.nn.fuse_conv_bn_eval(tconv, bn)(x), bn(tconv(x)))
    w, b = fold_batch_norm(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    torch.testing.assert_close(F.conv2d(x, w, b, padding=1), bn(conv(x)))
    with pytest.raises(ValueError, match="eval mode"):
        fastcv.nn.fuse_conv_bn_eval(conv.train(), bn)
    with pytest.raises(ValueError, match="one per output channel"):
        fold_batch_norm(conv.weight, None, torch.zeros(4), torch.ones(4))


BAD = {
    "rank1": (lambda: (torch.randn(5), torch.zeros(5), torch.ones(5)), {}, ValueError, "rank 2 to 5"),
    "rank6": (lambda: (torch.randn(2, 3, 2, 2, 2, 2), torch.zeros(3), torch.ones(3)), {}, ValueError, "rank 2 to 5"),
    "int_input": (lambda: (torch.ones(4, 3, dtype=torch.long), torch.zeros(3), torch.ones(3)), {}, TypeError,
                  "float32"),
    "stats_size": (lambda: (torch.randn(4, 3), torch.zeros(4), torch.ones(3)), {}, ValueError,
                   r"running_mean must be a Tensor\[3\]"),
    "stats_dtype": (lambda: (torch.randn(4, 3), torch.zeros(3, dtype=torch.float64), torch.ones(3)), {}, TypeError,
                    "running_mean must be torch.float32"),
    "stats_device": (lambda: (torch.randn(4, 3), torch.zeros(3, device="meta"), torch.ones(3)), {}, ValueError,
                     "device of input"),
    "weight_size": (lambda: (torch.randn(4, 3), torch.zeros(3), torch.ones(3)), {"weight": torch.ones(2)}, ValueError,
                    r"weight must be a Tensor\[3\]"),
    "one_value_per_channel": (lambda: (torch.randn(1, 3), torch.zeros(3), torch.ones(3)), {}, ValueError,
                              "more than 1 value per channel"),
    "one_value_per_channel_4d": (lambda: (torch.randn(1, 3, 1, 1), torch.zeros(3), torch.ones(3)), {}, ValueError,
                                 "more than 1 value per channel"),
    "negative_eps": (lambda: (torch.randn(4, 3), torch.zeros(3), torch.ones(3)), {"eps": -1e-5}, ValueError, "eps"),
    "zero_eps_training": (lambda: (torch.randn(4, 3), torch.zeros(3), torch.ones(3)), {"eps": 0.0}, ValueError,
                          "eps must be positive"),
    "nan_eps": (lambda: (torch.randn(4, 3), torch.zeros(3), torch.ones(3)), {"eps": math.nan}, ValueError, "eps"),
    "one_stat_missing": (lambda: (torch.randn(4, 3), torch.zeros(3), None), {}, ValueError, "both"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_without_updating(case):
    make_args, kwargs, error, match = BAD[case]
    x, rm, rv = make_args()
    before = [t.clone() if t is not None and t.device.type != "meta" else t for t in (rm, rv)]
    count = torch.zeros((), dtype=torch.long)
    with pytest.raises(error, match=match):
        batch_norm(x, rm, rv, training=True, num_batches_tracked=count, **kwargs)
    for t, b in zip((rm, rv), before):
        if t is not None and t.device.type != "meta":
            assert torch.equal(t, b), "running statistics changed by a call that raised"
    assert count.item() == 0


def test_bad_identity_and_module_input():
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="identity must have the shape"):
        batch_norm_add_relu(x, torch.randn(4, 3, 2, 1), None, None, training=True)
    with pytest.raises(ValueError, match="identity must have the dtype"):
        batch_norm_add_relu(x, x.double(), None, None, training=True)
    bn = fastcv.nn.BatchNorm2d(3)
    with pytest.raises(ValueError, match="4D input"):
        bn(torch.randn(4, 3))
    with pytest.raises(ValueError, match="more than 1 value"):
        bn(torch.randn(1, 3, 1, 1))
    assert bn.num_batches_tracked.item() == 0 and torch.equal(bn.running_mean, torch.zeros(3))


def test_odd_strides_are_copied_not_misread():
    x = torch.randn(4, 6, 5, 5)[:, ::2]  # every other channel: neither layout
    rm, rv = torch.zeros(3), torch.ones(3)
    close(batch_norm(x, rm, rv, training=True), F.batch_norm(x.double(), None, None, training=True), torch.float32)
    # A residual in another memory format than the input.
    y = batch_norm_add_relu(x.contiguous(memory_format=torch.channels_last), x.contiguous(), None, None, training=True)
    close(y, F.relu(F.batch_norm(x.double(), None, None, training=True) + x.double()), torch.float32)


def test_nan_passes_the_fused_relu(device):
    """relu(NaN) is NaN in PyTorch; the fused ReLU must not turn it into 0."""
    x = torch.randn(2, 3, 4, 4, device=device)
    x[0, 1, 2, 2] = math.nan
    w, b, rm, rv = params(3, torch.float32, device)
    y = batch_norm_relu(x, rm, rv, w, b, False)
    expected = F.relu(F.batch_norm(x, rm, rv, w, b, False))
    assert torch.isnan(y[0, 1, 2, 2]) and torch.equal(torch.isnan(y), torch.isnan(expected))
    torch.testing.assert_close(y.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("shape,channels_last", [((4, 32, 181, 181), False), ((4, 33, 180, 180), True)])
def test_large_outputs_streamed(shape, channels_last):
    """Outputs of 16 MB and more are written with streaming stores (csrc: kStreamBytes): odd plane
    lengths and channel counts put runs at every alignment."""
    x = make(shape, channels_last, torch.float32, "cpu")
    w, b, rm, rv = params(shape[1], torch.float32, "cpu")
    identity = make(shape, channels_last, torch.float32, "cpu", 1.0, 0.0, seed=3)
    g = make(shape, channels_last, torch.float32, "cpu", 1.0, 0.0, seed=7)
    for training in (True, False):
        y_ref, (xr, wr, br, _), _ = reference(x, rm, rv, w, b, training)
        x1, w1 = (t.detach().clone().requires_grad_() for t in (x, w))
        y = batch_norm(x1, rm.clone(), rv.clone(), w1, b, training)
        close(y, y_ref, torch.float32, "output")
        y.backward(g)
        y_ref.backward(g.double())
        close(x1.grad, xr.grad, torch.float32, "grad_input")
        close(w1.grad, wr.grad, torch.float32, "grad_weight")
        # The fused residual and ReLU, and identity's gradient (also streamed).
        pre, (xr, _, _, ir), _ = reference(x, rm, rv, w, b, training, identity=identity)
        x1, i1 = x.clone().requires_grad_(), identity.clone().requires_grad_()
        y = batch_norm_add_relu(x1, i1, rm.clone(), rv.clone(), w, b, training)
        y_ref = through_kernel_mask(y, pre, torch.float32)
        close(y, y_ref, torch.float32, "fused output")
        y.backward(g)
        y_ref.backward(g.double())
        close(i1.grad, ir.grad, torch.float32, "grad_identity")
        close(x1.grad, xr.grad, torch.float32, "fused grad_input")


def test_double_backward_raises():
    """A second derivative is not implemented: a clear error, not silently wrong (zero) gradients."""
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(batch_norm(x, None, None, training=True).pow(2).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        g.sum().backward()
