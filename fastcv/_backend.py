"""The boundary between torch tensors and the compiled module fastcv._C.

Everything that turns a tensor into what C++ sees, finds the CUDA stream, or decides whether this build
can run on a device lives here, so that ops never repeat it.
"""
from __future__ import annotations

import functools
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


def gpu_backend(device: torch.device) -> str:
    """Which GPU kernels run: 'cuda' (the compiled CUDA C++ kernels) when this build has them, else
    'triton'. FASTCV_GPU_BACKEND=triton selects Triton even when CUDA kernels were built. Raises when
    the CUDA kernels are chosen but cannot run on the device."""
    if not CUDA_BUILT or os.environ.get("FASTCV_GPU_BACKEND", "").lower() == "triton":
        return "triton"
    if device.type == "cuda":
        check_cuda_device(device.index if device.index is not None else torch.cuda.current_device())
    return "cuda"
