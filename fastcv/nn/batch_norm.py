"""Drop-ins for nn.BatchNorm1d/2d/3d running fastcv.ops.batch_norm: subclasses that replace only the
forward, so constructors, parameters, buffers (running_mean, running_var, num_batches_tracked),
state_dict names and isinstance checks are nn.BatchNorm's own. Unlike nn.BatchNorm, an input that
raises leaves num_batches_tracked and the running statistics untouched.

fuse_conv_bn_eval folds an evaluation-mode batch norm into the convolution before it."""
from __future__ import annotations

import copy

from torch import Tensor, nn

from fastcv.ops.batch_norm import _batch_norm, fold_batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "fuse_conv_bn_eval"]


class _FastBatchNorm:
    """The forward of nn.modules.batchnorm._BatchNorm, with fastcv's op and, optionally, a fused ReLU
    (relu=True: the module computes relu(bn(x)))."""

    relu: bool = False

    def forward(self, input: Tensor, identity: Tensor | None = None) -> Tensor:
        """identity (optional, fastcv only): relu(bn(input) + identity), ResNet's residual junction."""
        self._check_input_dim(input)
        tracking = self.track_running_stats
        use_stats = not self.training or tracking
        return _batch_norm(
            input, identity,
            self.running_mean if use_stats else None,
            self.running_var if use_stats else None,
            self.weight, self.bias, self.training, self.momentum, self.eps,
            self.relu or identity is not None,
            self.num_batches_tracked if self.training and tracking else None,
        )


class BatchNorm1d(_FastBatchNorm, nn.BatchNorm1d):
    """nn.BatchNorm1d ([N, C] or [N, C, L]) computed by fastcv.ops.batch_norm."""


class BatchNorm2d(_FastBatchNorm, nn.BatchNorm2d):
    """nn.BatchNorm2d ([N, C, H, W], NCHW or channels_last) computed by fastcv.ops.batch_norm."""


class BatchNorm3d(_FastBatchNorm, nn.BatchNorm3d):
    """nn.BatchNorm3d ([N, C, D, H, W]) computed by fastcv.ops.batch_norm."""


def fuse_conv_bn_eval(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A copy of `conv` (nn.Conv1d/2d/3d, nn.ConvTranspose*, or fastcv's) with `bn` folded into its weight
    and bias: conv(x) then bn in evaluation mode, in one convolution. Both must be in eval mode."""
    if conv.training or bn.training:
        raise ValueError("fuse_conv_bn_eval needs both modules in eval mode (call .eval() first)")
    if bn.running_mean is None:
        raise ValueError("the batch norm has no running statistics (track_running_stats=False) to fold")
    transposed = bool(getattr(conv, "transposed", False))
    if transposed and conv.groups != 1:
        raise ValueError("folding into a grouped transposed convolution is not supported")
    fused = copy.deepcopy(conv)
    weight, bias = fold_batch_norm(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                   bn.eps, transposed=transposed)
    fused.weight = nn.Parameter(weight, conv.weight.requires_grad)
    fused.bias = nn.Parameter(bias, conv.weight.requires_grad)
    return fused
