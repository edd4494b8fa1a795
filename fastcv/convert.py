"""fastcv.convert(model): a model whose layers run fastcv's ops, with the patterns fastcv fuses rewritten.

    model = fastcv.convert(torchvision.models.resnet50())      # a converted deep copy
    fastcv.convert(model, inplace=True)                        # converts model itself, keeps its parameters

Module swaps. Every nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm1d/2d/3d and nn.MultiheadAttention (these exact
classes) becomes fastcv.nn's class of the same name. The swap re-classes the module object
(``module.__class__ = fastcv.nn.Conv2d``): fastcv.nn's classes subclass PyTorch's and replace only the
computation, so the module keeps its parameter and buffer objects, attributes, hooks and state_dict names, and
checkpoints load both ways. torchvision's detection modules (MultiScaleRoIAlign, the RPN and the RoI heads)
are re-classed the same way to run fastcv's multi-level RoI Align and NMS (fastcv.patch.swap_detection_modules:
what patch_torchvision does globally, for this model only). Layers fastcv cannot run stay as they are, and one warning names each with the
reason: parameters of a dtype other than float32/float64/float16/bfloat16 (complex, say), parameters on a
device other than the CPU or CUDA (or meta), lazy modules not initialised yet (run one forward first), and
subclasses of these classes (whose own forward fastcv would drop). nn.Conv2d's padding modes ('reflect',
'replicate', 'circular') and every nn.MultiheadAttention option are supported (fastcv.nn.MultiheadAttention
computes need_weights=True with PyTorch's own forward).

Fusion (fuse=True). Each module that has a fastcv Conv2d or BatchNorm among its direct children is traced with
torch.fx, its children kept as leaves, and the graph of its forward is rewritten:

- conv -> batch norm [-> + identity] [-> relu]: in eval mode the batch norm is folded into the convolution
  (fold_batch_norm) and the chain is one ops.conv2d_fused(relu=..., residual=identity); in training mode the
  convolution runs, then ops.batch_norm_relu / ops.batch_norm_add_relu (or the batch norm alone).
- batch norm -> relu and batch norm -> + identity -> relu (ResNet's junction): ops.batch_norm_relu /
  ops.batch_norm_add_relu, in either mode, with the running statistics updated as nn.BatchNorm updates them.
- conv [-> + identity] [-> relu] without a batch norm: ops.conv2d_fused.

The relu is nn.ReLU, F.relu, torch.relu or Tensor.relu (also in-place); the add is +, +=, torch.add or
Tensor.add (without alpha). A chain is fused only where each intermediate result has no other use.

The rewritten graph calls functions of this module that receive the modules themselves and choose at run time:
the fold only when the batch norm is in eval mode with running statistics, the fused residual only when the
identity has the output's shape and dtype, and the plain module calls whenever one of the modules has hooks
(so hooks keep firing). The modules stay where they were: nothing is added to or removed from the state_dict,
and parameters are the same objects. Folded weights are cached per convolution (outside the module, so not in
its state_dict, copies or pickles) and recomputed when a parameter or running statistic changes (in place, by
an optimizer or load_state_dict, or replaced); with gradients enabled the fold is computed afresh each call,
differentiably, so eval-mode training (frozen statistics) gets gradients for the convolution and the batch norm.

The rewritten module keeps its class: the generated forward is set on the instance (``module.forward``). A
module whose traced code depends on the mode (its forward reads self.training) gets both graphs, picked by
self.training at each call, so train() and eval() after conversion behave as before it. A module that torch.fx
cannot trace (data-dependent control flow, say), or whose forward enters torch.no_grad, torch.enable_grad,
torch.inference_mode or torch.autocast (which a trace would silently drop), keeps its own forward: its layers
are swapped but not fused, one warning names it with the reason, and its children are traced on their own.
Fusion is within one module's forward: a chain whose conv or batch norm sits in a child (a Sequential, say) and
whose relu or add sits in the parent is not fused.

What fusion changes in a rewritten module, as any torch.fx trace does: its forward is fixed at conversion, so
Python side effects of that forward other than its children's calls (a counter it increments, say) happened
once, at conversion, and a child appended to a Sequential afterwards is not called (replacing a child works).
Hooks on the module itself and on its children keep firing. A converted model pickled whole (torch.save(model))
loads with its layers swapped but not fused (a bound method pickles by its name, so the module gets its
class's forward back): convert() it again. Copies (copy.deepcopy) keep the fused forwards, bound to the copies.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import linecache
import operator
import threading
import types
import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fastcv import nn as fnn
from fastcv.nn.fused import bn_act, conv_act, conv_bn_act
from fastcv.patch import swap_detection_modules

__all__ = ["convert"]

_SWAPS: dict[type, type] = {
    nn.Conv2d: fnn.Conv2d,
    nn.ConvTranspose2d: fnn.ConvTranspose2d,
    nn.BatchNorm1d: fnn.BatchNorm1d,
    nn.BatchNorm2d: fnn.BatchNorm2d,
    nn.BatchNorm3d: fnn.BatchNorm3d,
    nn.MultiheadAttention: fnn.MultiheadAttention,
}
_FAST = tuple(_SWAPS.values())
_FAST_BN = (fnn.BatchNorm1d, fnn.BatchNorm2d, fnn.BatchNorm3d)
_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DEVICE_TYPES = ("cpu", "cuda", "meta")


def convert(model: nn.Module, *, fuse: bool = True, inplace: bool = False) -> nn.Module:
    """The model with its layers running fastcv's ops (see the module docstring).

    model: any nn.Module; convert it after building it (and after loading weights, or before: state_dicts are
    unchanged). fuse: also rewrite the patterns fastcv fuses, with torch.fx. inplace: convert `model` itself
    (its parameter objects stay the same, so an optimizer built before still works) instead of a deep copy
    (the default: build the optimizer on the returned model).

    Warns once (UserWarning) naming the layers left as PyTorch's and why, and once naming the modules torch.fx
    could not trace (their layers swapped, not fused). Converting a converted model changes nothing."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    skipped = _swap(model)
    swap_detection_modules(model)
    if skipped:
        warnings.warn("fastcv.convert left these layers as PyTorch's: "
                      + "; ".join(f"'{name}' ({reason})" for name, reason in skipped), UserWarning, stacklevel=2)
    if fuse:
        untraced = _fuse(model)
        if untraced:
            warnings.warn("fastcv.convert: torch.fx could not trace these modules, so their layers are swapped but "
                          "not fused: " + "; ".join(f"'{name}' ({reason})" for name, reason in untraced),
                          UserWarning, stacklevel=2)
    return model


# ------------------------------------------------------------------------------------------------ module swaps


def _display(name: str, module: nn.Module) -> str:
    return name or f"<root {type(module).__name__}>"


def _unsupported(module: nn.Module) -> str | None:
    """Why fastcv's class cannot stand in for this layer, or None."""
    cls = type(module)
    base = next(b for b in cls.__mro__ if b in _SWAPS)
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return f"{cls.__name__}: a lazy module not initialised yet; run one forward before converting"
    if cls is not base:
        return f"{cls.__name__}: a subclass of nn.{base.__name__}, whose own forward fastcv would replace"
    for t in list(module.parameters()) + list(module.buffers()):
        if t is None or not (t.is_floating_point() or t.is_complex()):
            continue  # num_batches_tracked
        if t.dtype not in _FLOATING:
            return f"{cls.__name__} with {t.dtype} parameters: fastcv computes in float32, float64, float16, bfloat16"
        if t.device.type not in _DEVICE_TYPES:
            return f"{cls.__name__} on {t.device}: fastcv's kernels run on the CPU and CUDA"
    return None


def _swap(model: nn.Module) -> list[tuple[str, str]]:
    """Re-classes every swappable layer in place; returns (name, reason) for those left alone."""
    skipped = []
    for name, module in model.named_modules():
        if isinstance(module, _FAST) or not isinstance(module, tuple(_SWAPS)):
            continue
        reason = _unsupported(module)
        if reason is None:
            module.__class__ = _SWAPS[type(module)]
        else:
            skipped.append((_display(name, module), reason))
    return skipped


# ------------------------------------------------------------------------------------------------ tracing


class _ChildrenAsLeaves(fx.Tracer):
    """Traces one module's own forward: every submodule call is a call_module node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


# Context managers whose effect torch.fx does not record: a traced forward would run without them. Tracing a
# forward that enters one fails (the module keeps its own forward).
_UNRECORDED = [
    (torch._C, "_set_grad_enabled", "torch.no_grad / torch.enable_grad / torch.set_grad_enabled"),
    (torch.autograd.grad_mode.inference_mode, "__enter__", "torch.inference_mode"),
    (torch.amp.autocast_mode.autocast, "__enter__", "torch.autocast"),
]


@contextlib.contextmanager
def _refusing_unrecorded_modes():
    thread = threading.get_ident()
    entered = []
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in _UNRECORDED]

    def watch(original, what):
        def watched(*args, **kwargs):
            if threading.get_ident() == thread:
                entered.append(what)
            return original(*args, **kwargs)
        return watched

    for (owner, name, original), (_, _, what) in zip(originals, _UNRECORDED):
        setattr(owner, name, watch(original, what))
    try:
        yield entered
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def _trace(module: nn.Module, training: bool) -> fx.Graph:
    """module's forward traced with the module (and its children) in the given mode; modes are restored."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in modes:
            m.training = training
        with _refusing_unrecorded_modes() as entered:
            graph = _ChildrenAsLeaves().trace(module)
        if entered:
            raise RuntimeError(f"the forward uses {entered[0]}, which a torch.fx trace would drop")
        return graph
    finally:
        for m, mode in modes:
            m.training = mode


def _fuse(model: nn.Module) -> list[tuple[str, str]]:
    """Rewrites the forward of every module with fusable children; returns (name, reason) of those that do not
    trace."""
    untraced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, (*_FAST, *_SWAPS, torch.jit.ScriptModule)) or _own_forward(module) is not None:
            continue  # a layer, a script module, or a forward already replaced (converted before, or patched)
        if not any(type(child) in (fnn.Conv2d, *_FAST_BN) for child in module.children()):
            continue
        try:
            graphs = [_trace(module, True), _trace(module, False)]
        except Exception as error:  # noqa: BLE001  (any failure to trace means: leave this module's forward alone)
            reason = (str(error).strip().splitlines() or [""])[0]
            if len(reason) > 160:
                reason = reason[:157] + "..."
            untraced.append((_display(name, module), f"{type(module).__name__}: {type(error).__name__}: {reason}"))
            continue
        if any([_rewrite(graph, module) for graph in graphs]):
            _install(module, graphs)
    return untraced


def _own_forward(module: nn.Module):
    """The forward set on the instance, or None. An unpickled converted module holds its class's forward there
    (a bound method pickles by name): that one is removed, and counts as none."""
    forward = module.__dict__.get("forward")
    if forward is None:
        return None
    if getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward:
        del module.__dict__["forward"]
        return None
    return forward


def _install(module: nn.Module, graphs: list[fx.Graph]) -> None:
    """Sets the generated forward on the instance: one function, or two picked by self.training when the traced
    code depends on the mode."""
    train_fn, train_src = _compile(graphs[0])
    eval_fn, eval_src = _compile(graphs[1])
    if train_src == eval_src:
        forward = train_fn
    else:
        def forward(self, *args, **kwargs):
            return (train_fn if self.training else eval_fn)(self, *args, **kwargs)
    forward.__fastcv_code__ = (train_src, eval_src)
    module.forward = types.MethodType(forward, module)


def _compile(graph: fx.Graph):
    """(forward function, its source) from a graph traced on a module, as torch.fx's GraphModule builds it; the
    source goes into linecache so tracebacks and inspect show it."""
    code = graph.python_code(root_module="self")
    src = code.src
    filename = f"<fastcv.convert generated forward {hashlib.sha1(src.encode()).hexdigest()[:12]}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(src, filename, "exec", dont_inherit=True), namespace)  # noqa: S102  (code generated by torch.fx)
    return namespace["forward"], src


# ------------------------------------------------------------------------------------------------ graph rewriting

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_INPLACE_FUNCTIONS = (operator.iadd, operator.isub, operator.imul, operator.itruediv)


def _plain_call(node: fx.Node) -> bool:
    """A call with one positional argument (a Node) and no keyword arguments."""
    return len(node.args) == 1 and isinstance(node.args[0], fx.Node) and not node.kwargs


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _relu(node: fx.Node | None, arg: fx.Node, modules: dict[str, nn.Module]):
    """If node is relu(arg): True for the functional forms, the target for an nn.ReLU module; else None."""
    if node is None or not node.args or node.args[0] is not arg:
        return None
    if node.op == "call_module":
        return node.target if type(modules.get(node.target)) is nn.ReLU and _plain_call(node) else None
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        extra = dict(node.kwargs)
        if len(node.args) > 2 or set(extra) - {"inplace"}:
            return None
        return True
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return True if len(node.args) == 1 and not node.kwargs else None
    return None


def _added(node: fx.Node | None, arg: fx.Node):
    """If node is arg + other (other a Node, arg not mutated where it is the other operand): other; else None."""
    if node is None or node.kwargs.get("alpha", 1) != 1 or set(node.kwargs) - {"alpha"} or len(node.args) != 2:
        return None
    a, b = node.args
    if node.op == "call_function" and node.target in (operator.add, torch.add):
        other = b if a is arg else a if b is arg else None
    elif node.op == "call_method" and node.target == "add":
        other = b if a is arg else a if b is arg else None
    elif (node.op == "call_function" and node.target is operator.iadd) or (
            node.op == "call_method" and node.target == "add_"):
        other = b if a is arg else None  # the in-place add writes into its first operand: only arg may be that
    else:
        return None
    return other if isinstance(other, fx.Node) and other is not arg else None


def _mutates(node: fx.Node, values: set, modules: dict[str, nn.Module]) -> bool:
    """Whether node may write into one of `values` in place (conservatively, for the forms tracing produces)."""
    if not node.args or node.args[0] not in values:
        return False
    if node.op == "call_method":
        return node.target.endswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_FUNCTIONS or name.endswith("_") or bool(node.kwargs.get("inplace"))
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "inplace", False))
    return False


def _tail(node: fx.Node, modules: dict[str, nn.Module]):
    """What follows node: (identity node or None, add node or None, relu (None/True/target), relu node or None),
    each step taken only where the previous result has no other use."""
    identity = add = relu = relu_node = None
    end = node
    user = _only_user(end)
    other = _added(user, end)
    if other is not None:
        identity, add, end = other, user, user
    user = _only_user(end)
    kind = _relu(user, end, modules)
    if kind is not None:
        relu, relu_node = kind, user
    return identity, add, relu, relu_node


def _between(first: fx.Node, last: fx.Node):
    """The nodes after first and before last, in graph order."""
    node = first.next
    while node is not last:
        yield node
        node = node.next


def _chain(node: fx.Node, modules: dict[str, nn.Module], done: set):
    """The fusable chain around node (a convolution or a batch norm call): (conv node or None, bn node or None,
    identity, add node, relu, relu node), or None. A convolution before the batch norm joins only if its output
    has no other use; if the chain with it is not safe to move, the one without it is tried."""
    layer = modules.get(node.target)
    if type(layer) in _FAST_BN:
        bn_node, source = node, node.args[0]
        conv = modules.get(source.target) if source.op == "call_module" else None
        foldable = (type(conv) is fnn.Conv2d and type(layer) is fnn.BatchNorm2d and _plain_call(source)
                    and len(source.users) == 1 and conv.out_channels == layer.num_features and source not in done)
        candidates = [source, None] if foldable else [None]
    elif type(layer) is fnn.Conv2d:
        bn_node, candidates = None, [node]
    else:
        return None
    identity, add, relu, relu_node = _tail(node, modules)
    for conv_node in candidates:
        if relu is None and not (conv_node is not None and (bn_node is not None or identity is not None)):
            continue  # nothing fastcv fuses: a lone batch norm (or one with an add), or a lone convolution
        chain = [n for n in (conv_node, bn_node, add, relu_node) if n is not None]
        # the chain will run where its last node is: nothing in between may write into its input or the identity
        watched = {chain[0].args[0]} | ({identity} if identity is not None else set())
        if not any(_mutates(n, watched, modules) for n in _between(chain[0], chain[-1]) if n not in chain):
            return conv_node, bn_node, identity, add, relu, relu_node
    return None


def _rewrite(graph: fx.Graph, root: nn.Module) -> bool:
    """Replaces the fusable chains of graph (traced on root) by calls to the functions below; True if any."""
    modules = dict(root.named_modules())
    done: set[fx.Node] = set()
    for node in list(graph.nodes):
        if node in done or node.op != "call_module" or not _plain_call(node):
            continue
        found = _chain(node, modules, done)
        if found is None:
            continue
        conv_node, bn_node, identity, add, relu, relu_node = found
        chain = [n for n in (conv_node, bn_node, add, relu_node) if n is not None]
        first, last = chain[0], chain[-1]
        with graph.inserting_before(last):
            def module_arg(target):
                return graph.get_attr(target) if isinstance(target, str) else target
            relu_arg = False if relu is None else module_arg(relu)
            if bn_node is None:
                fused = graph.call_function(conv_act, (first.args[0], module_arg(conv_node.target), identity,
                                                        relu_arg))
            elif conv_node is None:
                fused = graph.call_function(bn_act, (first.args[0], module_arg(bn_node.target), identity, relu_arg))
            else:
                fused = graph.call_function(conv_bn_act, (first.args[0], module_arg(conv_node.target),
                                                           module_arg(bn_node.target), identity, relu_arg))
        last.replace_all_uses_with(fused)
        for n in reversed(chain):
            graph.erase_node(n)
        done.update(chain)
    if done:
        graph.lint()
    return bool(done)
