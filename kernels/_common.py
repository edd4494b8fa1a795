"""What the Triton kernels share: whether they run under the interpreter, the autotuning switch, and
device functions."""
import os

import triton
import triton.language as tl

# TRITON_INTERPRET=1: the kernels run on the CPU through Triton's interpreter (the tests), which gets one
# small configuration per kernel.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# FASTCV_TRITON_AUTOTUNE=0 keeps one configuration per kernel (the GPU tests set it: autotuning every
# test shape would compile every candidate of each kernel per shape).
ONE_CONFIG = INTERPRET or os.environ.get("FASTCV_TRITON_AUTOTUNE") == "0"


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST: multiply in float32 (under the interpreter, which keeps bfloat16 as raw uint16
    bits and whose dot would multiply those bits)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)
