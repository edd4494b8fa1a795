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
import importlib.util
import os
import shlex
import warnings
from pathlib import Path
from typing import NamedTuple

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
def triton_available() -> bool:
    """Whether the triton package is installed (found without importing it, which takes a second)."""
    return importlib.util.find_spec("triton") is not None


class Gpu(NamedTuple):
    """What the backend choice reads of a CUDA device."""
    index: int
    name: str
    capability: tuple[int, int]

    @property
    def sm(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"


@functools.lru_cache(maxsize=None)
def gpu(index: int) -> Gpu:
    """CUDA device `index` as torch sees it, read once per process."""
    return Gpu(index, torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)))


def source_checkout() -> Path | None:
    """The source tree this fastcv runs from (an editable install or a checkout on sys.path), if any."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "csrc").is_dir() else None


def rebuild_command(**cmake: str) -> str:
    """The command that rebuilds this fastcv with the CMake settings `cmake` (FASTCV_CUDA_ARCHS=...,
    FASTCV_WITH_CUDA=...): an editable reinstall of its checkout, else a wheel built from its source."""
    root = source_checkout()
    if root is not None:
        env = " ".join(f'{name}="{value}"' for name, value in cmake.items())
        no_isolation = all(importlib.util.find_spec(m) for m in ("scikit_build_core", "pybind11"))
        return (f"cd {shlex.quote(str(root))} && {env} pip install "
                f"{'--no-build-isolation ' if no_isolation else ''}-e .")
    defines = " ".join(f'-Ccmake.define.{name}="{value}"' for name, value in cmake.items())
    return f"pip wheel <fastcv's source> {defines} && pip install --force-reinstall fastcv-*.whl"


def archs_with(capabilities) -> str:
    """This build's CUDA architectures plus machine code for each capability in `capabilities`."""
    built = [a for a in CUDA_ARCHS.replace(",", ";").split(";") if a]
    return ";".join(built + [f"{major}{minor}-real" for major, minor in capabilities])


# ---------------------------------------------------------------- which kernels run an op

CPU, CUDA, TRITON = "cpu", "cuda", "triton"

# The GPU kernels each op has (every op has C++ CPU kernels). CUDA C++ runs when this build has it for
# the GPU and FASTCV_GPU_BACKEND is not "triton"; else Triton, where the op has Triton kernels; else a
# clear error. On a GPU the build does not cover, Triton runs with one warning (FASTCV_STRICT=1: an error).
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
_warned: set[int] = set()  # the devices whose fallback to Triton has been warned about


class Choice(NamedTuple):
    """Which kernels run an op on a device, and why. backend None: the op cannot run there, `error`
    says why; `warning` is given once per process and device (Triton instead of uncovered CUDA C++);
    `cause` names a failure's reason for `python -m fastcv doctor`: "uncovered", "strict",
    "no_cuda_build", "no_triton" or "gpu_backend"."""
    backend: str | None
    reason: str
    error: str | None = None
    warning: str | None = None
    cause: str | None = None


def _cpu_backend(op: str) -> str:
    return _forced_backend if _forced_backend in GPU_KERNELS[op] else CPU


def choice(op: str, device: str | int = CPU) -> Choice:
    """The kernels select() runs `op` with on `device` (CPU, or a CUDA device index), and why; what
    `python -m fastcv doctor` prints. Reads the environment each call; decides once per device and
    setting (_choices; tests that pretend other devices or packages empty it)."""
    if device == CPU:
        backend = _cpu_backend(op)
        return Choice(backend, "Triton (interpreted): forced(backend='triton')" if backend == TRITON else
                      f"C++ ({_C.cpu_isa()})")
    key = (op, device, _forced_backend, os.environ.get("FASTCV_GPU_BACKEND", "").lower(), CUDA_BUILT, CUDA_ARCHS,
           False)
    chosen = _choices.get(key) or _choices.setdefault(key, _gpu_choice(*key[:-1], False))
    if chosen.cause == "uncovered" and os.environ.get("FASTCV_STRICT", "") not in ("", "0"):
        key = key[:-1] + (True,)  # FASTCV_STRICT is read only where it matters, off the common path
        chosen = _choices.get(key) or _choices.setdefault(key, _gpu_choice(*key[:-1], True))
    return chosen


_choices: dict[tuple, Choice] = {}


def _gpu_choice(op: str, device: int, forced: str | None, env: str, built: bool, archs: str,
                strict: bool) -> Choice:
    kernels, has_triton = GPU_KERNELS[op], triton_available()
    wants_triton = forced == TRITON or env == TRITON
    if CUDA in kernels and built and not wants_triton:
        dev = gpu(device)
        if arch_covers(archs, dev.capability):
            return Choice(CUDA, f"CUDA C++: built for {archs}, the GPU is {dev.sm}")
        major, minor = dev.capability
        uncovered = (f"fastcv's CUDA kernels were built for architectures '{archs}', which cannot run on "
                     f"{dev.name} (GPU {dev.index}, {dev.sm}, compute capability {major}.{minor})")
        fix = f"Rebuild for it: {rebuild_command(FASTCV_CUDA_ARCHS=archs_with([dev.capability]))}"
        short = f"the CUDA kernels, built for {archs}, cannot run on {dev.sm}"
        if strict:
            return Choice(None, f"error: {short}, and FASTCV_STRICT=1 forbids Triton's instead",
                          f"{uncovered}, and FASTCV_STRICT=1 forbids running Triton's kernels instead. {fix}",
                          cause="strict")
        if TRITON not in kernels:
            return Choice(None, f"error: {short}, and {op} has no Triton kernels",
                          f"{uncovered}, and its {op} has no Triton kernels to run instead. {fix}",
                          cause="uncovered")
        if not has_triton:
            return Choice(None, f"error: {short}, and triton, which its Triton kernels need, is not installed",
                          f"{uncovered}, and the Triton kernels its {op} would run instead need the triton "
                          f"package, which is not installed (pip install triton). {fix}", cause="uncovered")
        return Choice(TRITON, f"Triton instead (warns once): {short}", warning=(
            f"{uncovered}: its ops run their Triton kernels there instead (those without raise). {fix} "
            "(FASTCV_STRICT=1 makes this an error)"), cause="uncovered")
    if TRITON not in kernels:
        if not built:
            major, minor = gpu(device).capability
            command = rebuild_command(FASTCV_WITH_CUDA="ON", FASTCV_CUDA_ARCHS=f"{major}{minor}-real")
            return Choice(None, f"error: no CUDA kernels in this build, and {op} has no Triton kernels", (
                f"fastcv's {op} on the GPU needs its CUDA kernels, which this build does not have (nvcc was not "
                "found at build time, or FASTCV_WITH_CUDA=OFF); it has no Triton kernels. Reinstall with nvcc on "
                f"PATH: {command}"), cause="no_cuda_build")
        switch = "FASTCV_GPU_BACKEND=triton" if env == TRITON else "forced(backend='triton')"
        return Choice(None, f"error: {op} has CUDA kernels only, and {switch} asks for Triton",
                      f"fastcv's {op} on the GPU has CUDA kernels only, and {switch} asks for Triton",
                      cause="gpu_backend")
    why = ("forced(backend='triton')" if forced == TRITON else "FASTCV_GPU_BACKEND=triton" if env == TRITON
           else "no CUDA kernels in this build" if CUDA in kernels else f"{op} has no CUDA C++ kernels")
    if not has_triton:
        return Choice(None, f"error: Triton ({why}), but triton is not installed", (
            f"fastcv's {op} on the GPU runs Triton's kernels here ({why}), which need the triton package; "
            "it is not installed: pip install triton"), cause="no_triton")
    return Choice(TRITON, f"Triton: {why}")


def select(op: str, t: torch.Tensor) -> str:
    """Which kernels run `op` on t's device: CPU (C++), CUDA (CUDA C++) or TRITON (choice() says why).
    Raises a clear error when no kernels of this build can run the op there; warns once per device when
    Triton's run instead of CUDA kernels the build has, but not for this GPU."""
    if t.is_cpu:
        return _cpu_backend(op)
    if not t.is_cuda:
        raise ValueError(f"fastcv's kernels run on CPU and CUDA tensors, got one on {t.device}")
    index = t.device.index
    if index is None:
        index = torch.cuda.current_device()
    chosen = choice(op, index)
    if chosen.backend is None:
        raise RuntimeError(chosen.error)
    if chosen.warning is not None and index not in _warned:
        _warned.add(index)
        warnings.warn(chosen.warning, UserWarning, stacklevel=3)
    return chosen.backend


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
