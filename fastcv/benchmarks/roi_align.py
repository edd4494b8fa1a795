"""RoI Align benchmark cases: the Mask R-CNN box head's pooling on one FPN level, against torchvision."""
from __future__ import annotations

import torch

from fastcv import ops
from fastcv.benchmarks import Case

SHAPE = (2, 256, 200, 272)  # a P2 level of an 800x1088 image, batch 2
BOXES, SCALE = 512, 0.25


def make_inputs(device: str, channels_last: bool, requires_grad: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*SHAPE, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    height, width = SHAPE[2] / SCALE, SHAPE[3] / SCALE
    xy = torch.rand(BOXES, 2, generator=g) * torch.tensor([width, height])
    wh = torch.rand(BOXES, 2, generator=g) * 300 + 10
    index = torch.randint(0, SHAPE[0], (BOXES, 1), generator=g).float()
    rois = torch.cat([index, xy, xy + wh], dim=1)
    x = x.to(device).requires_grad_(requires_grad)
    return x, rois.to(device)


def _forward(fn):
    return lambda x, rois: fn(x, rois, 7, SCALE, 2, True)


def _forward_backward(fn):
    def run(x, rois):
        out = fn(x, rois, 7, SCALE, 2, True)
        (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
        return grad

    return run


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _bytes(args, out):
    x = args[0]
    moved = x.numel() * x.element_size() + out.numel() * out.element_size()
    return moved / 1e9, "GB/s (input + output)"


def cases(device: str) -> list[Case]:
    import torchvision

    out = []
    for channels_last in (False, True):
        layout = "channels_last" if channels_last else "NCHW"
        name = f"[2,256,200,272] {layout}, {BOXES} boxes, 7x7, sampling 2, aligned"
        out.append(Case(
            "roi_align", f"forward, {name}",
            make=lambda cl=channels_last: make_inputs(device, cl, False),
            fastcv=_forward(ops.roi_align), reference=_forward(torchvision.ops.roi_align),
            reference_name="torchvision.ops.roi_align", check=_close, work=_bytes,
        ))
        out.append(Case(
            "roi_align", f"forward+backward, {name}",
            make=lambda cl=channels_last: make_inputs(device, cl, True),
            fastcv=_forward_backward(ops.roi_align), reference=_forward_backward(torchvision.ops.roi_align),
            reference_name="torchvision.ops.roi_align", check=_close, work=_bytes, quick=False,
        ))
    return out + multi_scale_cases(device)


def make_pyramid(device: str, requires_grad: bool, boxes: int = 1000):
    """A 4-level FPN (strides 4..32) of an 800x1088 batch of 2, and proposals of every size."""
    g = torch.Generator().manual_seed(1)
    feats = {f"p{i}": torch.randn(2, 256, 200 // 2**i, 272 // 2**i, generator=g).to(device).requires_grad_(requires_grad)
             for i in range(4)}
    xy = torch.rand(boxes, 2, generator=g) * torch.tensor([1000.0, 760.0])
    wh = torch.rand(boxes, 2, generator=g) ** 2 * 600 + 8
    b = torch.cat([xy, xy + wh], dim=1).to(device)
    return feats, [b[: boxes // 2], b[boxes // 2:]], [(800, 1088), (800, 1088)]


def _ms(module_cls, backward: bool):
    def run(feats, boxes, shapes):
        module = module_cls(list(feats), 7, 2)
        out = module(feats, boxes, shapes)
        if not backward:
            return out
        return torch.autograd.grad(out, list(feats.values()), torch.ones_like(out))

    return run


def _close_all(a, b):
    if isinstance(a, torch.Tensor):
        a, b = [a], [b]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def multi_scale_cases(device: str) -> list[Case]:
    import torchvision

    from fastcv import nn as fnn

    name = "4-level FPN [2,256,200..25,272..34], 1,000 boxes, 7x7, sampling 2"
    return [
        Case("multi_scale_roi_align", f"{kind}, {name}",
             make=lambda bw=backward: make_pyramid(device, bw),
             fastcv=_ms(fnn.MultiScaleRoIAlign, backward), reference=_ms(torchvision.ops.MultiScaleRoIAlign, backward),
             reference_name="torchvision.ops.MultiScaleRoIAlign", check=_close_all, quick=not backward)
        for kind, backward in (("forward", False), ("forward+backward", True))
    ]
