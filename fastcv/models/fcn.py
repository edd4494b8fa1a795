"""FCN (Long et al., 2015) with a dilated ResNet backbone, torchvision's segmentation model, on fastcv's kernels.

The network is torchvision's fcn_resnet50 / fcn_resnet101: the backbone is ResNet's trunk with its last two stages
dilated instead of strided (output stride 8), keys backbone.conv1.weight ... backbone.layer4..., a 3 x 3
convolution head on the last stage (classifier.*) and optionally one on the third (aux_classifier.*), and the
class scores upsampled bilinearly to the input's size. The heads' convolution -> batch norm -> ReLU is one
conv_bn_act call (folded in eval, as the backbone's blocks are).
"""
from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from fastcv.models._blocks import reject_weights
from fastcv.models.resnet import Bottleneck, ResNetTrunk
from fastcv.nn.batch_norm import BatchNorm2d
from fastcv.nn.conv import Conv2d
from fastcv.nn.fused import conv_bn_act

__all__ = ["FCN", "FCNHead", "fcn_resnet50", "fcn_resnet101"]


class FCNHead(nn.Sequential):
    """3 x 3 convolution to a quarter of the channels, batch norm, ReLU, dropout, 1 x 1 convolution to the
    classes (modules 0-4, torchvision's layout)."""

    def __init__(self, in_channels: int, channels: int) -> None:
        inter_channels = in_channels // 4
        super().__init__(Conv2d(in_channels, inter_channels, 3, padding=1, bias=False), BatchNorm2d(inter_channels),
                         nn.ReLU(), nn.Dropout(0.1), Conv2d(inter_channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        conv, norm, relu, dropout, classify = self
        return classify(dropout(conv_bn_act(x, conv, norm, relu=relu)))


class FCN(nn.Module):
    """backbone -> classifier on its last stage (and aux_classifier on its third), each upsampled to the input:
    {"out": [N, classes, H, W], "aux": ...} as torchvision's."""

    def __init__(self, backbone: ResNetTrunk, classifier: nn.Module, aux_classifier: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        *_, third, last = self.backbone(x)
        result = OrderedDict()
        result["out"] = F.interpolate(self.classifier(last), size=size, mode="bilinear", align_corners=False)
        if self.aux_classifier is not None:
            result["aux"] = F.interpolate(self.aux_classifier(third), size=size, mode="bilinear", align_corners=False)
        return result


def _fcn(layers: list[int], kwargs: dict) -> FCN:
    reject_weights(kwargs)
    num_classes = kwargs.pop("num_classes", None) or 21
    aux_loss = kwargs.pop("aux_loss", None)
    if kwargs:
        raise TypeError(f"unexpected arguments {sorted(kwargs)} (fcn builders take num_classes and aux_loss)")
    backbone = ResNetTrunk(Bottleneck, layers, replace_stride_with_dilation=[False, True, True])
    aux = FCNHead(1024, num_classes) if aux_loss else None
    return FCN(backbone, FCNHead(2048, num_classes), aux)


def fcn_resnet50(**kwargs) -> FCN:
    """torchvision's fcn_resnet50 (num_classes=21, aux_loss=None: no auxiliary head)."""
    return _fcn([3, 4, 6, 3], kwargs)


def fcn_resnet101(**kwargs) -> FCN:
    """torchvision's fcn_resnet101 (num_classes=21, aux_loss=None: no auxiliary head)."""
    return _fcn([3, 4, 23, 3], kwargs)
