"""The CPU instruction set fastcv's kernels run.

Kernels whose speed depends on the instruction set (the GEMM micro-kernels under convolution and
attention, the attention softmax, batch norm, depthwise convolution, NMS, transposes) are compiled for
x86-64 baseline (SSE2), AVX2 (x86-64-v3) and AVX-512 (x86-64-v4). The best one this CPU supports runs
unless another is forced: with the environment variable FASTCV_CPU_ISA=baseline|avx2|avx512 (read at
import) or with `set_cpu_isa` / `force_cpu_isa`, which take effect at the next kernel call. Tests use
them to run every path on one machine.

    import fastcv.cpu
    with fastcv.cpu.force_cpu_isa("avx2"):
        y = fastcv.ops.conv2d(x, w)          # the AVX2 kernels, also on an AVX-512 CPU
"""
from __future__ import annotations

import contextlib
import os

from fastcv import _C

__all__ = ["cpu_isa", "available_cpu_isas", "compiled_cpu_isas", "set_cpu_isa", "force_cpu_isa"]


def cpu_isa() -> str:
    """The instruction set in use: "baseline", "avx2" or "avx512"."""
    return _C.cpu_isa()


def compiled_cpu_isas() -> list[str]:
    """The instruction sets this build has kernels for, best last."""
    return list(_C.build_info["cpu_isas"])


def available_cpu_isas() -> list[str]:
    """The compiled instruction sets this CPU runs, best last."""
    return [isa for isa in compiled_cpu_isas() if _C.cpu_supports(isa)]


def set_cpu_isa(name: str) -> None:
    """Runs every dispatched CPU kernel with `name`'s instructions from the next call on. ValueError for
    an unknown name, one this build has no kernels for, or one this CPU lacks."""
    if not isinstance(name, str):
        raise TypeError(f"cpu_isa: expected a name such as 'avx2', got {type(name).__name__}")
    _C.set_cpu_isa(name)


@contextlib.contextmanager
def force_cpu_isa(name: str):
    """Runs the block with `name`'s kernels, then restores the instruction set in use before it."""
    previous = cpu_isa()
    set_cpu_isa(name)
    try:
        yield
    finally:
        set_cpu_isa(previous)


def _from_environment() -> None:
    name = os.environ.get("FASTCV_CPU_ISA", "")
    if name:
        try:
            set_cpu_isa(name)
        except ValueError as e:
            raise ValueError(f"FASTCV_CPU_ISA={name!r}: {e}") from None


_from_environment()
