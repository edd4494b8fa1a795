"""Drop-in for torch.nn.MultiheadAttention whose attention runs in fastcv.ops.scaled_dot_product_attention.

fastcv.nn.MultiheadAttention subclasses nn.MultiheadAttention and replaces only forward, so the constructor,
the parameters (in_proj_weight, or q/k/v_proj_weight when kdim or vdim differ from embed_dim; in_proj_bias;
out_proj; bias_k/bias_v), the state_dict names (load_state_dict works both ways) and isinstance checks are
PyTorch's own.

Fast path, need_weights=False: the input projections (one GEMM for self-attention with the packed
in_proj_weight, two when only key is value, three otherwise), the heads as [B, H, L, Dh] views,
key_padding_mask and attn_mask merged into one mask for the op (bool masks stay bool; a mask that broadcasts,
[B, 1, 1, S] or [L, S], when only one of them is given), add_bias_kv, add_zero_attn, dropout (in training),
the is_causal hint, batch_first and unbatched inputs, then out_proj. The attention itself is
fastcv.ops.scaled_dot_product_attention, which never materialises the [B, H, L, S] weights.

need_weights=True (nn.MultiheadAttention's default) has to return those weights, so it is delegated to
nn.MultiheadAttention.forward unchanged, as are NestedTensor inputs (which only PyTorch's inference fast path
takes): only need_weights=False with ordinary tensors runs fastcv's kernels.

Differences from nn.MultiheadAttention, all where PyTorch would raise or silently ignore:
- is_causal=True without attn_mask (PyTorch raises) means the standard causal mask, torch.ones(L, S).triu(1)
  in nn.MultiheadAttention's convention (True = not allowed), on both paths.
- A wrongly shaped attn_mask raises even with the is_causal hint (PyTorch's fast path ignores its shape).
- Shape and dtype mistakes raise fastcv's ValueError / TypeError, which are also instances of the
  AssertionError / RuntimeError PyTorch raises for the same mistakes, so existing except clauses still work.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcv import ops as _ops  # looked up at call time: _ops.scaled_dot_product_attention

__all__ = ["MultiheadAttention"]


class _ShapeError(ValueError, AssertionError, RuntimeError):
    """A wrong shape or rank: fastcv's ValueError, also the AssertionError/RuntimeError nn.MHA raises."""


class _DTypeError(TypeError, AssertionError):
    """A mask of a dtype other than bool or floating: fastcv's TypeError, also nn.MHA's AssertionError."""


def _check_mask_dtype(mask: Tensor | None, name: str) -> None:
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise _DTypeError(f"only bool and floating types of {name} are supported, got {mask.dtype}")


def _to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """nn.MHA's conversion of a bool mask (True = ignore) into an additive one (-inf where True)."""
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


class MultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention; with need_weights=False the attention is fastcv.ops.scaled_dot_product_attention
    (see the module docstring). need_weights=True is nn.MultiheadAttention.forward itself."""

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if query.is_nested or key.is_nested or value.is_nested:  # only PyTorch's inference fast path takes these
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        batched = self._check_shapes(query, key, value, key_padding_mask, attn_mask)
        _check_mask_dtype(key_padding_mask, "key_padding_mask")
        _check_mask_dtype(attn_mask, "attn_mask")
        if is_causal and attn_mask is None and (need_weights or key_padding_mask is not None):
            # The hint with no mask to hint at: the standard causal mask, in key_padding_mask's kind (so no
            # mismatched-types warning). Without key_padding_mask the fast path uses the op's is_causal.
            seq_dim = 1 if self.batch_first and batched else 0
            causal = torch.ones(query.shape[seq_dim], key.shape[seq_dim], dtype=torch.bool,
                                device=query.device).triu_(1)
            if key_padding_mask is not None and key_padding_mask.is_floating_point():
                causal = _to_additive(causal, query.dtype)
            attn_mask = causal
        if need_weights:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=True,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        return self._fast_forward(query, key, value, key_padding_mask, attn_mask, is_causal, batched), None

    # ---------------------------------------------------------------------------------------------------

    def _check_shapes(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
                      attn_mask: Tensor | None) -> bool:
        """Every shape nn.MHA checks (and a few it leaves to an obscure failure later); True if batched."""
        if query.dim() not in (2, 3):
            raise _ShapeError(f"query must be 2-D (L, E) unbatched or 3-D batched, got {query.dim()}-D "
                              f"{tuple(query.shape)}")
        batched = query.dim() == 3
        rank = "3-D (batched, as query)" if batched else "2-D (unbatched, as query)"
        for name, t in (("key", key), ("value", value)):
            if t.dim() != query.dim():
                raise _ShapeError(f"{name} must be {rank}, got {t.dim()}-D {tuple(t.shape)}")
        if batched:
            b_dim, s_dim = (0, 1) if self.batch_first else (1, 0)
            bsz, tgt_len, src_len = query.shape[b_dim], query.shape[s_dim], key.shape[s_dim]
            for name, t in (("key", key), ("value", value)):
                if t.shape[b_dim] != bsz:
                    raise _ShapeError(f"{name} has batch size {t.shape[b_dim]} but query has {bsz} "
                                      f"(batch_first={self.batch_first})")
        else:
            s_dim = 0
            bsz, tgt_len, src_len = 1, query.shape[0], key.shape[0]
        if value.shape[s_dim] != src_len:
            raise _ShapeError(f"key and value must have the same sequence length, got key {tuple(key.shape)} "
                              f"and value {tuple(value.shape)}")
        for name, t, dim in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != dim:
                raise _ShapeError(f"{name} must have {dim} features in its last dimension, got {tuple(t.shape)}")
        if key_padding_mask is not None:
            expected = (bsz, src_len) if batched else (src_len,)
            if tuple(key_padding_mask.shape) != expected:
                raise _ShapeError(f"key_padding_mask must have shape {expected} ({'(N, S)' if batched else '(S,)'}"
                                  f"), got {tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            expected2 = (tgt_len, src_len)
            expected3 = (bsz * self.num_heads, tgt_len, src_len)
            if tuple(attn_mask.shape) not in (expected2, expected3):
                raise _ShapeError(f"attn_mask must have shape {expected2} (L, S) or {expected3} "
                                  f"({'N * num_heads' if batched else 'num_heads'}, L, S), "
                                  f"got {tuple(attn_mask.shape)}")
        return batched

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The input projections on batch-first inputs; q [B, L, E], k and v [B, S, E] (possibly views)."""
        e = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if self._qkv_same_embed_dim:
            if query is key and key is value:  # self-attention: one GEMM
                return F.linear(query, w, b).unflatten(-1, (3, e)).unbind(-2)
            b_q, b_kv = (None, None) if b is None else (b[:e], b[e:])
            q = F.linear(query, w[:e], b_q)
            if key is value:
                k, v = F.linear(key, w[e:], b_kv).unflatten(-1, (2, e)).unbind(-2)
                return q, k, v
            b_k, b_v = (None, None) if b_kv is None else (b_kv[:e], b_kv[e:])
            return q, F.linear(key, w[e:2 * e], b_k), F.linear(value, w[2 * e:], b_v)
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        return (F.linear(query, self.q_proj_weight, b_q), F.linear(key, self.k_proj_weight, b_k),
                F.linear(value, self.v_proj_weight, b_v))

    def _fast_forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
                      attn_mask: Tensor | None, is_causal: bool, batched: bool) -> Tensor:
        same_qk, same_kv = query is key, key is value
        if not batched:  # batch_first does not apply to unbatched inputs
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # keep nn.MHA's "is" tests (which pick the fused projections) true through the transposes
        if same_kv:
            value = key
        if same_qk:
            key = query
            if same_kv:
                value = query
        bsz, tgt_len, _ = query.shape
        src_len = key.shape[1]
        heads, head_dim = self.num_heads, self.head_dim

        q, k, v = self._project(query, key, value)
        extra = 0  # key/value positions appended after the projections
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(bsz, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(bsz, 1, -1)], dim=1)
            extra += 1
        elif self.bias_k is not None or self.bias_v is not None:
            raise RuntimeError("bias_k and bias_v must both be set or both be None")
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz, 1, k.shape[-1])], dim=1)
            v = torch.cat([v, v.new_zeros(bsz, 1, v.shape[-1])], dim=1)
            extra += 1
        q, k, v = (t.unflatten(-1, (heads, head_dim)).transpose(1, 2) for t in (q, k, v))  # [B, H, *, Dh]

        # nn.MHA drops attn_mask for the is_causal hint when there is no key_padding_mask (need_weights=False)
        use_causal = is_causal and key_padding_mask is None
        mask = None if use_causal else self._merge_masks(key_padding_mask, attn_mask, bsz, tgt_len, src_len,
                                                          extra, query.dtype)
        dropout_p = self.dropout if self.training else 0.0
        out = _ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=use_causal)

        if batched and not self.batch_first:  # [B, H, L, Dh] -> [L, B, E], contiguous as nn.MHA returns it
            out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, self.embed_dim)
        else:
            out = out.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        return out if batched else out.squeeze(0)

    def _merge_masks(self, key_padding_mask: Tensor | None, attn_mask: Tensor | None, bsz: int, tgt_len: int,
                     src_len: int, extra: int, dtype: torch.dtype) -> Tensor | None:
        """One mask for the op in SDPA's convention (bool True = take part, or additive float) that broadcasts
        against [B, H, L, S + extra]: [L, S] or [B, H, L, S] from attn_mask alone, [B, 1, 1, S] from
        key_padding_mask alone, [B, 1 or H, L, S] from both. The `extra` appended key positions (bias_k,
        add_zero_attn) take part everywhere, as in nn.MHA."""
        if key_padding_mask is None and attn_mask is None:
            return None
        if key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype:
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. "
                          "Use same type for both instead.", stacklevel=4)
        as_bool = all(m is None or m.dtype == torch.bool for m in (key_padding_mask, attn_mask))

        def canonical(m: Tensor) -> Tensor:
            if as_bool:
                return ~m  # nn.MHA: True = ignore; SDPA: True = take part
            return _to_additive(m, dtype) if m.dtype == torch.bool else m

        mask = None
        if attn_mask is not None:
            mask = canonical(attn_mask)
            if mask.dim() == 3:
                mask = mask.reshape(bsz, self.num_heads, tgt_len, src_len)  # a view unless strided oddly
        if key_padding_mask is not None:
            kpm = canonical(key_padding_mask).reshape(bsz, 1, 1, src_len)
            mask = kpm if mask is None else (mask & kpm if as_bool else mask + kpm)
        if extra:
            mask = F.pad(mask, (0, extra), value=True if as_bool else 0.0)
        return mask
