"""Under torch.autocast every fastcv op does what its PyTorch or torchvision counterpart does, through
torch.ops.fastcv.*, the fastcv.ops functions and the fastcv.nn modules:

  convolution (F.conv2d, F.conv_transpose2d, conv2d_fused), attention (SDPA)
      autocast's lower-precision list on the CPU and on CUDA: floating inputs cast to the autocast dtype
  batch norm and its fused variants (F.batch_norm), im2col / col2im (F.unfold / F.fold)
      on no list: the op runs in its input's dtype (batch norm with float32 parameters for half input)
  roi_align, multi_scale_roi_align (torchvision): float32 compute, the output in the input's dtype
  nms, batched_nms, batched_nms_padded (torchvision's nms): float32 boxes and scores

Tolerances. Both sides get the same inputs, rounded identically by the casts, so what differs is the
rounding of results and intermediates in the reduced dtype: each rounding is at most half an ulp
(eps / 2 relative, eps = torch.finfo(dtype).eps), and the two sides round in different places (a fused
kernel rounds once where PyTorch's composition rounds twice; gradients pass through a rounded
grad_output and rounded saved tensors). A few ulps of the result's magnitude bound that, so the
comparisons use rtol = atol / max|expected| = K * eps with K small (3 for forwards, 6 for gradients);
float32 results (ops autocast leaves alone) are compared at float32's usual tolerance.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fastcv.nn as fnn
from conftest import HAS_CUDA
from fastcv import _library, ops
from fastcv.benchmarks.nms import distinct_scores, random_boxes

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")  # Triton-only ops


def amp(gpu_mark=needs_cuda):
    """(device type, autocast dtype): both dtypes on the CPU and on CUDA (which skip without a GPU)."""
    return [
        pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
        pytest.param("cpu", torch.float16, id="cpu-float16"),
        pytest.param("cuda", torch.float16, id="cuda-float16", marks=gpu_mark),
        pytest.param("cuda", torch.bfloat16, id="cuda-bfloat16", marks=gpu_mark),
    ]


AMP = amp()
AMP_GPU = amp(needs_gpu)


def rand(*shape, device, seed, dtype=torch.float32, grad=True):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


def close(actual, expected, k=3, computed_in=None):
    """actual has expected's dtype and its values within k ulps of the dtype they were computed in
    (theirs, or the forward output's for float32 gradients that came through a reduced-precision
    backward), at expected's scale."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    a, e = actual.detach().double(), expected.detach().double()
    computed_in = computed_in or expected.dtype
    if computed_in in (torch.float16, torch.bfloat16):
        eps = torch.finfo(computed_in).eps
        torch.testing.assert_close(a, e, rtol=k * eps, atol=k * eps * max(e.abs().max().item(), 1e-3))
    else:
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * max(e.abs().max().item(), 1.0))


def run(fn, leaves, device, dtype, seed=99):
    """fn(*leaves) under autocast, and the gradients of a random projection of it with respect to the
    leaves that require grad (the backward runs after the autocast region, as PyTorch recommends)."""
    with torch.autocast(device, dtype=dtype):
        out = fn(*leaves)
    wants = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    if not wants:
        return out, []
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(device=out.device, dtype=out.dtype)
    return out, list(torch.autograd.grad(out, wants, g))


def same_as_reference(fast, reference, leaves, device, dtype, k=3, kg=6):
    """fast and reference give outputs of one dtype and close values under autocast, and gradients that
    reach the leaves in the leaves' own dtypes, close to the reference's."""
    fresh = lambda: [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                     for t in leaves]
    fast_leaves, ref_leaves = fresh(), fresh()
    out, grads = run(fast, fast_leaves, device, dtype)
    ref, ref_grads = run(reference, ref_leaves, device, dtype)
    close(out, ref, k)
    wants = [t for t in fast_leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    for leaf, g, rg in zip(wants, grads, ref_grads):
        assert g.dtype == leaf.dtype, (g.dtype, leaf.dtype)
        close(g, rg, kg, computed_in=ref.dtype)
    return out, ref


def same_module(fast, reference, inputs, device, dtype, k=3, kg=6, call=lambda m, *x: m(*x)):
    """A fastcv.nn module and its torch counterpart (same state): outputs and parameter gradients."""
    reference.load_state_dict(fast.state_dict())
    outs = []
    for module in (fast, reference):
        xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
        params = [p for p in module.parameters() if p.requires_grad]
        with torch.autocast(device, dtype=dtype):
            out = call(module, *xs)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(device=out.device, dtype=out.dtype)
        leaves = params + [x for x in xs if x.requires_grad]
        outs.append((out, torch.autograd.grad(out, leaves, g), leaves))
    (out, grads, leaves), (ref, ref_grads, _) = outs
    close(out, ref, k)
    for leaf, g, rg in zip(leaves, grads, ref_grads):
        assert g.dtype == leaf.dtype == torch.float32
        close(g, rg, kg, computed_in=ref.dtype)
    return out, ref


# ---------------------------------------------------------------- convolution: the autocast dtype


CONV = {"dense": (4, 1), "grouped": (4, 2), "depthwise": (4, 4)}  # (in channels, groups)


@pytest.mark.parametrize("device, dtype", AMP)
@pytest.mark.parametrize("kind", list(CONV))
def test_conv2d(device, dtype, kind):
    c, groups = CONV[kind]
    x, w, b = rand(2, c, 9, 9, device=device, seed=0), rand(8, c // groups, 3, 3, device=device, seed=1), \
        rand(8, device=device, seed=2)
    ref = lambda x, w, b: F.conv2d(x, w, b, 2, 1, 1, groups)
    out, expected = same_as_reference(lambda x, w, b: torch.ops.fastcv.conv2d(x, w, b, [2, 2], [1, 1], [1, 1], groups),
                                      ref, [x, w, b], device, dtype)
    assert out.dtype == expected.dtype == dtype
    same_as_reference(lambda x, w, b: ops.conv2d(x, w, b, 2, 1, 1, groups), ref, [x, w, b], device, dtype)
    same_as_reference(lambda x, w, b: ops.conv2d(x[0], w, b, padding="same", groups=groups),  # unbatched, 'same'
                      lambda x, w, b: F.conv2d(x[0], w, b, padding="same", groups=groups), [x, w, b], device, dtype)


@pytest.mark.parametrize("device, dtype", AMP)
def test_conv2d_module(device, dtype):
    fast = fnn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect").to(device)
    out, _ = same_module(fast, nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect").to(device),
                         [rand(2, 4, 9, 9, device=device, seed=3)], device, dtype)
    assert out.dtype == dtype


@pytest.mark.parametrize("device, dtype", AMP)
def test_conv_transpose2d(device, dtype):
    x, w, b = rand(2, 4, 5, 5, device=device, seed=4), rand(4, 3, 3, 3, device=device, seed=5), \
        rand(3, device=device, seed=6)
    # torch.ops.fastcv.conv2d_input_grad is the transposed convolution (without bias)
    out, _ = same_as_reference(
        lambda x, w: torch.ops.fastcv.conv2d_input_grad(x, w, [10, 10], [2, 2], [1, 1], [1, 1], 1),
        lambda x, w: F.conv_transpose2d(x, w, None, 2, 1, output_padding=1), [x, w], device, dtype)
    assert out.dtype == dtype
    same_as_reference(lambda x, w, b: ops.conv_transpose2d(x, w, b, 2, 1, output_padding=1),
                      lambda x, w, b: F.conv_transpose2d(x, w, b, 2, 1, output_padding=1), [x, w, b], device, dtype)
    fast = fnn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1).to(device)
    same_module(fast, nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1).to(device), [x], device,
                dtype)


@pytest.mark.parametrize("device, dtype", AMP)
@pytest.mark.parametrize("residual_dtype", ["float32", "autocast"])
def test_conv2d_fused(device, dtype, residual_dtype):
    """conv2d_fused casts like F.conv2d: every floating input, the residual too, to the autocast dtype, so
    the output has F.conv2d's dtype. (PyTorch's unfused relu(conv2d + residual) with a float32 residual
    would promote to float32 in the add; the fused op rounds once, in the autocast dtype.)"""
    x, w, b = rand(2, 4, 8, 8, device=device, seed=7), rand(6, 4, 3, 3, device=device, seed=8), \
        rand(6, device=device, seed=9)
    r = rand(2, 6, 8, 8, device=device, seed=10)
    if residual_dtype == "autocast":
        r = r.detach().to(dtype).requires_grad_()

    def reference(x, w, b, r):  # the composition, with the residual in the autocast dtype
        y = F.conv2d(x, w, b, 1, 1)
        return torch.relu(y + r.to(y.dtype))

    # the fused kernel rounds once where the composition rounds twice: one more ulp
    out, _ = same_as_reference(lambda x, w, b, r: torch.ops.fastcv.conv2d_fused(x, w, b, r, True, [1, 1], [1, 1],
                                                                                [1, 1], 1),
                               reference, [x, w, b, r], device, dtype, k=4)
    assert out.dtype == dtype
    same_as_reference(lambda x, w, b, r: ops.conv2d_fused(x, w, b, 1, 1, residual=r, relu=True), reference,
                      [x, w, b, r], device, dtype, k=4)


@pytest.mark.parametrize("device, dtype", AMP)
def test_conv_float64_is_not_cast(device, dtype):
    """Autocast leaves float64 alone (as for F.conv2d), through the op and the wrappers."""
    x = rand(1, 2, 5, 5, device=device, seed=11, dtype=torch.float64)
    w = rand(3, 2, 3, 3, device=device, seed=12, dtype=torch.float64)
    with torch.autocast(device, dtype=dtype):
        outs = [torch.ops.fastcv.conv2d(x, w, None, [1, 1], [0, 0], [1, 1], 1), ops.conv2d(x, w),
                ops.conv_transpose2d(x, w.transpose(0, 1)), F.conv2d(x, w)]
    assert all(o.dtype == torch.float64 for o in outs)


# ---------------------------------------------------------------- attention: the autocast dtype


def _bf16_exact(*shape, device, seed):
    """A float32 additive mask whose values bfloat16 and float16 hold exactly (multiples of 1/4 in [-2, 2]):
    torch.ops.fastcv.attention_forward takes its mask in the compute dtype, float32, while
    F.scaled_dot_product_attention rounds a float mask to the autocast dtype."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-8, 9, shape, generator=g).float() / 4).to(device)


@pytest.mark.parametrize("device, dtype", AMP_GPU)
@pytest.mark.parametrize("mask_kind", ["none", "additive", "bool", "causal"])
def test_attention(device, dtype, mask_kind):
    q = rand(2, 3, 16, 8, device=device, seed=13)
    k, v = rand(2, 3, 12, 8, device=device, seed=14), rand(2, 3, 12, 8, device=device, seed=15)
    mask, causal = None, mask_kind == "causal"
    if mask_kind == "additive":
        mask = _bf16_exact(16, 12, device=device, seed=16)
    elif mask_kind == "bool":
        mask = torch.rand(16, 12, generator=torch.Generator().manual_seed(16)).to(device) > 0.3
    ref = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal)
    out, expected = same_as_reference(lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, mask, is_causal=causal),
                                      ref, [q, k, v], device, dtype)
    assert out.dtype == expected.dtype == dtype
    op_mask = None
    if mask is not None:  # the op's form: additive, float32, [B, H, L, S] (broadcast through strides)
        op_mask = mask if mask.is_floating_point() else torch.zeros(mask.shape, device=device).masked_fill(
            ~mask, float("-inf"))
        op_mask = op_mask.expand(2, 3, 16, 12)
    same_as_reference(lambda q, k, v: torch.ops.fastcv.attention_forward(q, k, v, op_mask, 0.0, causal, 8 ** -0.5,
                                                                         0)[0],
                      ref, [q, k, v], device, dtype)


@pytest.mark.parametrize("device, dtype", AMP_GPU)
def test_attention_mask_rounded_as_pytorch_does(device, dtype):
    """The wrapper casts a float mask with query, key and value (SDPA's policy): a mask the autocast dtype
    cannot hold exactly is rounded on both sides, and a float32 mask with a float32 query is accepted."""
    q = rand(1, 2, 8, 16, device=device, seed=17)
    mask = rand(8, 8, device=device, seed=18, grad=False) * 3
    same_as_reference(lambda q: ops.scaled_dot_product_attention(q, q, q, mask),
                      lambda q: F.scaled_dot_product_attention(q, q, q, mask), [q], device, dtype)


@pytest.mark.parametrize("device, dtype", AMP_GPU)
def test_attention_mixed_input_dtypes(device, dtype):
    """Autocast unifies float32 and autocast-dtype inputs, which fastcv refuses without it (as PyTorch)."""
    q, k = rand(1, 2, 8, 16, device=device, seed=19), rand(1, 2, 8, 16, device=device, seed=20)
    v = rand(1, 2, 8, 16, device=device, seed=21, dtype=dtype)
    same_as_reference(lambda q, k, v: ops.scaled_dot_product_attention(q, k, v),
                      lambda q, k, v: F.scaled_dot_product_attention(q, k, v), [q, k, v], device, dtype)


@pytest.mark.parametrize("device, dtype", AMP_GPU)
def test_multihead_attention_module(device, dtype):
    torch.manual_seed(0)
    fast = fnn.MultiheadAttention(16, 2, batch_first=True).to(device)
    x = rand(2, 8, 16, device=device, seed=22)
    mask = _bf16_exact(8, 8, device=device, seed=23)
    call = lambda m, x: m(x, x, x, need_weights=False, attn_mask=mask)[0]
    out, _ = same_module(fast, nn.MultiheadAttention(16, 2, batch_first=True).to(device), [x], device, dtype,
                         call=call)
    assert out.dtype == dtype


# ---------------------------------------------------------------- batch norm: the input's dtype


def _bn_inputs(device, dtype, seed):
    """x a float32 leaf (the reduced-precision input is x.to(dtype), as an autocast convolution's output)."""
    return rand(4, 6, 5, 5, device=device, seed=seed) * 2 + 1, rand(6, device=device, seed=seed + 1), \
        rand(6, device=device, seed=seed + 2)


@pytest.mark.parametrize("device, dtype", AMP)
@pytest.mark.parametrize("input_dtype", ["float32", "autocast"])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm(device, dtype, input_dtype, training):
    x, w, b = _bn_inputs(device, dtype, 24)
    stats = lambda: (torch.linspace(-1, 1, 6, device=device), torch.linspace(0.5, 2, 6, device=device))
    cast = (lambda t: t.to(dtype)) if input_dtype == "autocast" else (lambda t: t)
    expected_dtype = dtype if input_dtype == "autocast" else torch.float32
    fast_stats, ref_stats = stats(), stats()

    out, ref = same_as_reference(lambda x, w, b: ops.batch_norm(cast(x), *fast_stats, w, b, training),
                                 lambda x, w, b: F.batch_norm(cast(x), *ref_stats, w, b, training),
                                 [x, w, b], device, dtype)
    assert out.dtype == expected_dtype
    for a, e in zip(fast_stats, ref_stats):  # running statistics: float32, updated alike
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-3)
    if training:
        op = lambda x, w, b: torch.ops.fastcv.batch_norm_train(cast(x), w, b, None, False, 1e-5, None, None)[0]
        ref_fn = lambda x, w, b: F.batch_norm(cast(x), None, None, w, b, True)
    else:
        op = lambda x, w, b: torch.ops.fastcv.batch_norm_eval(cast(x), *stats(), w, b, None, False, 1e-5)
        ref_fn = lambda x, w, b: F.batch_norm(cast(x), *stats(), w, b, False)
    same_as_reference(op, ref_fn, [x, w, b], device, dtype)


@pytest.mark.parametrize("device, dtype", AMP)
@pytest.mark.parametrize("input_dtype", ["float32", "autocast"])
def test_batch_norm_fused(device, dtype, input_dtype):
    x, w, b = _bn_inputs(device, dtype, 27)
    identity = rand(4, 6, 5, 5, device=device, seed=30)
    cast = (lambda t: t.to(dtype)) if input_dtype == "autocast" else (lambda t: t)
    # The fused ops round once where relu(bn(x) + identity) rounds twice: one more ulp.
    out, _ = same_as_reference(lambda x, w, b: ops.batch_norm_relu(cast(x), None, None, w, b, True),
                               lambda x, w, b: torch.relu(F.batch_norm(cast(x), None, None, w, b, True)),
                               [x, w, b], device, dtype, k=4)
    assert out.dtype == (dtype if input_dtype == "autocast" else torch.float32)
    same_as_reference(lambda x, w, b, i: ops.batch_norm_add_relu(cast(x), cast(i), None, None, w, b, True),
                      lambda x, w, b, i: torch.relu(F.batch_norm(cast(x), None, None, w, b, True) + cast(i)),
                      [x, w, b, identity], device, dtype, k=4)
    same_as_reference(lambda x, w, b, i: torch.ops.fastcv.batch_norm_train(cast(x), w, b, cast(i), True, 1e-5, None, None)[0],
                      lambda x, w, b, i: torch.relu(F.batch_norm(cast(x), None, None, w, b, True) + cast(i)),
                      [x, w, b, identity], device, dtype, k=4)


@pytest.mark.parametrize("device, dtype", AMP)
@pytest.mark.parametrize("training", [True, False])
def test_conv_batch_norm_relu_block(device, dtype, training):
    """The usual autocast chain: a float32 input, a convolution (to the autocast dtype), a batch norm (in
    it, float32 parameters and statistics), a ReLU; every parameter's gradient float32."""
    def block(conv, bn):
        return nn.Sequential(conv(3, 6, 3, padding=1, bias=False), bn(6), nn.ReLU()).to(device).train(training)

    torch.manual_seed(1)
    fast = block(fnn.Conv2d, fnn.BatchNorm2d)
    reference = block(nn.Conv2d, nn.BatchNorm2d)
    with torch.no_grad():
        fast[1].running_var.uniform_(0.5, 2)
    out, _ = same_module(fast, reference, [rand(4, 3, 8, 8, device=device, seed=31)], device, dtype, k=4, kg=8)
    assert out.dtype == dtype
    torch.testing.assert_close(fast[1].running_mean, reference[1].running_mean, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------- im2col / col2im: the input's dtype


@pytest.mark.parametrize("device, dtype", AMP)
@pytest.mark.parametrize("input_dtype", ["float32", "autocast"])
def test_im2col_col2im(device, dtype, input_dtype):
    x = rand(2, 3, 7, 7, device=device, seed=32)
    cast = (lambda t: t.to(dtype)) if input_dtype == "autocast" else (lambda t: t)
    args = dict(kernel_size=3, dilation=1, padding=1, stride=2)
    out, _ = same_as_reference(lambda x: ops.im2col(cast(x), **args), lambda x: F.unfold(cast(x), **args), [x],
                               device, dtype)
    assert out.dtype == (dtype if input_dtype == "autocast" else torch.float32)
    same_as_reference(lambda x: torch.ops.fastcv.im2col(cast(x), [3, 3], [1, 1], [1, 1], [2, 2]),
                      lambda x: F.unfold(cast(x), **args), [x], device, dtype)
    cols = rand(2, 27, 16, device=device, seed=33)
    same_as_reference(lambda c: ops.col2im(cast(c), (7, 7), **args), lambda c: F.fold(cast(c), (7, 7), **args),
                      [cols], device, dtype)
    same_as_reference(lambda c: torch.ops.fastcv.col2im(cast(c), [7, 7], [3, 3], [1, 1], [1, 1], [2, 2]),
                      lambda c: F.fold(cast(c), (7, 7), **args), [cols], device, dtype)


# ---------------------------------------------------------------- roi_align: float32, back to the input's dtype


def _rois(device):
    boxes = torch.tensor([[0, 1.0, 1.5, 12.0, 9.0], [1, 3.0, 0.5, 7.5, 14.0], [0, 0.0, 0.0, 15.0, 15.0]])
    return boxes.to(device)


@pytest.mark.parametrize("device, dtype", AMP)
@pytest.mark.parametrize("input_dtype", ["float32", "autocast"])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align(device, dtype, input_dtype, aligned):
    x = rand(2, 4, 16, 16, device=device, seed=34)
    rois = _rois(device)
    cast = (lambda t: t.to(dtype)) if input_dtype == "autocast" else (lambda t: t)
    ref = lambda x: torchvision.ops.roi_align(cast(x), rois, 3, 0.5, 2, aligned)
    out, expected = same_as_reference(lambda x: ops.roi_align(cast(x), rois, 3, 0.5, 2, aligned), ref, [x],
                                      device, dtype)
    assert out.dtype == expected.dtype == (dtype if input_dtype == "autocast" else torch.float32)
    same_as_reference(lambda x: torch.ops.fastcv.roi_align(cast(x), rois, 0.5, 3, 3, 2, aligned), ref, [x], device,
                      dtype)
    same_as_reference(lambda x: fnn.RoIAlign(3, 0.5, 2, aligned)(cast(x), rois),
                      lambda x: torchvision.ops.RoIAlign(3, 0.5, 2, aligned)(cast(x), rois), [x], device, dtype)
    # rois in the autocast dtype are computed with in float32 too
    same_as_reference(lambda x: ops.roi_align(cast(x), rois.to(dtype), 3, 0.5, 2, aligned),
                      lambda x: torchvision.ops.roi_align(cast(x), rois.to(dtype), 3, 0.5, 2, aligned), [x], device,
                      dtype)


@pytest.mark.parametrize("device, dtype", AMP)
@pytest.mark.parametrize("level_dtypes", ["float32", "autocast", "mixed"])
def test_multi_scale_roi_align(device, dtype, level_dtypes):
    """torchvision pools each level with roi_align (float32, back to the level's dtype) into a result of
    features[0]'s dtype; fastcv pools every level in float32 in one call and returns features[0]'s dtype.
    Levels of different dtypes (layers autocast ran in different precisions) are accepted under autocast."""
    fine, coarse = rand(2, 4, 64, 64, device=device, seed=35), rand(2, 4, 32, 32, device=device, seed=36)
    casts = {"float32": (torch.float32, torch.float32), "autocast": (dtype, dtype), "mixed": (dtype, torch.float32)}
    dtypes = casts[level_dtypes]
    boxes = [torch.tensor([[4.0, 4.0, 30.0, 28.0], [10.0, 20.0, 200.0, 180.0]], device=device),
             torch.tensor([[0.0, 0.0, 250.0, 250.0], [50.0, 60.0, 70.0, 90.0]], device=device)]
    shapes = [(256, 256), (256, 256)]

    def pool(module):
        def f(fine, coarse):
            return module({"0": fine.to(dtypes[0]), "1": coarse.to(dtypes[1])}, boxes, shapes)
        return f

    out, _ = same_as_reference(pool(fnn.MultiScaleRoIAlign(["0", "1"], 3, 2)),
                               pool(torchvision.ops.MultiScaleRoIAlign(["0", "1"], 3, 2)), [fine, coarse], device,
                               dtype)
    assert out.dtype == dtypes[0]
    rois = torch.cat([torch.cat([torch.full((2, 1), float(i), device=device), b], 1) for i, b in enumerate(boxes)])
    same_as_reference(lambda f, c: torch.ops.fastcv.multi_scale_roi_align([f.to(dtypes[0]), c.to(dtypes[1])], rois,
                                                                          [0.25, 0.125], 3, 3, 2, False, 224.0, 4),
                      pool(torchvision.ops.MultiScaleRoIAlign(["0", "1"], 3, 2)), [fine, coarse], device, dtype)


# ---------------------------------------------------------------- nms: float32


@pytest.mark.parametrize("device, dtype", AMP)
def test_nms(device, dtype):
    g = torch.Generator().manual_seed(37)
    boxes = random_boxes(200, device=device, generator=g).to(dtype)  # boxes in the autocast dtype, scores float32
    scores = distinct_scores(200, dtype=dtype, device=device, generator=g).float()
    idxs = torch.randint(0, 5, (200,), generator=g).to(device)
    with torch.autocast(device, dtype=dtype):
        keep = ops.nms(boxes, scores, 0.5)
        keep_op = torch.ops.fastcv.nms(boxes, scores, 0.5)
        expected = torchvision.ops.nms(boxes, scores, 0.5)
        kept = ops.batched_nms(boxes, scores, idxs, 0.5)
        padded = torch.ops.fastcv.batched_nms_padded(boxes.unsqueeze(0), scores.view(1, 200, 1).to(dtype), 0.5, 0.0,
                                                     50, 200)
    assert torch.equal(keep, expected) and torch.equal(keep_op, expected)
    assert torch.equal(kept, ops.batched_nms(boxes.float(), scores, idxs, 0.5))  # what the float32 cast computes
    unpadded = ops.batched_nms_padded(boxes.float().unsqueeze(0), scores.view(1, 200, 1), 0.5, 0.0, 50, 200)
    assert torch.equal(padded[0], unpadded.indices) and torch.equal(padded[2], unpadded.counts)


# ---------------------------------------------------------------- the mechanism


def test_policies_under_autocast():
    """The policies of autocast_mode.h: the lower-precision dtype read at each call, float32, promote to
    float32 if any argument is float32; float64, integer and other-device tensors are left alone."""
    half, single, double = torch.ones(1, dtype=torch.bfloat16), torch.ones(1), torch.ones(1, dtype=torch.float64)
    ints = torch.ones(1, dtype=torch.int64)
    assert _library._target_dtype(_library.PROMOTE, "cpu", (half, single)) == torch.float32
    assert _library._target_dtype(_library.FP32, "cpu", (half,)) == torch.float32
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            assert _library._target_dtype(_library.PROMOTE, "cpu", (half, [double])) == dtype
            assert _library._target_dtype(_library.LOWER, "cpu", (single,)) == dtype
            cast = _library.autocast_args("conv2d", single, [single, double], ints, None)
            assert [cast[0].dtype, cast[1][0].dtype, cast[1][1].dtype, cast[2].dtype, cast[3]] == \
                [dtype, dtype, torch.float64, torch.int64, None]
    args = (single, half)
    assert _library.autocast_args("conv2d", *args) == args  # autocast off: the arguments themselves
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        assert _library.autocast_args("conv2d", *args)[0] is single  # CPU tensors: CUDA autocast leaves them


def test_compile_under_autocast():
    x, w = rand(2, 3, 16, 16, device="cpu", seed=38), rand(4, 3, 3, 3, device="cpu", seed=39)

    def f(x, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.ops.fastcv.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1), ops.roi_align(x, _rois("cpu"), 2)

    torch._dynamo.reset()
    out, pooled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w)
    ref, ref_pooled = f(x, w)
    assert out.dtype == torch.bfloat16 and pooled.dtype == torch.float32
    torch.testing.assert_close(out, ref), torch.testing.assert_close(pooled, ref_pooled)
