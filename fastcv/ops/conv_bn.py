"""Convolution -> batch norm [-> + residual] [-> relu] in training, with the batch statistics taken from the
convolution's output tiles.

A channels_last convolution followed by a training-mode batch norm reads the convolution's output twice
after writing it: once for the batch statistics, once to normalise. conv2d_batch_norm runs the convolution
as conv2d_bn_stats, whose kernels compute each channel's statistics from every output tile while it is
still in cache (csrc/ops/conv2d, Epilogue::mean and var), and hands them to batch_norm_train, which then
only normalises: one pass over the activation instead of two. That pays only on outputs too large to stay
cached until batch norm reads them (TILE_STATS_BYTES, 16 MB; measured on 2 cores: per layer 0.98-1.04x the
separate ops, so a small effect on a machine where the convolutions' arithmetic dominates). Planar (NCHW)
outputs keep batch norm's own training forward, which already reads each channel once (the normalisation
finds it in L2); tile statistics made that case slower.

The two stay separate autograd nodes (batch norm's backward, then the convolution's), so the batch norm's
saved tensors are freed before the convolution's gradients run: one node holding both had made ResNet-50's
backward 3-5% slower (more live memory, so fresh pages for the gradients).

Backends: every backend of conv2d and batch_norm; the statistics come from the tiles on the CPU's
channels_last GEMM kernels, elsewhere from batch norm's training forward.
"""
from __future__ import annotations

import math

from torch import Tensor

from fastcv._library import OPS, autocast_args, autocast_enabled
from fastcv.ops._args import pair
from fastcv.ops.batch_norm import _batch_norm
from fastcv.ops.conv import TILE_STATS_BYTES, _check_tensor, _geometry, _tile_stats

__all__ = ["conv2d_batch_norm"]

# The batch norm checks' messages name this function's arguments.
_NAMES = {"input": "the convolution's output", "weight": "bn_weight", "bias": "bn_bias", "identity": "residual"}


def conv2d_batch_norm(input: Tensor, weight: Tensor, bias: Tensor | None, running_mean: Tensor | None,
                      running_var: Tensor | None, bn_weight: Tensor | None = None, bn_bias: Tensor | None = None,
                      training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5, stride=1, padding=0,
                      dilation=1, groups: int = 1, *, residual: Tensor | None = None, relu: bool = False,
                      num_batches_tracked: Tensor | None = None) -> Tensor:
    """relu?(F.batch_norm(F.conv2d(input, weight, bias, stride, padding, dilation, groups), running_mean,
    running_var, bn_weight, bn_bias, training, momentum, eps) + residual), the running statistics updated as
    F.batch_norm updates them (momentum=None with num_batches_tracked: nn.BatchNorm's cumulative average).
    A convolution, then ops.batch_norm's kernels; with batch statistics (training, or no running statistics)
    on large channels_last outputs the statistics come from the convolution's output tiles (module notes).
    input is [N, C, H, W]; padding an int or a pair."""
    if autocast_enabled():  # the convolution's policy; batch norm keeps float32 parameters, as F.batch_norm
        input, weight, bias, residual = autocast_args("conv2d", input, weight, bias, residual)
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    stats = None
    if training or running_mean is None:  # batch statistics: from the tiles where they pay
        _check_tensor(input, "input", 4)
        _check_tensor(weight, "weight", 4, input)
        g = _geometry(input.shape, weight.shape, stride, padding, dilation, groups)
        if _tile_stats(input, weight, g) and math.prod(g.output_shape()) * input.element_size() >= TILE_STATS_BYTES:
            y, *stats = OPS.conv2d_bn_stats(input, weight, bias, stride, padding, dilation, groups)
    if stats is None:
        y = OPS.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return _batch_norm(y, residual, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps, relu,
                       num_batches_tracked, _NAMES, stats)
