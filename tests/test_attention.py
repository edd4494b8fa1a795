"""fastcv.ops.scaled_dot_product_attention against F.scaled_dot_product_attention (math backend, float64, on
the same rounded inputs, so only our own arithmetic is measured): outputs and the gradients of query, key and
value for every dtype, odd lengths, head dims up to 128, 2-D to 5-D inputs, bool and additive masks of every
broadcast shape, fully masked rows, is_causal (L == S, L < S, L > S, with a mask), custom scales, grouped-query
attention, dropout (through a value = identity trick that makes the dropped probabilities visible), gradcheck,
opcheck, torch.compile, empty tensors, thread-count determinism, strided inputs and bad arguments; query, key
and value that broadcast against each other (every rank combination PyTorch accepts, read in place), and the
gradient of a floating mask that requires grad (every broadcast shape, causal, dropout, GQA, half dtypes).

On CUDA the op runs the Triton kernels for float16/bfloat16/float32 and PyTorch's own op for float64; every
device-parametrised test here is written to hold there too. Small sizes: the file runs in well under a minute
on two CPU cores."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastcv.ops.attention as attention_module
from conftest import GPU_DEVICES as DEVICES
from fastcv.ops import scaled_dot_product_attention as sdpa

# Every test runs under each CPU instruction set this machine supports, on one thread (tests/conftest.py);
# test_thread_count_does_not_change_results sets its own counts.
pytestmark = pytest.mark.usefixtures("cpu_isa", "one_thread")

# Tolerances on the largest error, relative to the largest magnitude of the reference tensor (outputs and
# gradients alike; relative rather than absolute so that small gradients, e.g. dK with S = 1000 where every
# P_ij ~ 1e-3, are held to the same standard as the output).
# - float64: the CPU kernels and PyTorch's op both compute in float64; 1e-10 leaves room for summation order.
# - float32: the kernels accumulate in float32 (IEEE dot products on the GPU, no TF32): a few 1e-7 on these
#   sizes, about 1e-6 for L = S = 1000 and the gradients; 5e-5 leaves a GPU's other summation order room.
# - float16 (11-bit mantissa, 4.9e-4 per rounding) and bfloat16 (8-bit, 3.9e-3 per rounding): inputs are exact
#   (the reference sees the same rounded values); outputs are rounded once, and the Triton kernels also round P
#   and dS to the input dtype before their dot products (as FlashAttention does), a few roundings per result.
# Every bug these tests look for moves results by far more: test_tolerances_catch_bugs checks that a missing
# scale, an ignored or shifted mask, the wrong causal alignment or GQA head mapping each move the float64
# reference by more than 10x the loosest (bfloat16) tolerance on the shapes used here.
TOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
DTYPES = list(TOL)
INF = math.inf


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def make(shape, dtype, device, seed=0, scale=1.0):
    """Random values drawn in float64 on the CPU (the same on every device), rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def qkv(lead, L, S, E, Ev, dtype, device, hkv=None, seed=0, grad=True):
    """query (*lead, L, E), key (*lead', S, E), value (*lead', S, Ev); lead' has hkv heads (GQA)."""
    klead = lead if hkv is None else (*lead[:-1], hkv)
    q = make((*lead, L, E), dtype, device, seed)
    k = make((*klead, S, E), dtype, device, seed + 1)
    v = make((*klead, S, Ev), dtype, device, seed + 2)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def causal_mask(L, S):
    """PyTorch's is_causal: top-left aligned, query i sees keys j <= i."""
    return torch.ones(L, S, dtype=torch.bool).tril()


def reference(q, k, v, grad_out=None, mask=None, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention in float64 on the CPU, math backend, from the same rounded inputs: the
    output and, with grad_out, the gradients of q, k, v. PyTorch refuses is_causal together with a mask: the
    causal mask is then merged into the given one."""
    qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    m = None
    if mask is not None:
        m = mask.detach().cpu()
        m = m if m.dtype == torch.bool else m.double()
    if is_causal and m is not None:
        tri = causal_mask(q.shape[-2], k.shape[-2])
        m = (m & tri) if m.dtype == torch.bool else m.masked_fill(~tri, -INF)
        is_causal = False
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(qd, kd, vd, m, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa)
    if grad_out is None:
        return out.detach(), None
    grads = torch.autograd.grad(out, (qd, kd, vd), grad_out.detach().cpu().double(), allow_unused=True)
    return out.detach(), grads


def close(actual, expected, dtype, what="", scale=None):
    """scale: the magnitude the error is relative to (default: the reference's largest)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    actual = actual.detach().cpu().double()
    assert not actual.isnan().any(), f"{what}: NaN in the result"
    scale = scale or expected.abs().max().item() or 1.0
    err = (actual - expected).abs().max().item()
    tol = TOL[dtype] * scale
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g} ({dtype}, largest magnitude {scale:.3g})"


def check(q, k, v, mask=None, is_causal=False, scale=None, enable_gqa=False, backward=True, seed=7):
    """Runs fastcv forward (and backward) on q, k, v and compares with the float64 reference."""
    dtype = q.dtype
    out = sdpa(q, k, v, mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    assert out.dtype == dtype and out.device == q.device
    grad_out = make(out.shape, dtype, q.device, seed) if backward else None
    ref, grads = reference(q, k, v, grad_out, mask, is_causal, scale, enable_gqa)
    close(out, ref, dtype, "output")
    if backward:
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)
        for name, a, r in (("grad_query", dq, grads[0]), ("grad_key", dk, grads[1]), ("grad_value", dv, grads[2])):
            assert a.dtype == dtype
            close(a, r, dtype, name)
    return out


# ------------------------------------------------------------------ shapes and dtypes

# (leading dims, L, S, E, Ev): 2-D to 5-D inputs, one token, odd lengths, S != L, head dims 8..128, Ev != E.
SHAPES = [
    ((), 1, 1, 8, 8),               # 2-D, one token
    ((), 3, 7, 16, 16),             # 2-D
    ((2,), 7, 33, 40, 24),          # 3-D, Ev < E
    ((2, 3), 33, 65, 64, 64),       # 4-D
    ((1, 2), 65, 7, 80, 32),        # L > S, E = 80
    ((2, 1, 2), 197, 197, 16, 40),  # 5-D, ViT length, Ev > E
    ((1, 2), 1, 33, 128, 8),        # a single query, E = 128
    ((1, 1), 17, 130, 128, 128),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-L{s[1]}-S{s[2]}-E{s[3]}-Ev{s[4]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward(device, shape, dtype):
    lead, L, S, E, Ev = shape
    q, k, v = qkv(lead, L, S, E, Ev, dtype, device)
    out = check(q, k, v)
    assert out.shape == (*lead, L, Ev)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_long_sequence(device, is_causal):
    """One long case: L = S = 1000 (several key and query blocks, partial last blocks), float32."""
    q, k, v = qkv((1, 2), 1000, 1000, 64, 64, torch.float32, device)
    check(q, k, v, is_causal=is_causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_scores(device, dtype):
    """Scores of a few hundred: the online softmax must subtract its running maximum (exp overflows
    otherwise), also when the maximum grows from one key block to the next."""
    lead, L, S, E = (1, 2), 9, 150, 16
    q, k, v = qkv(lead, L, S, E, E, dtype, device, grad=False)
    k = (k.double() * torch.linspace(1, 30, S, dtype=torch.float64, device=device)[:, None]).to(dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    check(q, k, v, scale=1.0)


# ------------------------------------------------------------------ masks

MASK_SHAPES = {  # for q [B, H, L, E] with B, H, L, S = 2, 3, 5, 9
    "LS": (5, 9),
    "1S": (1, 9),
    "B1LS": (2, 1, 5, 9),
    "1H1S": (1, 3, 1, 9),
    "BHLS": (2, 3, 5, 9),
}


def random_mask(shape, kind, dtype, device, seed=3, fraction=0.3):
    """About `fraction` of the entries masked: False (bool) or -inf (additive, finite values elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=g) >= fraction
    if kind == "bool":
        return keep.to(device)
    add = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).masked_fill(~keep, -INF)
    return add.to(dtype).to(device)


@pytest.mark.parametrize("mask_shape", list(MASK_SHAPES))
@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masks(device, mask_shape, kind, dtype):
    q, k, v = qkv((2, 3), 5, 9, 16, 12, dtype, device)
    mask = random_mask(MASK_SHAPES[mask_shape], kind, dtype, device)
    check(q, k, v, mask)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_mask_5d_and_3d_inputs(device, kind):
    """Masks broadcast over several leading dims (5-D inputs) and over the heads of 3-D inputs."""
    q, k, v = qkv((2, 2, 3), 4, 6, 8, 8, torch.float32, device)
    check(q, k, v, random_mask((2, 1, 1, 4, 6), kind, torch.float32, device))
    check(q, k, v, random_mask((3, 1, 6), kind, torch.float32, device))
    q, k, v = qkv((3,), 4, 6, 8, 8, torch.float32, device)
    check(q, k, v, random_mask((4, 6), kind, torch.float32, device))


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows(device, kind, dtype):
    """Rows whose keys are all masked: PyTorch gives 0 outputs and 0 gradients there, and no NaN anywhere."""
    B, H, L, S = 2, 2, 6, 40  # S > one key block on the GPU for some rows' second block
    q, k, v = qkv((B, H), L, S, 16, 16, dtype, device)
    mask = random_mask((B, H, L, S), kind, dtype, device, fraction=0.2).cpu()
    dead = torch.zeros(B, H, L, dtype=torch.bool)
    dead[0, 0, 1] = dead[0, 1, 5] = dead[1, 0, 0] = True
    dead[1, 1] = True  # a whole head
    mask = mask.masked_fill(dead[..., None], False if kind == "bool" else -INF).to(device)
    out = check(q, k, v, mask)
    dead = dead.to(device)
    assert torch.equal(out[dead], torch.zeros_like(out[dead])), "fully masked rows must give 0"
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert torch.equal(dq[dead], torch.zeros_like(dq[dead])), "fully masked rows must give grad_query 0"
    assert torch.equal(dk[1, 1], torch.zeros_like(dk[1, 1])) and torch.equal(dv[1, 1], torch.zeros_like(dv[1, 1]))


def test_masked_keys_do_not_leak(device):
    """A masked key's value must not reach the output, whatever its size (inf-free but huge values)."""
    q, k, v = qkv((1, 2), 3, 8, 8, 8, torch.float32, device, grad=False)
    mask = torch.ones(3, 8, dtype=torch.bool, device=device)
    mask[:, 5] = False
    v2 = v.clone()
    v2[..., 5, :] = 1e30
    torch.testing.assert_close(sdpa(q, k, v2, mask), sdpa(q, k, v, mask), rtol=0, atol=0)


# ------------------------------------------------------------------ causal, scale, GQA

@pytest.mark.parametrize("L,S", [(7, 7), (5, 13), (13, 5), (65, 65), (33, 70), (70, 33), (530, 600), (600, 530)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_causal(device, L, S, dtype):
    q, k, v = qkv((2, 2), L, S, 32, 24, dtype, device)
    check(q, k, v, is_causal=True)


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("L,S", [(6, 6), (4, 11), (11, 4)])
def test_causal_with_mask(device, kind, L, S):
    """is_causal together with a mask (PyTorch refuses it; the reference merges the two masks). Row 0 has only
    key 0 under the causal mask: masking key 0 too leaves it fully masked."""
    q, k, v = qkv((2, 3), L, S, 16, 16, torch.float32, device)
    mask = random_mask((2, 1, L, S), kind, torch.float32, device).cpu()
    mask[0, 0, 0, 0] = False if kind == "bool" else -INF
    out = check(q, k, v, mask.to(device), is_causal=True)
    assert torch.equal(out[0, :, 0], torch.zeros_like(out[0, :, 0]))


@pytest.mark.parametrize("scale", [0.3, 2.0, 1e-3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_custom_scale(device, scale, dtype):
    q, k, v = qkv((2, 2), 9, 17, 24, 24, dtype, device)
    check(q, k, v, scale=scale)
    check(q, k, v, random_mask((9, 17), "bool", dtype, device), is_causal=True, scale=scale)


@pytest.mark.parametrize("hkv", [2, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gqa(device, hkv, dtype):
    q, k, v = qkv((2, 6), 7, 19, 16, 8, dtype, device, hkv=hkv)
    check(q, k, v, enable_gqa=True)
    check(q, k, v, is_causal=True, enable_gqa=True)
    check(q, k, v, random_mask((2, 6, 7, 19), "additive", dtype, device), enable_gqa=True)


def test_gqa_5d(device):
    q, k, v = qkv((2, 2, 6), 5, 9, 8, 8, torch.float32, device, hkv=3)
    check(q, k, v, random_mask((1, 2, 6, 1, 9), "bool", torch.float32, device), enable_gqa=True)


def test_gqa_requires_enable_gqa(device):
    q, k, v = qkv((2, 6), 7, 19, 16, 8, torch.float32, device, hkv=2, grad=False)
    with pytest.raises(ValueError, match=r"query has 6 heads and key 2.*enable_gqa"):
        sdpa(q, k, v)
    with pytest.raises(ValueError, match=r"query has 6 heads and key 4"):
        sdpa(q, *qkv((2, 4), 7, 19, 16, 8, torch.float32, device, grad=False)[1:], enable_gqa=True)


def test_tolerances_catch_bugs():
    """The bugs these tests look for move the float64 reference by more than 10x the loosest tolerance: a
    missing scale, an ignored mask, a causal mask off by one or aligned bottom-right, the wrong GQA head map."""
    loosest = 10 * max(TOL.values())
    dt = torch.float64

    def moved(a, b):
        return (a - b).abs().max().item() / b.abs().max().item()

    q, k, v = qkv((2, 3), 9, 17, 16, 16, dt, "cpu", grad=False)
    good = reference(q, k, v)[0]
    assert moved(reference(q, k, v, scale=1.0)[0], good) > loosest, "missing scale"
    mask = random_mask((9, 17), "bool", dt, "cpu")
    masked = reference(q, k, v, mask=mask)[0]
    assert moved(good, masked) > loosest, "ignored mask"
    assert moved(reference(q, k, v, mask=mask.roll(1, -1))[0], masked) > loosest, "mask shifted by one key"
    causal = reference(q, k, v, is_causal=True)[0]
    off_by_one = torch.ones(9, 17, dtype=torch.bool).tril(1)
    assert moved(reference(q, k, v, mask=off_by_one)[0], causal) > loosest, "causal mask off by one"
    bottom_right = torch.ones(9, 17, dtype=torch.bool).tril(17 - 9)
    assert moved(reference(q, k, v, mask=bottom_right)[0], causal) > loosest, "bottom-right causal alignment"
    q6, k2, v2 = qkv((2, 6), 7, 19, 16, 8, dt, "cpu", hkv=2, grad=False)
    gqa = reference(q6, k2, v2, enable_gqa=True)[0]
    wrong = reference(q6, k2.repeat(1, 3, 1, 1), v2.repeat(1, 3, 1, 1))[0]  # head h -> h % Hkv, not h // 3
    assert moved(wrong, gqa) > loosest, "GQA head mapping"


# ------------------------------------------------------------------ gradcheck (float64, CPU)

GRADCHECK = {
    "plain": dict(lead=(1, 2), L=3, S=5, E=4, Ev=4),
    "causal_L_lt_S": dict(lead=(1, 2), L=3, S=5, E=4, Ev=3, is_causal=True),
    "causal_L_gt_S": dict(lead=(2, 1), L=5, S=3, E=3, Ev=4, is_causal=True),
    "bool_mask": dict(lead=(1, 2), L=4, S=5, E=3, Ev=2, mask="bool"),
    "additive_mask_causal": dict(lead=(1, 2), L=4, S=5, E=3, Ev=2, mask="additive", is_causal=True),
    "gqa": dict(lead=(1, 4), L=3, S=4, E=3, Ev=2, hkv=2, enable_gqa=True),
    "2d_scale": dict(lead=(), L=3, S=4, E=5, Ev=2, scale=0.7),
}


@pytest.mark.parametrize("case", list(GRADCHECK))
def test_gradcheck(case):
    c = dict(GRADCHECK[case])
    lead, L, S, E, Ev = (c.pop(n) for n in ("lead", "L", "S", "E", "Ev"))
    q, k, v = qkv(lead, L, S, E, Ev, torch.float64, "cpu", hkv=c.pop("hkv", None))
    kind = c.pop("mask", None)
    if kind is not None:
        mask = random_mask((L, S), kind, torch.float64, "cpu", fraction=0.25)
        mask[:, 0] = True if kind == "bool" else 0.0  # no fully masked row: their gradient is 0 on one side
        c["attn_mask"] = mask
    assert torch.autograd.gradcheck(lambda a, b, d: sdpa(a, b, d, **c), (q, k, v))


def test_gradcheck_dropout():
    """With the generator re-seeded inside the function every call draws the same dropout mask: the backward
    must regenerate exactly the mask its forward used."""
    q, k, v = qkv((1, 2), 3, 5, 4, 3, torch.float64, "cpu")

    def fn(a, b, d):
        torch.manual_seed(0)
        return sdpa(a, b, d, dropout_p=0.3, is_causal=True)

    assert not torch.allclose(fn(q, k, v), sdpa(q, k, v, is_causal=True)), "dropout must change the output"
    assert torch.equal(fn(q, k, v), fn(q, k, v))
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_no_double_backward():
    q, k, v = qkv((1, 1), 3, 4, 4, 4, torch.float64, "cpu")
    dq, = torch.autograd.grad(sdpa(q, k, v).sum(), q, create_graph=True)
    with pytest.raises((NotImplementedError, RuntimeError), match="second derivative|double backward"):
        dq.sum().backward()


# ------------------------------------------------------------------ dropout

def eye_inputs(B, H, S, dtype, device, seed=0):
    """q, k of [B, H, S, E] and value = eye(S) per batch and head: the output row i is then row i of the
    (dropped, rescaled) probability matrix itself."""
    q = make((B, H, S, 16), dtype, device, seed, scale=0.5)
    k = make((B, H, S, 16), dtype, device, seed + 1, scale=0.5)
    v = torch.eye(S, dtype=dtype, device=device).expand(B, H, S, S)
    return q, k, v


@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_dropout_statistics_and_values(device, p, is_causal, dtype):
    B, H, S = 2, 2, 64
    q, k, v = eye_inputs(B, H, S, dtype, device)
    torch.manual_seed(1)
    out = sdpa(q, k, v, dropout_p=p, is_causal=is_causal)
    probs, _ = reference(q, k, v, is_causal=is_causal)  # [B, H, S, S]: the probabilities without dropout
    allowed = probs > 0  # causal: the upper triangle is structurally 0
    assert allowed.sum() == (B * H * S * (S + 1) // 2 if is_causal else B * H * S * S)
    kept = out.cpu() != 0
    assert not (kept & ~allowed).any(), "dropout must not create probability where the mask has none"
    n = allowed.sum().item()
    fraction = (kept & allowed).sum().item() / n
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(fraction - (1 - p)) < 5 * sigma, f"kept fraction {fraction:.4f}, expected {1 - p} +- {5 * sigma:.4f}"
    # Kept entries are p_ij / (1 - p), dropped ones exactly 0.
    close(out.cpu().double() * kept, probs / (1 - p) * kept, dtype, "kept probabilities")
    # Every query row keeps about 1 - p of its keys: the mask is not the same pattern repeated per row/head.
    per_head = (kept & allowed).flatten(2).sum(-1) / allowed.flatten(2).sum(-1)
    assert not torch.equal(kept[0, 0], kept[0, 1]) and not torch.equal(kept[0, 0], kept[1, 0])
    assert (per_head - (1 - p)).abs().max() < 0.1


def test_dropout_seeding(device):
    q, k, v = eye_inputs(2, 2, 32, torch.float32, device)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(sdpa(q, k, v, dropout_p=0.5))
    assert torch.equal(runs[0], runs[1]), "the same torch.manual_seed must reproduce the output"
    assert not torch.equal(runs[0], runs[2]), "another seed must draw another mask"
    # Consecutive calls advance torch's generator: they draw different masks.
    torch.manual_seed(0)
    a, b = sdpa(q, k, v, dropout_p=0.5), sdpa(q, k, v, dropout_p=0.5)
    assert not torch.equal(a, b)
    # The dispatcher path (inputs that require grad) draws the same seed as the direct eager path.
    torch.manual_seed(0)
    c = sdpa(q.clone().requires_grad_(), k, v, dropout_p=0.5)
    assert torch.equal(c.detach(), runs[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("is_causal", [False, True])
def test_dropout_gradients(device, dtype, is_causal):
    """Gradients with dropout against the float64 reference that applies the very keep mask the forward
    used, recovered with value = eye(S) and the same seed (the mask depends only on the seed and the
    position (b, h, i, j), not on the values)."""
    B, H, S, p = 2, 2, 48, 0.4
    qe, ke, ve = eye_inputs(B, H, S, dtype, device)
    torch.manual_seed(5)
    keep = (sdpa(qe, ke, ve, dropout_p=p, is_causal=is_causal) != 0).cpu()
    if is_causal:  # entries above the diagonal are 0 either way; they carry no gradient
        keep |= ~causal_mask(S, S)
    q, k, v = qkv((B, H), S, S, 16, S, dtype, device)
    torch.manual_seed(5)
    out = sdpa(q, k, v, dropout_p=p, is_causal=is_causal)
    grad_out = make(out.shape, dtype, device, 9)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)
    qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        probs = F.scaled_dot_product_attention(qd, kd, torch.eye(S, dtype=torch.float64).expand(B, H, S, S),
                                               is_causal=is_causal)
    ref = (probs * keep / (1 - p)) @ vd
    close(out, ref.detach(), dtype, "output with dropout")
    grads = torch.autograd.grad(ref, (qd, kd, vd), grad_out.cpu().double())
    for name, a, r in (("grad_query", dq, grads[0]), ("grad_key", dk, grads[1]), ("grad_value", dv, grads[2])):
        close(a, r, dtype, name)


def test_dropout_zero_is_deterministic_and_exact(device):
    q, k, v = qkv((2, 2), 5, 7, 8, 8, torch.float32, device, grad=False)
    assert torch.equal(sdpa(q, k, v, dropout_p=0.0), sdpa(q, k, v))


# ------------------------------------------------------------------ the registered ops

def _op_inputs(B=2, Hq=2, Hkv=2, L=5, S=7, E=8, Ev=6, dtype=torch.float32, seed=0):
    q = make((B, Hq, L, E), dtype, "cpu", seed)
    k = make((B, Hkv, S, E), dtype, "cpu", seed + 1)
    v = make((B, Hkv, S, Ev), dtype, "cpu", seed + 2)
    return q, k, v


def test_opcheck():
    ops = torch.ops.fastcv
    q, k, v = _op_inputs()
    mask = random_mask((1, 1, 5, 7), "additive", torch.float32, "cpu").expand(2, 2, 5, 7)
    cases = [
        (q, k, v, None, 0.0, False, 0.35, 0),
        (q, k, v, mask, 0.0, True, 0.35, 0),
        (*_op_inputs(Hq=4, Hkv=2, L=7, S=5, dtype=torch.float64), None, 0.25, True, 0.5, 1234),
        (*_op_inputs(B=1, Hq=1, Hkv=1, L=3, S=0, E=4, Ev=4), None, 0.0, False, 0.5, 0),
    ]
    for args in cases:
        grad_args = (args[0].clone().requires_grad_(), args[1].clone().requires_grad_(),
                     args[2].clone().requires_grad_(), *args[3:])
        torch.library.opcheck(ops.attention_forward, grad_args)
        out, lse = ops.attention_forward(*args)
        torch.library.opcheck(ops.attention_backward, (torch.randn_like(out), *args[:3], out, lse, *args[3:], False))


def test_op_rejects_bad_arguments():
    """Direct torch.ops.fastcv calls with what only the public function would have fixed up."""
    ops = torch.ops.fastcv
    q, k, v = _op_inputs()
    with pytest.raises(ValueError, match="4-D"):
        ops.attention_forward(q[0], k[0], v[0], None, 0.0, False, 1.0, 0)
    with pytest.raises(ValueError, match="mask must be a torch.float32"):
        ops.attention_forward(q, k, v, torch.zeros(2, 2, 5, 7, dtype=torch.float64), 0.0, False, 1.0, 0)
    with pytest.raises(ValueError, match="mask must be a torch.float32"):
        ops.attention_forward(q, k, v, torch.zeros(5, 7), 0.0, False, 1.0, 0)
    with pytest.raises(ValueError, match="incompatible"):
        ops.attention_forward(q, k[..., :4], v, None, 0.0, False, 1.0, 0)


def test_compile_fullgraph(device):
    q, k, v = qkv((2, 3), 9, 13, 16, 8, torch.float32, device)
    mask = random_mask((9, 13), "bool", torch.float32, device)

    def fn(a, b, c, m):
        return sdpa(a * 2, b, c, m, is_causal=True, scale=0.3).relu()

    compiled = torch.compile(fn, fullgraph=True)
    out_c = compiled(q, k, v, mask)
    out_e = fn(q, k, v, mask)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    g = make(out_e.shape, torch.float32, device, 4)
    grads_c = torch.autograd.grad(out_c, (q, k, v), g)
    grads_e = torch.autograd.grad(out_e, (q, k, v), g)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("with_mask", [False, True])
def test_dispatcher_and_direct_paths_agree(device, with_mask):
    """Inputs that require grad go through torch.ops.fastcv (autograd); plain ones run the implementation
    directly. Both must give the identical output."""
    q, k, v = qkv((2, 3), 9, 13, 16, 8, torch.float32, device, grad=False)
    mask = random_mask((9, 13), "additive", torch.float32, device) if with_mask else None
    direct = sdpa(q, k, v, mask, is_causal=True)
    through = sdpa(q.clone().requires_grad_(), k.clone().requires_grad_(), v, mask, is_causal=True)
    assert through.requires_grad and through.grad_fn is not None
    assert torch.equal(direct, through.detach())
    with torch.no_grad():
        assert torch.equal(direct, sdpa(q.clone().requires_grad_(), k, v, mask, is_causal=True))
    # and against the registered op called by hand
    m4 = None if mask is None else mask.float().expand(2, 3, 9, 13)
    out, lse = torch.ops.fastcv.attention_forward(q, k, v, m4, 0.0, True, 0.25, 0)
    assert torch.equal(direct, out)
    assert lse.shape == (2, 3, 9) and lse.dtype == torch.float32


# ------------------------------------------------------------------ empty tensors

EMPTY = {  # (lead, L, S)
    "B0": ((0, 2), 3, 5),
    "H0": ((2, 0), 3, 5),
    "L0": ((2, 2), 0, 5),
    "S0": ((2, 2), 3, 0),
    "L0S0": ((2, 2), 0, 0),
}


@pytest.mark.parametrize("case", list(EMPTY))
@pytest.mark.parametrize("with_mask", [False, True])
def test_empty_tensors(device, case, with_mask):
    """Shapes and values as PyTorch's op; with no keys (S = 0) PyTorch's math backend gives 0 (an empty
    softmax is a fully masked row), as documented for our kernels; gradients flow as zeros."""
    lead, L, S = EMPTY[case]
    q, k, v = qkv(lead, L, S, 8, 4, torch.float32, device)
    mask = random_mask((L, S), "bool", torch.float32, device) if with_mask else None
    out = sdpa(q, k, v, mask, is_causal=not with_mask)
    ref, _ = reference(q, k, v, mask=mask, is_causal=not with_mask)
    assert out.shape == ref.shape == (*lead, L, 4)
    assert torch.equal(out.cpu().double(), ref), "PyTorch gives 0 for rows without keys"
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for g, t in ((dq, q), (dk, k), (dv, v)):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(g))


def test_empty_head_dims(device):
    """E = 0 (scores all 0: uniform attention) and Ev = 0 (an empty output), as PyTorch."""
    q, k, v = qkv((1, 2), 3, 5, 0, 4, torch.float32, device)
    check(q, k, v, scale=1.0)
    q, k, v = qkv((1, 2), 3, 5, 4, 0, torch.float32, device)
    assert sdpa(q, k, v).shape == (1, 2, 3, 0)


# ------------------------------------------------------------------ threads and strides

@pytest.mark.parametrize("heads,kv_heads,keys", [((2, 4), 2, 129), ((1, 1), 1, 600)], ids=["gqa", "one_head"])
def test_thread_count_does_not_change_results(heads, kv_heads, keys):
    """Forward and backward bit-identical with 1 and 2 threads (causal, mask, GQA, dropout), also with
    fewer heads than threads, where the backward splits a head's keys over several tasks."""
    q, k, v = qkv(heads, 67, keys, 40, 24, torch.float32, "cpu", hkv=kv_heads)
    mask = random_mask((heads[0], 1, 67, keys), "additive", torch.float32, "cpu")
    g = make((*heads, 67, 24), torch.float32, "cpu", 11)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            for kw in (dict(is_causal=True, attn_mask=mask), dict(dropout_p=0.2)):
                torch.manual_seed(3)
                out = sdpa(q, k, v, enable_gqa=True, **kw)
                results.append((out.detach(), *torch.autograd.grad(out, (q, k, v), g)))
    finally:
        torch.set_num_threads(before)
    for run in (results[2:4], results[4:6]):
        for mine, ref in zip(run, results[0:2]):
            for a, b in zip(mine, ref):
                assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_non_contiguous(device, dtype):
    """[B, L, H, E] tensors permuted to [B, H, L, E] (as MultiheadAttention produces), a transposed mask and
    a sliced value: the same results as contiguous copies, and gradients shaped as the inputs."""
    B, H, L, S, E = 2, 3, 7, 11, 16
    qb, kb = make((B, L, H, E), dtype, device, 0), make((B, S, H, E), dtype, device, 1)
    vb = make((B, S, H, 2 * E), dtype, device, 2)[..., ::2]
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in (qb, kb, vb))
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    mask = random_mask((S, L), "additive", dtype, device).t()
    out = check(q, k, v, mask, is_causal=True)
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    out_c = sdpa(qc, kc, vc, mask.contiguous(), is_causal=True)
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=1e-3)
    torch.testing.assert_close(out, out_c, **tol)
    g = make(out.shape, dtype, device, 5)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(out_c, (qc, kc, vc), g)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("layout", ["sum", "transposed", "row_sums", "sliced"])
def test_grad_out_layouts(device, layout):
    """The gradient reaching the op is whatever autograd hands over: out.sum() gives an expanded tensor (every
    stride 0), a use of out.transpose(-1, -2) a transposed one (last stride L), out.sum(-1) one expanded along
    the last dim. All must give the reference gradients."""
    q, k, v = qkv((2, 3), 7, 9, 16, 16, torch.float64, device)
    w = make((2, 3, 16, 7), torch.float64, device, 8)
    loss = {
        "sum": lambda o: o.sum(),
        "transposed": lambda o: (o.transpose(-1, -2) * w).sum(),
        "row_sums": lambda o: (o.sum(-1) * w[:, :, 0]).sum(),
        "sliced": lambda o: (o[..., ::2] * w.transpose(-1, -2)[..., ::2]).sum(),
    }[layout]
    grads = torch.autograd.grad(loss(sdpa(q, k, v)), (q, k, v))
    qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.autograd.grad(loss(F.scaled_dot_product_attention(qd, kd, vd)), (qd, kd, vd))
    for name, a, r in zip(("grad_query", "grad_key", "grad_value"), grads, ref):
        close(a, r.cpu(), torch.float64, name)


def test_broadcast_key_value_views(device):
    """key and value expanded over the heads (stride 0), as a user sharing one key across heads would pass."""
    q = make((2, 4, 5, 8), torch.float32, device).requires_grad_()
    k1, v1 = make((2, 1, 9, 8), torch.float32, device, 1), make((2, 1, 9, 8), torch.float32, device, 2)
    k, v = k1.expand(2, 4, 9, 8).requires_grad_(), v1.expand(2, 4, 9, 8).requires_grad_()
    check(q, k, v)


# ------------------------------------------------------------------ bad input

def _t(*shape, dtype=torch.float32, **kw):
    return torch.zeros(shape, dtype=dtype, **kw)


BAD = {
    "head_dims": (lambda: (_t(2, 3, 5, 8), _t(2, 3, 7, 4), _t(2, 3, 7, 8)), {}, ValueError,
                  r"key's head dim \(4\).*query's \(8\)"),
    "batch_dims": (lambda: (_t(2, 3, 5, 8), _t(3, 3, 7, 8), _t(3, 3, 7, 8)), {}, ValueError,
                   "query.*key.*value.*leading"),
    "kv_batch_dims": (lambda: (_t(2, 3, 5, 8), _t(2, 3, 7, 8), _t(3, 3, 7, 8)), {}, ValueError,
                      "query.*key.*value.*broadcast"),
    "query_heads_vs_key": (lambda: (_t(2, 3, 5, 8), _t(2, 7, 8), _t(2, 7, 8)), {}, ValueError,
                           "query has 3 heads and key 2"),
    "value_length": (lambda: (_t(2, 3, 5, 8), _t(2, 3, 7, 8), _t(2, 3, 6, 8)), {}, ValueError,
                     r"value's length \(6\).*key's \(7\)"),
    "rank1": (lambda: (_t(8), _t(7, 8), _t(7, 8)), {}, ValueError, "query must have at least 2 dimensions"),
    "mask_broadcast": (lambda: (_t(2, 3, 5, 8), _t(2, 3, 7, 8), _t(2, 3, 7, 8)),
                       {"attn_mask": _t(5, 6, dtype=torch.bool)}, ValueError, r"attn_mask of shape \[5, 6\]"),
    "mask_heads": (lambda: (_t(2, 3, 5, 8), _t(2, 3, 7, 8), _t(2, 3, 7, 8)),
                   {"attn_mask": _t(2, 2, 5, 7, dtype=torch.bool)}, ValueError, "attn_mask"),
    "mask_rank": (lambda: (_t(2, 3, 5, 8), _t(2, 3, 7, 8), _t(2, 3, 7, 8)),
                  {"attn_mask": _t(1, 2, 3, 5, 7, dtype=torch.bool)}, ValueError, "attn_mask"),
    "mask_int": (lambda: (_t(2, 3, 5, 8), _t(2, 3, 7, 8), _t(2, 3, 7, 8)),
                 {"attn_mask": _t(5, 7, dtype=torch.int64)}, TypeError, "attn_mask must be bool"),
    "mask_float64": (lambda: (_t(2, 3, 5, 8), _t(2, 3, 7, 8), _t(2, 3, 7, 8)),
                     {"attn_mask": _t(5, 7, dtype=torch.float64)}, TypeError, "attn_mask.*torch.float64"),
    "mask_not_tensor": (lambda: (_t(2, 3, 5, 8), _t(2, 3, 7, 8), _t(2, 3, 7, 8)),
                        {"attn_mask": [[True] * 7] * 5}, TypeError, "attn_mask must be a Tensor"),
    "dropout_negative": (lambda: (_t(2, 3, 5, 8), _t(2, 3, 7, 8), _t(2, 3, 7, 8)), {"dropout_p": -0.1}, ValueError,
                         "dropout_p"),
    "dropout_one": (lambda: (_t(2, 3, 5, 8), _t(2, 3, 7, 8), _t(2, 3, 7, 8)), {"dropout_p": 1.0}, ValueError,
                    "dropout_p"),
    "dropout_nan": (lambda: (_t(2, 3, 5, 8), _t(2, 3, 7, 8), _t(2, 3, 7, 8)), {"dropout_p": math.nan}, ValueError,
                    "dropout_p"),
    "scale_nan": (lambda: (_t(2, 3, 5, 8), _t(2, 3, 7, 8), _t(2, 3, 7, 8)), {"scale": math.nan}, ValueError,
                  "scale"),
    "head_dim_too_large": (lambda: (_t(1, 1, 2, attention_module.MAX_HEAD_DIM["cpu"] + 1),
                                    _t(1, 1, 3, attention_module.MAX_HEAD_DIM["cpu"] + 1),
                                    _t(1, 1, 3, 8)), {}, ValueError, "head dims up to .*query"),
    "value_dim_too_large": (lambda: (_t(1, 1, 2, 8), _t(1, 1, 3, 8),
                                     _t(1, 1, 3, attention_module.MAX_HEAD_DIM["cpu"] + 1)), {}, ValueError,
                            "head dims up to .*value"),
    "gqa_not_divisible": (lambda: (_t(2, 6, 5, 8), _t(2, 4, 7, 8), _t(2, 4, 7, 8)), {"enable_gqa": True},
                          ValueError, "query has 6 heads and key 4"),
    "gqa_2d": (lambda: (_t(5, 8), _t(7, 8), _t(7, 8)), {"enable_gqa": True}, ValueError,
               "enable_gqa=True needs.*3-D"),
    "gqa_query_fewer_heads": (lambda: (_t(2, 1, 5, 8), _t(2, 3, 7, 8), _t(2, 3, 7, 8)), {"enable_gqa": True},
                              ValueError, "query has 1 heads and key 3"),
    # PyTorch adds the mask in place to the scores of broadcast(query, key): value's extra dims do not count
    "mask_beyond_scores": (lambda: (_t(3, 5, 8), _t(3, 7, 8), _t(2, 3, 7, 8)),
                           {"attn_mask": _t(2, 3, 5, 7)}, ValueError, r"attn_mask of shape \[2, 3, 5, 7\]"),
    "mask_rank_2d": (lambda: (_t(5, 8), _t(7, 8), _t(7, 8)), {"attn_mask": _t(1, 5, 7)}, ValueError,
                     r"attn_mask of shape \[1, 5, 7\]"),
    "mixed_dtypes": (lambda: (_t(2, 3, 5, 8), _t(2, 3, 7, 8, dtype=torch.float64), _t(2, 3, 7, 8)), {}, TypeError,
                     "key and value must have the query's dtype"),
    "int_query": (lambda: (_t(2, 3, 5, 8, dtype=torch.int64),) * 3, {}, TypeError, "query must be float32"),
    "query_not_tensor": (lambda: ([[0.0] * 8] * 5, _t(7, 8), _t(7, 8)), {}, TypeError, "query must be a Tensor"),
    "value_not_tensor": (lambda: (_t(5, 8), _t(7, 8), None), {}, TypeError, "value must be a Tensor"),
    "mixed_devices": (lambda: (_t(5, 8), _t(7, 8, device="meta"), _t(7, 8)), {}, ValueError,
                      "key and value must be on the query's device"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    make_args, kwargs, error, match = BAD[case]
    with pytest.raises(error, match=match):
        sdpa(*make_args(), **kwargs)


def test_head_dim_limit(device):
    """The largest supported head dim works; one more is refused with a message naming the limit."""
    limit = attention_module.MAX_HEAD_DIM[device]
    q, k, v = qkv((1, 1), 3, 5, limit, limit, torch.float32, device)
    check(q, k, v)
    for e, ev in ((limit + 1, 8), (8, limit + 1)):
        q, k, v = qkv((1, 1), 3, 5, e, ev, torch.float32, device, grad=False)
        with pytest.raises(ValueError, match=f"head dims up to {limit}"):
            sdpa(q, k, v)


def test_mask_requiring_grad_is_fine_without_grad():
    q, k, v = qkv((1, 2), 3, 4, 8, 8, torch.float32, "cpu", grad=False)
    mask = torch.zeros(3, 4, requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(q, k, v, mask), sdpa(q, k, v))


# ------------------------------------------------------------------ broadcasting between query, key and value

# (query, key, value shapes, enable_gqa): every rank combination F.scaled_dot_product_attention's math backend
# accepts; L, S, E = 5, 7, 8 and Ev = 6.
BROADCAST = {
    "q4_kv3": ((2, 3, 5, 8), (3, 7, 8), (3, 7, 6), False),
    "q4_kv4_batch1": ((2, 3, 5, 8), (1, 3, 7, 8), (1, 3, 7, 6), False),
    "q4_kv_one_head": ((2, 3, 5, 8), (2, 1, 7, 8), (2, 1, 7, 6), False),
    "q_batch1": ((1, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 6), False),
    "q_one_head": ((2, 1, 5, 8), (2, 3, 7, 8), (2, 3, 7, 6), False),
    "k_v_differ": ((2, 3, 5, 8), (2, 3, 7, 8), (1, 3, 7, 6), False),
    "q3_kv4": ((3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 6), False),
    "q2_kv4": ((5, 8), (2, 3, 7, 8), (2, 3, 7, 6), False),
    "q4_kv2": ((2, 3, 5, 8), (7, 8), (7, 6), False),
    "q5_kv3": ((2, 2, 3, 5, 8), (3, 7, 8), (3, 7, 6), False),
    "q5_kv5_unmergeable": ((2, 2, 3, 5, 8), (2, 1, 3, 7, 8), (2, 1, 3, 7, 6), False),
    "value_beyond_scores": ((3, 5, 8), (3, 7, 8), (2, 3, 7, 6), False),
    "gqa_kv3": ((2, 6, 5, 8), (3, 7, 8), (3, 7, 6), True),
    "gqa_k_v_heads_differ": ((2, 6, 5, 8), (2, 2, 7, 8), (2, 3, 7, 6), True),
    "gqa_5d_batch1": ((2, 2, 6, 5, 8), (1, 2, 3, 7, 8), (1, 2, 3, 7, 6), True),
    "gqa_q_batch1": ((1, 6, 5, 8), (2, 2, 7, 8), (2, 2, 7, 6), True),
}


def _broadcast_inputs(case, dtype, device):
    qs, ks, vs, gqa = BROADCAST[case]
    q, k, v = make(qs, dtype, device, 0), make(ks, dtype, device, 1), make(vs, dtype, device, 2)
    return [t.requires_grad_() for t in (q, k, v)], gqa


@pytest.mark.parametrize("case", list(BROADCAST))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_broadcast_inputs(device, case, dtype):
    """Outputs and gradients (each at its input's shape, summed over the dims it broadcasts over) as PyTorch's."""
    (q, k, v), gqa = _broadcast_inputs(case, dtype, device)
    out = check(q, k, v, enable_gqa=gqa)
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(*(t.detach().cpu() for t in (q, k, v)), enable_gqa=gqa)
    assert out.shape == ref.shape


@pytest.mark.parametrize("case", ["q4_kv3", "q_one_head", "q5_kv5_unmergeable", "gqa_5d_batch1"])
def test_broadcast_inputs_with_mask_causal_dropout(device, case):
    """Broadcast inputs together with a broadcast mask (that requires grad) and causal masking; with dropout,
    the same seed gives the same output twice and the unmergeable 5-D split draws different masks per call."""
    (q, k, v), gqa = _broadcast_inputs(case, torch.float64, device)
    with sdpa_kernel(SDPBackend.MATH):
        scores = F.scaled_dot_product_attention(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(),
                                                enable_gqa=gqa)
    mask = random_mask((1, 5, 7), "additive", torch.float64, device).requires_grad_()
    check(q, k, v, mask, is_causal=True, enable_gqa=gqa)
    runs = []
    for _ in range(2):
        torch.manual_seed(4)
        runs.append(sdpa(q, k, v, mask, dropout_p=0.5, enable_gqa=gqa))
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == scores.shape
    grads = torch.autograd.grad(runs[0].sum(), (q, k, v, mask))
    assert all(g.shape == t.shape and torch.isfinite(g).all() for g, t in zip(grads, (q, k, v, mask)))


def test_broadcast_reads_inputs_in_place(monkeypatch):
    """Broadcast inputs and masks reach the kernels as views of the caller's memory (stride 0 along the broadcast
    dims), in the forward and the backward: no input is expanded into a copy."""
    calls = []
    fwd, bwd = attention_module._forward_call, attention_module._backward_call

    def record_fwd(q, k, v, mask, *rest):
        calls.append(("fwd", q, k, v, mask))
        return fwd(q, k, v, mask, *rest)

    def record_bwd(grad_out, q, k, v, out, lse, mask, *rest):
        calls.append(("bwd", q, k, v, mask))
        return bwd(grad_out, q, k, v, out, lse, mask, *rest)

    monkeypatch.setattr(attention_module, "_forward_call", record_fwd)
    monkeypatch.setattr(attention_module, "_backward_call", record_bwd)
    for case in ("q4_kv3", "q_one_head", "q2_kv4", "q5_kv5_unmergeable", "gqa_5d_batch1"):
        (q, k, v), gqa = _broadcast_inputs(case, torch.float32, "cpu")
        mask = torch.randn(5, 7).requires_grad_()
        calls.clear()
        out = sdpa(q, k, v, mask, enable_gqa=gqa)
        out.sum().backward()
        assert {c[0] for c in calls} == {"fwd", "bwd"}
        for _, *views in calls:
            for view, src in zip(views, (q, k, v, mask)):
                assert view.untyped_storage().data_ptr() == src.untyped_storage().data_ptr(), case
                assert view.untyped_storage().nbytes() == src.untyped_storage().nbytes(), case
            assert views[3].stride()[:2] == (0, 0), case  # the mask broadcast over batch and heads
        # batch dims of an input expanded along some but not all of them merge into no single stride: one
        # call per index of the first dim (2 here), forward and backward
        assert len(calls) == (4 if case in ("q5_kv5_unmergeable", "gqa_5d_batch1") else 2), case


# ------------------------------------------------------------------ the gradient of a floating mask

# mask shapes for B, H, L, S = 2, 3, 5, 9 (Swin's relative-position bias is [H, L, S] or [1, H, L, S])
MASK_GRAD_SHAPES = {
    "LS": (5, 9),
    "11LS": (1, 1, 5, 9),
    "HLS": (3, 5, 9),
    "1HLS": (1, 3, 5, 9),
    "B1LS": (2, 1, 5, 9),
    "BHLS": (2, 3, 5, 9),
    "BH1S": (2, 3, 1, 9),
    "1HL1": (1, 3, 5, 1),
    "1S": (1, 9),
    "L1": (5, 1),
    "scalar": (1,),
}


def reference_mask_grad(q, k, v, mask, grad_out, is_causal=False, enable_gqa=False, keep=None, p=0.0):
    """float64: the output and the gradients of q, k, v and the mask, through PyTorch's math (softmax of the
    scores plus the mask; with `keep`, the dropout mask the kernels drew), and the largest |dS| of a full
    [B, H, L, S] mask: the scale of the mask gradient, which is ~0 for masks that broadcast over the keys
    (adding one value to a whole row of scores changes no probability)."""
    qd, kd, vd, md = (t.detach().cpu().double().requires_grad_() for t in (q, k, v, mask))
    L, S = q.shape[-2], k.shape[-2]
    full = torch.zeros((*q.shape[:-1], S), dtype=torch.float64, requires_grad=True)
    m = md + full
    if is_causal:
        m = m.masked_fill(~causal_mask(L, S), -INF)
    if keep is None:
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(qd, kd, vd, m, enable_gqa=enable_gqa)
    else:
        group = q.shape[-3] // k.shape[-3]
        s = qd @ kd.repeat_interleave(group, -3).transpose(-1, -2) / math.sqrt(q.shape[-1]) + m
        out = (torch.softmax(s, -1) * keep / (1 - p)) @ vd.repeat_interleave(group, -3)
    grads = torch.autograd.grad(out, (qd, kd, vd, md, full), grad_out.detach().cpu().double())
    return out.detach(), grads[:4], grads[4].abs().max().item()


def check_mask_grad(q, k, v, mask, is_causal=False, enable_gqa=False, seed=7, dropout_p=0.0, keep=None):
    dtype = q.dtype
    if dropout_p:
        torch.manual_seed(seed)
    out = sdpa(q, k, v, mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=enable_gqa)
    grad_out = make(out.shape, dtype, q.device, seed)
    ref, ref_grads, ds_scale = reference_mask_grad(q, k, v, mask, grad_out, is_causal, enable_gqa, keep, dropout_p)
    close(out, ref, dtype, "output")
    grads = torch.autograd.grad(out, (q, k, v, mask), grad_out)
    for name, a, r in zip(("grad_query", "grad_key", "grad_value"), grads, ref_grads):
        close(a, r, dtype, name)
    dmask = grads[3]
    assert dmask.shape == mask.shape and dmask.dtype == mask.dtype
    close(dmask, ref_grads[3], dtype, "grad_mask", scale=max(ref_grads[3].abs().max().item(), ds_scale))
    return dmask


@pytest.mark.parametrize("shape", list(MASK_GRAD_SHAPES))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_mask_grad(device, shape, is_causal, dtype):
    q, k, v = qkv((2, 3), 5, 9, 16, 12, dtype, device)
    shape = MASK_GRAD_SHAPES[shape]  # -inf entries, but not a whole mask of them
    mask = random_mask(shape, "additive", dtype, device, fraction=0.2 if shape[-1] > 1 else 0.0).requires_grad_()
    dmask = check_mask_grad(q, k, v, mask, is_causal)
    masked = (mask == -INF).cpu()
    assert torch.equal(dmask.cpu()[masked], torch.zeros(int(masked.sum()), dtype=dtype)), "-inf entries: grad 0"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", ["HLS", "B1LS", "BHLS"])
def test_mask_grad_half(device, dtype, shape):
    """float16/bfloat16 masks: the gradient comes back in the mask's dtype; dS is computed in float32 from
    the exactly rounded inputs and rounded once, so TOL's input-dtype tolerances hold (as for dQ, dK)."""
    q, k, v = qkv((2, 3), 5, 9, 16, 12, dtype, device)
    mask = random_mask(MASK_GRAD_SHAPES[shape], "additive", dtype, device).requires_grad_()
    check_mask_grad(q, k, v, mask)


def test_mask_grad_long(device):
    """Several key and query blocks (L = 150, S = 333) with a Swin-like [H, L, S] bias, float32."""
    q, k, v = qkv((2, 2), 150, 333, 32, 32, torch.float32, device)
    mask = make((2, 150, 333), torch.float32, device, 5).requires_grad_()
    check_mask_grad(q, k, v, mask, is_causal=True)
    check_mask_grad(q, k, v, mask)


@pytest.mark.parametrize("shape", [(6, 7, 19), (2, 1, 7, 19), (7, 19), (1, 6, 7, 1)], ids=str)
def test_mask_grad_gqa(device, shape):
    q, k, v = qkv((2, 6), 7, 19, 16, 8, torch.float64, device, hkv=2)
    mask = make(shape, torch.float64, device, 5).requires_grad_()
    check_mask_grad(q, k, v, mask, enable_gqa=True)
    check_mask_grad(q, k, v, mask, is_causal=True, enable_gqa=True)


def test_mask_grad_fully_masked_rows(device):
    """Rows whose keys are all -inf: output 0 and every gradient 0 there, mask's included (PyTorch's math gives 0
    too, no NaN); the same for single -inf entries."""
    B, H, L, S = 2, 2, 6, 40
    q, k, v = qkv((B, H), L, S, 16, 16, torch.float64, device)
    mask = random_mask((B, H, L, S), "additive", torch.float64, device, fraction=0.2).cpu()
    mask[0, 0, 1] = mask[1, 1] = -INF
    mask = mask.to(device).requires_grad_()
    dmask = check_mask_grad(q, k, v, mask).cpu()
    assert torch.isfinite(dmask).all()
    assert torch.equal(dmask[0, 0, 1], torch.zeros(S, dtype=torch.float64))
    assert torch.equal(dmask[1, 1], torch.zeros(L, S, dtype=torch.float64))


@pytest.mark.parametrize("shape", ["HLS", "LS", "BHLS"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_mask_grad_dropout(device, shape, is_causal):
    """With dropout, against the float64 reference that applies the very keep mask the forward drew (recovered
    with value = eye(S), as test_dropout_gradients does)."""
    B, H, S, p = 2, 3, 24, 0.3
    qe, ke, ve = eye_inputs(B, H, S, torch.float64, device)
    torch.manual_seed(5)
    keep = (sdpa(qe, ke, ve, dropout_p=p, is_causal=is_causal) != 0).cpu()
    if is_causal:
        keep |= ~causal_mask(S, S)
    q, k, v = qkv((B, H), S, S, 16, 16, torch.float64, device)
    mask = make({"HLS": (H, S, S), "LS": (S, S), "BHLS": (B, H, S, S)}[shape], torch.float64, device, 6)
    check_mask_grad(q, k, v, mask.requires_grad_(), is_causal, seed=5, dropout_p=p, keep=keep.double())


GRADCHECK_MASKS = {"LS": (3, 5), "HLS": (2, 3, 5), "B1LS": (2, 1, 3, 5), "BHLS": (2, 2, 3, 5), "BH1S": (2, 2, 1, 5),
                   "1HL1": (1, 2, 3, 1)}


@pytest.mark.parametrize("shape", list(GRADCHECK_MASKS))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_gradcheck_mask(shape, is_causal):
    q, k, v = qkv((2, 2), 3, 5, 4, 3, torch.float64, "cpu")
    mask = make(GRADCHECK_MASKS[shape], torch.float64, "cpu", 4).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c, m: sdpa(a, b, c, m, is_causal=is_causal), (q, k, v, mask))


def test_gradcheck_mask_gqa_dropout():
    q, k, v = qkv((1, 4), 3, 5, 4, 3, torch.float64, "cpu", hkv=2)
    mask = make((4, 3, 5), torch.float64, "cpu", 4).requires_grad_()

    def fn(a, b, c, m):
        torch.manual_seed(0)
        return sdpa(a, b, c, m, dropout_p=0.3, enable_gqa=True)

    assert torch.autograd.gradcheck(fn, (q, k, v, mask))


def test_mask_grad_only_when_needed(monkeypatch):
    """The backward asks the kernels for the mask's gradient (an accumulator) only when the mask requires grad."""
    q, k, v = qkv((1, 2), 3, 5, 8, 8, torch.float32, "cpu")
    seen = []
    real = attention_module._backward_call

    def spy(*args):
        seen.append(args[-1] is not None)
        return real(*args)

    monkeypatch.setattr(attention_module, "_backward_call", spy)
    mask = torch.randn(3, 5)
    sdpa(q, k, v, mask).sum().backward()
    sdpa(q, k, v, mask.requires_grad_()).sum().backward()
    assert seen == [False, True]
    assert mask.grad is not None and mask.grad.shape == (3, 5)


def test_mask_grad_thread_count_does_not_change_results():
    """Forward and backward, the mask's gradient included, bit-identical with 1 and 2 threads: few heads (so
    the backward splits key blocks into chunks), masks that broadcast over batch, heads, queries or keys."""
    q, k, v = qkv((1, 4), 67, 300, 40, 24, torch.float32, "cpu", hkv=2)
    g = make((1, 4, 67, 24), torch.float32, "cpu", 11)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            run = []
            for shape, kw in (((4, 67, 300), dict(is_causal=True)), ((67, 300), dict(dropout_p=0.2)),
                              ((1, 4, 67, 1), {}), ((1, 1, 1, 300), {})):
                mask = make(shape, torch.float32, "cpu", 12).requires_grad_()
                torch.manual_seed(3)
                out = sdpa(q, k, v, mask, enable_gqa=True, **kw)
                run.append((out.detach(), *torch.autograd.grad(out, (q, k, v, mask), g)))
            results.append(run)
    finally:
        torch.set_num_threads(before)
    for run in results[1:]:
        for mine, ref in zip(run, results[0]):
            for a, b in zip(mine, ref):
                assert torch.equal(a, b)


def test_opcheck_mask_grad():
    ops = torch.ops.fastcv
    q, k, v = _op_inputs()
    for shape in ((1, 1, 5, 7), (2, 1, 5, 7), (1, 2, 5, 1), (2, 2, 5, 7)):
        mask = random_mask(shape, "additive", torch.float32, "cpu", fraction=0.0)
        args = (q, k, v, mask, 0.0, True, 0.35, 0)
        grad_args = (q.clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_(),
                     mask.clone().requires_grad_(), *args[4:])
        torch.library.opcheck(ops.attention_forward, grad_args)
        out, lse = ops.attention_forward(*args)
        torch.library.opcheck(ops.attention_backward, (torch.randn_like(out), *args[:3], out, lse, *args[3:], True))
        dq, dk, dv, dmask = ops.attention_backward(torch.randn_like(out), *args[:3], out, lse, *args[3:], True)
        assert dmask.shape == mask.shape and dmask.dtype == torch.float32
    with pytest.raises(ValueError, match="mask_grad=True needs a mask"):
        ops.attention_backward(torch.randn_like(out), q, k, v, out, lse, None, 0.0, False, 0.35, 0, True)


def test_compile_mask_grad(device):
    q, k, v = qkv((2, 3), 9, 13, 16, 8, torch.float32, device)
    bias = make((3, 9, 13), torch.float32, device, 6).requires_grad_()

    def fn(a, b, c, m):
        return sdpa(a, b, c, m * 2, is_causal=True)

    out_c = torch.compile(fn, fullgraph=True)(q, k, v, bias)
    out_e = fn(q, k, v, bias)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    g = make(out_e.shape, torch.float32, device, 4)
    for a, b in zip(torch.autograd.grad(out_c, (q, bias), g), torch.autograd.grad(out_e, (q, bias), g)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", [c for c in BAD if BAD[c][2] is ValueError and "attn_mask" not in BAD[c][1]
                                  and "dropout_p" not in BAD[c][1] and "scale" not in BAD[c][1]
                                  and "too_large" not in c and c != "mixed_devices"]
                         + ["mask_broadcast", "mask_heads", "mask_rank", "mask_beyond_scores", "mask_rank_2d"])
def test_bad_shapes_pytorch_rejects_too(case):
    """Each shape fastcv refuses, F.scaled_dot_product_attention (math backend) refuses as well."""
    make_args, kwargs, _, _ = BAD[case]
    with pytest.raises((RuntimeError, IndexError, ValueError)), sdpa_kernel(SDPBackend.MATH):
        F.scaled_dot_product_attention(*make_args(), **kwargs)
