"""Convolution -> batch norm [-> + residual] [-> relu] in training, with the batch statistics taken from the
convolution's output tiles.

A channels_last convolution followed by a training-mode batch norm reads the convolution's output twice
after writing it: once for the batch statistics, once to normalise. Here the convolution's kernels
compute each channel's statistics from every output tile while it is still in cache (csrc/ops/conv2d,
Epilogue::mean and var), so the batch norm only normalises: one pass over the activation instead of two.
Planar (NCHW) outputs keep batch norm's own training forward, which already reads each channel once (the
normalisation finds it in L2); tile statistics made that case slower. The backward is batch norm's
training backward, then the convolution's.

One registered op:
  conv2d_bn_train(input, weight, bias, bn_weight, bn_bias, residual, relu, eps, stride, padding, dilation,
                  groups) -> (out, conv_out, mean, var)
    out = relu?(batch_norm(conv2d(input, weight, bias), batch statistics) + residual); conv_out is the
    convolution's output and mean, var (biased) its statistics, which the backward and the running
    statistics' update need (none of the three carries a gradient).
and one public function, conv2d_batch_norm: the whole chain with F.batch_norm's arguments (running
statistics, training, momentum), in evaluation mode a convolution then ops.batch_norm.

Backends: every backend of conv2d and batch_norm; the statistics come from the tiles on the CPU's
channels_last GEMM kernels, elsewhere from batch norm's training forward.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastcv._library import OPS, autocast_args, autocast_enabled, define
from fastcv.ops.batch_norm import _batch_norm, _check, _eval_impl, _m, _momentum, _params, _stats_dtype
from fastcv.ops.batch_norm import _train_impl as _bn_train_impl
from fastcv.ops.conv import _ARGS, _check_tensor, _empty, _forward, _fused_checked, _geometry, _tile_stats
from fastcv.ops._args import memory_format, pair

__all__ = ["conv2d_batch_norm"]


# The batch norm checks' messages name this function's arguments.
_NAMES = {"input": "the convolution's output", "weight": "bn_weight", "bias": "bn_bias", "identity": "residual"}


def _checked(input, weight, bias, bn_weight, bn_bias, residual, relu, eps, stride, padding, dilation, groups):
    g = _fused_checked(input, weight, bias, residual, relu, stride, padding, dilation, groups)
    stats = _stats_dtype(input.dtype)
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        if t is not None and (t.shape != (g.out_channels,) or t.dtype != stats or t.device != input.device):
            raise ValueError(f"{name} must be a {stats} Tensor[{g.out_channels}] on {input.device}, got {t.dtype} "
                             f"{list(t.shape)} on {t.device}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    return g


def _train_impl(input, weight, bias, bn_weight, bn_bias, residual, relu, eps, stride, padding, dilation, groups):
    g = _checked(input, weight, bias, bn_weight, bn_bias, residual, relu, eps, stride, padding, dilation, groups)
    conv_args = (input, weight, bias, None, False, stride, padding, dilation, groups, g)
    if not _tile_stats(input, weight, g):  # batch norm's own training forward reads each planar channel once
        y = _forward(*conv_args)
        out, mean, var = _bn_train_impl(y, bn_weight, bn_bias, residual, relu, eps)
        return out, y, mean, var
    mean = input.new_empty((g.out_channels,), dtype=_stats_dtype(input.dtype))
    var = torch.empty_like(mean)
    y = _forward(*conv_args, stats=(mean, var))
    out = _eval_impl(y, mean, var, bn_weight, bn_bias, residual, relu, eps)
    return out, y, mean, var


def _train_fake(input, weight, bias, bn_weight, bn_bias, residual, relu, eps, stride, padding, dilation, groups):
    g = _checked(input, weight, bias, bn_weight, bn_bias, residual, relu, eps, stride, padding, dilation, groups)
    y = _empty(g.output_shape(), input, memory_format(input, weight))
    stats = input.new_empty((g.out_channels,), dtype=_stats_dtype(input.dtype))
    return torch.empty_like(y), y, stats, stats.clone()


def _train_setup(ctx, inputs, output):
    input, weight, bias, bn_weight, bn_bias, residual, relu, eps, *ctx.args = inputs
    out, y, mean, var = output
    ctx.mark_non_differentiable(y, mean, var)
    ctx.save_for_backward(input, weight, y, out if relu else None, mean, var, bn_weight)
    ctx.eps, ctx.has_bias = eps, bias is not None
    need = ctx.needs_input_grad
    # batch_norm_backward's output_mask: (the convolution's output, residual, bn_weight, bn_bias)
    ctx.mask = [any(need[:3]), residual is not None and need[5], bn_weight is not None and need[3],
                bn_bias is not None and need[4]]


def _train_backward(ctx, grad, _grad_y, _grad_mean, _grad_var):
    input, weight, y, out, mean, var, bn_weight = ctx.saved_tensors
    gy, gr, gbw, gbb = OPS.batch_norm_backward(grad, y, out, mean, var, bn_weight, True, ctx.eps, ctx.mask)
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx = OPS.conv2d_input_grad(gy, weight, list(input.shape[2:]), *ctx.args) if need_x else None
    gw = OPS.conv2d_weight_grad(gy, input, list(weight.shape), *ctx.args) if need_w else None
    gb = gy.sum((0, 2, 3)) if ctx.has_bias and need_b else None
    m = ctx.mask
    return (gx, gw, gb, gbw if m[2] else None, gbb if m[3] else None, gr if m[1] else None, None, None, None, None,
            None, None)


define(f"conv2d_bn_train(Tensor input, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
       f"Tensor? residual, bool relu, float eps, {_ARGS}) -> (Tensor, Tensor, Tensor, Tensor)",
       impl=_train_impl, fake=_train_fake, backward=_train_backward, setup_context=_train_setup)


def conv2d_batch_norm(input: Tensor, weight: Tensor, bias: Tensor | None, running_mean: Tensor | None,
                      running_var: Tensor | None, bn_weight: Tensor | None = None, bn_bias: Tensor | None = None,
                      training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5, stride=1, padding=0,
                      dilation=1, groups: int = 1, *, residual: Tensor | None = None, relu: bool = False,
                      num_batches_tracked: Tensor | None = None) -> Tensor:
    """relu?(F.batch_norm(F.conv2d(input, weight, bias, stride, padding, dilation, groups), running_mean,
    running_var, bn_weight, bn_bias, training, momentum, eps) + residual), the running statistics updated as
    F.batch_norm updates them (momentum=None with num_batches_tracked: nn.BatchNorm's cumulative average).
    With batch statistics (training, or no running statistics) the statistics come from the convolution's
    output tiles (see the module notes); with running statistics a convolution, then ops.batch_norm.
    input is [N, C, H, W]; padding an int or a pair."""
    if autocast_enabled():  # the convolution's policy; batch norm keeps float32 parameters, as F.batch_norm
        input, weight, bias, residual = autocast_args("conv2d", input, weight, bias, residual)
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    use_batch_stats = training or running_mean is None
    if not use_batch_stats:
        y = OPS.conv2d(input, weight, bias, stride, padding, dilation, groups)
        return _batch_norm(y, residual, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps,
                           relu, num_batches_tracked, _NAMES)
    _check_tensor(input, "input", 4)
    _check_tensor(weight, "weight", 4, input)
    g = _geometry(input.shape, weight.shape, stride, padding, dilation, groups)
    like = input.new_empty((1, 1, 1, 1)).expand(g.output_shape())  # the convolution's output, for the checks
    _check(like, residual, running_mean, running_var, bn_weight, bn_bias, training, eps, True, _NAMES)
    w, b = _params(bn_weight, input), _params(bn_bias, input)
    out, _, mean, var = OPS.conv2d_bn_train(input, weight, bias, w, b, residual, bool(relu), float(eps), stride,
                                            padding, dilation, groups)
    if training and running_mean is not None:
        factor = _momentum(momentum, num_batches_tracked)
        count = _m(like)
        if count > 0:
            OPS.batch_norm_update_running(running_mean, running_var, mean, var, factor, count)
    return out
