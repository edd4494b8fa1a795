"""Inputs shared by the tests."""
import torch


def random_boxes(n, *, size=100.0, max_wh=20.0, dtype=torch.float32, device="cpu", generator=None):
    """n boxes (x1, y1, x2, y2) with corners in [0, size) and sides up to max_wh: plenty of overlaps."""
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * size
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * max_wh
    return torch.cat([xy, xy + wh], dim=1).to(dtype=dtype, device=device)


def distinct_scores(n, *, dtype=torch.float32, device="cpu", generator=None):
    """Scores with no ties even in float16 (up to 2048 of them) or bfloat16 (up to 256)."""
    levels = {torch.float16: 2048, torch.bfloat16: 256}.get(dtype, 1 << 20)
    assert n <= levels
    picks = torch.randperm(levels, generator=generator)[:n].to(torch.float64)
    return (picks / levels).to(dtype=dtype, device=device)


# Unit roundoff u of each dtype: half an ulp of 1, the largest relative error of one rounding.
UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def assert_sums_close(actual, expected, magnitude, dtype, sum_units, what="", final_ulps=0.5):
    """Elementwise check of a kernel's sums of products against `expected`, the float64 result for the
    same (rounded) inputs. `magnitude` holds, per element, the sum of its terms' absolute values (the
    same computation on |inputs|), the scale of its rounding error: a sum of K products accumulated in
    the compute dtype (float64 for float64 inputs, else float32) is off by at most about K u times it,
    and in practice (blocked and pairwise sums, FMA) by a few u. `sum_units` is how many of the compute
    dtype's u are allowed. float16 / bfloat16 results are rounded once more when stored: half an ulp of
    the result (u(dtype) |expected|, and half the smallest subnormal's spacing near zero) on top, or
    final_ulps ulps where the conversion does not round to nearest (the Triton interpreter truncates
    float32 to bfloat16: final_ulps=1)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    expected, magnitude = expected.detach().cpu().double(), magnitude.detach().cpu().double()
    allowed = sum_units * UNIT[compute] * magnitude
    if dtype != compute:
        allowed = allowed + 2 * final_ulps * UNIT[dtype] * (expected.abs() + torch.finfo(dtype).smallest_normal)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.detach().cpu().double() - expected).abs()
    bad = ~(err <= allowed)  # NaN fails too
    if bad.any():
        ratio = (err / allowed).nan_to_num(nan=float("inf"))
        i = int(ratio.flatten().argmax())
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.numel()} elements beyond the bound; worst "
                             f"{err.flatten()[i].item():.3g} > {allowed.flatten()[i].item():.3g} (expected "
                             f"{expected.flatten()[i].item():.6g}, sum of |terms| {magnitude.flatten()[i].item():.3g})")


def sum_units_used(actual, expected, magnitude, dtype):
    """The smallest sum_units assert_sums_close would accept (to measure the kernels' errors)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    expected, magnitude = expected.detach().cpu().double(), magnitude.detach().cpu().double()
    err = (actual.detach().cpu().double() - expected).abs()
    if dtype != compute:
        err = (err - UNIT[dtype] * (expected.abs() + torch.finfo(dtype).smallest_normal)).clamp(min=0)
    if not err.numel():
        return 0.0
    return (err / (UNIT[compute] * magnitude)).nan_to_num(nan=0.0).max().item()


def conv2d_reference(x, w, b, grad_out, conv=None, **kw):
    """float64 results of conv(x, w, b, **kw) (F.conv2d by default) on the same rounded values: the
    output and the input, weight and bias gradients for grad_out, each with its sums of |terms| (for
    assert_sums_close): the same computation on |x|, |w|, |b| and |grad_out|. b and grad_out may be None."""
    conv = conv or torch.nn.functional.conv2d
    results = []
    for f in (lambda t: t, torch.abs):
        xr, wr = (f(t.detach().cpu().double()).requires_grad_() for t in (x, w))
        br = f(b.detach().cpu().double()).requires_grad_() if b is not None else None
        out = conv(xr, wr, br, **kw)
        grads = [None, None, None]
        if grad_out is not None:
            leaves = [t for t in (xr, wr, br) if t is not None]
            got = torch.autograd.grad(out, leaves, f(grad_out.detach().cpu().double()))
            grads = list(got) + [None] * (3 - len(got))
        results.append((out.detach(), *grads))
    return results  # [(out, grad_x, grad_w, grad_b), (their magnitudes)]
