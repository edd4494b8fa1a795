"""Scaled-dot-product attention: a drop-in for torch.nn.functional.scaled_dot_product_attention.

softmax(Q K^T * scale + mask) V, memory-efficient on every device: the L x S score matrix is never
stored. The forward walks key blocks with an online softmax and saves one log-sum-exp per query; the
backward recomputes each block's probabilities from it (FlashAttention-2's scheme). Memory grows
linearly in the sequence lengths.

Semantics are F.scaled_dot_product_attention's (math backend): inputs (..., L, E), (..., S, E), (..., S, Ev)
of any ranks >= 2 whose leading dimensions (the last of them the heads) broadcast against each other as
PyTorch broadcasts them; broadcast inputs reach the kernels as stride-0 views (expand), never as copies,
and their gradients are summed back to their own shapes. Boolean masks (True takes part) or additive
masks of the query's dtype that broadcast to the scores (*broadcast(query, key) batch, L, S) without
growing them; is_causal with PyTorch's top-left alignment (query i sees keys j <= i, also when L != S);
a custom scale; grouped-query attention with enable_gqa=True (the key's and value's heads divide the
query's); rows whose keys are all masked give 0, as PyTorch does. Dropout draws a counter-based Philox
stream from a seed taken from torch's generator (torch.manual_seed reproduces it), and the backward
regenerates the same mask. Gradients flow to query, key and value, and to a floating mask that requires
grad (a learned bias such as Swin's relative-position bias): its gradient, the score gradient
dS = P * (dP - delta) summed over the dimensions the mask broadcasts over, is accumulated by the backward
kernels at the mask's own shape (no L x S buffer per batch and head); 0 at -inf entries and on fully
masked rows, as PyTorch's math gives.

Backends: CPU C++ (csrc/ops/attention/), GPU Triton (kernels/attention.py). float64 on a GPU has no
Triton kernels: it runs PyTorch's op.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcv import _C
from fastcv._backend import CPU, FLOATING, num_threads, select, triton
from fastcv._library import LOWER, OPS, autocast_args, autocast_enabled, define, no_second_derivative

__all__ = ["scaled_dot_product_attention"]

# Head dims the kernels take: the Triton kernels hold a head in registers up to 256; the CPU kernels'
# per-thread tiles grow with the head dim, so they stop at 512.
MAX_HEAD_DIM = {"cpu": 512, "cuda": 256}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- the ops
#
# attention_forward(q, k, v, mask, dropout_p, is_causal, scale, seed) -> (out, lse): q [*B, Hq, L, E],
# k [*B, Hkv, S, E], v [*B, Hkv, S, Ev] (at least 4-D, the same leading dims *B, any strides: expanded
# views are read in place); mask None or additive in the compute dtype, of the same rank, each dim 1 or
# that of [*B, Hq, L, S] (broadcast through strides). out [*B, Hq, L, Ev], lse [*B, Hq, L].
# attention_backward(..., mask, ..., seed, mask_grad) returns (grad_q, grad_k, grad_v, grad_mask):
# grad_mask is the mask's gradient at the mask's own shape in the compute dtype (summed by the kernels
# over the dimensions it broadcasts over) when mask_grad, else an empty tensor.


def _check_op(q, k, v, mask, *_):
    """What the kernels' own checks would reject, as Python exceptions (direct torch.ops.fastcv calls)."""
    if q.dim() < 4 or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError("attention_forward takes query, key and value of one rank, at least 4-D ([..., B, H, L, E])")
    if q.dtype not in FLOATING or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"query, key and value must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    hq, l, e = q.shape[-3:]
    if k.shape[:-3] != q.shape[:-3] or k.shape[-1] != e or v.shape[:-1] != k.shape[:-1] or \
            (k.shape[-3] and hq % k.shape[-3]):
        raise ValueError(f"incompatible query {list(q.shape)}, key {list(k.shape)}, value {list(v.shape)}")
    if q.is_cuda and q.dtype == torch.float64:
        raise TypeError("the GPU attention kernels take float32, float16 and bfloat16 (float64: use "
                        "fastcv.ops.scaled_dot_product_attention, which runs PyTorch's op)")
    if mask is not None:
        target = (*q.shape[:-1], k.shape[-2])
        if mask.dim() != len(target) or mask.dtype != _compute_dtype(q.dtype) or \
                any(m not in (1, t) for m, t in zip(mask.shape, target)):
            raise ValueError(f"mask must be a {_compute_dtype(q.dtype)} Tensor of rank {len(target)} whose dims are "
                             f"1 or those of {list(target)}, got {mask.dtype} {list(mask.shape)}")


def _rows(t: Tensor) -> Tensor:
    """t with a contiguous last dimension (the kernels read rows as runs): itself, almost always."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _pad_last(t: Tensor, width: int) -> Tensor:
    return t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]))


def _same_head_dims(q, k, v):
    """The Triton kernels take one head dim: a value head dim that differs from the query's is padded
    with zeros to the larger of the two (zero columns change neither q.k nor the output's own columns)."""
    width = max(q.shape[3], v.shape[3])
    return _pad_last(q, width), _pad_last(k, width), _pad_last(v, width), width


def _merges(shape, stride, nb: int) -> bool:
    """Whether dims [0, nb) of a tensor of this shape and stride merge into one dim (a view)."""
    if 0 in shape:
        return True
    dims = [(n, st) for n, st in zip(shape[:nb], stride[:nb]) if n != 1]
    return all(dims[i][1] == dims[i + 1][1] * dims[i + 1][0] for i in range(len(dims) - 1))


def _layout(t: Tensor | None):
    return None if t is None else (tuple(t.shape), tuple(t.stride()))


def _compact_layout(mask: Tensor, full) -> tuple:
    """The layout of the mask gradient's accumulator (contiguous at the mask's shape) expanded to `full`."""
    st, acc = [], 1
    for n in reversed(mask.shape):
        st.append(acc)
        acc *= n
    st = st[::-1]
    return tuple(full), tuple(0 if m == 1 and f != 1 else s for m, f, s in zip(mask.shape, full, st))


def _calls(nb: int, layouts, tensors):
    """The kernel calls for tensors whose first nb dims are the batch dims: one call on [B, ...] views when
    every input's batch dims merge (`layouts`: shapes and strides of the inputs, which decide, so the forward
    and the backward split alike), else one per index of the first dim, recursively (expanded inputs can
    have batch dims that merge into no single stride). Yields lists of views, None kept. reshape: a view
    for the inputs and the contiguous outputs (grad_out may be copied)."""
    if nb == 1 or all(lay is None or _merges(lay[0], lay[1], nb) for lay in layouts):
        yield [None if t is None else t.reshape(math.prod(t.shape[:nb]), *t.shape[nb:]) for t in tensors]
        return
    inner = [None if lay is None else (lay[0][1:], lay[1][1:]) for lay in layouts]
    for i in range(tensors[0].shape[0]):
        yield from _calls(nb - 1, inner, [None if t is None else t[i] for t in tensors])


def _full_mask(q, k, mask):
    return None if mask is None else mask.expand(*q.shape[:-1], k.shape[-2])


def _decisive(q, k, v, mask, full_mask):
    """The layouts that decide how the batch dims are split into calls (see _calls)."""
    lays = [_layout(q), _layout(k), _layout(v), _layout(full_mask)]
    if mask is not None:
        lays.append(_compact_layout(mask, full_mask.shape))
    return lays


def _forward_outputs(q, v):
    *lead, _ = q.shape
    return q.new_empty((*lead, v.shape[-1])), q.new_empty(lead, dtype=_compute_dtype(q.dtype))


def _forward_impl(q, k, v, mask, dropout_p, is_causal, scale, seed):
    out, lse = _forward_outputs(q, v)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    full = _full_mask(q, k, mask)
    if q.dim() == 4:
        _forward_call(q, k, v, full, dropout_p, is_causal, scale, seed, 0, out, lse)
        return out, lse
    calls = list(_calls(q.dim() - 3, _decisive(q, k, v, mask, full), [q, k, v, full, out, lse]))
    for offset, (q4, k4, v4, m4, o4, l4) in enumerate(calls):
        _forward_call(q4, k4, v4, m4, dropout_p, is_causal, scale, seed, offset, o4, l4)
    return out, lse


def _forward_call(q, k, v, mask, dropout_p, is_causal, scale, seed, offset, out, lse):
    """One kernel call on 4-D views; offset: the dropout stream of this call (the call's index)."""
    if out.numel() == 0 and lse.numel() == 0:
        return
    q, k, v = _rows(q), _rows(k), _rows(v)
    if select("attention", q) == CPU:
        _C.attention_forward_cpu(q, k, v, mask, scale, is_causal, dropout_p, seed, offset, out, lse, num_threads())
    elif k.shape[2] == 0:  # no keys: every row is empty
        out.zero_(), lse.fill_(math.inf)
    else:
        q, k, v, width = _same_head_dims(q, k, v)
        o = out if width == out.shape[3] else q.new_empty(q.shape)
        triton("attention").forward(q, k, v, mask, scale, is_causal, dropout_p, seed, offset, o, lse)
        if o is not out:
            out.copy_(o[..., :out.shape[3]])


def _forward_fake(q, k, v, mask, dropout_p, is_causal, scale, seed):
    return _forward_outputs(q, v)


def _backward_outputs(q, k, v, mask, mask_grad):
    grads = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    if mask_grad:
        if mask is None:
            raise ValueError("attention_backward: mask_grad=True needs a mask")
        return (*grads, torch.zeros(mask.shape, dtype=mask.dtype, device=mask.device))
    return (*grads, q.new_empty((0,), dtype=_compute_dtype(q.dtype)))


def _backward_impl(grad_out, q, k, v, out, lse, mask, dropout_p, is_causal, scale, seed, mask_grad):
    dq, dk, dv, dmask = _backward_outputs(q, k, v, mask, mask_grad)
    full = _full_mask(q, k, mask)
    acc = dmask.expand(full.shape) if mask_grad else None  # the kernels add dS into it
    if q.dim() == 4:
        _backward_call(grad_out, q, k, v, out, lse, full, dropout_p, is_causal, scale, seed, 0, dq, dk, dv, acc)
        return dq, dk, dv, dmask
    calls = list(_calls(q.dim() - 3, _decisive(q, k, v, mask, full),
                        [q, k, v, full, grad_out, out, lse, dq, dk, dv, acc]))
    for offset, (q4, k4, v4, m4, g4, o4, l4, dq4, dk4, dv4, a4) in enumerate(calls):
        _backward_call(g4, q4, k4, v4, o4, l4, m4, dropout_p, is_causal, scale, seed, offset, dq4, dk4, dv4, a4)
    return dq, dk, dv, dmask


def _backward_call(grad_out, q, k, v, out, lse, mask, dropout_p, is_causal, scale, seed, offset, dq, dk, dv, acc):
    grad_out, q, k, v = _rows(grad_out), _rows(q), _rows(k), _rows(v)
    if select("attention", q) == CPU:
        _C.attention_backward_cpu(grad_out, q, k, v, out.contiguous(),
                                  lse.contiguous(), mask, scale, is_causal, dropout_p, seed, offset,
                                  dq, dk, dv, acc, num_threads())
    elif 0 in (q.shape[2], k.shape[2]):  # no queries or no keys: nothing flows
        dq.zero_(), dk.zero_(), dv.zero_()
    elif 0 not in q.shape[:2]:
        e, ev = q.shape[3], v.shape[3]
        q, k, v, width = _same_head_dims(q, k, v)
        grad_out, out = _pad_last(grad_out.contiguous(), width), _pad_last(out.contiguous(), width)
        grads = (dq, dk, dv) if e == ev else tuple(torch.empty_like(t) for t in (q, k, v))
        triton("attention").backward(grad_out, q, k, v, out, lse.contiguous(), mask, scale, is_causal, dropout_p,
                                     seed, offset, *grads, dmask=acc)
        if e != ev:
            dq.copy_(grads[0][..., :e]), dk.copy_(grads[1][..., :e]), dv.copy_(grads[2][..., :ev])


def _check_backward(grad_out, q, k, v, out, lse, mask, *_):
    _check_op(q, k, v, mask)


def _backward_fake(grad_out, q, k, v, out, lse, mask, dropout_p, is_causal, scale, seed, mask_grad):
    return _backward_outputs(q, k, v, mask, mask_grad)


def _setup(ctx, inputs, output):
    q, k, v, mask, dropout_p, is_causal, scale, seed = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, mask)
    ctx.args = (dropout_p, is_causal, scale, seed)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    mask_grad = mask is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dmask = OPS.attention_backward(grad_out, q, k, v, out, lse, mask, *ctx.args, mask_grad)
    return dq, dk, dv, dmask if mask_grad else None, None, None, None, None


define("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
       "float dropout_p, bool is_causal, float scale, int seed, bool mask_grad) -> (Tensor, Tensor, Tensor, Tensor)",
       impl=_backward_impl, fake=_backward_fake, check=_check_backward,
       backward=no_second_derivative("scaled_dot_product_attention"))
define("attention_forward(Tensor q, Tensor k, Tensor v, Tensor? mask, float dropout_p, bool is_causal, "
       "float scale, int seed) -> (Tensor, Tensor)", impl=_forward_impl, fake=_forward_fake, check=_check_op,
       backward=_backward, setup_context=_setup,
       autocast=LOWER, autocast_keep=("mask",))  # SDPA's policy; the mask stays in the compute dtype


# ---------------------------------------------------------------- the public function


def _broadcast_shapes(*shapes):
    """torch.broadcast_shapes as a tuple, None where they do not broadcast (plain Python: torch's costs
    about 10 us a call, as much as a small attention)."""
    n = max(len(sh) for sh in shapes)
    out = []
    for i in range(n):
        size = 1
        for sh in shapes:
            j = i - n + len(sh)
            if j >= 0 and sh[j] != 1:
                if size != 1 and sh[j] != size:
                    return None
                size = sh[j]
        out.append(size)
    return tuple(out)


def _broadcast(shapes, what):
    out = _broadcast_shapes(*shapes)
    if out is None:
        raise ValueError(what)
    return out


class _Shapes:
    """The inputs' shapes for an error message, formatted only if one is raised (a few µs a call)."""

    def __init__(self, *tensors):
        self.tensors = tensors

    def __format__(self, spec):
        q, k, v = (list(t.shape) for t in self.tensors)
        return f"query {q}, key {k} and value {v}"


def _check(query, key, value, attn_mask, dropout_p, scale, enable_gqa):
    """Checks the arguments as F.scaled_dot_product_attention (math backend) accepts them; returns the
    plan: (batch dims of the output, kv heads the kernels take or None, whether key and value are
    repeated over the heads)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (..., length, features), got {list(t.shape)}")
    if query.dtype not in FLOATING:
        raise TypeError(f"query must be float32, float64, float16 or bfloat16, got {query.dtype}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"key and value must have the query's dtype ({query.dtype}), got {key.dtype} and {value.dtype}")
    if key.device != query.device or value.device != query.device:
        raise ValueError(f"key and value must be on the query's device ({query.device}), got {key.device} and "
                         f"{value.device}")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key's head dim ({key.shape[-1]}) must equal the query's ({query.shape[-1]})")
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(f"value's length ({value.shape[-2]}) must equal the key's ({key.shape[-2]})")
    shapes = _Shapes(query, key, value)
    qlead, klead, vlead = tuple(query.shape[:-2]), tuple(key.shape[:-2]), tuple(value.shape[:-2])
    repeat = False
    if enable_gqa:  # PyTorch repeats key and value over the heads (dim -3), then broadcasts
        if min(query.dim(), key.dim(), value.dim()) < 3:
            raise ValueError(f"enable_gqa=True needs query, key and value with a heads dimension (at least 3-D), got "
                             f"{shapes}")
        hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if hk == 0 or hv == 0 or hq % hk or hq % hv:
            raise ValueError(f"query has {hq} heads and key {hk}, value {hv}: with enable_gqa=True the key's and the "
                             "value's heads must divide the query's")
        klead, vlead = (*klead[:-1], hq), (*vlead[:-1], hq)
        repeat = hk != hv  # one kv head count for the kernels: both repeated to the query's (a copy of k, v)
    else:
        hq = query.shape[-3] if query.dim() >= 3 else 1
        hk = key.shape[-3] if key.dim() >= 3 else 1
        if hq != hk and hq != 1 and hk != 1:
            raise ValueError(f"query has {hq} heads and key {hk}: they must be equal (or one of them 1), or the "
                             "query's a multiple of the key's with enable_gqa=True")
    if qlead == klead == vlead:  # the usual call: nothing to broadcast
        attn = batch = qlead
    else:
        attn = _broadcast((qlead, klead), f"{shapes} must have leading (batch) dimensions that broadcast")
        batch = _broadcast((attn, vlead), f"{shapes} must have leading (batch) dimensions that broadcast")
    limit = MAX_HEAD_DIM["cuda" if query.is_cuda else "cpu"]
    if max(query.shape[-1], value.shape[-1]) > limit:
        raise ValueError(f"head dims up to {limit} are supported on {query.device.type}, got query "
                         f"{query.shape[-1]} and value {value.shape[-1]}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None, got {scale}")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise TypeError(f"attn_mask must be bool or the query's dtype ({query.dtype}), got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask must be on the query's device ({query.device}), got {attn_mask.device}")
        # PyTorch adds the mask in place to the scores [*broadcast(query, key) batch, L, S] (to [1, H, L, S]
        # when query, key and value are all 3-D): the mask must broadcast to them without growing them.
        target = (*attn, query.shape[-2], key.shape[-2])
        if query.dim() == key.dim() == value.dim() == 3:
            target = (1, *target)
        if attn_mask.dim() > len(target) or _broadcast_shapes(tuple(attn_mask.shape), target) != target:
            raise ValueError(f"attn_mask of shape {list(attn_mask.shape)} does not broadcast to the scores "
                             f"{list(target)} (..., L, S)")
    return batch, repeat


def _lift(t: Tensor, rank: int) -> Tensor:
    """t with leading unit dims up to `rank` (a view)."""
    return t[(None,) * (rank - t.dim())] if t.dim() < rank else t


def _expand(t: Tensor, shape: tuple) -> Tensor:
    """t.expand(shape), or t itself when it has that shape already (the usual call)."""
    return t if t.shape == shape else t.expand(shape)


def _dropout_seed() -> int:
    """A seed for the Philox stream from torch's default generator (so torch.manual_seed reproduces it)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Tensor:
    """Drop-in for torch.nn.functional.scaled_dot_product_attention (see the module docstring)."""
    if autocast_enabled():  # SDPA's casts, before the checks (they unify float32 and half inputs)
        query, key, value, attn_mask = autocast_args("attention_forward", query, key, value, attn_mask)
    batch, repeat = _check(query, key, value, attn_mask, dropout_p, scale, enable_gqa)
    if query.is_cuda and query.dtype == torch.float64:  # no float64 Triton kernels: PyTorch's op
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    L, S = query.shape[-2], key.shape[-2]
    lead = (1,) * max(0, 2 - len(batch)) + batch  # [*B, H] for the ops: at least one batch dim and the heads
    rank = len(lead) + 2
    q = _expand(_lift(query, rank), (*lead, L, query.shape[-1]))  # expand: stride-0 views, never copies
    k, v = _lift(key, rank), _lift(value, rank)
    if repeat:  # enable_gqa with key and value heads that differ: both repeated to the query's heads
        k = k.repeat_interleave(query.shape[-3] // key.shape[-3], -3)
        v = v.repeat_interleave(query.shape[-3] // value.shape[-3], -3)
    # The kernels map query head h to kv head h // (Hq / Hkv): with enable_gqa the key's own heads; a
    # single kv head (broadcast) also stays single; else key and value are expanded to every head.
    hkv = k.shape[-3] if enable_gqa and k.shape[-3] == v.shape[-3] else \
        1 if k.shape[-3] == v.shape[-3] == 1 else lead[-1]
    k = _expand(k, (*lead[:-1], hkv, S, key.shape[-1]))
    v = _expand(v, (*lead[:-1], hkv, S, value.shape[-1]))
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    mask = None
    if attn_mask is not None:  # additive in the compute dtype at its own shape (broadcast by the kernels)
        dtype = _compute_dtype(query.dtype)
        if attn_mask.dtype == torch.bool:
            mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(~attn_mask,
                                                                                               -math.inf)
        else:
            mask = attn_mask.to(dtype)
        mask = _lift(mask, rank)  # its rank is at most `rank` ([1, H, L, S] for 3-D inputs: lead is (1, H))
    seed = _dropout_seed() if dropout_p > 0 else 0
    args = (q, k, v, mask, float(dropout_p), bool(is_causal), scale, seed)
    out, _ = OPS.attention_forward(*args)
    return out if len(batch) == out.dim() - 2 else out.reshape(*batch, L, value.shape[-1])
