"""Device functions shared by the Triton kernels."""
import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST: multiply in float32 (under the interpreter, which keeps bfloat16 as raw uint16
    bits and whose dot would multiply those bits)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)
