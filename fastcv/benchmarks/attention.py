"""Scaled-dot-product attention benchmark cases: fastcv.ops.scaled_dot_product_attention against
F.scaled_dot_product_attention with PyTorch's default backend choice (its flash kernel for these inputs on
the CPU and on the GPU), causal and not, forward and forward+backward.

float32 on every device: ViT-S/16 ([4, 6, 197, 64]) and one image of 1,024 and 4,096 tokens ([1, 8, L, 64]).
On the GPU also bfloat16 at FlashAttention's benchmark sizes: B * L = 16k tokens, L in 1k, 4k, 16k, head dim
64 with 16 heads and head dim 128 with 8.

Throughput is GFLOP/s as FlashAttention counts it: 4 * B * H * L * S * D per forward (two matrix products),
halved when causal, and the backward 2.5 times the forward (5 matrix products, P recomputed), so
forward+backward is 3.5 times the forward. It is shown as a fraction of the measured torch.mm rate of the
same dtype on the same device (fastcv.benchmarks.peaks)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcv import ops
from fastcv.benchmarks import Case
from fastcv.benchmarks.peaks import matmul_gflops

# name, (B, H, L, D), dtype, devices, in --quick (forward, not causal)
SHAPES = [
    ("ViT-S/16", (4, 6, 197, 64), torch.float32, ("cpu", "cuda"), True),
    ("1k tokens", (1, 8, 1024, 64), torch.float32, ("cpu", "cuda"), False),
    ("4k tokens", (1, 8, 4096, 64), torch.float32, ("cpu", "cuda"), False),
    ("FA2 D=64, 1k", (16, 16, 1024, 64), torch.bfloat16, ("cuda",), True),
    ("FA2 D=64, 4k", (4, 16, 4096, 64), torch.bfloat16, ("cuda",), False),
    ("FA2 D=64, 16k", (1, 16, 16384, 64), torch.bfloat16, ("cuda",), False),
    ("FA2 D=128, 1k", (16, 8, 1024, 128), torch.bfloat16, ("cuda",), False),
    ("FA2 D=128, 4k", (4, 8, 4096, 128), torch.bfloat16, ("cuda",), False),
    ("FA2 D=128, 16k", (1, 8, 16384, 128), torch.bfloat16, ("cuda",), False),
]

# Agreement, relative to the largest magnitude: both sides accumulate in float32; bfloat16 rounds P (and the
# outputs) to 8 bits of mantissa on both sides, in different places.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def flops(shape, causal: bool, backward: bool) -> float:
    b, h, length, d = shape
    forward = 4 * b * h * length * length * d / (2 if causal else 1)
    return forward * (3.5 if backward else 1.0)


def _close(dtype):
    def check(a, b):
        a, b = (a,) if isinstance(a, torch.Tensor) else a, (b,) if isinstance(b, torch.Tensor) else b
        for x, y in zip(a, b):
            scale = max(y.float().abs().amax().item(), 1e-6)
            err = (x.float() - y.float()).abs().amax().item()
            assert err <= TOLERANCE[dtype] * scale, f"max error {err:.3g} > {TOLERANCE[dtype] * scale:.3g}"
    return check


def _maker(shape, dtype, device, grad):
    def make():
        g = torch.Generator().manual_seed(0)
        q, k, v, dy = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(4))
        if grad:
            q, k, v = (t.requires_grad_() for t in (q, k, v))
        return q, k, v, dy
    return make


def _run(fn, causal, backward):
    if not backward:
        return lambda q, k, v, dy: fn(q, k, v, is_causal=causal)

    def run(q, k, v, dy):
        out = fn(q, k, v, is_causal=causal)
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), dy))
    return run


def cases(device: str) -> list[Case]:
    result = []
    for label, shape, dtype, devices, quick in SHAPES:
        if device not in devices:
            continue
        dt = str(dtype).removeprefix("torch.")
        peak = (lambda dtype=dtype: (matmul_gflops(device, dtype), f"torch.mm {str(dtype).removeprefix('torch.')}"))
        for backward in (False, True):
            for causal in (False, True):
                name = (f"{label} {list(shape)} {dt}" + (", causal" if causal else "")
                        + (", forward+backward" if backward else ""))
                work = flops(shape, causal, backward) / 1e9
                result.append(Case(
                    "attention", name, make=_maker(shape, dtype, device, backward),
                    fastcv=_run(ops.scaled_dot_product_attention, causal, backward),
                    reference=_run(F.scaled_dot_product_attention, causal, backward),
                    reference_name="F.scaled_dot_product_attention" + (" + autograd" if backward else ""),
                    check=_close(dtype), work=lambda args, out, work=work: (work, "GFLOP/s"),
                    quick=quick and not backward and not causal, peak=peak, tags={"gflop": work}))
    return result
