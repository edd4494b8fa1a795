"""ResNet (He et al., 2016), ResNeXt (Xie et al., 2017) and wide ResNet on fastcv's kernels.

The networks are torchvision's: the same modules under the same names (conv1, bn1, layer1.0.conv1,
layer1.0.downsample.0, ..., fc), the same channel arithmetic and, from the same seed, the same initial weights, so
torchvision's state_dicts load unchanged. What differs is how a block runs: every convolution -> batch norm
(-> ReLU) is one fastcv.nn.fused.conv_bn_act call, and a block's last one takes the shortcut as its identity:

- eval: each batch norm is folded into its convolution, so a bottleneck is three fastcv conv2d_fused calls whose
  epilogues add the bias, the shortcut and the ReLU, and the projection shortcut is a fourth;
- training: fastcv's convolution, then batch_norm_relu, or batch_norm_add_relu at the block's junction (one pass
  over the activations each way instead of three).

ResNetTrunk is the network without its classifier (the stem and the four stages, returning each stage's output):
the backbone of FCN and of the detectors, with torchvision's keys minus fc.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from fastcv.models._blocks import check_images, reject_weights
from fastcv.nn.batch_norm import BatchNorm2d
from fastcv.nn.conv import Conv2d
from fastcv.nn.fused import conv_bn_act

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "ResNetTrunk", "resnet18", "resnet34", "resnet50", "resnet101",
           "resnet152", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2",
           "wide_resnet101_2"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> Conv2d:
    return Conv2d(in_planes, out_planes, 3, stride, padding=dilation, groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> Conv2d:
    return Conv2d(in_planes, out_planes, 1, stride, bias=False)


def _shortcut(x: Tensor, downsample: nn.Module | None) -> Tensor:
    """The block's identity: x, or its projection (a 1 x 1 convolution and batch norm, one fused call)."""
    if downsample is None:
        return x
    if isinstance(downsample, nn.Sequential) and len(downsample) == 2:
        return conv_bn_act(x, downsample[0], downsample[1])
    return downsample(x)  # a user's own shortcut module


class BasicBlock(nn.Module):
    """Two 3 x 3 convolutions (ResNet-18 and -34)."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        norm_layer = norm_layer or BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError(f"BasicBlock only supports groups=1 and base_width=64, got groups={groups}, "
                             f"base_width={base_width}")
        if dilation > 1:
            raise NotImplementedError(f"Dilation > 1 not supported in BasicBlock, got dilation={dilation}")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = _shortcut(x, self.downsample)
        out = conv_bn_act(x, self.conv1, self.bn1, relu=self.relu)
        return conv_bn_act(out, self.conv2, self.bn2, identity, relu=self.relu)


class Bottleneck(nn.Module):
    """1 x 1 (reduce), 3 x 3 (grouped in ResNeXt, strided), 1 x 1 (expand by 4): ResNet-50 and deeper."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        norm_layer = norm_layer or BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = _shortcut(x, self.downsample)
        out = conv_bn_act(x, self.conv1, self.bn1, relu=self.relu)
        out = conv_bn_act(out, self.conv2, self.bn2, relu=self.relu)
        return conv_bn_act(out, self.conv3, self.bn3, identity, relu=self.relu)


class ResNetTrunk(nn.Module):
    """The stem (7 x 7 stride-2 convolution, batch norm, ReLU, 3 x 3 max pool) and the four stages; forward returns
    the four stages' outputs (strides 4, 8, 16, 32, unless replace_stride_with_dilation dilates a stage instead of
    striding it, as FCN's backbone does). torchvision's constructor arguments and initialisation."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], zero_init_residual: bool = False,
                 groups: int = 1, width_per_group: int = 64, replace_stride_with_dilation: list[bool] | None = None,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        self._build(block, layers, groups, width_per_group, replace_stride_with_dilation, norm_layer)
        self._init_weights(zero_init_residual)

    def _build(self, block, layers, groups, width_per_group, replace_stride_with_dilation, norm_layer) -> None:
        """The modules in torchvision's order (so that one seed gives torchvision's initial weights)."""
        self._norm_layer = norm_layer or BatchNorm2d
        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None or a 3-element tuple, got "
                             f"{replace_stride_with_dilation}")
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:  # keep the resolution: dilate the following convolutions instead of striding
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       norm_layer(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation,
                        norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                dilation=self.dilation, norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        """torchvision's: He-normal convolutions (fan out), unit norms; zero_init_residual starts each block as
        the identity (its last batch norm's weight 0)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                last = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
                if last is not None and last.weight is not None:
                    nn.init.constant_(last.weight, 0)

    def stages(self, x: Tensor) -> list[Tensor]:
        check_images(x, type(self).__name__)
        x = self.maxpool(conv_bn_act(x, self.conv1, self.bn1, relu=self.relu))
        outputs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outputs.append(x)
        return outputs

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.stages(x)


class ResNet(ResNetTrunk):
    """The classifier: the trunk, global average pooling and a fully connected layer (torchvision's ResNet)."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: list[bool] | None = None,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:
        nn.Module.__init__(self)
        self._build(block, layers, groups, width_per_group, replace_stride_with_dilation, norm_layer)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self._init_weights(zero_init_residual)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(self.stages(x)[-1]), 1))


def _resnet(block, layers, kwargs: dict, **defaults) -> ResNet:
    reject_weights(kwargs)
    return ResNet(block, layers, **{**defaults, **kwargs})


def resnet18(**kwargs) -> ResNet:
    return _resnet(BasicBlock, [2, 2, 2, 2], kwargs)


def resnet34(**kwargs) -> ResNet:
    return _resnet(BasicBlock, [3, 4, 6, 3], kwargs)


def resnet50(**kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 6, 3], kwargs)


def resnet101(**kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 23, 3], kwargs)


def resnet152(**kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 8, 36, 3], kwargs)


def resnext50_32x4d(**kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 6, 3], kwargs, groups=32, width_per_group=4)


def resnext101_32x8d(**kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 23, 3], kwargs, groups=32, width_per_group=8)


def resnext101_64x4d(**kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 23, 3], kwargs, groups=64, width_per_group=4)


def wide_resnet50_2(**kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 6, 3], kwargs, width_per_group=128)


def wide_resnet101_2(**kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 23, 3], kwargs, width_per_group=128)
