"""Registration of fastcv's ops as torch.ops.fastcv.<name>.

Library.define + impl costs less per call than torch.library.custom_op (measured in the README), and
tiny calls are where users notice overhead.
"""
from __future__ import annotations

import types
from typing import Callable

import torch

lib = torch.library.Library("fastcv", "DEF")


# Autocast policies: what PyTorch's autocast does to an op (aten/src/ATen/autocast_mode.h, CastPolicy),
# applied to the floating tensors autocast may cast (on the autocast device type, not float64).
LOWER = "lower_precision_fp"  # the autocast dtype, torch.get_autocast_dtype(device_type): F.conv2d, SDPA
FP32 = "fp32"  # float32: torchvision's nms and roi_align
PROMOTE = "promote"  # the widest of the arguments' dtypes: float32 if any is, else the autocast dtype
_POLICIES = (LOWER, FP32, PROMOTE)
_DEVICE_TYPES = ("cpu", "cuda")

# name -> {device type: policy}, for the public wrappers (autocast_args) to apply the op's own policy
_autocast_policy: dict[str, dict[str, str]] = {}
# Whether autocast is on for any device type: the wrappers' hot-path test (about 0.05 µs) before autocast_args
autocast_enabled = torch._C._is_any_autocast_enabled


def define(
    schema: str,
    *,
    impl: Callable,
    fake: Callable,
    check: Callable | None = None,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
    autocast: str | dict[str, str | None] | None = None,
    autocast_keep: tuple[str, ...] = (),
    autocast_restore: bool = False,
) -> "Op":
    """Defines torch.ops.fastcv.<name> with its implementation (one Python function for the CPU and
    CUDA dispatch keys: it picks the kernels by device), fake (meta) impl and autocast behaviour.

    check: raises for arguments the op does not take (what the C++ checks would reject, as Python
    exceptions), before impl and fake run under the dispatcher. fastcv's own calls (Op) skip it: the
    public wrappers have checked their arguments already, and backward formulas pass what the forward
    saved.
    backward, setup_context: the op's autograd formula (torch.library.register_autograd's), also the
    eager route's autograd.Function; a backward op passes no_second_derivative(...) instead.
    autocast: the op's policy under torch.autocast, its PyTorch counterpart's: LOWER, FP32 or PROMOTE,
    for both device types or as {"cpu": ..., "cuda": ...}; None (or a device type left out) runs the op
    in its inputs' dtypes, as PyTorch does for ops on none of autocast's lists (F.batch_norm, F.unfold).
    autocast_keep: arguments (by schema name) left as they are (attention's additive mask, which the op
    takes in its compute dtype, float32, whatever the query's).
    autocast_restore: floating outputs are cast back to the first floating input's dtype, as
    torchvision's roi_align does after computing in float32.

    Returns the op's Op: what fastcv's own code calls to run it (the cheapest correct route).
    """
    name = schema.split("(", 1)[0]
    lib.define(schema)
    kernel = impl if check is None else _checked(check, impl)
    lib.impl(name, kernel, "CPU")
    lib.impl(name, kernel, "CUDA")
    torch.library.register_fake(f"fastcv::{name}", fake if check is None else _checked(check, fake), lib=lib)
    _ops[name] = Op(name, impl)
    setattr(OPS, name, _ops[name])
    if backward is not None:
        _register_autograd(name, backward, setup_context or _no_context)
    _register_autocast(name, schema, autocast, autocast_keep, autocast_restore)
    return _ops[name]


def _checked(check: Callable, fn: Callable) -> Callable:
    def checked(*args):
        check(*args)
        return fn(*args)

    return checked


def _register_autocast(name, schema, autocast, autocast_keep, autocast_restore) -> None:
    policies = autocast if isinstance(autocast, dict) else dict.fromkeys(_DEVICE_TYPES, autocast)
    policies = {d: p for d, p in policies.items() if p is not None}
    if not policies:
        return
    for device_type, policy in policies.items():
        if device_type not in _DEVICE_TYPES or policy not in _POLICIES:
            raise ValueError(f"{name}: unknown autocast policy {policy!r} for {device_type!r}")
    args = [a.name for a in torch._C.parse_schema(f"fastcv::{schema}").arguments]
    keep = frozenset(args.index(a) for a in autocast_keep)
    op = getattr(torch.ops.fastcv, name).default
    for device_type, policy in policies.items():
        lib.impl(name, _autocast_kernel(op, device_type, policy, keep, autocast_restore),
                 "Autocast" + device_type.upper())
    _autocast_policy[name] = policies
    _ops[name].autocast = True


def _eligible(t, device_type: str) -> bool:
    """Whether autocast casts t: floating, not float64, on the autocast device type (at::autocast::is_eligible)."""
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 \
        and t.device.type == device_type


def _target_dtype(policy: str, device_type: str, args) -> torch.dtype:
    if policy == FP32:
        return torch.float32
    if policy == PROMOTE:
        for a in args:
            for t in (a if isinstance(a, (list, tuple)) else (a,)):
                if _eligible(t, device_type) and t.dtype == torch.float32:
                    return torch.float32
    return torch.get_autocast_dtype(device_type)


def _cast(a, dtype: torch.dtype, device_type: str):
    if isinstance(a, torch.Tensor):
        return a.to(dtype) if a.dtype != dtype and _eligible(a, device_type) else a
    if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
        return type(a)(_cast(t, dtype, device_type) for t in a)
    return a


def _first_floating(args) -> torch.dtype | None:
    for a in args:
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                return t.dtype
    return None


def _autocast_kernel(op, device_type: str, policy: str, keep: frozenset, restore: bool) -> Callable:
    """The op's Autocast<Device> kernel: cast, then run the op with this autocast key excluded (as
    torch.library.register_autocast does, but the lower-precision dtype is read at each call)."""
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, "Autocast" + device_type.upper()))

    def kernel(*args):
        dtype = _target_dtype(policy, device_type, args)
        cast = [a if i in keep else _cast(a, dtype, device_type) for i, a in enumerate(args)]
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            out = op(*cast)
        if restore:
            back = _first_floating(args)
            if isinstance(out, torch.Tensor):
                return out.to(back) if out.is_floating_point() else out
            return type(out)(o.to(back) if o.is_floating_point() else o for o in out)
        return out

    return kernel


def autocast_args(name: str, *args):
    """A public wrapper's tensor arguments (tensors, lists of tensors or None) cast as the op `name`
    casts its own under autocast, so that the wrapper's checks and Op's direct route see
    what the dispatcher would: every floating argument, also ones the op itself takes converted (an
    attention mask, as F.scaled_dot_product_attention casts it). The arguments unchanged when autocast
    is off; wrappers call it only `if autocast_enabled()`, which is cheaper than the call."""
    if not autocast_enabled():
        return args
    first = next((t for a in args for t in (a if isinstance(a, (list, tuple)) else (a,))
                  if isinstance(t, torch.Tensor)), None)
    if first is None:
        return args
    device_type = first.device.type
    policy = _autocast_policy.get(name, {}).get(device_type)
    if policy is None or not torch.is_autocast_enabled(device_type):
        return args
    dtype = _target_dtype(policy, device_type, args)
    return tuple(_cast(a, dtype, device_type) for a in args)


# ---------------------------------------------------------------- eager calls
#
# torch.ops.fastcv.<name> goes through the dispatcher and, when a gradient is needed, torch.library's
# autograd wrapper: together tens of microseconds a call, more than a tiny batch norm or attention
# costs. Plain eager calls, where nothing but autograd must see the op, take shortcuts that give the
# same results: the implementation itself when no gradient is recorded, else a torch.autograd.Function
# built from the op's own autograd formula. Everything else (torch.compile, dispatch modes, tensor
# subclasses, functorch transforms) goes through torch.ops.

_ops: dict[str, "Op"] = {}
_TENSOR_LISTS = ("List[Tensor]", "List[Optional[Tensor]]")
_DIRECT, _FUNCTION, _DISPATCH = range(3)

# Every op by name, as fastcv's own code calls it: OPS.conv2d(...) is torch.ops.fastcv.conv2d(...) by
# the cheapest correct route.
OPS = types.SimpleNamespace()


def _route(args, tensors, lists, _tensor=torch.Tensor, _is_compiling=torch.compiler.is_compiling,
           _dispatch_stack=torch._C._len_torch_dispatch_stack,
           _functorch=torch._C._are_functorch_transforms_active,
           _function_mode=torch._C._is_torch_function_mode_enabled, _grad_enabled=torch.is_grad_enabled) -> int:
    """How a call with these arguments may run (_DIRECT, _FUNCTION or _DISPATCH); tensors and lists: the
    positions of the schema's Tensor and Tensor[] arguments. A few C calls: this runs on every call of
    every op (the defaults bind the globals it reads once)."""
    if _is_compiling():  # first: Dynamo folds it to True and traces nothing after it
        return _DISPATCH
    if _dispatch_stack() or _functorch() or _function_mode():
        return _DISPATCH
    grad = False
    for i in tensors:
        a = args[i]
        if type(a) is _tensor:
            grad = grad or a.requires_grad
        elif isinstance(a, _tensor):  # a subclass: it may override anything
            return _DISPATCH
    for i in lists:
        for t in args[i]:
            if type(t) is _tensor:
                grad = grad or t.requires_grad
            elif isinstance(t, _tensor):
                return _DISPATCH
    return _FUNCTION if grad and _grad_enabled() else _DIRECT


class Op:
    """torch.ops.fastcv.<name> as fastcv's wrappers and backward formulas call it: the implementation
    directly, through an autograd.Function, or through the dispatcher (see _route). Inputs must be
    what the op's schema takes (public wrappers check and cast them first, autocast_args included)."""

    def __init__(self, name: str, impl: Callable):
        self.name, self.impl = name, impl
        self.packet = getattr(torch.ops.fastcv, name)
        arguments = self.packet.default._schema.arguments
        self.tensors = tuple(i for i, a in enumerate(arguments) if str(a.type) in ("Tensor", "Optional[Tensor]"))
        self.lists = tuple(i for i, a in enumerate(arguments) if str(a.type).startswith(_TENSOR_LISTS))
        self.function: type[torch.autograd.Function] | None = None  # set by register_autograd
        self.autocast = False  # whether the op has an autocast policy (then autocast takes the dispatcher)

    def __call__(self, *args):
        route = _route(args, self.tensors, self.lists)
        if self.autocast and autocast_enabled():
            route = _DISPATCH
        if route == _DIRECT:
            return self.impl(*args)
        if route == _FUNCTION and self.function is not None:
            return self.function.apply(*args)
        return self.packet(*args)


def _register_autograd(name: str, backward: Callable, setup_context: Callable) -> None:
    """The op's autograd formula, registered for torch.ops.fastcv.<name> and also made the eager
    route's autograd.Function (the same setup_context and backward, so the two cannot differ)."""
    torch.library.register_autograd(f"fastcv::{name}", backward, setup_context=setup_context, lib=lib)
    op = _ops[name]
    if op.lists:
        return  # an autograd.Function sees no tensor inside a list: such ops keep the dispatcher's wrapper
    impl = op.impl

    # forward(ctx, ...) calls setup_context itself: an autograd.Function that defines setup_context
    # has its arguments bound to forward's signature by inspect on every call (about 25 µs).
    def forward(ctx, *args):
        output = impl(*args)
        setup_context(ctx, args, output)
        return output

    op.function = type(f"{name}_function", (torch.autograd.Function,),
                       {"forward": staticmethod(forward), "backward": staticmethod(backward)})


def _no_context(ctx, inputs, output) -> None:
    pass


def no_second_derivative(what: str) -> Callable:
    """The autograd formula of a backward op: it raises. Without one, autograd would treat the backward
    as a constant under create_graph=True and return silently wrong (zero) second derivatives."""
    def backward(ctx, *grads):
        raise NotImplementedError(f"fastcv's {what} has no second derivative (double backward)")

    return backward
