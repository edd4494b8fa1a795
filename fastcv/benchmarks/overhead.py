"""Per-call overhead: every op on tiny inputs, eager and under autograd (forward + backward), against its
PyTorch/torchvision counterpart. Networks make many small calls (ViT-S has 12 attention calls a forward,
ResNet-50 53 batch norms), so the fixed cost of a call (argument checks, allocation, dispatch, autograd
bookkeeping, waking threads) matters as much as a kernel's speed. The target is at most 1.5x PyTorch's
time per call."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcv import ops
from fastcv.benchmarks import Case

OP_NAME = "per-call overhead"


def _close(got, expected):
    """float32 results of a handful of terms: a few float32 roundings apart."""
    for g, e in zip(got if isinstance(got, (tuple, list)) else (got,),
                    expected if isinstance(expected, (tuple, list)) else (expected,)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def _with_grad(fn, n_inputs):
    """fn's output and the gradients of its first n_inputs arguments (which require grad)."""
    def run(*args):
        out = fn(*args)
        return (out.detach(), *torch.autograd.grad(out.sum(), args[:n_inputs]))
    return run


def _leaf(t):
    return t.detach().requires_grad_()


def cases(device: str) -> list[Case]:
    def make(builder):
        def build():
            g = torch.Generator().manual_seed(0)
            return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in builder(g))
        return build

    def case(op, name, builder, ours, reference, reference_name, check=_close, grad_inputs=0):
        if grad_inputs:
            inner = builder
            builder = lambda g: tuple(_leaf(t) if i < grad_inputs else t  # noqa: E731
                                      for i, t in enumerate(inner(g)))
            ours, reference = _with_grad(ours, grad_inputs), _with_grad(reference, grad_inputs)
            name += ", forward+backward"
        return Case(op=op, name=f"{OP_NAME}: {name}", make=make(builder), fastcv=ours, reference=reference,
                    reference_name=reference_name, check=check, tags={"overhead": True})

    import torchvision

    out = []
    # RoI Align: torchvision's op (NMS has its own tiny case in fastcv/benchmarks/nms.py)
    roi = lambda g: (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([[0.0, 1, 1, 5, 6]]))  # noqa: E731
    for grad in (0, 1):
        out.append(case("roi_align", "[1,4,8,8], 1 box, 2x2", roi,
                        lambda x, b: ops.roi_align(x, b, 2, 1.0, 2, True),
                        lambda x, b: torchvision.ops.roi_align(x, b, 2, 1.0, 2, True), "torchvision.ops.roi_align",
                        grad_inputs=grad))
    # im2col / col2im: F.unfold / F.fold
    for grad in (0, 1):
        out.append(case("im2col", "[1,4,6,6], 3x3", lambda g: (torch.randn(1, 4, 6, 6, generator=g),),
                        lambda x: ops.im2col(x, 3, padding=1), lambda x: F.unfold(x, 3, padding=1), "F.unfold",
                        grad_inputs=grad))
        out.append(case("col2im", "[1,36,36] -> [1,4,6,6], 3x3", lambda g: (torch.randn(1, 36, 36, generator=g),),
                        lambda c: ops.col2im(c, (6, 6), 3, padding=1), lambda c: F.fold(c, (6, 6), 3, padding=1),
                        "F.fold", grad_inputs=grad))
    # Convolutions: F.conv2d (oneDNN), F.conv_transpose2d
    conv = lambda g: (torch.randn(1, 4, 6, 6, generator=g), torch.randn(4, 4, 3, 3, generator=g))  # noqa: E731
    depthwise = lambda g: (torch.randn(1, 4, 6, 6, generator=g), torch.randn(4, 1, 3, 3, generator=g))  # noqa: E731
    for grad in (0, 2):
        out.append(case("conv2d", "[1,4,6,6], 3x3, 4 -> 4", conv, lambda x, w: ops.conv2d(x, w, padding=1),
                        lambda x, w: F.conv2d(x, w, padding=1), "F.conv2d", grad_inputs=grad))
        out.append(case("depthwise_conv2d", "[1,4,6,6], 3x3 depthwise", depthwise,
                        lambda x, w: ops.conv2d(x, w, padding=1, groups=4),
                        lambda x, w: F.conv2d(x, w, padding=1, groups=4), "F.conv2d", grad_inputs=grad))
        out.append(case("conv_transpose2d", "[1,4,6,6], 4x4 stride 2", lambda g: (
            torch.randn(1, 4, 6, 6, generator=g), torch.randn(4, 4, 4, 4, generator=g)),
            lambda x, w: ops.conv_transpose2d(x, w, stride=2, padding=1),
            lambda x, w: F.conv_transpose2d(x, w, stride=2, padding=1), "F.conv_transpose2d", grad_inputs=grad))
    # Batch norm: F.batch_norm, training (batch statistics, running statistics updated) and evaluation
    bn = lambda g: (torch.randn(2, 4, 4, 4, generator=g), torch.rand(4, generator=g) + 0.5,  # noqa: E731
                    torch.randn(4, generator=g), torch.zeros(4), torch.ones(4))
    for training in (True, False):
        mode = "training" if training else "evaluation"
        for grad in (0, 3):
            out.append(case("batch_norm", f"[2,4,4,4], {mode}", bn,
                            lambda x, w, b, rm, rv, t=training: ops.batch_norm(x, rm, rv, w, b, t),
                            lambda x, w, b, rm, rv, t=training: F.batch_norm(x, rm, rv, w, b, t),
                            "F.batch_norm", grad_inputs=grad))
    # Attention: F.scaled_dot_product_attention
    qkv = lambda g: tuple(torch.randn(1, 2, 4, 8, generator=g) for _ in range(3))  # noqa: E731
    for grad in (0, 3):
        out.append(case("scaled_dot_product_attention", "[1,2,4,8]", qkv, ops.scaled_dot_product_attention,
                        F.scaled_dot_product_attention, "F.scaled_dot_product_attention", grad_inputs=grad))
    return out
