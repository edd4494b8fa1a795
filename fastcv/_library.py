"""Registration of fastcv's ops as torch.ops.fastcv.<name>.

Library.define + impl costs less per call than torch.library.custom_op (measured in the README), and
tiny calls are where users notice overhead.
"""
from __future__ import annotations

from typing import Callable

import torch

lib = torch.library.Library("fastcv", "DEF")


def define(
    schema: str,
    *,
    impl: Callable,
    fake: Callable,
    autocast_to: torch.dtype | None = None,
) -> None:
    """Defines torch.ops.fastcv.<name> with its implementation (one Python function for the CPU and
    CUDA dispatch keys: it picks the kernels by device), fake (meta) impl and autocast behaviour.

    autocast_to: under autocast, floating inputs are cast to this dtype first (as torchvision does for
    nms and roi_align); None leaves the op out of autocast.
    """
    name = schema.split("(", 1)[0]
    lib.define(schema)
    lib.impl(name, impl, "CPU")
    lib.impl(name, impl, "CUDA")
    torch.library.register_fake(f"fastcv::{name}", fake, lib=lib)
    if autocast_to is not None:
        for device_type in ("cpu", "cuda"):
            torch.library.register_autocast(f"fastcv::{name}", device_type, autocast_to, lib=lib)


def eager_direct(*tensors) -> bool:
    """Whether a call may run its implementation directly instead of through torch.ops: plain eager
    tensors, no gradient to record, no compiler, dispatch mode, tensor subclass or functorch
    transform that must see the op. The dispatcher and the autograd wrapper cost tens of
    microseconds a call, as much as a small batch norm itself."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    present = [t for t in tensors if t is not None]
    grad = torch.is_grad_enabled()
    for t in present:
        if type(t) is not torch.Tensor or (grad and t.requires_grad) or torch._C._functorch.is_functorch_wrapped_tensor(t):
            return False
    return not torch.overrides.has_torch_function(present)


def no_second_derivative(name: str, what: str) -> None:
    """Registers an autograd formula for the backward op torch.ops.fastcv.<name> that raises: without
    one, autograd would treat the backward as a constant under create_graph=True and return silently
    wrong (zero) second derivatives."""
    def backward(ctx, *grads):
        raise NotImplementedError(f"fastcv's {what} has no second derivative (double backward)")

    torch.library.register_autograd(f"fastcv::{name}", backward, setup_context=lambda ctx, inputs, output: None)
