"""Drop-ins for nn.Conv2d and nn.ConvTranspose2d running fastcv.ops: the same constructors, parameters,
state_dict names and padding modes (subclasses that replace only the convolution itself), so a model's
checkpoint loads into either."""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from fastcv.ops.conv import conv2d, conv_transpose2d


class Conv2d(nn.Conv2d):
    """nn.Conv2d computed by fastcv.ops.conv2d."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.padding_mode != "zeros":  # as nn.Conv2d: pad explicitly, then convolve without padding
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class ConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d computed by fastcv.ops.conv_transpose2d (output_size works as in PyTorch)."""

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        if self.padding_mode != "zeros":
            raise ValueError("Only 'zeros' padding mode is supported for ConvTranspose2d")
        num_spatial_dims = 2
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              num_spatial_dims, self.dilation)
        return conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding, output_padding,
                                self.groups, self.dilation)
