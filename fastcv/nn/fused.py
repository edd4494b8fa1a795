"""Fused conv -> batch norm [-> + identity] [-> relu] chains on modules: what fastcv.convert's rewritten
graphs call and what fastcv.models' blocks call, so both run the same code.

    out = conv_bn_act(x, self.conv1, self.bn1, relu=True)                  # relu(bn1(conv1(x)))
    out = conv_bn_act(out, self.conv3, self.bn3, identity, relu=True)      # relu(bn3(conv3(out)) + identity)

Each function receives the modules themselves and decides at run time:
- conv_bn_act: in eval mode the batch norm is folded into the convolution (fold_batch_norm, cached per
  convolution and recomputed when a parameter or running statistic changes; with gradients enabled the fold is
  differentiable) and the chain is one ops.conv2d_fused; in training mode one ops.conv2d_batch_norm (the
  convolution computes the batch statistics from its output tiles; batch norm then only normalises).
- bn_act: ops.batch_norm_relu / ops.batch_norm_add_relu, with the running statistics updated as nn.BatchNorm
  updates them.
- conv_act: relu?(conv(x) + identity?) as one ops.conv2d_fused.
The fused residual is used only when the identity has the output's shape, dtype and device (else the add and the
relu follow as PyTorch ops), and the plain module calls whenever a module of the chain has hooks (so they fire)
or is not fastcv's (a torch nn.Conv2d, say).

`relu` is False (none), True (torch.relu) or an nn.ReLU module (then called as a module where hooks need it);
anything else raises TypeError (a ReLU6 or GELU must follow the chain, not be passed to it).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcv import ops
from fastcv.nn.batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from fastcv.nn.conv import Conv2d

__all__ = ["bn_act", "conv_act", "conv_bn_act"]

_FAST_BN = (BatchNorm1d, BatchNorm2d, BatchNorm3d)


def _global_hooks() -> bool:
    module = nn.modules.module
    return bool(getattr(module, "_global_forward_hooks", None) or getattr(module, "_global_forward_pre_hooks", None)
                or getattr(module, "_global_backward_hooks", None)
                or getattr(module, "_global_backward_pre_hooks", None))


def _hooked(*modules) -> bool:
    """Whether a module of the chain has hooks (then it is called as a module, so they fire)."""
    for m in modules:
        if isinstance(m, nn.Module) and (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                                         or m._backward_pre_hooks):
            return True
    return _global_hooks()


def _check_relu(relu) -> None:
    if not (relu is False or relu is True or type(relu) is nn.ReLU):
        raise TypeError(f"relu must be False, True or an nn.ReLU module, got {relu!r}")


def _apply_relu(x: Tensor, relu) -> Tensor:
    if relu is False:
        return x
    if relu is True:
        return torch.relu(x)
    return relu(x)


def _fits(identity, shape, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether identity can be the fused residual of an output of this shape, dtype and device."""
    return (isinstance(identity, Tensor) and identity.shape == shape and identity.dtype == dtype
            and identity.device == device)


def bn_act(input: Tensor, bn, identity=None, relu=False) -> Tensor:
    """relu?(bn(input) + identity?): ops.batch_norm_relu / batch_norm_add_relu where they apply, as
    fastcv.nn.BatchNorm's forward calls ops.batch_norm (the same statistics, counter and momentum)."""
    fits = identity is None or _fits(identity, input.shape, input.dtype, input.device)
    _check_relu(relu)
    if relu is not False and fits and type(bn) in _FAST_BN and not _hooked(bn, relu):
        bn._check_input_dim(input)
        tracking = bn.track_running_stats
        use_stats = not bn.training or tracking
        args = (bn.running_mean if use_stats else None, bn.running_var if use_stats else None, bn.weight, bn.bias,
                bn.training, bn.momentum, bn.eps)
        counter = bn.num_batches_tracked if bn.training and tracking else None
        if identity is None:
            return ops.batch_norm_relu(input, *args, num_batches_tracked=counter)
        return ops.batch_norm_add_relu(input, identity, *args, num_batches_tracked=counter)
    out = bn(input)
    if identity is not None:
        out = out + identity
    return _apply_relu(out, relu)


def conv_act(input: Tensor, conv, identity=None, relu=False) -> Tensor:
    """relu?(conv(input) + identity?) as one ops.conv2d_fused."""
    _check_relu(relu)
    if type(conv) is not Conv2d or _hooked(conv, relu):
        out = conv(input)
        if identity is not None:
            out = out + identity
        return _apply_relu(out, relu)
    return _conv_fused(conv, input, conv.weight, conv.bias, identity, relu)


def conv_bn_act(input: Tensor, conv, bn, identity=None, relu=False) -> Tensor:
    """relu?(bn(conv(input)) + identity?): with running statistics (eval mode) one ops.conv2d_fused with the
    batch norm folded into the convolution; with batch statistics (training) one ops.conv2d_batch_norm, whose
    convolution computes the statistics as it stores its output. Other modules (a GroupNorm, say) run one after
    the other."""
    _check_relu(relu)
    if type(conv) is not Conv2d or type(bn) is not BatchNorm2d or input.dim() != 4 or _hooked(conv, bn, relu):
        return bn_act(conv(input), bn, identity, relu)
    if bn.training or bn.running_mean is None:
        return _conv_bn_train(conv, bn, input, identity, relu)
    weight, bias = _folded(conv, bn)
    return _conv_fused(conv, input, weight, bias, identity, relu)


def _conv_bn_train(conv: nn.Conv2d, bn: nn.BatchNorm2d, input: Tensor, identity, relu) -> Tensor:
    """relu?(bn(conv(input)) + identity?) with batch statistics, as bn_act calls batch norm (the same running
    statistics, counter and momentum), in one ops.conv2d_batch_norm when the identity fits."""
    input, padding = _geometry_input(conv, input)
    residual = None
    if identity is not None and _fits(identity, *_output_spec(conv, input, conv.weight, padding)):
        residual, identity = identity, None
    tracking = bn.track_running_stats
    use_stats = not bn.training or tracking
    out = ops.conv2d_batch_norm(
        input, conv.weight, conv.bias, bn.running_mean if use_stats else None, bn.running_var if use_stats else None,
        bn.weight, bn.bias, bn.training, bn.momentum, bn.eps, conv.stride, padding, conv.dilation, conv.groups,
        residual=residual, relu=relu is not False and identity is None,
        num_batches_tracked=bn.num_batches_tracked if bn.training and tracking else None)
    if identity is None:
        return out
    return _apply_relu(out + identity, relu)


def _geometry_input(conv: nn.Conv2d, input: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """The input and the pair of paddings that run conv as a zero-padded convolution: other padding modes and
    'same' with an odd total are padded into the input."""
    padding = conv.padding
    if conv.padding_mode != "zeros":
        input = F.pad(input, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = (0, 0)
    elif padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        pads = conv._reversed_padding_repeated_twice  # (left, right, top, bottom); right/bottom get the odd pixel
        if pads[0] == pads[1] and pads[2] == pads[3]:
            padding = (pads[2], pads[0])
        else:
            input = F.pad(input, pads)
            padding = (0, 0)
    return input, padding


def _conv_fused(conv: nn.Conv2d, input: Tensor, weight: Tensor, bias: Tensor | None, identity, relu) -> Tensor:
    """relu?(conv2d(input, weight, bias) + identity?) with conv's geometry, in one ops.conv2d_fused when the
    identity has the output's shape and dtype (else the add and the relu follow as PyTorch ops)."""
    input, padding = _geometry_input(conv, input)
    residual = None
    if identity is not None and _fits(identity, *_output_spec(conv, input, weight, padding)):
        residual, identity = identity, None
    out = ops.conv2d_fused(input, weight, bias, conv.stride, padding, conv.dilation, conv.groups, residual=residual,
                           relu=relu is not False and identity is None)
    if identity is None:
        return out
    return _apply_relu(out + identity, relu)


def _output_spec(conv: nn.Conv2d, input: Tensor, weight: Tensor, padding):
    """The shape, dtype and device of the convolution's output (what a fused residual must have)."""
    size = [(n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip(input.shape[-2:], padding, conv.dilation, weight.shape[2:], conv.stride)]
    shape = torch.Size((*input.shape[:-3], weight.shape[0], *size))
    dtype, device_type = input.dtype, input.device.type
    if torch.is_autocast_enabled(device_type) and dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device_type)  # conv2d_fused computes and returns in autocast's dtype
    return shape, dtype, input.device


# (conv -> (key, weak references to the sources, folded weight, folded bias)): outside the module, so folded
# weights are not in its state_dict, copies or pickles, and go away with it.
_FOLD_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """The convolution's weight and bias with the eval-mode batch norm folded in."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return _fold_differentiable(conv, bn)
    # The kernels that update running statistics write them without bumping their version counters (PyTorch's
    # batch norm too), but every such update also counts the batch in num_batches_tracked, in place.
    sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked)
    key = tuple(None if t is None else (t._version, t.data_ptr(), t.dtype, t.device, t.shape) for t in sources)
    key += (bn.eps,)
    cached = _FOLD_CACHE.get(conv)
    if cached is not None and cached[0] == key and all(
            (r is None) == (t is None) and (t is None or r() is t) for r, t in zip(cached[1], sources)):
        return cached[2], cached[3]
    weight, bias = ops.fold_batch_norm(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                       bn.eps)
    refs = tuple(None if t is None else weakref.ref(t) for t in sources)
    _FOLD_CACHE[conv] = (key, refs, weight, bias)
    return weight, bias


def _fold_differentiable(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """fold_batch_norm's formula in PyTorch ops, so gradients reach the convolution's and the batch norm's
    parameters (w' = w * gamma / sqrt(var + eps), b' = (b - mean) * gamma / sqrt(var + eps) + beta)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    weight = (conv.weight * scale.reshape(-1, 1, 1, 1)).to(conv.weight.dtype)
    shift = -bn.running_mean if conv.bias is None else conv.bias - bn.running_mean
    bias = shift * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    return weight, bias.to(conv.weight.dtype if conv.bias is None else conv.bias.dtype)
