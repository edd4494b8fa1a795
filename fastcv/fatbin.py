"""What GPU code the compiled module really holds, read from its fat binary with cuobjdump, against the CUDA
architectures it was asked to hold (`python -m fastcv archs`).

A wheel built with FASTCV_CUDA_ARCHS="80-real;90a-real;90-virtual" must hold SASS (machine code) for sm_80 and
sm_90a and PTX for compute_90, and nothing else: a missing architecture is the "no kernel image is available"
error on that GPU, an unasked one is build time and wheel size spent for nothing. The check reads what nvcc put
in the module (not what the build recorded), so it cannot be fooled by a wrong record.

cuobjdump is looked up on PATH, then in CUDA_HOME/bin, then in PyPI's nvidia-cuda-cuobjdump package
(`pip install nvidia-cuda-cuobjdump`), then in the one Triton ships.

The build also records what it asked for in the wheel's metadata (fastcv-<version>.dist-info/fastcv_build.json:
the architectures, nvcc's version and origin, the CPU instruction sets), readable without importing the module:
`python -m fastcv archs --wheel` checks that record against the module the wheel carries."""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import NamedTuple

__all__ = ["Contents", "asked", "find_cuobjdump", "installed_record", "module_contents", "verify", "wheel_record"]

RECORD = "fastcv_build.json"


class Contents(NamedTuple):
    """GPU code as sets of architecture names: sass {"80", "90a"} (cubins), ptx {"90"} (PTX for JIT)."""

    sass: frozenset[str]
    ptx: frozenset[str]


def asked(archs: str) -> Contents | None:
    """The contents a CMake CUDA architecture list asks for: "80-real" SASS only, "90-virtual" PTX only, "90"
    both; "90a" / "100a" the arch-specific targets. None for "native" and "all" (they depend on the build
    machine or on nvcc's list, so there is nothing fixed to compare with)."""
    sass, ptx = set(), set()
    for entry in filter(None, re.split(r"[;,\s]+", archs.strip())):
        if entry in ("native", "all", "all-major"):
            return None
        m = re.fullmatch(r"(\d+[af]?)(?:-(real|virtual))?", entry)
        if m is None:
            raise ValueError(f"not a CUDA architecture: {entry!r} (expected e.g. 80-real, 90a-real, 90-virtual, 90)")
        arch, kind = m.groups()
        if kind in (None, "real"):
            sass.add(arch)
        if kind in (None, "virtual"):
            ptx.add(arch)
    return Contents(frozenset(sass), frozenset(ptx))


def find_cuobjdump() -> str | None:
    candidates = [shutil.which("cuobjdump")]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        candidates.append(str(Path(cuda_home) / "bin" / "cuobjdump"))
    try:  # PyPI's nvidia-cuda-cuobjdump: nvidia/cuda_cuobjdump/bin/cuobjdump (a namespace package)
        import nvidia
        candidates += [str(Path(p) / "cuda_cuobjdump" / "bin" / "cuobjdump") for p in nvidia.__path__]
    except ImportError:
        pass
    try:
        import triton
        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _listed(cuobjdump: str, path: str, flag: str) -> frozenset[str]:
    result = subprocess.run([cuobjdump, flag, path], capture_output=True, text=True)
    if result.returncode != 0:
        if "does not contain" in (result.stdout + result.stderr):  # no device code of that kind at all
            return frozenset()
        raise RuntimeError(f"{cuobjdump} {flag} {path} failed: {(result.stderr or result.stdout).strip()}")
    return frozenset(re.findall(r"\.sm_(\d+[af]?)\.(?:cubin|ptx)\b", result.stdout))


def module_contents(path: str, cuobjdump: str | None = None) -> Contents:
    """The SASS and PTX architectures in a compiled file (fastcv's _C module, a shared library)."""
    cuobjdump = cuobjdump or find_cuobjdump()
    if cuobjdump is None:
        raise FileNotFoundError("cuobjdump not found (PATH, CUDA_HOME/bin, PyPI's nvidia-cuda-cuobjdump, Triton's "
                                "package): pip install nvidia-cuda-cuobjdump")
    return Contents(_listed(cuobjdump, path, "--list-elf"), _listed(cuobjdump, path, "--list-ptx"))


def verify(path: str, archs: str, cuobjdump: str | None = None) -> list[str]:
    """Problems with the module at `path` built for `archs` (empty when it holds exactly what was asked)."""
    want = asked(archs)
    if want is None:
        return []
    have = module_contents(path, cuobjdump)
    problems = []
    for kind, w, h in (("SASS", want.sass, have.sass), ("PTX", want.ptx, have.ptx)):
        if w - h:
            problems.append(f"{kind} missing for {', '.join(f'sm_{a}' for a in sorted(w - h))}")
        if h - w:
            problems.append(f"{kind} present but not asked for: {', '.join(f'sm_{a}' for a in sorted(h - w))}")
    return problems


def installed_record() -> dict | None:
    """The build record in the installed distribution's metadata; None where it has none (a build from
    before the record, or fastcv imported from a source tree without being installed)."""
    try:
        text = importlib.metadata.distribution("fastcv").read_text(RECORD)
    except importlib.metadata.PackageNotFoundError:
        return None
    return json.loads(text) if text else None


def wheel_record(wheel: str, module_dir: str) -> tuple[dict, str]:
    """A wheel's build record, and its compiled module extracted into module_dir (for module_contents)."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        records = [n for n in names if n.endswith(f".dist-info/{RECORD}")]
        modules = [n for n in names if re.fullmatch(r"fastcv/_C\.[^/]*\.so", n)]
        if len(records) != 1 or len(modules) != 1:
            raise ValueError(f"{wheel} is not a fastcv wheel with one build record and one compiled module "
                             f"(found records {records}, modules {modules})")
        return json.loads(z.read(records[0])), z.extract(modules[0], module_dir)
