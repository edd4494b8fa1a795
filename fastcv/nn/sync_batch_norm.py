"""fastcv.nn.SyncBatchNorm: nn.SyncBatchNorm computed by fastcv's batch norm kernels, for
DistributedDataParallel on PyTorch's own distributed engine (torch.distributed).

In training, over a process group of more than one process:

- forward: each process computes its batch's per-channel count n, mean and biased variance with
  fastcv's kernel (batch_norm_train); one all_gather (float64) brings every process's (n, mean, M2 =
  n * var) to every process, which merges them with Chan's formula for k groups,
      N = sum n_r,  mean = sum n_r mean_r / N,  M2 = sum M2_r + sum n_r (mean_r - mean)^2,
  free of the cancellation of sum(x^2) - N mean^2. Counts may differ between processes, zero
  included (a process with an empty batch still takes part in every collective). The output is
  normalised with the group's mean and biased variance by fastcv's batch_norm_eval, and the running
  statistics are updated with the group's mean and unbiased variance (momentum, or momentum=None
  with num_batches_tracked, as nn.BatchNorm).
- backward (_SyncBatchNormFunction): each process reduces sum(dy) and sum(dy * xhat) over its batch
  with fastcv's batch_norm_backward (its evaluation-mode form returns exactly these as the weight's
  and the bias's gradients), all_reduces them and forms
      grad_input = weight * invstd * (dy - sum(dy) / N - xhat * sum(dy * xhat) / N),
  which is the gradient of the sum of every process's loss, as torch's SyncBatchNorm computes it.
  grad_weight and grad_bias stay this process's sums: DistributedDataParallel all-reduces (averages)
  parameter gradients itself, as it does for torch's SyncBatchNorm.

Otherwise (evaluation mode, no initialised process group, a group of one process) the forward is
fastcv.nn.BatchNorm's, and so is the optional fused `identity` / ReLU. Unlike torch's SyncBatchNorm,
CPU tensors are synchronised too (torch's accepts only GPU inputs; its statistics kernels are CUDA's):
gloo on CPUs is tested, NCCL on GPUs is not yet. Global statistics cost one host synchronisation per
call (the group's count), as torch's do.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from fastcv._library import OPS
from fastcv.nn.batch_norm import _FastBatchNorm
from fastcv.ops.batch_norm import _REDUCED, _check, _dense, _m, _momentum, _params, _stats_dtype

__all__ = ["SyncBatchNorm"]


def _all_gather(local: Tensor, group) -> Tensor:
    """[world size, *local.shape]: every process's `local`, in rank order."""
    world = dist.get_world_size(group)
    if dist.get_backend(group) == "gloo":  # gloo has no all_gather_into_tensor
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=group)
        return torch.stack(parts)
    out = local.new_empty((world,) + tuple(local.shape))
    dist.all_gather_into_tensor(out, local, group=group)
    return out


def _group_statistics(x: Tensor, eps: float, group) -> tuple[Tensor, Tensor, int]:
    """The group's per-channel mean and biased variance (float64) and its count of values per channel."""
    c, n = x.shape[1], _m(x)
    local = x.new_zeros((1 + 2 * c,), dtype=torch.float64)
    if n:
        _, mean, var = OPS.batch_norm_train(x, None, None, None, False, eps, None, None)
        local[0] = n
        local[1:1 + c] = mean
        local[1 + c:] = var.double() * n
    counts, means, m2 = _all_gather(local, group).split([1, c, c], dim=1)
    count = int(counts.sum().item())
    if count == 0:
        return means[0], m2[0], 0
    mean = (counts * means).sum(0) / count
    m2 = m2.sum(0) + (counts * (means - mean).square()).sum(0)
    return mean, m2 / count, count


def _grad_input(x: Tensor, dy: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, sum_dy: Tensor,
                sum_dy_xhat: Tensor, count: int, eps: float) -> Tensor:
    """weight * invstd * (dy - sum_dy / N - xhat * sum_dy_xhat / N), where xhat = (x - mean) * invstd."""
    invstd = torch.rsqrt(var + eps)
    scale = invstd * weight if weight is not None else invstd
    mean_dy, mean_dy_xhat = (sum_dy / count).to(mean.dtype), (sum_dy_xhat / count).to(mean.dtype)
    shape = (x.shape[1],) + (1,) * (x.dim() - 2)
    if x.dtype in _REDUCED:  # computed in float32, rounded once
        xhat = (x.float() - mean.view(shape)) * invstd.view(shape)
        return ((dy.float() - mean_dy.view(shape) - xhat * mean_dy_xhat.view(shape)) * scale.view(shape)).to(x.dtype)
    # xhat * (-scale * mean_dy_xhat) - scale * mean_dy by fastcv's kernel (in x's layout), then + scale * dy
    g = OPS.batch_norm_eval(x, mean, var, -scale * mean_dy_xhat, -scale * mean_dy, None, False, eps)
    return g.addcmul_(dy, scale.view(shape))


class _SyncBatchNormFunction(torch.autograd.Function):
    """relu?(batch_norm(input) + identity?) with the group's statistics; updates the running statistics.
    weight and bias are in the kernels' dtype (fastcv.ops.batch_norm._params)."""

    @staticmethod
    def forward(ctx, input, weight, bias, identity, relu, eps, group, running_mean, running_var, momentum,
                num_batches_tracked):
        x = _dense(input)
        mean, var, count = _group_statistics(x, eps, group)
        if count == 1:  # the same count on every process: all raise, none waits
            raise ValueError("Expected more than 1 value per channel when training, got 1 value per channel "
                             f"over the process group (input size {list(input.shape)} here)")
        mean, var = mean.to(_stats_dtype(x.dtype)), var.to(_stats_dtype(x.dtype))
        if running_mean is not None:
            factor = _momentum(momentum, num_batches_tracked)  # counts the batch, as nn.BatchNorm does
            if count:  # an empty batch leaves the statistics alone
                OPS.batch_norm_update_running(running_mean, running_var, mean, var, factor, count)
        y = OPS.batch_norm_eval(x, mean, var, weight, bias, identity, relu, eps)
        ctx.save_for_backward(x, y if relu else None, mean, var, weight)
        ctx.eps, ctx.relu, ctx.group, ctx.count = eps, relu, group, count
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, y, mean, var, weight = ctx.saved_tensors
        want_x, want_w, want_b, want_identity = ctx.needs_input_grad[:4]
        c = x.shape[1]
        if _m(x):
            ones = weight if weight is not None else mean.new_ones((c,))
            # evaluation-mode backward: grad_weight = sum(dy * xhat), grad_bias = sum(dy), grad_residual =
            # dy through the ReLU's mask
            _, masked, sum_dy_xhat, sum_dy = OPS.batch_norm_backward(
                grad, x, y, mean, var, ones, False, ctx.eps, [False, ctx.relu, True, True])
            dy = masked if ctx.relu else grad
        else:  # an empty batch: zero sums, still reduced with the others'
            dy = grad
            sum_dy_xhat, sum_dy = mean.new_zeros((c,)), mean.new_zeros((c,))
        grad_input = None
        if want_x:
            sums = torch.cat([sum_dy, sum_dy_xhat]).double()
            dist.all_reduce(sums, group=ctx.group)
            grad_input = (_grad_input(x, dy, mean, var, weight, sums[:c], sums[c:], ctx.count, ctx.eps)
                          if _m(x) else torch.zeros_like(x))
        # local sums (zeros for an empty batch, so DDP sees a gradient for every parameter it waits on)
        return (grad_input, sum_dy_xhat if want_w else None, sum_dy if want_b else None,
                dy if want_identity else None) + (None,) * 7


class SyncBatchNorm(_FastBatchNorm, _BatchNorm):
    """nn.SyncBatchNorm's constructor, parameters, buffers, state_dict names and process_group, computed by
    fastcv's kernels, with the statistics reduced over the process group in training (see the module
    notes); otherwise fastcv.nn.BatchNorm's forward. Inputs of rank 2 to 5, NCHW or channels_last.
    forward(input, identity=None): with identity, relu(bn(input) + identity), as fastcv.nn.BatchNorm.

    A sibling of nn.SyncBatchNorm (both subclass nn.modules.batchnorm._BatchNorm), not its subclass:
    DistributedDataParallel refuses a CPU module that contains an nn.SyncBatchNorm ("SyncBatchNorm layers
    only work with GPU modules"), and synchronising CPU processes is what this class adds."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        extra = {} if bias else {"bias": False}  # older torch's batch norms have no bias argument
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **extra)
        self.process_group = process_group

    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        if input.dim() > 5:
            raise ValueError(f"fastcv's batch norm takes inputs of rank 2 to 5 ([N, C, *spatial]), got "
                             f"{input.dim()}D input")

    def _sync_group(self):
        """The process group this call reduces over, or None when it needs no synchronisation."""
        if not self.training or not dist.is_available() or not dist.is_initialized():
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: Tensor, identity: Tensor | None = None) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group = self._sync_group()
        if group is None:
            return _FastBatchNorm.forward(self, input, identity)
        tracking = self.track_running_stats
        running_mean = self.running_mean if tracking else None
        running_var = self.running_var if tracking else None
        # every check of the single-process path, before any collective, except its "more than one value
        # per channel", which holds for the group's count (checked once it is known)
        _check(input, identity, running_mean, running_var, self.weight, self.bias, False, self.eps, True)
        return _SyncBatchNormFunction.apply(
            input, _params(self.weight, input), _params(self.bias, input), identity,
            self.relu or identity is not None, float(self.eps), group, running_mean, running_var, self.momentum,
            self.num_batches_tracked if tracking else None)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Every batch norm in `module` (nn.BatchNorm1d/2d/3d, fastcv.nn.BatchNorm*, nn.SyncBatchNorm: any
        _BatchNorm) replaced by a fastcv.nn.SyncBatchNorm over `process_group` (None: the whole world) that
        holds the same parameter and buffer tensors, mode, qconfig and fused ReLU. As
        nn.SyncBatchNorm.convert_sync_batchnorm: `module` itself is returned with its children replaced, or
        a new module when it is a batch norm itself."""
        output = module
        if isinstance(module, _BatchNorm):
            extra = {"bias": False} if module.affine and module.bias is None else {}
            output = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                         process_group, **extra)
            if module.affine:
                with torch.no_grad():
                    output.weight = module.weight
                    output.bias = module.bias
            output.running_mean = module.running_mean
            output.running_var = module.running_var
            output.num_batches_tracked = module.num_batches_tracked
            output.training = module.training
            if getattr(module, "relu", False) is True:
                output.relu = True
            if hasattr(module, "qconfig"):
                output.qconfig = module.qconfig
        for name, child in module.named_children():
            output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return output
