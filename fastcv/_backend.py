"""The boundary between torch tensors and fastcv's kernels.

Which kernels run an op (select), the Triton kernels' loader (triton), the CUDA stream and the thread
count the C++ kernels take, and whether this build can run on a GPU, live here, so that ops never
repeat them. forced() is the one switch that makes tests take code paths this machine would not take
by itself.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os

import torch

from fastcv import _C

FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CUDA_BUILT: bool = bool(_C.build_info["cuda"])
CUDA_ARCHS: str = _C.build_info["cuda_archs"]


def num_threads() -> int:
    """CPU kernels use as many threads as torch does (torch.set_num_threads controls both)."""
    return torch.get_num_threads()


def cuda_stream(t: torch.Tensor) -> int:
    """The caller's current stream on t's device: our kernels queue behind the caller's torch work."""
    return torch.cuda.current_stream(t.device).cuda_stream


def _parse_archs(archs: str) -> list[tuple[int, bool, bool]]:
    """CMake CUDA architectures -> [(capability, real, arch_specific)]; 'native' and 'all' -> []."""
    parsed = []
    for entry in filter(None, archs.replace(",", ";").split(";")):
        number, _, kind = entry.partition("-")
        digits = number.rstrip("af")
        if not digits.isdigit():
            continue
        specific = number != digits
        real = kind in ("", "real")
        virtual = kind in ("", "virtual")
        if real:
            parsed.append((int(digits), True, specific))
        if virtual:
            parsed.append((int(digits), False, specific))
    return parsed


def arch_covers(archs: str, capability: tuple[int, int]) -> bool:
    """Whether a build for `archs` has code a GPU of `capability` can run.

    SASS (real) runs on the same major version at an equal or higher minor; PTX (virtual) is compiled
    by the driver for any equal or newer GPU. Arch-specific targets (90a, 100f) run only where built.
    """
    parsed = _parse_archs(archs)
    if not parsed:  # 'native', 'all', 'all-major': built for what the build saw, or for everything
        return True
    cc = capability[0] * 10 + capability[1]
    for arch, real, specific in parsed:
        if specific and arch != cc:
            continue
        if real and arch // 10 == cc // 10 and arch <= cc:
            return True
        if not real and arch <= cc:
            return True
    return False


@functools.lru_cache(maxsize=None)
def check_cuda_device(index: int) -> None:
    """Raises a clear error, before any launch, when this build cannot run on CUDA device `index`."""
    if not CUDA_BUILT:
        raise RuntimeError(
            "fastcv was built without CUDA kernels (nvcc was not found at build time, or "
            "FASTCV_WITH_CUDA=OFF). Reinstall with nvcc on PATH or FASTCV_WITH_CUDA=ON."
        )
    capability = torch.cuda.get_device_capability(index)
    if not arch_covers(CUDA_ARCHS, capability):
        name = torch.cuda.get_device_name(index)
        raise RuntimeError(
            f"fastcv's CUDA kernels were built for architectures '{CUDA_ARCHS}', which cannot run on "
            f"{name} (compute capability {capability[0]}.{capability[1]}). Rebuild with "
            f"FASTCV_CUDA_ARCHS='{capability[0]}{capability[1]}-real' (or 'native') set."
        )


# ---------------------------------------------------------------- which kernels run an op

CPU, CUDA, TRITON = "cpu", "cuda", "triton"

# The GPU kernels each op has (every op has C++ CPU kernels). CUDA C++ runs when this build has it and
# FASTCV_GPU_BACKEND is not "triton"; else Triton, where the op has Triton kernels; else a clear error.
GPU_KERNELS = {
    "nms": (CUDA, TRITON),
    "roi_align": (CUDA, TRITON),  # Triton: the single-level forward in float32, float16 and bfloat16
    "roi_align_backward": (CUDA,),
    "multi_scale_roi_align": (CUDA,),
    "batch_norm": (CUDA, TRITON),
    "conv2d": (TRITON,),
    "depthwise_conv2d": (CUDA, TRITON),
    "im2col": (CUDA,),
    "attention": (TRITON,),
}

_forced_backend: str | None = None


def select(op: str, t: torch.Tensor) -> str:
    """Which kernels run `op` on t's device: CPU (C++), CUDA (CUDA C++) or TRITON. Raises a clear error
    when this build has no kernels for the op on t's device, or its CUDA kernels cannot run there."""
    if t.is_cpu:
        return _forced_backend if _forced_backend in GPU_KERNELS[op] else CPU
    if not t.is_cuda:
        raise ValueError(f"fastcv's kernels run on CPU and CUDA tensors, got one on {t.device}")
    kernels = GPU_KERNELS[op]
    wanted = _forced_backend or os.environ.get("FASTCV_GPU_BACKEND", "").lower() or CUDA
    if CUDA in kernels and CUDA_BUILT and wanted != TRITON:
        check_cuda_device(t.device.index if t.device.index is not None else torch.cuda.current_device())
        return CUDA
    if TRITON in kernels:
        return TRITON
    raise RuntimeError(
        f"fastcv's {op} on the GPU needs its CUDA kernels, which this build does not have (nvcc was not found "
        "at build time, or FASTCV_WITH_CUDA=OFF); it has no Triton kernels. Reinstall with nvcc on PATH."
        if not CUDA_BUILT else
        f"fastcv's {op} on the GPU has CUDA kernels only, and FASTCV_GPU_BACKEND=triton asks for Triton")


def triton(name: str):
    """The Triton kernels of fastcv.kernels.<name>, with one error when Triton cannot be imported."""
    try:
        return importlib.import_module(f"fastcv.kernels.{name}")
    except ImportError as e:
        raise RuntimeError(f"fastcv's Triton kernels need the triton package, which cannot be imported ({e}); "
                           "install triton, or reinstall fastcv with nvcc available for its CUDA kernels") from e


@contextlib.contextmanager
def forced(*, backend: str | None = None, thread_pool: bool = False, attention_blocks: dict | None = None):
    """Takes, inside the block, code paths this machine would not take by itself, so that tests reach
    them: backend=TRITON runs CPU tensors through the Triton kernels of the ops that have them (with
    TRITON_INTERPRET=1) and GPU tensors too when the CUDA kernels were built; thread_pool=True runs
    the C++ kernels' parallel regions on fastcv's own thread pool instead of torch's OpenMP team;
    attention_blocks ({"fwd": (m, n), "kv": ..., "q": ...}) sets the Triton attention kernels' tiles."""
    global _forced_backend
    if backend not in (None, TRITON):
        raise ValueError(f"backend can be forced to {TRITON!r} only, got {backend!r}")
    blocks_module = triton("attention") if attention_blocks is not None else None
    saved = _forced_backend, blocks_module and blocks_module._BLOCKS_OVERRIDE
    _forced_backend = backend
    if thread_pool:
        _C._set_use_openmp(False)
    if blocks_module:
        blocks_module._BLOCKS_OVERRIDE = attention_blocks
    try:
        yield
    finally:
        _forced_backend = saved[0]
        if thread_pool:
            _C._set_use_openmp(True)
        if blocks_module:
            blocks_module._BLOCKS_OVERRIDE = saved[1]
