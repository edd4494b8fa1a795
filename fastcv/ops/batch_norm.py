"""Batch normalisation: a drop-in for torch.nn.functional.batch_norm, and the fused variants ResNet needs.

batch_norm has F.batch_norm's semantics for inputs of rank 2 to 5: batch statistics in training
(normalising with the biased variance, updating running_mean/running_var in place with the unbiased
one), running statistics in evaluation, optional affine parameters, and batch statistics whenever
no running statistics are given (as nn.BatchNorm with track_running_stats=False). momentum=None is
the cumulative average nn.BatchNorm uses: pass the module's num_batches_tracked counter, which is
incremented here as nn.BatchNorm does.

Beyond PyTorch: batch_norm_relu (relu(bn(x))) and batch_norm_add_relu (relu(bn(x) + identity),
ResNet's residual junction) in one pass each way, with the ReLU's mask taken from the saved output
instead of a separate tensor; fold_batch_norm, which folds an evaluation-mode batch norm into the
preceding convolution's weights. NCHW and channels_last run without layout copies. float16 and
bfloat16 inputs compute in float32 with float32 statistics and parameters (as under autocast);
float64 stays float64. Statistics are numerically stable (blockwise two-pass, merged with Chan's
formula), so a channel with mean 1e4 and standard deviation 1e-2 normalises correctly in float32.

Backends: CPU C++, CUDA C++, Triton (on GPUs without the CUDA build, or FASTCV_GPU_BACKEND=triton).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fastcv import _C
from fastcv._backend import CPU, CUDA, FLOATING, TRITON, cuda_stream, num_threads, select, triton
from fastcv._library import OPS, define, no_second_derivative
from fastcv.ops._args import channels_last

__all__ = ["batch_norm", "batch_norm_relu", "batch_norm_add_relu", "fold_batch_norm"]

_REDUCED = (torch.float16, torch.bfloat16)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- layouts


def _as_3d(t: Tensor) -> Tensor | None:
    """t as [N, C, S] without a copy (planar NCHW or packed channels_last), or None if t is neither."""
    n, c, s = t.shape[0], t.shape[1], math.prod(t.shape[2:])
    if t.dim() == 2:
        return t.unsqueeze(-1) if t.is_contiguous() else None
    if t.is_contiguous():
        return t.view(n, c, s)
    if channels_last(t):
        return t.movedim(1, -1).reshape(n, s, c).transpose(1, 2)
    return None


def _dense(x: Tensor) -> Tensor:
    """x itself when the kernels can read it in place (contiguous or channels_last), else a contiguous
    copy (unusual strides only)."""
    return x if x.is_contiguous() or channels_last(x) else x.contiguous()


def _like(t: Tensor | None, x: Tensor) -> Tensor | None:
    """t (of x's shape) in x's memory layout: a copy only when the two layouts differ."""
    if t is None or t.stride() == x.stride() or t.numel() == 0:
        return t
    return torch.empty_like(x, dtype=t.dtype).copy_(t)


def _empty_like(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.preserve_format)


def _m(x: Tensor) -> int:
    """Values per channel."""
    return x.numel() // x.shape[1] if x.shape[1] else 0


# ---------------------------------------------------------------- backends


# The C++ kernels take the tensors in their own shape (rank 2 to 5) and read the layout from the
# strides; the Triton launchers take [N, C, S] views.


def _opt_3d(t):
    return None if t is None else _as_3d(t)


def _run_train(x, weight, bias, residual, relu, eps, y, mean, var):
    backend = select("batch_norm", x)
    if backend == TRITON:
        triton("batch_norm").forward_train(_as_3d(x), weight, bias, _opt_3d(residual), relu, eps, _as_3d(y), mean,
                                           var)
    elif backend == CUDA:
        _C.batch_norm_forward_train_cuda(x, weight, bias, residual, relu, eps, y, mean, var, cuda_stream(x))
    else:
        _C.batch_norm_forward_train_cpu(x, weight, bias, residual, relu, eps, y, mean, var, num_threads())


def _run_eval(x, mean, var, weight, bias, residual, relu, eps, y):
    backend = select("batch_norm", x)
    if backend == TRITON:
        triton("batch_norm").forward_eval(_as_3d(x), mean, var, weight, bias, _opt_3d(residual), relu, eps, _as_3d(y))
    elif backend == CUDA:
        _C.batch_norm_forward_eval_cuda(x, mean, var, weight, bias, residual, relu, eps, y, cuda_stream(x))
    else:
        _C.batch_norm_forward_eval_cpu(x, mean, var, weight, bias, residual, relu, eps, y, num_threads())


def _run_backward(grad, x, y, mean, var, weight, training, eps, grads):
    gx, gr, gw, gb = grads
    backend = select("batch_norm", x)
    if backend == TRITON:
        triton("batch_norm").backward(_as_3d(grad), _as_3d(x), _opt_3d(y), mean, var, weight, training, eps,
                                      _opt_3d(gx), _opt_3d(gr), gw, gb)
    elif backend == CUDA:
        _C.batch_norm_backward_cuda(grad, x, y, mean, var, weight, training, eps, gx, gr, gw, gb, cuda_stream(x))
    else:
        _C.batch_norm_backward_cpu(grad, x, y, mean, var, weight, training, eps, gx, gr, gw, gb, num_threads())


# ---------------------------------------------------------------- the ops
#
# batch_norm_train: batch statistics, returned with the output (the caller updates running buffers).
# batch_norm_eval: given statistics. Both take the fused residual and ReLU. batch_norm_backward serves
# both: it returns (grad_input, grad_residual, grad_weight, grad_bias), an empty tensor where
# output_mask says a gradient is not wanted.


def _check_op(x, weight, bias, residual, mean=None, var=None):
    """What the C++ checks would reject, as Python exceptions (for direct torch.ops.fastcv calls)."""
    if x.dim() < 2 or x.dim() > 5 or x.dtype not in FLOATING:
        raise ValueError(f"input must be a floating Tensor of rank 2 to 5, got {x.dtype} of shape {list(x.shape)}")
    stats = _stats_dtype(x.dtype)
    for name, t in (("weight", weight), ("bias", bias), ("mean", mean), ("var", var)):
        if t is not None and (t.shape != (x.shape[1],) or t.dtype != stats or t.device != x.device):
            raise ValueError(f"{name} must be a {stats} Tensor[{x.shape[1]}] on {x.device}, got {t.dtype} "
                             f"{list(t.shape)} on {t.device}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device):
        raise ValueError(f"residual must match input ({x.dtype} {list(x.shape)} on {x.device}), got "
                         f"{residual.dtype} {list(residual.shape)} on {residual.device}")


def _check_train(input, weight, bias, residual, relu, eps, mean, var):
    if (mean is None) != (var is None):
        raise ValueError("mean and var (the input's batch statistics) must both be given or both be None")
    _check_op(input, weight, bias, residual, mean, var)


def _check_eval(input, mean, var, weight, bias, residual, relu, eps):
    _check_op(input, weight, bias, residual, mean, var)


def _train_impl(input, weight, bias, residual, relu, eps, mean, var):
    if mean is not None:  # the input's statistics, computed by the caller (conv2d_bn_stats): normalise only
        return _eval_impl(input, mean, var, weight, bias, residual, relu, eps), mean.clone(), var.clone()
    x = _dense(input)
    y = _empty_like(x)
    c, stats = x.shape[1], _stats_dtype(x.dtype)
    mean = x.new_empty((c,), dtype=stats)
    var = x.new_empty((c,), dtype=stats)
    if _m(x) == 0:  # no values: empty output, undefined statistics (the caller leaves its buffers alone)
        return y, mean.fill_(math.nan), var.fill_(math.nan)
    if c:
        _run_train(x, _contig(weight), _contig(bias), _like(residual, x), relu, eps, y, mean, var)
    return y, mean, var


def _train_fake(input, weight, bias, residual, relu, eps, mean, var):
    stats = input.new_empty((input.shape[1],), dtype=_stats_dtype(input.dtype))
    return _empty_like(_dense(input)), stats, stats.clone()


def _eval_impl(input, mean, var, weight, bias, residual, relu, eps):
    x = _dense(input)
    y = _empty_like(x)
    if y.numel():
        _run_eval(x, mean.contiguous(), var.contiguous(), _contig(weight), _contig(bias), _like(residual, x), relu,
                  eps, y)
    return y


def _eval_fake(input, mean, var, weight, bias, residual, relu, eps):
    return _empty_like(_dense(input))


def _contig(t):
    return None if t is None else t.contiguous()


def _wanted(weight, output_mask):
    """output_mask, less a weight gradient without a weight."""
    want_x, want_res, want_w, want_b = output_mask
    return want_x, want_res, want_w and weight is not None, want_b


def _backward_outputs(x, weight, output_mask):
    """Allocations of (grad_input, grad_residual, grad_weight, grad_bias): empty where not wanted."""
    c, stats = x.shape[1], _stats_dtype(x.dtype)
    want_x, want_res, want_w, want_b = _wanted(weight, output_mask)
    return (
        _empty_like(x) if want_x else x.new_empty((0,)),
        _empty_like(x) if want_res else x.new_empty((0,)),
        x.new_empty((c,), dtype=stats) if want_w else x.new_empty((0,), dtype=stats),
        x.new_empty((c,), dtype=stats) if want_b else x.new_empty((0,), dtype=stats),
    )


def _backward_impl(grad_output, input, output, mean, var, weight, training, eps, output_mask):
    x = _dense(input)
    grad = _like(grad_output, x)
    out = _like(output, x)
    outs = _backward_outputs(x, weight, output_mask)
    if x.shape[1]:
        wanted = [t if want else None for t, want in zip(outs, _wanted(weight, output_mask))]
        _run_backward(grad, x, out, mean.contiguous(), var.contiguous(), _contig(weight), training, eps, wanted)
    return outs


def _backward_fake(grad_output, input, output, mean, var, weight, training, eps, output_mask):
    return _backward_outputs(_dense(input), weight, output_mask)


def _setup(ctx, optional, positions, relu, eps):
    """Both forwards' autograd context. optional: (weight, bias, residual); positions: their indices
    among the op's inputs. ctx.mask is batch_norm_backward's output_mask."""
    needs = [t is not None and ctx.needs_input_grad[k] for t, k in zip(optional, positions)]
    ctx.mask = [ctx.needs_input_grad[0], needs[2], needs[0], needs[1]]
    ctx.relu, ctx.eps = relu, eps


def _grads(ctx, grad, training):
    x, out, mean, var, weight = ctx.saved_tensors
    out = out if ctx.relu else None
    gx, gr, gw, gb = OPS.batch_norm_backward(grad, x, out, mean, var, weight, training, ctx.eps, ctx.mask)
    m = ctx.mask
    return gx if m[0] else None, gw if m[2] else None, gb if m[3] else None, gr if m[1] else None


def _train_setup(ctx, inputs, output):
    input, weight, bias, residual, relu, eps, _, _ = inputs
    y, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    _setup(ctx, (weight, bias, residual), (1, 2, 3), relu, eps)
    ctx.save_for_backward(input, y if relu else None, mean, var, weight)


def _train_backward(ctx, grad, _grad_mean, _grad_var):
    gx, gw, gb, gr = _grads(ctx, grad, True)
    return gx, gw, gb, gr, None, None, None, None


def _eval_setup(ctx, inputs, output):
    input, mean, var, weight, bias, residual, relu, eps = inputs
    _setup(ctx, (weight, bias, residual), (3, 4, 5), relu, eps)
    ctx.save_for_backward(input, output if relu else None, mean, var, weight)


def _eval_backward(ctx, grad):
    gx, gw, gb, gr = _grads(ctx, grad, False)
    return gx, None, None, gw, gb, gr, None, None


def _check_update(running_mean, running_var, mean, var, momentum, count):
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t.shape != mean.shape or not t.is_floating_point() or t.device != mean.device:
            raise ValueError(f"{name} must be a floating Tensor{list(mean.shape)} on {mean.device}, got {t.dtype} "
                             f"{list(t.shape)} on {t.device}")


def _update_impl(running_mean, running_var, mean, var, momentum, count):
    """running = (1 - momentum) * running + momentum * batch, with the unbiased variance (as nn.BatchNorm).
    On the CPU one C++ pass (three torch ops cost more than a tiny batch norm); on a GPU two queued ops each."""
    if select("batch_norm", running_mean) == CPU:
        _C.batch_norm_update_running_cpu(running_mean, running_var, mean.contiguous(), var.contiguous(), momentum,
                                         count)
    else:
        unbiased = count / (count - 1) if count > 1 else 1.0
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum * unbiased)


def _update_fake(running_mean, running_var, mean, var, momentum, count):
    return None


# Updates the running statistics in place: no gradient flows into or out of them.
define("batch_norm_update_running(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
       "float momentum, int count) -> ()", impl=_update_impl, fake=_update_fake, check=_check_update)

# No autocast policy: F.batch_norm is on none of autocast's lists; it runs in the input's dtype (with
# float32 parameters and statistics for float16/bfloat16 input), on the CPU and on CUDA.
define("batch_norm_backward(Tensor grad_output, Tensor input, Tensor? output, Tensor mean, Tensor var, "
       "Tensor? weight, bool training, float eps, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)",
       impl=_backward_impl, fake=_backward_fake,
       backward=no_second_derivative("batch_norm"))
# batch_norm_train's mean and var, when not None, are the input's own batch statistics (conv2d_bn_stats takes
# them from its output tiles): the kernel then only normalises. The gradient is the same (it flows through the
# statistics as functions of the input); they are returned (copied) as the statistics.
define("batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, bool relu, float eps, "
       "Tensor? mean, Tensor? var) -> (Tensor, Tensor, Tensor)", impl=_train_impl, fake=_train_fake, check=_check_train,
       backward=_train_backward, setup_context=_train_setup)
define("batch_norm_eval(Tensor input, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, Tensor? residual, "
       "bool relu, float eps) -> Tensor", impl=_eval_impl, fake=_eval_fake, check=_check_eval,
       backward=_eval_backward, setup_context=_eval_setup)


# ---------------------------------------------------------------- public functions


# The arguments' names in the public functions' messages (conv2d_batch_norm has its own).
_NAMES = {"input": "input", "weight": "weight", "bias": "bias", "identity": "identity"}


def _check(input, identity, running_mean, running_var, weight, bias, training, eps, use_batch_stats, names=_NAMES):
    """Every check runs before anything is computed or updated: an input that raises leaves the running
    buffers as they were."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if not 2 <= input.dim() <= 5:
        raise ValueError(f"input must have rank 2 to 5 ([N, C, *spatial]), got rank {input.dim()} "
                         f"({list(input.shape)})")
    if input.dtype not in FLOATING:
        raise TypeError(f"input must be float32, float64, float16 or bfloat16, got {input.dtype}")
    c = input.shape[1]
    allowed = (input.dtype, torch.float32) if input.dtype in _REDUCED else (input.dtype,)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    for name, t in (("running_mean", running_mean), ("running_var", running_var), (names["weight"], weight),
                    (names["bias"], bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.shape != (c,):
            raise ValueError(f"{name} must be a Tensor[{c}] (one value per channel of {names['input']}), got "
                             f"{list(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t.dtype not in allowed:
            raise TypeError(f"{name} must be {' or '.join(map(str, allowed))} for a {input.dtype} {names['input']}, "
                            f"got {t.dtype}")
        if t.device != input.device:
            raise ValueError(f"{name} must be on the device of {names['input']} ({input.device}), got {t.device}")
    if identity is not None:
        if not isinstance(identity, Tensor) or identity.shape != input.shape:
            raise ValueError(f"{names['identity']} must have the shape of {names['input']} {list(input.shape)}, got "
                             f"{list(identity.shape) if isinstance(identity, Tensor) else type(identity).__name__}")
        if identity.dtype != input.dtype or identity.device != input.device:
            raise ValueError(f"{names['identity']} must have the dtype and device of {names['input']} "
                             f"({input.dtype}, {input.device}), got {identity.dtype}, {identity.device}")
    if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a non-negative number, got {eps}")
    if use_batch_stats and eps <= 0:  # as PyTorch: a constant channel would divide by zero
        raise ValueError(f"eps must be positive when normalising with batch statistics, got {eps}")
    if use_batch_stats and training and _m(input) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
    if not use_batch_stats and running_mean is None:
        raise ValueError("running_mean and running_var are required in evaluation mode")


def _momentum(momentum, num_batches_tracked):
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is not None:
        return float(momentum)
    if num_batches_tracked is None:
        raise ValueError("momentum=None (a cumulative moving average) needs the num_batches_tracked counter")
    return 1.0 / float(num_batches_tracked.item())


def _params(t, input):
    """Per-channel tensors in the kernels' dtype (float32 for reduced precision): a cast of C values."""
    if t is None:
        return None
    dtype = _stats_dtype(input.dtype)
    return t if t.dtype == dtype else t.to(dtype)


def _batch_norm(input, identity, running_mean, running_var, weight, bias, training, momentum, eps, relu,
                num_batches_tracked, names=_NAMES, stats=None):
    """stats: (mean, var), input's batch statistics where the caller has them (conv2d_batch_norm)."""
    use_batch_stats = training or running_mean is None
    _check(input, identity, running_mean, running_var, weight, bias, training, eps, use_batch_stats, names)
    w, b = _params(weight, input), _params(bias, input)
    if not use_batch_stats:
        mean, var = _params(running_mean, input), _params(running_var, input)
        return OPS.batch_norm_eval(input, mean, var, w, b, identity, relu, float(eps))
    y, mean, var = OPS.batch_norm_train(input, w, b, identity, relu, float(eps), *(stats or (None, None)))
    if training and running_mean is not None:
        factor = _momentum(momentum, num_batches_tracked)  # counts the batch, as nn.BatchNorm does
        if _m(input) > 0:  # an empty batch leaves the statistics alone (as PyTorch does)
            OPS.batch_norm_update_running(running_mean, running_var, mean, var, factor, _m(input))
    return y


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None = None,
               bias: Tensor | None = None, training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5,
               *, num_batches_tracked: Tensor | None = None) -> Tensor:
    """Drop-in for F.batch_norm (see the module notes): inputs [N, C, *spatial] of rank 2 to 5."""
    return _batch_norm(input, None, running_mean, running_var, weight, bias, training, momentum, eps, False,
                       num_batches_tracked)


def batch_norm_relu(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                    weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                    momentum: float | None = 0.1, eps: float = 1e-5, *,
                    num_batches_tracked: Tensor | None = None) -> Tensor:
    """relu(batch_norm(input, ...)) in one pass forward and one backward."""
    return _batch_norm(input, None, running_mean, running_var, weight, bias, training, momentum, eps, True,
                       num_batches_tracked)


def batch_norm_add_relu(input: Tensor, identity: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                        weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                        momentum: float | None = 0.1, eps: float = 1e-5, *,
                        num_batches_tracked: Tensor | None = None) -> Tensor:
    """relu(batch_norm(input, ...) + identity): the end of a ResNet block, one pass each way; the
    backward also returns identity's gradient from the same pass."""
    if identity is None:
        raise ValueError("identity must be a Tensor of input's shape")
    return _batch_norm(input, identity, running_mean, running_var, weight, bias, training, momentum, eps, True,
                       num_batches_tracked)


@torch.no_grad()
def fold_batch_norm(conv_weight: Tensor, conv_bias: Tensor | None, running_mean: Tensor, running_var: Tensor,
                    bn_weight: Tensor | None = None, bn_bias: Tensor | None = None,
                    eps: float = 1e-5, transposed: bool = False) -> tuple[Tensor, Tensor]:
    """The weight and bias of one convolution equal to conv followed by an evaluation-mode batch norm:
    w' = w * gamma / sqrt(var + eps) per output channel, b' = (b - mean) * gamma / sqrt(var + eps) + beta.
    Computed in float64 and returned in conv_weight's dtype. transposed: the weight is a transposed
    convolution's ([C_in, C_out / groups, ...]; groups=1 assumed), whose output channels are dim 1."""
    c = conv_weight.shape[1] if transposed else conv_weight.shape[0]
    if running_mean.shape != (c,) or running_var.shape != (c,):
        raise ValueError(f"running statistics must be Tensor[{c}] (one per output channel of the convolution), "
                         f"got {list(running_mean.shape)} and {list(running_var.shape)}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a non-negative number, got {eps}")
    f64 = dict(dtype=torch.float64, device=conv_weight.device)
    gamma = bn_weight.to(**f64) if bn_weight is not None else torch.ones(c, **f64)
    beta = bn_bias.to(**f64) if bn_bias is not None else torch.zeros(c, **f64)
    scale = gamma / torch.sqrt(running_var.to(**f64) + eps)
    b = conv_bias.to(**f64) if conv_bias is not None else torch.zeros(c, **f64)
    shape = [1] * conv_weight.dim()
    shape[1 if transposed else 0] = c
    weight = (conv_weight.to(torch.float64) * scale.view(shape)).to(conv_weight.dtype)
    bias = ((b - running_mean.to(**f64)) * scale + beta).to(conv_bias.dtype if conv_bias is not None else conv_weight.dtype)
    return weight, bias
