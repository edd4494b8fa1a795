"""Scaled-dot-product attention: a drop-in for torch.nn.functional.scaled_dot_product_attention.

softmax(Q K^T * scale + mask) V, memory-efficient on every device: the L x S score matrix is never
stored. The forward walks key blocks with an online softmax and saves one log-sum-exp per query; the
backward recomputes each block's probabilities from it (FlashAttention-2's scheme). Memory grows
linearly in the sequence lengths.

Semantics are F.scaled_dot_product_attention's: inputs (..., L, E), (..., S, E), (..., S, Ev) with the
same leading dimensions (the last of them the heads); boolean masks (True takes part) or additive
masks of the query's dtype, broadcast to (..., L, S); is_causal with PyTorch's top-left alignment
(query i sees keys j <= i, also when L != S); a custom scale; grouped-query attention with
enable_gqa=True (the query's heads a multiple of the key's); rows whose keys are all masked give 0, as
PyTorch does. Dropout draws a counter-based Philox stream from a seed taken from torch's generator
(torch.manual_seed reproduces it), and the backward regenerates the same mask. Gradients flow to query,
key and value; a mask that requires grad is refused (its gradient would be the L x S matrix this op
exists to avoid).

Backends: CPU C++ (csrc/ops/attention/), GPU Triton (kernels/attention.py). float64 on a GPU has no
Triton kernels: it runs PyTorch's op.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcv import _C
from fastcv._backend import FLOATING, num_threads, opt_view, view
from fastcv._library import LOWER, autocast_args, autocast_enabled, define, eager_direct, no_second_derivative

__all__ = ["scaled_dot_product_attention"]

# Head dims the kernels take: the Triton kernels hold a head in registers up to 256; the CPU kernels'
# per-thread tiles grow with the head dim, so they stop at 512.
MAX_HEAD_DIM = {"cpu": 512, "cuda": 256}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Tests set this under TRITON_INTERPRET=1 to run the op's Triton path (padding, launch arguments) on
# CPU tensors; CPU tensors otherwise always run the C++ kernels.
_TRITON_ON_CPU = False


def _use_cpp(q: Tensor) -> bool:
    return q.device.type == "cpu" and not _TRITON_ON_CPU


def _triton():
    from fastcv.kernels import attention as triton_attention
    return triton_attention


# ---------------------------------------------------------------- the ops
#
# attention_forward(q, k, v, mask, dropout_p, is_causal, scale, seed) -> (out, lse): q [B, Hq, L, E],
# k [B, Hkv, S, E], v [B, Hkv, S, Ev]; mask None or additive in the compute dtype, [B, Hq, L, S]
# (broadcast through strides). attention_backward returns (grad_q, grad_k, grad_v).


def _check_op(q, k, v, mask):
    """What the kernels' own checks would reject, as Python exceptions (direct torch.ops.fastcv calls)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention_forward takes 4-D query, key and value ([B, H, L, E])")
    if q.dtype not in FLOATING or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"query, key and value must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, hq, l, e = q.shape
    if k.shape[0] != b or k.shape[3] != e or v.shape[:3] != k.shape[:3] or (k.shape[1] and hq % k.shape[1]):
        raise ValueError(f"incompatible query {list(q.shape)}, key {list(k.shape)}, value {list(v.shape)}")
    if q.is_cuda and q.dtype == torch.float64:
        raise TypeError("the GPU attention kernels take float32, float16 and bfloat16 (float64: use "
                        "fastcv.ops.scaled_dot_product_attention, which runs PyTorch's op)")
    if mask is not None and (mask.shape != (b, hq, l, k.shape[2]) or mask.dtype != _compute_dtype(q.dtype)):
        raise ValueError(f"mask must be a {_compute_dtype(q.dtype)} Tensor{[b, hq, l, k.shape[2]]}, got "
                         f"{mask.dtype} {list(mask.shape)}")


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


def _forward_outputs(q, v):
    b, hq, l, _ = q.shape
    out = q.new_empty((b, hq, l, v.shape[3]))
    lse = q.new_empty((b, hq, l), dtype=_compute_dtype(q.dtype))
    return out, lse


def _forward_impl(q, k, v, mask, dropout_p, is_causal, scale, seed):
    _check_op(q, k, v, mask)
    out, lse = _forward_outputs(q, v)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    q, k, v = _rows(q), _rows(k), _rows(v)
    if _use_cpp(q):
        _C.attention_forward_cpu(view(q), view(k), view(v), opt_view(mask), scale, is_causal, dropout_p, seed, 0,
                                 view(out), view(lse), num_threads())
    elif k.shape[2] == 0:  # no keys: every row is empty
        out.zero_(), lse.fill_(math.inf)
    else:
        q, k, v, width = _same_head_dims(q, k, v)
        o = out if width == out.shape[3] else q.new_empty(q.shape)
        _triton().forward(q, k, v, mask, scale, is_causal, dropout_p, seed, 0, o, lse)
        if o is not out:
            out.copy_(o[..., :out.shape[3]])
    return out, lse


def _forward_fake(q, k, v, mask, dropout_p, is_causal, scale, seed):
    _check_op(q, k, v, mask)
    return _forward_outputs(q, v)


def _backward_outputs(q, k, v):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


def _backward_impl(grad_out, q, k, v, out, lse, mask, dropout_p, is_causal, scale, seed):
    _check_op(q, k, v, mask)
    dq, dk, dv = _backward_outputs(q, k, v)
    grad_out, q, k, v = _rows(grad_out), _rows(q), _rows(k), _rows(v)
    if _use_cpp(q):
        _C.attention_backward_cpu(view(grad_out), view(q), view(k), view(v), view(out.contiguous()),
                                  view(lse.contiguous()), opt_view(mask), scale, is_causal, dropout_p, seed, 0,
                                  view(dq), view(dk), view(dv), num_threads())
    elif 0 in (q.shape[2], k.shape[2]):  # no queries or no keys: nothing flows
        dq.zero_(), dk.zero_(), dv.zero_()
    else:
        e, ev = q.shape[3], v.shape[3]
        q, k, v, width = _same_head_dims(q, k, v)
        grad_out, out = _pad_last(grad_out.contiguous(), width), _pad_last(out.contiguous(), width)
        grads = (dq, dk, dv) if e == ev else tuple(torch.empty_like(t) for t in (q, k, v))
        _triton().backward(grad_out, q, k, v, out, lse.contiguous(), mask, scale, is_causal, dropout_p, seed, 0,
                           *grads)
        if e != ev:
            dq.copy_(grads[0][..., :e]), dk.copy_(grads[1][..., :e]), dv.copy_(grads[2][..., :ev])
    return dq, dk, dv


def _backward_fake(grad_out, q, k, v, out, lse, mask, dropout_p, is_causal, scale, seed):
    return _backward_outputs(q, k, v)


define("attention_forward(Tensor q, Tensor k, Tensor v, Tensor? mask, float dropout_p, bool is_causal, "
       "float scale, int seed) -> (Tensor, Tensor)", impl=_forward_impl, fake=_forward_fake,
       autocast=LOWER, autocast_keep=("mask",))  # SDPA's policy; the mask stays in the compute dtype
define("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
       "float dropout_p, bool is_causal, float scale, int seed) -> (Tensor, Tensor, Tensor)",
       impl=_backward_impl, fake=_backward_fake)


def _setup(ctx, inputs, output):
    q, k, v, mask, dropout_p, is_causal, scale, seed = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, mask)
    ctx.args = (dropout_p, is_causal, scale, seed)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.fastcv.attention_backward(grad_out, q, k, v, out, lse, mask, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


no_second_derivative("attention_backward", "scaled_dot_product_attention")
torch.library.register_autograd("fastcv::attention_forward", _backward, setup_context=_setup)


# ---------------------------------------------------------------- the public function


def _check(query, key, value, attn_mask, dropout_p, scale, enable_gqa):
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
    if not (query.dim() == key.dim() == value.dim()) or key.shape[:-2] != value.shape[:-2] \
            or key.shape[:-3] != query.shape[:-3]:
        raise ValueError(f"query {list(query.shape)}, key {list(key.shape)} and value {list(value.shape)} must "
                         "share their leading (batch) dimensions")
    hq = query.shape[-3] if query.dim() >= 3 else 1
    hkv = key.shape[-3] if key.dim() >= 3 else 1
    if hq != hkv and not (enable_gqa and hkv > 0 and hq % hkv == 0):
        raise ValueError(f"query has {hq} heads and key {hkv}: they must be equal, or the query's a multiple of "
                         "the key's with enable_gqa=True")
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
        target = (*query.shape[:-2], query.shape[-2], key.shape[-2])
        try:
            torch.broadcast_shapes(attn_mask.shape, target)
            ok = attn_mask.dim() <= len(target)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"attn_mask of shape {list(attn_mask.shape)} does not broadcast to {list(target)} "
                             "(..., L, S)")
        if attn_mask.requires_grad and torch.is_grad_enabled():
            raise ValueError("attn_mask must not require grad: its gradient would be the L x S score matrix "
                             "that memory-efficient attention never forms (detach it, or use PyTorch's op)")


def _as_4d(t: Tensor) -> Tensor:
    """(..., H, N, E) -> [B, H, N, E] (a view when the leading dims merge without a copy)."""
    if t.dim() == 2:
        return t.unsqueeze(0).unsqueeze(0)
    if t.dim() == 3:
        return t.unsqueeze(0)
    return t if t.dim() == 4 else t.reshape(-1, *t.shape[-3:])


def _dropout_seed() -> int:
    """A seed for the Philox stream from torch's default generator (so torch.manual_seed reproduces it)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Tensor:
    """Drop-in for torch.nn.functional.scaled_dot_product_attention (see the module docstring)."""
    if autocast_enabled():  # SDPA's casts, before the checks (they unify float32 and half inputs)
        query, key, value, attn_mask = autocast_args("attention_forward", query, key, value, attn_mask)
    _check(query, key, value, attn_mask, dropout_p, scale, enable_gqa)
    if query.is_cuda and query.dtype == torch.float64:  # no float64 Triton kernels: PyTorch's op
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    shape = query.shape[:-1] + value.shape[-1:]
    q, k, v = _as_4d(query), _as_4d(key), _as_4d(value)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    mask = None
    if attn_mask is not None:  # additive in the compute dtype, converted before broadcasting (no L x S copy)
        dtype = _compute_dtype(query.dtype)
        if attn_mask.dtype == torch.bool:
            mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(~attn_mask,
                                                                                               -math.inf)
        else:
            mask = attn_mask.to(dtype)
        mask = _as_4d(mask.expand(*query.shape[:-2], query.shape[-2], key.shape[-2]))
    seed = _dropout_seed() if dropout_p > 0 else 0
    args = (q, k, v, mask, float(dropout_p), bool(is_causal), scale, seed)
    if eager_direct(q, k, v, mask):
        out, _ = _forward_impl(*args)
    else:
        out, _ = torch.ops.fastcv.attention_forward(*args)
    return out.reshape(shape)
