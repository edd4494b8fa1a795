"""Depthwise convolution benchmark cases: two MobileNetV2 layers at batch 8 (a stride-1 block of the
56x56 stage and the stride-2 layer into it), forward and forward + backward (input and weight
gradients), NCHW and channels_last, against F.conv2d with the same weights."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcv import ops
from fastcv.benchmarks import Case

LAYERS = [  # input shape, stride (3x3 kernel, padding 1, groups = channels)
    ((8, 144, 56, 56), 1),
    ((8, 96, 112, 112), 2),
]


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _forward_work(args, out):
    return _nbytes(args[0], out) / 1e9, "GB/s (input + output)"


def _training_work(args, out):
    # The least each pass must move: forward x -> y, input gradient dy -> dx, weight gradient dy and x.
    x, _, dy = args
    return (_nbytes(x, dy) + _nbytes(dy, out[0]) + _nbytes(dy, x)) / 1e9, "GB/s (inputs + outputs, 3 passes)"


def _close(a, b):
    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        scale = max(v.abs().max().item(), 1.0)
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4 * scale)


def cases(device: str) -> list[Case]:
    result = []
    for shape, stride in LAYERS:
        c = shape[1]
        for layout in ("NCHW", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            name = f"{list(shape)}, 3x3, stride {stride}, {layout}"

            def forward_inputs(shape=shape, fmt=fmt):
                g = torch.Generator().manual_seed(0)
                x = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
                return x.to(device), torch.randn(shape[1], 1, 3, 3, generator=g).to(device)

            def training_inputs(shape=shape, fmt=fmt, stride=stride):
                x, w = forward_inputs(shape, fmt)
                out = (shape[2] + 2 - 3) // stride + 1
                dy = torch.randn(shape[0], shape[1], out, out, generator=torch.Generator().manual_seed(1))
                return x.requires_grad_(), w.requires_grad_(), dy.contiguous(memory_format=fmt).to(device)

            def conv(fn, stride=stride, c=c):
                return lambda x, w: fn(x, w, None, stride, 1, 1, c)

            def training(fn, stride=stride, c=c):
                return lambda x, w, dy: torch.autograd.grad(fn(x, w, None, stride, 1, 1, c), (x, w), dy)

            result.append(Case("depthwise_conv2d", f"forward {name}", make=forward_inputs, fastcv=conv(ops.conv2d),
                               reference=conv(F.conv2d), reference_name="torch.nn.functional.conv2d",
                               check=_close, work=_forward_work))
            result.append(Case("depthwise_conv2d", f"forward+backward {name}", make=training_inputs,
                               fastcv=training(ops.conv2d), reference=training(F.conv2d),
                               reference_name="torch.nn.functional.conv2d + autograd", check=_close,
                               work=_training_work, quick=False))
    return result
