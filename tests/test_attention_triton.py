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
from fastcv._backend import forced, select
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
def test_tilings(device, blocks):
    mask = additive_mask((2, 2, 1, 40), device, ninf=0.1).expand(2, 2, 41, 40)
    with forced(attention_blocks=blocks):
        check(2, 2, 1, 41, 40, 24, causal=True, mask=mask, p=0.2, seed=4, device=device)
        check(1, 2, 2, 19, 70, 16, causal=True, device=device)
    assert triton_attention._BLOCKS_OVERRIDE is None, "forced() must restore the kernels' own tiles"


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
def triton_route():
    """The public op's Triton path on the test device (on the CPU: CPU tensors, interpreted kernels)."""
    with forced(backend="triton"):
        yield


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
    B, H, L, S, p, seed = 1, 2, 5, 24, 0.4, 12345
    q = torch.randn(B, H, L, 8)
    k = torch.randn(B, H, S, 8)
    v = torch.eye(S).expand(B, H, S, S).contiguous()
    out, _ = torch.ops.fastcv.attention_forward(q, k, v, None, p, False, 0.3, seed)
    keep = triton_attention.dropout_mask(B, H, L, S, p, seed, 0, triton_device()).cpu()
    assert torch.equal(out != 0, keep)
    assert select("attention", q) == "cpu"  # the output above came from the C++ kernels


# ---------------------------------------------------------------- the mask's gradient (dK/dV kernel)

# mask shapes for B, Hq, L, S = 2, 4, 20, 37 (two query and three key blocks of the interpreter's 16 x 16
# tiles) and how the kernel adds them: stores when every entry belongs to one program, else atomic adds,
# with the tile summed first over the queries (L broadcast) or keys (S broadcast).
MASK_GRAD = {
    "BHLS_store": (2, 4, 20, 37),
    "HLS_batch_atomic": (1, 4, 20, 37),
    "LS_heads_atomic": (1, 1, 20, 37),
    "BH1S_sum_queries": (2, 4, 1, 37),
    "1HL1_sum_keys": (1, 4, 20, 1),
    "1111_sum_both": (1, 1, 1, 1),
}


@pytest.mark.parametrize("name", list(MASK_GRAD))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_mask_grad(device, name, causal):
    """dmask (float32, the mask's shape, seen through stride-0 views) against the float64 autograd of the
    mask; GQA (Hkv = 2) so that heads of one program share broadcast entries."""
    q, k, v, grad_out = make_inputs(2, 4, 2, 20, 37, 24, torch.float32, device, seed=1)
    g = torch.Generator().manual_seed(2)
    mask = torch.randn(MASK_GRAD[name], generator=g, dtype=torch.float64)
    scale = 1.0 / math.sqrt(24)
    out, lse, *_ = run(q, k, v, grad_out, mask.float().to(device), scale, causal)
    dmask = torch.zeros(mask.shape, dtype=torch.float32, device=device)
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    triton_attention.backward(grad_out, q, k, v, out, lse, mask.float().to(device), scale, causal, 0.0, 0, 0,
                              dq, dk, dv, dmask=dmask)
    md = mask.clone().requires_grad_()
    full = torch.zeros(2, 4, 20, 37, dtype=torch.float64, requires_grad=True)  # dS itself: the error's scale
    qd, kd, vd = (t.cpu().double() for t in (q, k, v))
    s = qd @ kd.repeat_interleave(2, 1).transpose(-1, -2) * scale + md + full
    if causal:
        s = s.masked_fill(~torch.ones(20, 37, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.softmax(s, -1) @ vd.repeat_interleave(2, 1)
    ref_dmask, ds = torch.autograd.grad(ref, (md, full), grad_out.cpu().double())
    tol = 1e-4 * max(ds.abs().max().item(), ref_dmask.abs().max().item())
    torch.testing.assert_close(dmask.cpu().double(), ref_dmask, rtol=0, atol=tol)


def test_mask_grad_accumulates(device):
    """The kernel adds into dmask (the op zeroes it once and may launch several calls into it)."""
    q, k, v, grad_out = make_inputs(1, 2, 2, 9, 13, 16, torch.float32, device)
    mask = torch.randn(1, 2, 9, 13, device=device)
    out, lse, *_ = run(q, k, v, grad_out, mask, 0.25, False)
    grads = [torch.empty_like(t) for t in (q, k, v)]
    once = torch.zeros_like(mask)
    triton_attention.backward(grad_out, q, k, v, out, lse, mask, 0.25, False, 0.0, 0, 0, *grads, dmask=once)
    twice = torch.full_like(mask, 1.0)
    triton_attention.backward(grad_out, q, k, v, out, lse, mask, 0.25, False, 0.0, 0, 0, *grads, dmask=twice)
    torch.testing.assert_close(twice, once + 1.0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mask_shape", [(4, 9, 13), (2, 1, 9, 13), (1, 4, 9, 1)], ids=str)
def test_public_op_mask_grad_on_triton(device, triton_route, mask_shape):
    """The public op's Triton path with a mask that requires grad (GQA, causal, dropout off and on)."""
    from fastcv.ops import scaled_dot_product_attention
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, 4, 9, 16, generator=g), torch.randn(2, 2, 13, 16, generator=g), \
        torch.randn(2, 2, 13, 16, generator=g)
    mask = torch.randn(mask_shape, generator=g)
    grad = torch.randn(2, 4, 9, 16, generator=g)
    leaves = [t.to(device).requires_grad_() for t in (q, k, v, mask)]
    out = scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3], is_causal=True, enable_gqa=True)
    grads = torch.autograd.grad(out, leaves, grad.to(device))
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, mask)]
    causal = torch.zeros(9, 13, dtype=torch.float64).masked_fill(~torch.ones(9, 13, dtype=torch.bool).tril(),
                                                                 float("-inf"))
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_leaves[:3], attn_mask=ref_leaves[3] + causal,
                                                           enable_gqa=True)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())
    assert_matches(out, ref, 1e-4, "out")
    for name, a, b in zip(("dq", "dk", "dv", "dmask"), grads, ref_grads):
        assert a.shape == b.shape
        assert_matches(a, b, 1e-4, name)


@pytest.mark.parametrize("shapes", [((2, 3, 5, 8), (3, 7, 8), (1, 7)), ((2, 2, 3, 5, 8), (2, 1, 3, 7, 8), (3, 5, 7))],
                         ids=["q4_kv3_mask1S", "q5_kv5_unmergeable_maskHLS"])
def test_public_op_broadcast_on_triton(device, triton_route, shapes):
    """Broadcast query/key/value (expanded views; the 5-D case splits into one launch per index of its first
    dim) with a broadcast mask that requires grad, through the Triton path."""
    from fastcv.ops import scaled_dot_product_attention
    qs, ks, ms = shapes
    g = torch.Generator().manual_seed(5)
    q, k, v, mask = (torch.randn(s, generator=g) for s in (qs, ks, ks, ms))
    grad = torch.randn(qs, generator=g)
    leaves = [t.to(device).requires_grad_() for t in (q, k, v, mask)]
    out = scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3])
    grads = torch.autograd.grad(out, leaves, grad.to(device))
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, mask)]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_leaves[:3], attn_mask=ref_leaves[3])
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())
    assert_matches(out, ref, 1e-4, "out")
    for name, a, b in zip(("dq", "dk", "dv", "dmask"), grads, ref_grads):
        assert a.shape == b.shape
        assert_matches(a, b, 1e-4, name)
