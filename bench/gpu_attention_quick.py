"""A short GPU timing of the Triton attention against torch's scaled_dot_product_attention (FlashAttention
backend where it applies): forward and forward+backward, ms and TFLOP/s (causal counts half the
FLOPs). Calls the kernels' launchers (fastcv.kernels.attention) directly, without the op around them.
    python bench/gpu_attention_quick.py [--autotune] [--d 128]"""
import os
import sys

if "--autotune" not in sys.argv:
    os.environ.setdefault("FASTCV_TRITON_AUTOTUNE", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from fastcv.kernels import attention as attn  # noqa: E402


def bench(fn, reps=20):
    return triton.testing.do_bench(fn, warmup=5, rep=reps * 5)


def case(B, H, L, D, dtype, causal):
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    scale = D ** -0.5
    out = torch.empty(B, H, L, D, device="cuda", dtype=dtype)
    lse = torch.empty(B, H, L, device="cuda", dtype=torch.float32)
    go = torch.randn_like(out)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def tri_fwd():
        attn.forward(q, k, v, None, scale, causal, 0.0, 0, 0, out, lse)

    def tri_fwd_bwd():
        attn.forward(q, k, v, None, scale, causal, 0.0, 0, 0, out, lse)
        attn.backward(go, q, k, v, out, lse, None, scale, causal, 0.0, 0, 0, dq, dk, dv)

    def torch_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

    def torch_fwd_bwd():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        torch.autograd.grad(o, (q, k, v), go)

    tri_fwd_bwd()  # compile
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), go)
    err = max((a.float() - b.float()).abs().max().item() for a, b in ((out, ref), (dq, rq), (dk, rk), (dv, rv)))
    flops = 4 * B * H * L * L * D * (0.5 if causal else 1.0)
    res = []
    for name, fn, f in (("fwd", tri_fwd, flops), ("fwd+bwd", tri_fwd_bwd, 3.5 * flops)):
        t = bench(fn)
        tt = bench(torch_fwd if name == "fwd" else torch_fwd_bwd)
        res.append(f"{name}: triton {t:.3f} ms {f / t / 1e9:.0f} TF/s, torch {tt:.3f} ms {f / tt / 1e9:.0f} TF/s "
                   f"(ratio {tt / t:.2f})")
    print(f"B={B} H={H} L={L} D={D} {str(dtype)[6:]} causal={int(causal)} maxerr={err:.2e} | " + " | ".join(res),
          flush=True)


print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
only = int(sys.argv[sys.argv.index("--d") + 1]) if "--d" in sys.argv else None
for D in (64, 128):
    for causal in (False, True):
        if only in (None, D):
            case(4, 16, 4096, D, torch.bfloat16, causal)
if only in (None, 256):
    case(2, 8, 2048, 256, torch.float16, True)
