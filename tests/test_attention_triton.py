"""The Triton attention (kernels/attention.py): forward (out and lse) and backward (dq, dk, dv) against
softmax(scale * q k^T + mask [causal]) [dropout] v and its autograd in float64 on the same rounded
inputs. Odd lengths, L < S and L > S with causal masking, head dims that are not powers of two,
grouped-query attention, broadcast additive and -inf masks, fully masked rows, dropout (its keep mask
from dropout_mask, its statistics and determinism), every dtype, strided inputs and other tilings. On
the CPU through the interpreter (small shapes), on the GPU compiled."""
import math

import pytest
import torch

from conftest import triton_device
from fastcv.kernels import attention as triton_attention

# Tolerances relative to the reference's largest magnitude (at least 1). float32 accumulates in float32
# with IEEE dot products: errors are a few 1e-7, so 1e-4 leaves room for longer rows on a GPU. float16
# and bfloat16 round P and dS to the input dtype before their dot products and round every output once,
# bfloat16 with an 8-bit mantissa (2^-8 = 4e-3 per rounding, several roundings in a gradient).
TOLERANCES = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@pytest.fixture
def device():
    return triton_device()


def make_inputs(B, Hq, Hkv, L, S, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    grad_out = torch.randn(B, Hq, L, D, generator=g, dtype=torch.float64)
    return [t.to(dtype).to(device) for t in (q, k, v, grad_out)]


def reference(q, k, v, grad_out, mask, scale, causal, keep=None, p=0.0):
    """float64 out, lse (+inf for fully masked rows) and the gradients of q, k and v."""
    qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    L, S = q.shape[2], k.shape[2]
    s = qd @ kd.repeat_interleave(group, 1).transpose(-1, -2) * scale
    if mask is not None:
        s = s + mask.cpu().double()
    if causal:
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    dead = (s == float("-inf")).all(-1, keepdim=True)  # PyTorch: out 0, gradients 0
    s = s.masked_fill(dead, 0.0)
    prob = torch.softmax(s, -1).masked_fill(dead, 0.0)
    if keep is not None:
        prob = prob * keep.cpu() / (1.0 - p)
    out = prob @ vd.repeat_interleave(group, 1)
    lse = torch.logsumexp(s, -1).masked_fill(dead.squeeze(-1), float("inf"))
    grads = torch.autograd.grad(out, (qd, kd, vd), grad_out.cpu().double())
    return out.detach(), lse.detach(), grads


def run(q, k, v, grad_out, mask, scale, causal, p=0.0, seed=0, offset=0):
    """The launchers, on NaN-filled outputs: out, lse, dq, dk, dv."""
    B, Hq, L, D = q.shape
    out = torch.full((B, Hq, L, D), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq, L), float("nan"), dtype=torch.float32, device=q.device)
    triton_attention.forward(q, k, v, mask, scale, causal, p, seed, offset, out, lse)
    dq, dk, dv = (torch.full(t.shape, float("nan"), dtype=t.dtype, device=t.device) for t in (q, k, v))
    triton_attention.backward(grad_out, q, k, v, out, lse, mask, scale, causal, p, seed, offset, dq, dk, dv)
    return out, lse, dq, dk, dv


def assert_matches(actual, expected, tol, name):
    assert not actual.isnan().any(), f"{name} has NaN"
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual.cpu().double(), expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def check(B=1, Hq=2, Hkv=1, L=7, S=19, D=24, dtype=torch.float32, causal=False, mask=None, p=0.0,
          seed=0, offset=0, device="cpu", inputs=None, scale=None):
    q, k, v, grad_out = inputs if inputs is not None else make_inputs(B, Hq, Hkv, L, S, D, dtype, device)
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    keep = triton_attention.dropout_mask(B, Hq, L, S, p, seed, offset, q.device) if p > 0 else None
    ref_out, ref_lse, (ref_dq, ref_dk, ref_dv) = reference(q, k, v, grad_out, mask, scale, causal, keep, p)
    out, lse, dq, dk, dv = run(q, k, v, grad_out, mask, scale, causal, p, seed, offset)
    tol = TOLERANCES[q.dtype]
    assert out.dtype == q.dtype and dq.dtype == q.dtype and dk.dtype == k.dtype
    assert_matches(out, ref_out, tol, "out")
    inf = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse.cpu()), inf), "lse: +inf exactly on the fully masked rows"
    assert_matches(lse.cpu()[~inf], ref_lse[~inf], 1e-4, "lse")
    assert_matches(dq, ref_dq, tol, "dq")
    assert_matches(dk, ref_dk, tol, "dk")
    assert_matches(dv, ref_dv, tol, "dv")
    return out, lse, dq, dk, dv


# (B, Hq, Hkv, L, S, D)
SHAPES = {
    "one_token": (1, 1, 1, 1, 1, 16),
    "one_query": (1, 2, 2, 1, 19, 24),
    "one_key": (2, 1, 1, 7, 1, 16),
    "7x5_d40": (1, 2, 2, 7, 5, 40),
    "33x40_d64": (1, 1, 1, 33, 40, 64),
    "33x19_d80": (1, 1, 1, 33, 19, 80),
    "7x19_d1": (1, 2, 1, 7, 19, 1),
    "5x7_d256": (1, 1, 1, 5, 7, 256),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_shapes(device, name):
    B, Hq, Hkv, L, S, D = SHAPES[name]
    check(B, Hq, Hkv, L, S, D, device=device)


# Causal: top-left aligned tril(ones(L, S)), also when L != S
@pytest.mark.parametrize("L, S, D", [(7, 7, 16), (7, 19, 24), (40, 19, 40), (33, 40, 64), (1, 5, 16)],
                         ids=["square", "L<S", "L>S", "33x40", "L1"])
def test_causal(device, L, S, D):
    check(1, 2, 1, L, S, D, causal=True, device=device)


@pytest.mark.parametrize("Hkv", [2, 1])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa(device, Hkv, causal):
    check(2, 4, Hkv, 17, 21, 24, causal=causal, device=device)


def additive_mask(shape, device, seed=1, ninf=0.0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(shape, generator=g) * 2
    if ninf:
        m = m.masked_fill(torch.rand(shape, generator=g) < ninf, float("-inf"))
    return m.to(device)


# Broadcast masks: [L, S], [B, 1, L, S], [1, Hq, 1, S] (stride 0 on the broadcast dimensions)
@pytest.mark.parametrize("shape", [(9, 19), (2, 1, 9, 19), (1, 2, 1, 19)], ids=["LS", "B1LS", "1H1S"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_additive_mask(device, shape, causal):
    mask = additive_mask(shape, device, ninf=0.2)
    check(2, 2, 1, 9, 19, 24, causal=causal, mask=mask.expand(2, 2, 9, 19), device=device)


def test_mask_unexpanded(device):
    # The launcher broadcasts a mask itself too
    check(1, 2, 2, 9, 19, 16, mask=additive_mask((9, 19), device), device=device)


def test_bool_mask_rows_fully_masked(device):
    # A boolean mask (converted to 0 / -inf) with rows that keep nothing: out 0, lse +inf, zero gradients,
    # no NaN; a row masked only where it is also causally masked; a column nobody attends.
    L, S = 9, 19
    keep = torch.rand(2, 2, L, S, generator=torch.Generator().manual_seed(3)) < 0.6
    keep[0, 0, 2] = False
    keep[1, 1, 0] = False
    keep[0, 1, 4, 5:] = False
    keep[..., 7] = False
    mask = torch.zeros(keep.shape).masked_fill(~keep, float("-inf")).to(device)
    for causal in (False, True):
        out, lse, dq, dk, dv = check(2, 2, 1, L, S, 24, causal=causal, mask=mask, device=device)
        assert (out[0, 0, 2] == 0).all() and (out[1, 1, 0] == 0).all()
        assert (dq[0, 0, 2] == 0).all() and (dq[1, 1, 0] == 0).all()
        assert lse[0, 0, 2] == float("inf")
        assert (dk[:, :, 7] == 0).all() and (dv[:, :, 7] == 0).all()


def test_fully_masked_everything(device):
    mask = torch.full((1, 2, 7, 19), float("-inf"), device=device)
    out, lse, dq, dk, dv = check(1, 2, 1, 7, 19, 24, mask=mask, device=device, p=0.25, seed=5)
    for t in (out, dq, dk, dv):
        assert (t == 0).all()
    assert (lse == float("inf")).all()


def test_large_negative_mask(device):
    # Finite -1e9 masks (the usual "minus infinity" of additive masks): all but one key per row; the
    # padded keys of the last block (score 0, far above lse) must not turn into inf or NaN anywhere.
    mask = torch.full((7, 19), -1e9)
    mask[torch.arange(7), torch.arange(7) * 2] = 0.0
    check(1, 2, 1, 7, 19, 24, mask=mask.to(device), device=device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["causal_gqa", "mask"])
def test_dtypes(device, dtype, case):
    if case == "causal_gqa":
        check(1, 4, 2, 33, 40, 40, dtype=dtype, causal=True, device=device)
    else:
        mask = additive_mask((1, 2, 1, 19), device, ninf=0.1).expand(2, 2, 21, 19)
        check(2, 2, 2, 21, 19, 80, dtype=dtype, mask=mask, device=device)


def test_strided_inputs(device):
    # q, k, v as [B, L, H, D] tensors viewed as [B, H, L, D]; grad_out non-contiguous as well
    B, Hq, Hkv, L, S, D = 2, 4, 2, 9, 19, 24
    q, k, v, grad_out = make_inputs(B, Hq, Hkv, L, S, D, torch.float32, device)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)
    v = torch.cat([v, v], dim=-1)[..., :D]  # a padded row stride
    grad_out = grad_out.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    check(inputs=(q, k, v, grad_out), causal=True, mask=additive_mask((L, S), device), device=device)


# ---------------------------------------------------------------------------------------------------
# Dropout


def test_dropout_mask_statistics(device):
    B, Hq, L, S = 2, 2, 33, 40  # 5280 decisions
    for p in (0.1, 0.5):
        keep = triton_attention.dropout_mask(B, Hq, L, S, p, 1234, 0, device).cpu()
        assert keep.dtype == torch.bool and keep.shape == (B, Hq, L, S)
        # the kept fraction within 5 standard deviations of 1 - p, overall and for each of the four
        # Philox outputs (key j takes output j % 4)
        for part, n in ((keep, keep.numel()), (keep[..., 1::4], keep[..., 1::4].numel())):
            bound = 5 * math.sqrt(p * (1 - p) / n)
            assert abs(part.float().mean().item() - (1 - p)) < bound
        # neighbouring keys, rows and heads are not copies of each other
        assert (keep[..., :, 0::4] != keep[..., :, 1::4]).float().mean() > 0.05
        assert (keep[:, :, 0:32:2] != keep[:, :, 1:32:2]).float().mean() > 0.05
        assert (keep[:, 0] != keep[:, 1]).float().mean() > 0.05
    assert triton_attention.dropout_mask(B, Hq, L, S, 0.0, 1, 0, device).all()


def test_dropout_mask_deterministic(device):
    a = triton_attention.dropout_mask(1, 2, 9, 19, 0.3, 77, 5, device)
    assert torch.equal(a, triton_attention.dropout_mask(1, 2, 9, 19, 0.3, 77, 5, device))
    assert not torch.equal(a, triton_attention.dropout_mask(1, 2, 9, 19, 0.3, 78, 5, device))
    assert not torch.equal(a, triton_attention.dropout_mask(1, 2, 9, 19, 0.3, 77, 6, device))
    # an element's decision does not depend on the tensor's size (counter = (j // 4, i, b*Hq + h, offset))
    big = triton_attention.dropout_mask(1, 2, 12, 30, 0.3, 77, 5, device)
    assert torch.equal(a, big[:, :, :9, :19])
    # a seed above 2^63 (the full 64-bit range is accepted)
    c = triton_attention.dropout_mask(1, 2, 9, 19, 0.3, (1 << 64) - 3, 5, device)
    assert torch.equal(c, triton_attention.dropout_mask(1, 2, 9, 19, 0.3, (1 << 64) - 3, 5, device))
    assert not torch.equal(a, c)


@pytest.mark.parametrize("case", ["plain", "causal_gqa_mask"])
def test_dropout(device, case):
    if case == "plain":
        check(1, 2, 2, 17, 33, 24, p=0.3, seed=11, offset=3, device=device)
    else:
        mask = additive_mask((17, 33), device, ninf=0.1)
        check(2, 4, 2, 17, 33, 40, causal=True, mask=mask, p=0.5, seed=12, offset=0, device=device)


def test_dropout_half(device):
    check(1, 2, 1, 17, 33, 24, dtype=torch.float16, causal=True, p=0.2, seed=9, device=device)


def test_dropout_seeds(device):
    q, k, v, _ = make_inputs(1, 2, 1, 9, 19, 16, torch.float32, device)
    outs = {}
    for seed, offset in ((1, 0), (1, 0), (2, 0), (1, 1)):
        out = torch.empty(q.shape, dtype=q.dtype, device=device)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=device)
        triton_attention.forward(q, k, v, None, 0.25, False, 0.4, seed, offset, out, lse)
        outs.setdefault((seed, offset), []).append(out)
    assert torch.equal(*outs[(1, 0)])
    assert not torch.allclose(outs[(1, 0)][0], outs[(2, 0)][0])
    assert not torch.allclose(outs[(1, 0)][0], outs[(1, 1)][0])


# ---------------------------------------------------------------------------------------------------
# Other tilings (BLOCK_M != BLOCK_N both ways): the causal stage bounds and the block-independent
# dropout mask

@pytest.mark.parametrize("blocks", [{"fwd": (32, 16), "kv": (16, 32), "q": (32, 16)},
                                    {"fwd": (16, 32), "kv": (32, 16), "q": (16, 32)}], ids=["m32n16", "m16n32"])
def test_tilings(device, blocks, monkeypatch):
    monkeypatch.setattr(triton_attention, "_BLOCKS_OVERRIDE", blocks)
    mask = additive_mask((2, 2, 1, 40), device, ninf=0.1).expand(2, 2, 41, 40)
    check(2, 2, 1, 41, 40, 24, causal=True, mask=mask, p=0.2, seed=4, device=device)
    check(1, 2, 2, 19, 70, 16, causal=True, device=device)


# ---------------------------------------------------------------------------------------------------
# Bad arguments


def test_float64_raises(device):
    q, k, v, _ = make_inputs(1, 1, 1, 3, 3, 16, torch.float64, device)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=device)
    with pytest.raises(TypeError, match="float64"):
        triton_attention.forward(q, k, v, None, 0.25, False, 0.0, 0, 0, out, lse)
    with pytest.raises(TypeError, match="float64"):
        triton_attention.backward(out, q, k, v, out, lse, None, 0.25, False, 0.0, 0, 0, q, k, v)


def test_bad_arguments(device):
    q, k, v, _ = make_inputs(1, 3, 2, 3, 5, 16, torch.float32, device)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match="multiple"):
        triton_attention.forward(q, k, v, None, 0.25, False, 0.0, 0, 0, out, lse)
    q, k, v, _ = make_inputs(1, 2, 2, 3, 5, 16, torch.float32, device)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=device)
    with pytest.raises(TypeError, match="q is"):
        triton_attention.forward(q, k.half(), v, None, 0.25, False, 0.0, 0, 0, out, lse)
    with pytest.raises(ValueError, match="dropout_p"):
        triton_attention.forward(q, k, v, None, 0.25, False, 1.0, 0, 0, out, lse)
    with pytest.raises(TypeError, match="mask"):
        triton_attention.forward(q, k, v, torch.zeros(3, 5, dtype=torch.bool, device=device), 0.25, False, 0.0,
                                 0, 0, out, lse)
    with pytest.raises(ValueError, match="lse"):
        triton_attention.forward(q, k, v, None, 0.25, False, 0.0, 0, 0, out, lse.double())


# ---------------------------------------------------------------- through the public op


@pytest.fixture
def triton_route(monkeypatch):
    """The public op's Triton path on the test device (on the CPU: CPU tensors, interpreted kernels)."""
    import fastcv.ops.attention as attention_module
    monkeypatch.setattr(attention_module, "_TRITON_ON_CPU", True)


@pytest.mark.parametrize("case", ["plain", "value_dim", "gqa_mask_causal"])
def test_public_op_on_triton(device, triton_route, case):
    """fastcv.ops.scaled_dot_product_attention's Triton path: the mask conversion, GQA, the padding of a
    value head dim that differs from the query's, and autograd, against PyTorch in float64."""
    from fastcv.ops import scaled_dot_product_attention
    g = torch.Generator().manual_seed(3)
    hq, hkv, ev = (4, 2, 16) if case == "gqa_mask_causal" else (2, 2, 24 if case == "value_dim" else 16)
    q = torch.randn(1, hq, 9, 16, generator=g)
    k = torch.randn(1, hkv, 13, 16, generator=g)
    v = torch.randn(1, hkv, 13, ev, generator=g)
    mask = torch.randn(9, 13, generator=g) > -0.5 if case == "gqa_mask_causal" else None
    kwargs = dict(attn_mask=mask, is_causal=case == "gqa_mask_causal", enable_gqa=hq != hkv)
    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    out = scaled_dot_product_attention(*leaves, **{**kwargs, "attn_mask": None if mask is None else mask.to(device)})
    grad = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, leaves, grad.to(device))
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_kwargs = dict(kwargs)
    if case == "gqa_mask_causal":  # PyTorch takes a mask or is_causal, not both: merge them
        ref_kwargs.update(attn_mask=mask & torch.ones(9, 13, dtype=torch.bool).tril(), is_causal=False)
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_leaves, **ref_kwargs)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())
    assert_matches(out, ref, 1e-4, "out")
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_matches(a, b, 1e-4, name)


def test_cpu_and_triton_drop_the_same_elements():
    """The C++ kernels draw the Triton kernels' Philox words: with value = identity, the CPU output row
    is the row's dropped probabilities, zero exactly where dropout_mask says dropped."""
    from fastcv.ops import attention as attention_ops
    B, H, L, S, p, seed = 1, 2, 5, 24, 0.4, 12345
    q = torch.randn(B, H, L, 8)
    k = torch.randn(B, H, S, 8)
    v = torch.eye(S).expand(B, H, S, S).contiguous()
    out, _ = torch.ops.fastcv.attention_forward(q, k, v, None, p, False, 0.3, seed)
    keep = triton_attention.dropout_mask(B, H, L, S, p, seed, 0, triton_device()).cpu()
    assert torch.equal(out != 0, keep)
    assert not attention_ops._TRITON_ON_CPU
