"""The CPU instruction-set switch (fastcv.cpu, FASTCV_CPU_ISA) and the kernels whose shape depends on it:
the GEMM micro-kernel's tile geometry and the attention blocks derived from it."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastcv.cpu
from conftest import CPU_ISAS
from fastcv import _C, ops

# The micro-kernel tile (rows MR, columns NR) per ISA and dtype: MR x 2 vectors (csrc/compute/gemm_kernel.h).
GEOMETRY = {
    ("baseline", torch.float32): (6, 8), ("baseline", torch.float64): (6, 4),
    ("avx2", torch.float32): (6, 16), ("avx2", torch.float64): (6, 8),
    ("avx512", torch.float32): (8, 32), ("avx512", torch.float64): (8, 16),
}


def _python(*args, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_default_is_the_best_supported():
    assert fastcv.cpu.available_cpu_isas()[0] == "baseline"
    assert fastcv.cpu.cpu_isa() == fastcv.cpu.available_cpu_isas()[-1]
    assert set(CPU_ISAS) <= set(fastcv.cpu.compiled_cpu_isas())


@pytest.mark.parametrize("isa", fastcv.cpu.compiled_cpu_isas())
def test_forcing_each_compiled_isa(isa):
    """An ISA this CPU runs is forced (and the GEMM kernel follows); one it lacks is a clear error."""
    before = fastcv.cpu.cpu_isa()
    if isa in fastcv.cpu.available_cpu_isas():
        with fastcv.cpu.force_cpu_isa(isa):
            assert fastcv.cpu.cpu_isa() == isa
            info = _C.gemm_kernel_info()
            assert (info["isa"], (info["mr"], info["nr"])) == (isa, GEOMETRY[isa, torch.float32])
    else:
        with pytest.raises(ValueError, match=f"this CPU does not support '{isa}'"):
            fastcv.cpu.set_cpu_isa(isa)
    assert fastcv.cpu.cpu_isa() == before


def test_bad_names_and_restoring():
    before = fastcv.cpu.cpu_isa()
    with pytest.raises(ValueError, match=r"expected one of baseline.*got 'sse4'"):
        fastcv.cpu.set_cpu_isa("sse4")
    with pytest.raises(TypeError, match="expected a name"):
        fastcv.cpu.set_cpu_isa(2)
    with pytest.raises(RuntimeError, match="inside"):
        with fastcv.cpu.force_cpu_isa("baseline"):
            assert fastcv.cpu.cpu_isa() == "baseline"
            raise RuntimeError("inside")
    assert fastcv.cpu.cpu_isa() == before


def test_environment_variable():
    code = "import fastcv.cpu; print(fastcv.cpu.cpu_isa())"
    got = _python("-c", code, env={"FASTCV_CPU_ISA": "baseline"})
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == "baseline"
    bad = _python("-c", code, env={"FASTCV_CPU_ISA": "avx1024"})
    assert bad.returncode != 0 and "FASTCV_CPU_ISA='avx1024'" in bad.stderr


def test_info_prints_the_isa_in_use():
    got = _python("-m", "fastcv", "info", env={"FASTCV_CPU_ISA": "baseline"})
    assert got.returncode == 0, got.stderr
    assert "CPU ISA     baseline in use (forced by FASTCV_CPU_ISA=baseline)" in got.stdout
    assert f"this CPU runs {', '.join(CPU_ISAS)}" in got.stdout


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cout,cin,pixels", [(1, 1, 1), (7, 257, 33), (9, 256, 31), (33, 5, 65), (48, 64, 97)])
def test_gemm_edges(dtype, cout, cin, pixels):
    """A 1x1 convolution is one GEMM: sizes across the tile's MR and NR and the depth block (256)."""
    g = torch.Generator().manual_seed(cout * 1000 + cin)
    x = torch.randn(1, cin, 1, pixels, generator=g, dtype=dtype)
    w = torch.randn(cout, cin, 1, 1, generator=g, dtype=dtype)
    ref = torch.einsum("oc,cp->op", w[:, :, 0, 0].double(), x[0, :, 0].double())
    got = ops.conv2d(x, w)[0, :, 0].double()
    # A sum of cin products in the dtype, in any order: within cin * eps of the sum of |terms|.
    bound = cin * torch.finfo(dtype).eps * torch.einsum("oc,cp->op", w[:, :, 0, 0].double().abs(),
                                                        x[0, :, 0].double().abs())
    assert ((got - ref).abs() <= bound + 1e-300).all()


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_every_query_block(dtype, causal):
    """Query lengths on both sides of every forward block (48 and 64) and of the micro-kernel's NR: the
    AVX-512 float kernel (NR = 32) once derived a block no softmax was compiled for."""
    g = torch.Generator().manual_seed(7)
    for length in (1, 31, 32, 33, 47, 48, 49, 63, 64, 65, 129):
        q = torch.randn(1, 2, length, 24, generator=g, dtype=dtype)
        k = torch.randn(1, 2, 70, 24, generator=g, dtype=dtype)
        v = torch.randn(1, 2, 70, 40, generator=g, dtype=dtype)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
        got = ops.scaled_dot_product_attention(q, k, v, is_causal=causal)
        # Each output is a convex combination of values (|v| <= ~5): float32 softmax and sums of 70 terms.
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(got.double(), ref, atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nms_same_under_every_isa(dtype):
    """The vectorised IoU loop decides the same suppressions whatever its vector width."""
    g = torch.Generator().manual_seed(3)
    boxes = torch.rand(3000, 4, generator=g, dtype=dtype) * 500
    boxes[:, 2:] += boxes[:, :2] + 1
    scores = torch.rand(3000, generator=g, dtype=dtype)
    results = []
    for isa in CPU_ISAS:
        with fastcv.cpu.force_cpu_isa(isa):
            results.append(ops.nms(boxes, scores, 0.5))
    for r in results[1:]:
        assert torch.equal(r, results[0])
