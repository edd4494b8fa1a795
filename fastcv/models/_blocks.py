"""Building blocks shared by fastcv.models' families."""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from fastcv.nn.batch_norm import BatchNorm2d
from fastcv.nn.conv import Conv2d
from fastcv.nn.fused import conv_act, conv_bn_act

__all__ = ["Conv2dNormActivation"]


class Conv2dNormActivation(nn.Sequential):
    """Convolution -> normalisation -> activation, the layout of torchvision.ops.Conv2dNormActivation (modules
    0, 1, 2; the norm or the activation left out when None, the later module moving up), so the state_dict
    keys are torchvision's. "Same" padding for odd kernels; the convolution has a bias only without a norm.

    The forward is one fused call: conv_bn_act with a norm (the batch norm folded into the convolution in eval
    mode), conv_act without one, with nn.ReLU in the convolution's epilogue; any other activation (MobileNetV2's
    ReLU6) follows as its module."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 norm_layer: Callable[..., nn.Module] | None = BatchNorm2d,
                 activation_layer: Callable[..., nn.Module] | None = nn.ReLU, dilation: int = 1) -> None:
        padding = (kernel_size - 1) // 2 * dilation
        layers = [Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation=dilation, groups=groups,
                         bias=norm_layer is None)]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)
        self.out_channels = out_channels
        self.has_norm = norm_layer is not None

    def forward(self, x: Tensor) -> Tensor:
        conv, *rest = self
        norm = rest.pop(0) if self.has_norm else None
        relu = False
        if rest and type(rest[0]) is nn.ReLU:
            relu = rest.pop(0)  # in the convolution's epilogue
        x = conv_act(x, conv, relu=relu) if norm is None else conv_bn_act(x, conv, norm, relu=relu)
        for activation in rest:
            x = activation(x)
        return x


def reject_weights(kwargs: dict) -> None:
    """The builders take torchvision's arguments but `weights`: fastcv downloads nothing."""
    if "weights" in kwargs or "weights_backbone" in kwargs:
        raise TypeError("fastcv.models builders take no `weights` (nothing is downloaded): build the network, then "
                        "load torchvision's state_dict into it")


def check_images(x: Tensor, network: str) -> None:
    """A clear error for what is not a batch of RGB images (the convolution's own would name its weight)."""
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
        got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{network} expects images [N, 3, H, W], got {got}")
