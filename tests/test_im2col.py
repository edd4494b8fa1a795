"""fastcv.ops.im2col / col2im against F.unfold / F.fold (CPU so far)."""
import pytest
import torch
import torch.nn.functional as F

from fastcv import ops
from helpers import assert_sums_close

# col2im adds the overlapping blocks' values: each output a sum of up to kh * kw terms. Allowed: SUM_UNITS
# unit roundoffs of the compute dtype (float32, float64 for float64) of the sum of |terms|, plus the final
# rounding of float16 / bfloat16 results (helpers.assert_sums_close). Measured: 2.8 u (float32), 0 (float64,
# and float16 / bfloat16 beyond their rounding).
SUM_UNITS = 16

GEOMETRIES = [  # kernel_size, dilation, padding, stride
    (3, 1, 1, 1),
    ((2, 3), (2, 1), (0, 2), (2, 3)),
    (1, 1, 0, 1),
    (5, 2, 3, 2),
    (3, 1, 0, 4),  # stride larger than the kernel
    (7, 1, 3, 2),  # the ResNet stem
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("shape", [(2, 3, 9, 11), (1, 1, 7, 7), (0, 2, 8, 8), (3, 4, 16, 5)])
def test_match_unfold_and_fold_float64(geometry, shape):
    k, d, p, s = geometry
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    try:
        expected = F.unfold(x, k, d, p, s)
    except RuntimeError:
        with pytest.raises(ValueError, match="larger than the padded input"):
            ops.im2col(x, k, d, p, s)
        return
    columns = ops.im2col(x, k, d, p, s)
    assert torch.equal(columns, expected)
    cols = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    assert_sums_close(ops.col2im(cols, shape[2:], k, d, p, s), F.fold(cols, shape[2:], k, d, p, s),
                      F.fold(cols.abs(), shape[2:], k, d, p, s), torch.float64, SUM_UNITS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 12, 12, generator=g).to(dtype)
    assert torch.equal(ops.im2col(x, 3, 1, 1, 1), F.unfold(x.float(), 3, 1, 1, 1).to(dtype))
    cols = torch.randn(2, 72, 144, generator=g).to(dtype)
    out = ops.col2im(cols, 12, 3, 1, 1, 1)
    assert out.dtype == dtype
    cols64 = cols.double()
    assert_sums_close(out, F.fold(cols64, 12, 3, 1, 1, 1), F.fold(cols64.abs(), 12, 3, 1, 1, 1), dtype, SUM_UNITS)


def test_unbatched_and_noncontiguous():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 10, 12, generator=g).transpose(1, 2)  # [4, 12, 10], not contiguous
    assert torch.equal(ops.im2col(x, 3, padding=1), F.unfold(x, 3, padding=1))
    cols = F.unfold(x, 3, padding=1).double()
    assert_sums_close(ops.col2im(cols.float(), (12, 10), 3, padding=1), F.fold(cols, (12, 10), 3, padding=1),
                      F.fold(cols.abs(), (12, 10), 3, padding=1), torch.float32, SUM_UNITS)


def test_gradients_are_each_other():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.im2col(t, (2, 3), 1, 1, (2, 1)), (x,))
    assert torch.autograd.gradgradcheck(lambda t: ops.im2col(t, (2, 3), 1, 1, (2, 1)), (x,))
    cols = torch.randn(1, 18, 12, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.col2im(t, (6, 7), 3, 1, 0, (1, 2)), (cols,))


def test_opcheck_and_compile():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 8, 9, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.fastcv.im2col.default, (x, [3, 3], [1, 1], [1, 1], [1, 1]))
    cols = torch.randn(2, 27, 72, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.fastcv.col2im.default, (cols, [8, 9], [3, 3], [1, 1], [1, 1], [1, 1]))
    fn = lambda t: ops.col2im(ops.im2col(t, 3, padding=1) * 2, (8, 9), 3, padding=1)  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(x), fn(x))


@pytest.mark.parametrize("call,error,message", [
    (lambda x: ops.im2col(x, 0), ValueError, "kernel_size must be positive"),
    (lambda x: ops.im2col(x, 3, stride=0), ValueError, "stride must be positive"),
    (lambda x: ops.im2col(x, 3, dilation=(1, -1)), ValueError, "dilation must be positive"),
    (lambda x: ops.im2col(x, 3, padding=-1), ValueError, "padding must be non-negative"),
    (lambda x: ops.im2col(x, 9), ValueError, "larger than the padded input"),
    (lambda x: ops.im2col(x[0, 0], 3), ValueError, "input must be a Tensor\\[N, C, H, W\\]"),
    (lambda x: ops.im2col(x.long(), 3), TypeError, "input must be float32"),
    (lambda x: ops.im2col(x, 2.5), TypeError, "kernel_size must be an int or a pair"),
    (lambda x: ops.col2im(torch.randn(1, 10, 36), 8, 3), ValueError, "must be divisible by the kernel"),
    (lambda x: ops.col2im(torch.randn(1, 9, 35), 8, 3), ValueError, "must be the number of blocks"),
])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call(torch.randn(1, 2, 8, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_unfold_and_fold(geometry, dtype):
    k, d, p, s = geometry
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 17, 19, generator=g, dtype=torch.float64)
    expected = F.unfold(x, k, d, p, s)
    assert torch.equal(ops.im2col(x.to("cuda", dtype), k, d, p, s).cpu(), expected.to(dtype))
    cols = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    out = ops.col2im(cols.to("cuda", dtype), (17, 19), k, d, p, s)
    torch.testing.assert_close(out.cpu().double(), F.fold(cols, (17, 19), k, d, p, s), rtol=tol, atol=tol)
