"""Convolution benchmark cases: the ResNet-50 layers at batch 8 and an FCN-style transposed convolution
(the MobileNetV2 depthwise layers are in depthwise.py), forward and forward+backward, against F.conv2d / F.conv_transpose2d
(oneDNN on the CPU, cuDNN on the GPU); and two of the layers as training conv -> batch norm -> relu chains
(conv2d_batch_norm against F.conv2d -> F.batch_norm -> F.relu). Throughput is useful GFLOP/s: 2 * output elements * (C/groups)
* kh * kw per forward, three times that for forward+backward (the input and weight gradients)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcv import ops
from fastcv.benchmarks import Case
from fastcv.benchmarks.peaks import kernel_gflops

# name, input [N, C, H, W], weight [Cout, C/groups, kh, kw], stride, padding, groups, in --quick
LAYERS = [
    ("ResNet-50 conv2_x 3x3", (8, 64, 56, 56), (64, 64, 3, 3), 1, 1, 1, True),
    ("ResNet-50 conv3_x 3x3", (8, 128, 28, 28), (128, 128, 3, 3), 1, 1, 1, False),
    ("ResNet-50 conv4_x 3x3", (8, 256, 14, 14), (256, 256, 3, 3), 1, 1, 1, False),
    ("ResNet-50 conv2_x 1x1 256->64", (8, 256, 56, 56), (64, 256, 1, 1), 1, 0, 1, True),
    ("ResNet-50 conv2_x 1x1 64->256", (8, 64, 56, 56), (256, 64, 1, 1), 1, 0, 1, False),
    ("ResNet-50 stem 7x7/2", (8, 3, 224, 224), (64, 3, 7, 7), 2, 3, 1, False),
]


def _close(a, b):
    a, b = (a,) if isinstance(a, torch.Tensor) else a, (b,) if isinstance(b, torch.Tensor) else b
    for x, y in zip(a, b):
        scale = max(y.abs().amax().item(), 1.0)
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4 * scale)


def _close_reduced(a, b):  # bfloat16: 8 bits of mantissa, sums in float32 on both sides
    a, b = (a,) if isinstance(a, torch.Tensor) else a, (b,) if isinstance(b, torch.Tensor) else b
    for x, y in zip(a, b):
        scale = max(y.float().abs().amax().item(), 1.0)
        torch.testing.assert_close(x.float(), y.float(), rtol=2e-2, atol=2e-2 * scale)


def _flops(weight_shape, backward):
    def work(args, out):
        out = out[0] if isinstance(out, tuple) else out
        _, cin_g, kh, kw = weight_shape
        return 2 * out.numel() * cin_g * kh * kw * (3 if backward else 1) / 1e9, "GFLOP/s"
    return work


def _forward_backward(conv, **kw):
    def run(x, w, grad):
        out = conv(x, w, **kw)
        return (out, *torch.autograd.grad(out, (x, w), grad))
    return run


def _layer_cases(device, name, xs, ws, stride, padding, groups, quick, channels_last, dtype=torch.float32):
    kw = dict(stride=stride, padding=padding, groups=groups)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    suffix = (", channels_last" if channels_last else "") + ("" if dtype == torch.float32 else f", {dtype}")
    check = _close if dtype == torch.float32 else _close_reduced
    # On the CPU: GFLOP/s against the micro-kernel every CPU convolution path multiplies with
    peak = (lambda: (kernel_gflops(), "micro-kernel")) if device == "cpu" and dtype == torch.float32 else None

    def forward_inputs():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(*xs, generator=g).to(device=device, dtype=dtype, memory_format=fmt)
        return x, (torch.randn(*ws, generator=g) / (ws[1] * ws[2] * ws[3]) ** 0.5).to(device=device, dtype=dtype)

    def backward_inputs():
        x, w = forward_inputs()
        grad = torch.randn(F.conv2d(x, w, **kw).shape, generator=torch.Generator().manual_seed(1)).to(
            device=device, dtype=dtype, memory_format=fmt)
        return x.requires_grad_(), w.requires_grad_(), grad

    return [
        Case("conv2d", f"{name}, {list(xs)}{suffix}", make=forward_inputs,
             fastcv=lambda x, w: ops.conv2d(x, w, **kw), reference=lambda x, w: F.conv2d(x, w, **kw),
             reference_name="torch.nn.functional.conv2d", check=check, work=_flops(ws, False),
             quick=quick and not channels_last, peak=peak),
        Case("conv2d", f"{name}, {list(xs)}{suffix}, forward+backward", make=backward_inputs,
             fastcv=_forward_backward(ops.conv2d, **kw), reference=_forward_backward(F.conv2d, **kw),
             reference_name="torch.nn.functional.conv2d", check=check, work=_flops(ws, True), quick=False,
             peak=peak),
    ]


def _conv_bn_relu(conv_bn):
    """conv -> training batch norm -> relu, forward and backward: fastcv.ops.conv2d_batch_norm, or PyTorch's ops
    as torchvision's ResNet runs them."""
    def run(x, w, gamma, beta, grad):
        c = w.shape[0]
        rm, rv = torch.zeros(c, device=x.device), torch.ones(c, device=x.device)
        out = conv_bn(x, w, rm, rv, gamma, beta)
        return (out, *torch.autograd.grad(out, (x, w, gamma, beta), grad)) if grad is not None else out
    return run


def _ours_conv_bn(x, w, rm, rv, gamma, beta):
    return ops.conv2d_batch_norm(x, w, None, rm, rv, gamma, beta, True, padding=w.shape[2] // 2, relu=True)


def _torch_conv_bn(x, w, rm, rv, gamma, beta):
    return F.relu(F.batch_norm(F.conv2d(x, w, padding=w.shape[2] // 2), rm, rv, gamma, beta, True), inplace=True)


def _conv_bn_cases(device, name, xs, ws, channels_last):
    """conv2d_batch_norm (training: statistics from the convolution's tiles where they pay) against F.conv2d ->
    F.batch_norm -> F.relu, forward and forward+backward."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    suffix = ", channels_last" if channels_last else ""
    peak = (lambda: (kernel_gflops(), "micro-kernel")) if device == "cpu" else None

    def inputs(backward):
        def make():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(*xs, generator=g).to(device=device, memory_format=fmt)
            w = (torch.randn(*ws, generator=g) / (ws[1] * ws[2] * ws[3]) ** 0.5).to(device)
            gamma, beta = (torch.rand(ws[0], generator=g) + 0.5).to(device), torch.randn(ws[0], generator=g).to(device)
            if not backward:
                return x, w, gamma, beta, None
            grad = torch.randn(F.conv2d(x, w, padding=ws[2] // 2).shape, generator=g).to(device=device,
                                                                                          memory_format=fmt)
            return (*(t.requires_grad_() for t in (x, w, gamma, beta)), grad)
        return make

    return [Case("conv2d_batch_norm", f"{name}, {list(xs)}{suffix}, train{', forward+backward' if backward else ''}",
                 make=inputs(backward), fastcv=_conv_bn_relu(_ours_conv_bn), reference=_conv_bn_relu(_torch_conv_bn),
                 reference_name="F.conv2d -> F.batch_norm -> F.relu" + (" + autograd" if backward else ""),
                 check=_close, work=_flops(ws, backward), quick=False, peak=peak)
            for backward in (False, True)]


def cases(device: str) -> list[Case]:
    out = []
    for name, xs, ws, _, _, _, _ in (LAYERS[0], LAYERS[4]):
        for channels_last in (False, True):
            out += _conv_bn_cases(device, name, xs, ws, channels_last)
    for name, xs, ws, stride, padding, groups, quick in LAYERS:
        for channels_last in (False, True):
            out += _layer_cases(device, name, xs, ws, stride, padding, groups, quick, channels_last)
        if device == "cuda":  # the GPU target: bfloat16, channels_last, against cuDNN
            out += _layer_cases(device, name, xs, ws, stride, padding, groups, quick, True, torch.bfloat16)

    def upsample_inputs():  # FCN-style 2x upsampling of a score map
        g = torch.Generator().manual_seed(2)
        return torch.randn(8, 64, 28, 28, generator=g).to(device), torch.randn(64, 32, 4, 4, generator=g).to(device) / 32

    out.append(Case("conv_transpose2d", "[8,64,28,28] -> [8,32,56,56], 4x4 stride 2", make=upsample_inputs,
                    fastcv=lambda x, w: ops.conv_transpose2d(x, w, stride=2, padding=1),
                    reference=lambda x, w: F.conv_transpose2d(x, w, stride=2, padding=1),
                    reference_name="torch.nn.functional.conv_transpose2d", check=_close,
                    work=lambda args, out: (2 * args[0].numel() * 32 * 16 / 1e9, "GFLOP/s")))
    return out
