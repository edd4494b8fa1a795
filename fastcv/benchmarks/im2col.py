"""im2col / col2im benchmark cases: the 3x3 convolution input of a ResNet-50 stage at batch 8."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcv import ops
from fastcv.benchmarks import Case

SHAPE = (8, 64, 56, 56)


def _bandwidth(args, out):
    moved = args[0].numel() * args[0].element_size() + out.numel() * out.element_size()
    return moved / 1e9, "GB/s (input + output)"


def _equal(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def cases(device: str) -> list[Case]:
    def image():
        return (torch.randn(*SHAPE, generator=torch.Generator().manual_seed(0)).to(device),)

    def columns():
        return (F.unfold(image()[0], 3, padding=1),)

    return [
        Case("im2col", "[8,64,56,56], 3x3, padding 1", make=image,
             fastcv=lambda x: ops.im2col(x, 3, padding=1), reference=lambda x: F.unfold(x, 3, padding=1),
             reference_name="torch.nn.functional.unfold", check=_equal, work=_bandwidth),
        Case("col2im", "[8,576,3136] -> [8,64,56,56], 3x3, padding 1", make=columns,
             fastcv=lambda c: ops.col2im(c, (56, 56), 3, padding=1),
             reference=lambda c: F.fold(c, (56, 56), 3, padding=1),
             reference_name="torch.nn.functional.fold", check=_equal, work=_bandwidth),
    ]
