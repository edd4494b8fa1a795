"""Batch norm benchmark cases: ResNet-50's [32,64,56,56] (stage 1) and [32,256,14,14] (stage 3) at batch
32, NCHW and channels_last, training and evaluation, forward and forward + backward; the fused
batch_norm_relu and batch_norm_add_relu against the unfused sequence torchvision's ResNet runs
(bn, then relu(inplace=True); bn, then out += identity, relu(inplace=True))."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcv import ops
from fastcv.benchmarks import Case

SHAPES = [(32, 64, 56, 56), (32, 256, 14, 14)]


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _close(a, b):
    """Agreement to float32 rounding, except where a fused ReLU's mask flips: an output within rounding of
    zero may be kept by one kernel and dropped by the other, which changes that element's gradient
    entirely. A few per million such elements are allowed, and in the per-channel (parameter) gradients,
    sums over 10^5 values, the one term each flip adds or drops."""
    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        scale = max(v.abs().max().item(), 1.0)
        bad = ~torch.isclose(u, v, rtol=1e-4, atol=(1e-2 if v.dim() == 1 else 1e-4) * scale)
        assert bad.sum().item() <= 1e-5 * v.numel(), f"{bad.sum().item()} of {v.numel()} values disagree"


# The unfused references, as torchvision's ResNet computes them.
def _torch_bn(x, rm, rv, w, b, identity, training):
    return F.batch_norm(x, rm, rv, w, b, training)


def _torch_bn_relu(x, rm, rv, w, b, identity, training):
    return F.relu(F.batch_norm(x, rm, rv, w, b, training), inplace=True)


def _torch_bn_add_relu(x, rm, rv, w, b, identity, training):
    out = F.batch_norm(x, rm, rv, w, b, training)
    out += identity
    return F.relu(out, inplace=True)


def _ours(kind):
    if kind == "batch_norm":
        return lambda x, rm, rv, w, b, identity, training: ops.batch_norm(x, rm, rv, w, b, training)
    if kind == "batch_norm_relu":
        return lambda x, rm, rv, w, b, identity, training: ops.batch_norm_relu(x, rm, rv, w, b, training)
    return lambda x, rm, rv, w, b, identity, training: ops.batch_norm_add_relu(x, identity, rm, rv, w, b, training)


REFERENCES = {"batch_norm": (_torch_bn, "F.batch_norm"),
              "batch_norm_relu": (_torch_bn_relu, "F.batch_norm -> F.relu(inplace)"),
              "batch_norm_add_relu": (_torch_bn_add_relu, "F.batch_norm -> += identity -> F.relu(inplace)")}


def _forward(fn, training):
    return lambda x, rm, rv, w, b, identity, dy: fn(x, rm, rv, w, b, identity, training)


def _training(fn, training, kind):
    def run(x, rm, rv, w, b, identity, dy):
        wrt = (x, w, b, identity) if kind == "batch_norm_add_relu" else (x, w, b)
        return torch.autograd.grad(fn(x, rm, rv, w, b, identity, training), wrt, dy)
    return run


def _work(kind, backward):
    """The bytes each pass must move at least: forward x (+ identity) -> y; backward dy and x (+ y,
    the ReLU's mask) -> dx (+ identity's gradient)."""
    def work(args, out):
        x, *_, identity, dy = args
        fwd = _nbytes(x, x) + (_nbytes(x) if kind == "batch_norm_add_relu" else 0)
        if not backward:
            return fwd / 1e9, "GB/s (least traffic)"
        bwd = 3 * _nbytes(x) + (_nbytes(x) if kind != "batch_norm" else 0) + (
            _nbytes(x) if kind == "batch_norm_add_relu" else 0)
        return (fwd + bwd) / 1e9, "GB/s (least traffic, fwd+bwd)"
    return work


def _maker(shape, fmt, device, grad):
    def make():
        g = torch.Generator().manual_seed(0)
        c = shape[1]
        x = torch.randn(shape, generator=g).contiguous(memory_format=fmt).to(device)
        identity = torch.randn(shape, generator=g).contiguous(memory_format=fmt).to(device)
        dy = torch.randn(shape, generator=g).contiguous(memory_format=fmt).to(device)
        w, b = (torch.rand(c, generator=g) + 0.5).to(device), torch.randn(c, generator=g).to(device)
        rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
        if grad:
            x, w, b, identity = (t.requires_grad_() for t in (x, w, b, identity))
        return x, rm, rv, w, b, identity, dy
    return make


# (kind, training, backward, quick)
VARIANTS = [
    ("batch_norm", True, False, True), ("batch_norm", False, False, False),
    ("batch_norm", True, True, True), ("batch_norm", False, True, False),
    ("batch_norm_relu", True, False, False), ("batch_norm_relu", True, True, True),
    ("batch_norm_add_relu", True, False, False), ("batch_norm_add_relu", False, False, False),
    ("batch_norm_add_relu", True, True, True),
]


def cases(device: str) -> list[Case]:
    result = []
    for shape in SHAPES:
        for layout in ("NCHW", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            for kind, training, backward, quick in VARIANTS:
                ref, ref_name = REFERENCES[kind]
                mode = "train" if training else "eval"
                name = f"{list(shape)} {layout}, {mode}, {'forward+backward' if backward else 'forward'}"
                wrap = (lambda f: _training(f, training, kind)) if backward else (lambda f: _forward(f, training))
                result.append(Case(
                    kind, name, make=_maker(shape, fmt, device, backward), fastcv=wrap(_ours(kind)),
                    reference=wrap(ref), reference_name=ref_name + (" + autograd" if backward else ""),
                    check=_close, work=_work(kind, backward), quick=quick and shape == SHAPES[0]))
    return result
