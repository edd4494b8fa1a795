"""fastcv.nn.MultiheadAttention against nn.MultiheadAttention with the same weights (load_state_dict): outputs
and gradients with need_weights=False (fastcv's op), need_weights=True (delegated to PyTorch), masks of every
kind, the module options, dropout, state_dict round trips and bad arguments. Small sizes: the whole file runs
in seconds on two cores."""
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcv.nn
import fastcv.ops
from conftest import GPU_DEVICES as DEVICES

# Every test runs under each CPU instruction set this machine supports, on one thread (tests/conftest.py);
# the op's own tests cover its threading.
pytestmark = pytest.mark.usefixtures("cpu_isa", "one_thread")

TOL = {torch.float64: dict(atol=1e-12, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5)}
E, H, L, S, B = 16, 4, 5, 7, 3


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def pair(dtype=torch.float64, device="cpu", seed=0, **kw):
    """(nn.MultiheadAttention, fastcv.nn.MultiheadAttention) with the same random weights, biases included
    (nn.MHA initialises them to zero), in eval mode."""
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(E, H, device=device, dtype=dtype, **kw)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(-0.5, 0.5)
    ours = fastcv.nn.MultiheadAttention(E, H, device=device, dtype=dtype, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref.eval(), ours.eval()


def inputs(kind, batch_first, dtype=torch.float64, device="cpu", kdim=E, vdim=E, seed=1, batched=True):
    """query, key, value; kind: 'self' (one tensor), 'kv' (key is value), 'cross' (three tensors)."""
    g = torch.Generator().manual_seed(seed)

    def make(n, d):
        shape = ((B, n, d) if batch_first else (n, B, d)) if batched else (n, d)
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)

    q = make(L if kind != "self" else S, E)
    if kind == "self":
        return q, q, q
    k = make(S, kdim)
    return (q, k, k) if kind == "kv" else (q, k, make(S, vdim))


def masks(name, dtype=torch.float64, device="cpu", tgt=L, src=S, bsz=B, seed=2):
    """(key_padding_mask, attn_mask) in nn.MHA's conventions (bool True = ignore, float additive). Bool masks
    leave key 0 free, so no row is fully masked (test_fully_masked_rows covers those)."""
    g = torch.Generator().manual_seed(seed)

    def boolean(*shape):
        m = torch.rand(shape, generator=g) < 0.4
        m[..., 0] = False
        return m.to(device)

    def additive(*shape):
        m = torch.randn(shape, generator=g, dtype=torch.float64) * 2
        m[torch.rand(shape, generator=g) < 0.2] = float("-inf")
        m[..., 0] = 0.0
        return m.to(dtype=dtype, device=device)

    make = boolean if name.endswith("bool") else additive
    which = name.split("_")[0]
    kpm = make(bsz, src) if which in ("kpm", "both", "both3d") else None
    attn = None
    if which in ("attn2d", "both"):
        attn = make(tgt, src)
    elif which in ("attn3d", "both3d"):
        attn = make(bsz * H, tgt, src)
    return kpm, attn


MASKS = ["none", "kpm_bool", "kpm_float", "attn2d_bool", "attn2d_float", "attn3d_bool", "attn3d_float",
         "both_bool", "both_float", "both3d_bool", "both3d_float"]


def run(m, q, k, v, **kw):
    return m(q, k, v, need_weights=False, **kw)[0]


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["self", "kv", "cross"])
@pytest.mark.parametrize("mask", MASKS)
def test_matches_torch(device, dtype, batch_first, kind, mask):
    kw = dict(kdim=12, vdim=20) if kind == "cross" else {}
    ref, ours = pair(dtype, device, batch_first=batch_first, **kw)
    q, k, v = inputs(kind, batch_first, dtype, device, **kw)
    tgt = q.shape[1 if batch_first else 0]
    kpm, attn = masks(mask, dtype, device, tgt=tgt)
    out, weights = ours(q, k, v, key_padding_mask=kpm, attn_mask=attn, need_weights=False)
    assert weights is None
    expected = run(ref, q, k, v, key_padding_mask=kpm, attn_mask=attn)
    assert out.shape == expected.shape
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("options", [dict(add_bias_kv=True), dict(add_zero_attn=True),
                                     dict(add_bias_kv=True, add_zero_attn=True), dict(bias=False),
                                     dict(bias=False, add_bias_kv=True, kdim=12, vdim=20)])
@pytest.mark.parametrize("mask", ["none", "kpm_bool", "attn3d_float", "both_bool", "both_float"])
def test_module_options(options, mask):
    ref, ours = pair(batch_first=True, **options)
    kind = "cross" if "kdim" in options else "self"
    q, k, v = inputs(kind, True, kdim=options.get("kdim", E), vdim=options.get("vdim", E))
    kpm, attn = masks(mask, tgt=q.shape[1])
    assert_close(run(ours, q, k, v, key_padding_mask=kpm, attn_mask=attn),
                 run(ref, q, k, v, key_padding_mask=kpm, attn_mask=attn), torch.float64)


@pytest.mark.parametrize("batch_first", [True, False])  # ignored for unbatched inputs
@pytest.mark.parametrize("kind", ["self", "cross"])
@pytest.mark.parametrize("mask", ["none", "kpm_bool", "kpm_float", "attn2d_bool", "attn3d_float", "both_bool"])
@pytest.mark.parametrize("options", [{}, dict(add_bias_kv=True, add_zero_attn=True)])
def test_unbatched(batch_first, kind, mask, options):
    ref, ours = pair(batch_first=batch_first, **options)
    q, k, v = inputs(kind, batch_first, batched=False)
    kpm, attn = masks(mask, tgt=q.shape[0], bsz=1)
    kpm = None if kpm is None else kpm[0]  # (S,)
    out = run(ours, q, k, v, key_padding_mask=kpm, attn_mask=attn)
    assert out.shape == (q.shape[0], E)
    assert_close(out, run(ref, q, k, v, key_padding_mask=kpm, attn_mask=attn), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kpm", ["none", "kpm_bool", "kpm_float"])
@pytest.mark.parametrize("options", [{}, dict(add_bias_kv=True), dict(add_zero_attn=True)])
@pytest.mark.parametrize("float_causal", [False, True])
def test_is_causal_with_causal_mask(dtype, kpm, options, float_causal):
    """The hint with nn.MHA's causal mask, with and without padding (PyTorch then merges the masks) and with
    appended keys (without padding PyTorch hands is_causal to SDPA over the S + 1 keys; so do we)."""
    ref, ours = pair(dtype, batch_first=True, **options)
    q, k, v = inputs("self", True, dtype)
    pad, _ = masks(kpm, dtype)
    causal = nn.Transformer.generate_square_subsequent_mask(S, dtype=dtype)  # float -inf above the diagonal
    if not float_causal:
        causal = torch.isinf(causal)
    mismatched = pad is not None and pad.dtype != causal.dtype
    with pytest.warns(UserWarning, match="mismatched") if mismatched else nullcontext():
        out = run(ours, q, k, v, key_padding_mask=pad, attn_mask=causal, is_causal=True)
    with pytest.warns(UserWarning, match="mismatched") if mismatched else nullcontext():
        expected = run(ref, q, k, v, key_padding_mask=pad, attn_mask=causal, is_causal=True)
    assert_close(out, expected, dtype)
    if not options:  # ... which without appended keys is plain causal attention
        with pytest.warns(UserWarning, match="mismatched") if mismatched else nullcontext():
            assert_close(out, run(ref, q, k, v, key_padding_mask=pad, attn_mask=causal), dtype)


@pytest.mark.parametrize("kpm", ["none", "kpm_bool", "kpm_float"])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("tgt", [S, L])
def test_is_causal_without_mask(kpm, need_weights, tgt):
    """PyTorch raises for the hint without attn_mask; ours takes it as the standard causal mask, triu(1) over
    (L, S), on both paths."""
    ref, ours = pair(batch_first=True)
    _, k, v = inputs("cross", True)
    q = torch.randn(B, tgt, E, dtype=torch.float64)
    pad, _ = masks(kpm)
    causal = torch.ones(tgt, S, dtype=torch.bool).triu(1)
    if pad is not None and pad.is_floating_point():
        causal = torch.zeros(tgt, S, dtype=torch.float64).masked_fill(causal, float("-inf"))
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        ref(q, k, v, key_padding_mask=pad, need_weights=need_weights, is_causal=True)
    out = ours(q, k, v, key_padding_mask=pad, need_weights=need_weights, is_causal=True)
    expected = ref(q, k, v, key_padding_mask=pad, need_weights=need_weights, attn_mask=causal)
    assert_close(out[0], expected[0], torch.float64)
    if need_weights:
        assert_close(out[1], expected[1], torch.float64)


@pytest.mark.parametrize("kind,options,mask", [
    ("self", {}, "both_bool"),
    ("self", dict(add_bias_kv=True, add_zero_attn=True), "both_float"),
    ("kv", {}, "attn3d_float"),
    ("cross", dict(kdim=12, vdim=20, add_bias_kv=True), "kpm_bool"),
    ("cross", dict(bias=False, add_zero_attn=True), "attn2d_bool"),
])
@pytest.mark.parametrize("batch_first", [True, False])
def test_gradients(kind, options, mask, batch_first):
    ref, ours = pair(batch_first=batch_first, **options)
    base = inputs(kind, batch_first, kdim=options.get("kdim", E), vdim=options.get("vdim", E))
    kpm, attn = masks(mask, tgt=base[0].shape[1 if batch_first else 0])
    grads = []
    for m in (ref, ours):
        m.zero_grad()
        leaves = {}
        qkv = [leaves.setdefault(id(t), t.detach().clone().requires_grad_()) for t in base]  # keeps `is`
        out = run(m, *qkv, key_padding_mask=kpm, attn_mask=attn)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        grads.append([t.grad for t in leaves.values()] + [p.grad for p in m.parameters()])
    names = [f"input{i}" for i in range(len({id(t) for t in base}))] + [n for n, _ in ours.named_parameters()]
    assert len(grads[0]) == len(grads[1]) == len(names)
    for name, g_ref, g_ours in zip(names, *grads):
        assert g_ours is not None, name
        torch.testing.assert_close(g_ours, g_ref, atol=1e-11, rtol=1e-9, msg=name)


def test_fully_masked_rows():
    """A row with every key masked: PyTorch's SDPA path gives out_proj of zeros, and so do we."""
    ref, ours = pair(batch_first=True)
    q, k, v = inputs("self", True)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1] = True
    attn = torch.zeros(S, S, dtype=torch.bool)
    attn[2] = True
    for kw in (dict(key_padding_mask=kpm), dict(attn_mask=attn), dict(key_padding_mask=kpm, attn_mask=attn)):
        out = run(ours, q, k, v, **kw)
        assert_close(out, run(ref, q, k, v, **kw), torch.float64)
        assert torch.isfinite(out).all()
    assert_close(out[1], ref.out_proj.bias.expand(S, E), torch.float64)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_strided_masks(kind):
    """Masks that are transposed views (PyTorch's own view() rejects a strided float 3-D attn_mask)."""
    ref, ours = pair(batch_first=True)
    q, k, v = inputs("cross", True)
    kpm, attn = masks("both3d_" + kind)
    kpm_t, attn_t = kpm.t().contiguous().t(), attn.transpose(1, 2).contiguous().transpose(1, 2)
    assert not kpm_t.is_contiguous() and not attn_t.is_contiguous()
    assert_close(run(ours, q, k, v, key_padding_mask=kpm_t, attn_mask=attn_t),
                 run(ref, q, k, v, key_padding_mask=kpm, attn_mask=attn), torch.float64)
    assert_close(run(ours, q, k, v, attn_mask=attn_t), run(ref, q, k, v, attn_mask=attn), torch.float64)


def test_mismatched_mask_types_warn_like_torch():
    ref, ours = pair()
    q, k, v = inputs("kv", False)
    kpm, _ = masks("kpm_bool")
    _, attn = masks("attn2d_float")
    for a, b in ((kpm, attn), (kpm.double().masked_fill(kpm, float("-inf")), attn.isinf())):
        with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
            out = run(ours, q, k, v, key_padding_mask=a, attn_mask=b)
        with pytest.warns(UserWarning, match="mismatched"):
            expected = run(ref, q, k, v, key_padding_mask=a, attn_mask=b)
        assert_close(out, expected, torch.float64)


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("batched", [True, False])
def test_need_weights_is_torch(average, batched):
    ref, ours = pair(dtype=torch.float32, add_bias_kv=True)
    q, k, v = inputs("cross", False, torch.float32, batched=batched)
    kpm, attn = masks("both_bool", tgt=q.shape[0], bsz=B if batched else 1)
    kpm = kpm if batched else kpm[0]
    out, w = ours(q, k, v, key_padding_mask=kpm, attn_mask=attn, average_attn_weights=average)
    out_ref, w_ref = ref(q, k, v, key_padding_mask=kpm, attn_mask=attn, average_attn_weights=average)
    torch.testing.assert_close(out, out_ref, atol=0, rtol=0)
    torch.testing.assert_close(w, w_ref, atol=0, rtol=0)
    assert_close(run(ours, q, k, v, key_padding_mask=kpm, attn_mask=attn), out_ref, torch.float32)


def test_inference_mode_matches_torch_fast_path():
    """Eval, no grad, batch_first self-attention: PyTorch takes its native fast path; same answer."""
    ref, ours = pair(torch.float32, batch_first=True)
    q, k, v = inputs("self", True, torch.float32)
    kpm, _ = masks("kpm_bool", torch.float32)
    with torch.inference_mode():
        for kw in ({}, dict(key_padding_mask=kpm)):
            assert_close(run(ours, q, k, v, **kw), run(ref, q, k, v, **kw), torch.float32)


def test_dropout():
    ref, ours = pair(dtype=torch.float32, batch_first=True, dropout=0.0)
    q, k, v = inputs("self", True, torch.float32)
    ours.train()
    assert_close(run(ours, q, k, v), run(ref, q, k, v), torch.float32)  # dropout=0.0 in training == eval

    ours.dropout = 0.5
    x = q[:1].expand(512, -1, -1)  # one sequence 512 times: independent dropout masks, one call
    torch.manual_seed(0)
    samples = run(ours, x, x, x)
    expected = run(ours.eval(), x[:1], x[:1], x[:1])[0]
    x2 = x[:2]
    torch.testing.assert_close(run(ours, x2, x2, x2), expected.expand(2, -1, -1))  # eval: no dropout
    assert not torch.allclose(samples[0], expected)
    assert not torch.allclose(samples[0], samples[1])
    # dropout keeps the expectation: the sample mean lies within 5 standard errors of the eval output
    err = (samples.mean(0) - expected).abs()
    assert (err <= 5 * samples.std(0) / 512 ** 0.5 + 1e-6).all(), err.max()


@pytest.mark.parametrize("options", [{}, dict(kdim=12, vdim=20), dict(add_bias_kv=True, bias=False)])
def test_state_dict_round_trip(options):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(E, H, **options)
    ours = fastcv.nn.MultiheadAttention(E, H, **options)
    assert isinstance(ours, nn.MultiheadAttention)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    ours.load_state_dict(theirs.state_dict())
    for name, t in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], t), name
    fresh = nn.MultiheadAttention(E, H, **options)
    fresh.load_state_dict(ours.state_dict())
    for name, t in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name


def test_calls_fastcv_op_with_compact_masks(monkeypatch):
    """need_weights=False goes through fastcv.ops.scaled_dot_product_attention, looked up at call time, with a
    mask that broadcasts instead of a materialised [B, H, L, S] one; need_weights=True does not call it."""
    calls = []
    real = fastcv.ops.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append((q.shape, None if attn_mask is None else (attn_mask.shape, attn_mask.dtype), is_causal))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(fastcv.ops, "scaled_dot_product_attention", spy)
    _, ours = pair(batch_first=True)
    q, k, v = inputs("self", True)
    kpm, attn2d = masks("both_bool", tgt=S)
    _, attn3d = masks("both3d_bool", tgt=S)
    causal = torch.ones(S, S, dtype=torch.bool).triu(1)
    run(ours, q, k, v)
    run(ours, q, k, v, key_padding_mask=kpm)
    run(ours, q, k, v, attn_mask=attn2d)
    run(ours, q, k, v, key_padding_mask=kpm, attn_mask=attn2d)
    run(ours, q, k, v, attn_mask=attn3d)
    run(ours, q, k, v, key_padding_mask=kpm.double(), attn_mask=attn2d.double())
    run(ours, q, k, v, attn_mask=causal, is_causal=True)
    ours(q, k, v)  # need_weights=True: PyTorch's own
    shape = (B, H, S, E // H)
    assert calls == [
        (shape, None, False),
        (shape, ((B, 1, 1, S), torch.bool), False),
        (shape, ((S, S), torch.bool), False),
        (shape, ((B, 1, S, S), torch.bool), False),
        (shape, ((B, H, S, S), torch.bool), False),
        (shape, ((B, 1, S, S), torch.float64), False),
        (shape, None, True),
    ]


@pytest.mark.parametrize("kind,gemms", [("self", 2), ("kv", 3), ("cross", 4)])
def test_fused_input_projection(monkeypatch, kind, gemms):
    """One GEMM for the three projections when query is key is value (also through batch_first's transpose),
    one for key and value when key is value; plus out_proj."""
    count = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *a, **kw: count.append(1) or linear(*a, **kw))
    for batch_first in (True, False):
        ref, ours = pair(batch_first=batch_first)
        q, k, v = inputs(kind, batch_first)
        count.clear()
        out = run(ours, q, k, v)
        assert len(count) == gemms
        assert_close(out, run(ref, q, k, v), torch.float64)


BAD = [
    (dict(key_padding_mask=torch.zeros(B, S + 1, dtype=torch.bool)), "key_padding_mask.*\\(3, 7\\)"),
    (dict(key_padding_mask=torch.zeros(S, dtype=torch.bool)), "key_padding_mask.*\\(3, 7\\)"),
    (dict(attn_mask=torch.zeros(L, S + 1, dtype=torch.bool)), "attn_mask.*\\(5, 7\\).*\\(12, 5, 7\\)"),
    (dict(attn_mask=torch.zeros(S, L)), "attn_mask.*\\(5, 7\\)"),
    (dict(attn_mask=torch.zeros(B, L, S)), "attn_mask.*\\(12, 5, 7\\)"),
    (dict(attn_mask=torch.zeros(B, H, L, S)), "attn_mask"),
    (dict(attn_mask=torch.zeros(L, S + 1, dtype=torch.bool), is_causal=True), "attn_mask"),
]


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("kwargs,match", BAD)
def test_bad_mask_shapes_raise(kwargs, match, need_weights):
    ref, ours = pair(batch_first=True)
    q, k, v = inputs("cross", True)
    with pytest.raises(ValueError, match=match) as info:
        ours(q, k, v, need_weights=need_weights, **kwargs)
    assert isinstance(info.value, (AssertionError, RuntimeError))  # what nn.MHA raises, for except clauses
    if not kwargs.get("is_causal"):  # PyTorch's fast path ignores the hinted mask's shape
        with pytest.raises((AssertionError, RuntimeError)):
            ref(q, k, v, need_weights=need_weights, **kwargs)


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v: (q[0], k, v), "key must be 2-D"),
    (lambda q, k, v: (q[None], k, v), "query must be 2-D .* or 3-D"),
    (lambda q, k, v: (q, k[:2], v[:2]), "key has batch size 2 but query has 3"),
    (lambda q, k, v: (q, k, v[:, :4]), "same sequence length"),
    (lambda q, k, v: (q[..., :8], k, v), "query must have 16 features"),
])
def test_bad_inputs_raise(bad, match):
    _, ours = pair(batch_first=True)
    with pytest.raises(ValueError, match=match):
        ours(*bad(*inputs("cross", True)), need_weights=False)


def test_bad_mask_dtype_raises():
    ref, ours = pair()
    q, k, v = inputs("self", False)
    for kw in (dict(key_padding_mask=torch.zeros(B, S, dtype=torch.int64)),
               dict(attn_mask=torch.zeros(S, S, dtype=torch.uint8))):
        with pytest.raises(TypeError, match="only bool and floating types of"):
            run(ours, q, k, v, **kw)
        with pytest.raises(AssertionError, match="only bool and floating types of"):
            run(ours, q, k, v, **kw)
        with pytest.raises(AssertionError, match="only bool and floating types of"):
            run(ref, q, k, v, **kw)


@pytest.mark.parametrize("mask", ["attn2d_float", "attn3d_float", "both_float"])
def test_learned_attn_mask_gets_its_gradient(device, mask):
    """A float attn_mask that requires grad (a learned bias) gets the gradient nn.MultiheadAttention gives it."""
    ref, ours = pair(device=device)
    q, k, v = inputs("cross", False, device=device)
    kpm, attn = masks(mask, device=device)
    grads = []
    for m in (ref, ours):
        bias = attn.detach().clone().requires_grad_()
        out = run(m, q, k, v, key_padding_mask=kpm, attn_mask=bias)
        grads.append(torch.autograd.grad(out.square().sum(), bias)[0])
    assert grads[1].shape == attn.shape
    assert_close(grads[1], grads[0], torch.float64)
