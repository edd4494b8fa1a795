"""MobileNetV2 (Sandler et al., 2018, "Inverted Residuals and Linear Bottlenecks") on fastcv's kernels.

The network is torchvision's: the same modules under the same names (features.0.0.weight, features.1.conv.0.0.weight,
..., classifier.1.weight), the same channel arithmetic and the same initialisation, so torchvision's state_dicts
load unchanged. What differs is how the blocks run:

- every convolution is fastcv.nn.Conv2d; the 3 x 3 depthwise ones (groups == channels) reach fastcv's direct
  depthwise kernels through it;
- every convolution -> batch norm pair is one fastcv.nn.fused.conv_bn_act call: in eval mode the batch norm is
  folded into the convolution (one conv2d_fused), in training mode the convolution then fastcv's batch norm;
- the inverted residual's skip connection is added in the projection's epilogue (conv_bn_act's identity) rather
  than by a separate addition;
- ReLU6 is not one of fastcv's fused epilogues, so it follows as its own (in-place) op.

The conv -> norm -> activation blocks are fastcv.models._blocks.Conv2dNormActivation.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from fastcv.models._blocks import Conv2dNormActivation, check_images, reject_weights
from fastcv.nn.batch_norm import BatchNorm2d
from fastcv.nn.conv import Conv2d
from fastcv.nn.fused import conv_bn_act

__all__ = ["InvertedResidual", "MobileNetV2", "mobilenet_v2"]

# (expansion t, output channels c, repeats n, first stride s) of each stage: the paper's Table 2
_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


def _make_divisible(value: float, divisor: int) -> int:
    """value rounded to the nearest multiple of divisor (at least divisor), rounded up instead when rounding
    to the nearest would lose more than 10% (the TensorFlow reference's rule, which torchvision follows: the
    channel counts, hence the state_dict's shapes, depend on it)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class InvertedResidual(nn.Module):
    """MobileNetV2's block: a 1 x 1 expansion to expand_ratio times the channels (left out when the ratio is 1),
    a 3 x 3 depthwise convolution (carrying the stride), both with ReLU6, then a linear 1 x 1 projection to
    `oup` channels. The input is added to the output when the shapes allow it (stride 1, inp == oup).

    Modules as torchvision's: conv.0 (.1) the Conv2dNormActivation blocks, then the projection's convolution and
    batch norm as conv.{-2} and conv.{-1}."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: float,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual: stride must be 1 or 2, got {stride}")
        norm_layer = norm_layer or BatchNorm2d
        hidden = round(inp * expand_ratio)
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        self.out_channels = oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden, kernel_size=1, norm_layer=norm_layer,
                                               activation_layer=nn.ReLU6))
        layers += [
            Conv2dNormActivation(hidden, hidden, stride=stride, groups=hidden, norm_layer=norm_layer,
                                 activation_layer=nn.ReLU6),
            Conv2d(hidden, oup, 1, bias=False),
            norm_layer(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        *blocks, project, norm = self.conv
        h = x
        for block in blocks:
            h = block(h)
        # the skip connection is the residual of the projection's fused epilogue (eval mode)
        return conv_bn_act(h, project, norm, identity=x if self.use_res_connect else None)


class MobileNetV2(nn.Module):
    """MobileNetV2 with torchvision's constructor (see torchvision.models.MobileNetV2):

    num_classes: outputs of the classifier.
    width_mult: scales every layer's channels (rounded to multiples of round_nearest); the last layer's 1280
        channels only grow with it, never shrink.
    inverted_residual_setting: the stages as [t, c, n, s] rows (expansion, channels, repeats, first stride);
        the paper's by default.
    round_nearest: channel counts are multiples of it (1: no rounding).
    block: the block class (InvertedResidual's signature); norm_layer: the normalisation (fastcv's BatchNorm2d).
    dropout: before the classifier's linear layer.

    features: the stem (3 x 3, stride 2), the inverted residuals, the 1 x 1 convolution to last_channel;
    then global average pooling and classifier (dropout, linear)."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0,
                 inverted_residual_setting: list[list[int]] | None = None, round_nearest: int = 8,
                 block: Callable[..., nn.Module] | None = None, norm_layer: Callable[..., nn.Module] | None = None,
                 dropout: float = 0.2) -> None:
        super().__init__()
        block = block or InvertedResidual
        norm_layer = norm_layer or BatchNorm2d
        setting = _SETTING if inverted_residual_setting is None else inverted_residual_setting
        if len(setting) == 0 or any(len(row) != 4 for row in setting):
            raise ValueError(f"inverted_residual_setting must be a non-empty list of [t, c, n, s] rows, got {setting}")

        channels = _make_divisible(32 * width_mult, round_nearest)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [Conv2dNormActivation(3, channels, stride=2, norm_layer=norm_layer,
                                                          activation_layer=nn.ReLU6)]
        for t, c, n, s in setting:
            out_channels = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(block(channels, out_channels, s if i == 0 else 1, expand_ratio=t,
                                      norm_layer=norm_layer))
                channels = out_channels
        features.append(Conv2dNormActivation(channels, self.last_channel, kernel_size=1, norm_layer=norm_layer,
                                             activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's: He-normal convolutions (fan out), unit batch / group norms, small normal linear weights,
        zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_images(x, "MobileNetV2")
        x = self.features(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


def mobilenet_v2(**kwargs) -> MobileNetV2:
    """MobileNetV2 (torchvision.models.mobilenet_v2's architecture) with MobileNetV2's arguments; no weights are
    downloaded: load torchvision's state_dict into it."""
    reject_weights(kwargs)
    return MobileNetV2(**kwargs)
