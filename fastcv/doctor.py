"""python -m fastcv doctor: what this installation is, which kernels each op runs where, and why.

collect() gathers the facts as a dict (`--json` prints it), render() writes them as text; info (`python
-m fastcv info`) is the part without the ops and the problems. Each op's backend comes from
fastcv._backend.choice, the function select() itself asks, so the report is the decision ops make.
Each problem found comes with the command that fixes it; the command exits 1 when there is one.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import sys

import torch

import fastcv
from fastcv import _C, _backend, fatbin

# The public ops each entry of _backend.GPU_KERNELS runs (tests check that every public op is here).
USED_BY = {
    "nms": "nms, batched_nms, batched_nms_padded",
    "roi_align": "roi_align, forward",
    "roi_align_backward": "roi_align and multi_scale_roi_align, backward",
    "multi_scale_roi_align": "multi_scale_roi_align, forward",
    "batch_norm": "batch_norm, batch_norm_relu, batch_norm_add_relu, conv2d_batch_norm",
    "conv2d": "conv2d, conv2d_fused, conv2d_batch_norm, conv_transpose2d, when dense or fused",
    "depthwise_conv2d": "conv2d, conv_transpose2d, when depthwise and not fused",
    "im2col": "im2col, col2im",
    "attention": "scaled_dot_product_attention",
}

SETTINGS = ("FASTCV_CPU_ISA", "FASTCV_GPU_BACKEND", "FASTCV_STRICT", "TRITON_INTERPRET")


def _cuda_version(number: int) -> str | None:
    """CUDA's integer versions (12040) as text ("12.4")."""
    return f"{number // 1000}.{number % 1000 // 10}" if number else None


def _nvidia_driver() -> str | None:
    """The NVIDIA kernel driver's version (Linux), which neither torch nor the CUDA runtime report."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            found = re.search(r"Kernel Module\s+(\S+)", f.read())
    except OSError:
        return None
    return found.group(1) if found else None


def _triton() -> tuple[str | None, str | None]:
    """(triton's version, why it cannot be imported): one of them is None."""
    if not _backend.triton_available():
        return None, "not installed"
    try:
        import triton
    except Exception as e:  # installed but broken (a missing library, a torch mismatch)
        return None, f"installed, but importing it fails: {e}"
    return triton.__version__, None


def _required_torch() -> str | None:
    """The lowest torch this fastcv asks for, from its installed metadata (pyproject's dependencies)."""
    try:
        requires = importlib.metadata.requires("fastcv") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for line in requires:
        found = re.fullmatch(r"torch\s*>=\s*([\d.]+)", line.split(";")[0].strip())
        if found:
            return found.group(1)
    return None


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def _cpu_facts() -> dict:
    isa, available = fastcv.cpu.cpu_isa(), fastcv.cpu.available_cpu_isas()
    forced = os.environ.get("FASTCV_CPU_ISA")
    if forced:
        why = f"forced by FASTCV_CPU_ISA={forced}"
    elif isa == available[-1]:
        why = "the best this CPU runs"
    else:
        why = "set by fastcv.cpu.set_cpu_isa"
    return {"isa": isa, "why": why, "available": available, "compiled": fastcv.cpu.compiled_cpu_isas(),
            "threads": torch.get_num_threads(), "parallel_backend": _C.parallel_backend()}


def _gpu_facts() -> tuple[dict, list[dict]]:
    """The CUDA runtime's and driver's versions, and each GPU with whether this build covers it."""
    runtime_info = getattr(_C, "cuda_runtime_info", None)  # CUDA builds only
    runtime = runtime_info() if _backend.CUDA_BUILT and runtime_info else None
    cuda = {
        "torch_cuda": torch.version.cuda,
        "torch_sees_gpus": torch.cuda.is_available(),
        "runtime": _cuda_version(runtime["runtime_version"]) if runtime else None,
        "driver_supports": _cuda_version(runtime["driver_version"]) if runtime else None,
        "driver": _nvidia_driver(),
        "runtime_error": (runtime["error"] or None) if runtime else None,
        "runtime_devices": len(runtime["devices"]) if runtime else None,
    }
    gpus = []
    if cuda["torch_sees_gpus"]:
        for index in range(torch.cuda.device_count()):
            dev = _backend.gpu(index)
            covered = _backend.arch_covers(_backend.CUDA_ARCHS, dev.capability) if _backend.CUDA_BUILT else None
            gpus.append({"index": index, "name": dev.name, "capability": list(dev.capability), "sm": dev.sm,
                         "memory_gib": round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1),
                         "covered": covered})
    return cuda, gpus


def _backends(gpus: list[dict]) -> dict:
    devices = ["cpu"] + [f"cuda:{g['index']}" for g in gpus]
    table = {}
    for op in _backend.GPU_KERNELS:
        table[op] = {}
        for device in devices:
            chosen = _backend.choice(op, "cpu" if device == "cpu" else int(device.split(":")[1]))
            table[op][device] = {"backend": chosen.backend, "reason": chosen.reason, "cause": chosen.cause}
    return table


def _problems(facts: dict) -> list[dict]:
    """What keeps this installation from running every op on every device it has, each with its fix."""
    problems = []

    def add(problem: str, fix: str) -> None:
        problems.append({"problem": problem, "fix": fix})

    required = _required_torch()
    if required and _version_tuple(torch.__version__) < _version_tuple(required):
        add(f"torch {torch.__version__} is older than the torch>={required} fastcv asks for",
            f'pip install "torch>={required}"')
    record = facts["build"]["record"]
    if record is not None and fatbin.asked(record["cuda_archs"]) != fatbin.asked(_backend.CUDA_ARCHS):
        add(f"the compiled module holds CUDA architectures '{_backend.CUDA_ARCHS}', but the installed "
            f"distribution records '{record['cuda_archs']}': a module left from another build",
            _backend.rebuild_command(FASTCV_CUDA_ARCHS=record["cuda_archs"]) if record["cuda_archs"]
            else _backend.rebuild_command(FASTCV_WITH_CUDA="OFF"))
    cuda, gpus, backends = facts["cuda"], facts["gpus"], facts["backends"]
    if cuda["runtime_devices"] and not cuda["torch_sees_gpus"]:
        add(f"the CUDA runtime sees {cuda['runtime_devices']} GPU(s), but torch sees none "
            f"(torch {torch.__version__}, built for CUDA {cuda['torch_cuda'] or 'none: a CPU-only torch'})",
            "install a CUDA build of torch: https://pytorch.org/get-started/locally/")
    if gpus and cuda["runtime_error"]:
        add(f"fastcv's CUDA runtime ({cuda['runtime']}) cannot use the GPUs torch sees: {cuda['runtime_error']} "
            f"(the driver supports CUDA up to {cuda['driver_supports'] or 'unknown'})",
            "update the NVIDIA driver, or rebuild fastcv with the CUDA toolkit the driver supports: "
            + _backend.rebuild_command(FASTCV_WITH_CUDA="ON"))

    def failing(device: str, cause: str) -> list[str]:
        return [op for op, row in backends.items() if row[device]["backend"] is None and row[device]["cause"] == cause]

    uncovered = [g for g in gpus if g["covered"] is False]
    if uncovered:
        strict = os.environ.get("FASTCV_STRICT", "") not in ("", "0")
        for g in uncovered:
            device = f"cuda:{g['index']}"
            if strict:
                effect = "FASTCV_STRICT=1: every op with CUDA kernels raises there"
            else:
                raising = failing(device, "uncovered")
                effect = ("the ops with Triton kernels run those instead (with a warning)"
                          + (f"; {', '.join(raising)} raise" if raising else ""))
            add(f"GPU {g['index']} ({g['name']}, {g['sm']}) is not covered by the CUDA architectures this build "
                f"has ({_backend.CUDA_ARCHS}): {effect}",
                _backend.rebuild_command(FASTCV_CUDA_ARCHS=_backend.archs_with(
                    sorted({tuple(g["capability"]) for g in uncovered}))))
    if gpus and not _backend.CUDA_BUILT:
        raising = sorted({op for g in gpus for op in failing(f"cuda:{g['index']}", "no_cuda_build")})
        archs = ";".join(sorted({f"{g['capability'][0]}{g['capability'][1]}-real" for g in gpus}))
        add("this build has no CUDA kernels (nvcc was not found at build time, or FASTCV_WITH_CUDA=OFF), but "
            f"there is a GPU: {', '.join(raising)} raise there, the others run Triton's kernels",
            "install the CUDA toolkit (nvcc on PATH, or CUDACXX=/path/to/nvcc), then "
            + _backend.rebuild_command(FASTCV_WITH_CUDA="ON", FASTCV_CUDA_ARCHS=archs))
    if gpus:
        raising = sorted({op for g in gpus for op in failing(f"cuda:{g['index']}", "no_triton")})
        if facts["versions"]["triton"] is None and (raising or _backend.triton_available()):
            why = facts["versions"]["triton_error"]
            add(f"triton is {why}: "
                + (f"{', '.join(raising)} cannot run on the GPU" if raising else "the Triton kernels cannot run"),
                "pip install triton" if why == "not installed" else "pip install --force-reinstall triton")
        forced = sorted({op for g in gpus for op in failing(f"cuda:{g['index']}", "gpu_backend")})
        if forced:
            add(f"FASTCV_GPU_BACKEND=triton asks for Triton, which {', '.join(forced)} do not have: they raise on "
                "the GPU", "unset FASTCV_GPU_BACKEND")
    return problems


def collect(ops: bool = True) -> dict:
    """Every fact the report prints, as JSON-able values; ops=False: without the ops and the problems."""
    build = _C.build_info
    triton_version, triton_error = _triton()
    cuda, gpus = _gpu_facts()
    root = _backend.source_checkout()
    facts = {
        "versions": {"fastcv": fastcv.__version__, "torch": torch.__version__, "triton": triton_version,
                     "triton_error": triton_error, "python": platform.python_version()},
        "install": {"path": os.path.dirname(fastcv.__file__), "source_checkout": str(root) if root else None},
        "build": {"compiler": build["cxx"], "cuda": _backend.CUDA_BUILT, "nvcc": build["nvcc"] or None,
                  "cuda_archs": _backend.CUDA_ARCHS or None, "record": fatbin.installed_record()},
        "settings": {name: os.environ[name] for name in SETTINGS if name in os.environ},
        "cpu": _cpu_facts(),
        "cuda": cuda,
        "gpus": gpus,
    }
    if ops:
        facts["backends"] = _backends(gpus)
        facts["problems"] = _problems(facts)
    return facts


def _line(label: str, text: str) -> str:
    return f"{label:<12}{text}"


def render(facts: dict) -> str:
    v, build, cpu, cuda = facts["versions"], facts["build"], facts["cpu"], facts["cuda"]
    source = facts["install"]["source_checkout"]
    lines = [
        _line("fastcv", f"{v['fastcv']} ({facts['install']['path']}"
                        + (", from its source checkout)" if source else ")")),
        _line("torch", f"{v['torch']}" + (f" (CUDA {cuda['torch_cuda']})" if cuda["torch_cuda"] else " (CPU only)")),
        _line("triton", v["triton"] or v["triton_error"]),
        _line("Python", v["python"]),
        _line("C++", ("g++ " if build["compiler"][:1].isdigit() else "") + build["compiler"]),
    ]
    if build["cuda"]:
        nvcc = build["nvcc"] or "(version unknown)"
        lines.append(_line("CUDA", f"kernels built with nvcc {nvcc} for architectures {build['cuda_archs']}"))
    else:
        lines.append(_line("CUDA", "kernels not built (no nvcc at build time, or FASTCV_WITH_CUDA=OFF)"))
    record = build["record"]
    if record is not None:
        nvcc = f"nvcc {record['nvcc']} ({record['nvcc_from']}), " if record["nvcc"] else ""
        lines.append(_line("metadata", f"fastcv-{record['version']}.dist-info/{fatbin.RECORD}: CUDA architectures "
                                       f"'{record['cuda_archs']}', {nvcc}CPU {', '.join(record['cpu_isas'])}"))
    lines.append(_line("CPU ISA", f"{cpu['isa']} in use ({cpu['why']}); this CPU runs {', '.join(cpu['available'])} "
                                  f"(compiled: {', '.join(cpu['compiled'])})"))
    lines.append(_line("threads", f"{cpu['threads']} (torch.get_num_threads()), run by {cpu['parallel_backend']}"))
    if facts["settings"]:
        lines.append(_line("settings", ", ".join(f"{k}={val}" for k, val in facts["settings"].items())))
    driver = ", ".join(filter(None, [
        cuda["driver"] and f"NVIDIA {cuda['driver']}",
        cuda["driver_supports"] and f"supports CUDA up to {cuda['driver_supports']}"]))
    if driver:
        lines.append(_line("driver", driver))
    if cuda["runtime"]:
        lines.append(_line("runtime", f"CUDA {cuda['runtime']} (fastcv's, linked statically)"
                                      + (f": {cuda['runtime_error']}" if cuda["runtime_error"] else "")))
    if not facts["gpus"]:
        why = ("torch.cuda.is_available() is False" if cuda["torch_cuda"] else "this torch is built without CUDA")
        lines.append(_line("GPUs", f"none visible ({why})"))
    for g in facts["gpus"]:
        verdict = {True: "covered by this build", None: "no CUDA kernels in this build",
                   False: "NOT covered by this build's architectures"}[g["covered"]]
        lines.append(_line(f"GPU {g['index']}", f"{g['name']} ({g['sm']}, {g['memory_gib']} GiB): {verdict}"))
    if "backends" not in facts:
        return "\n".join(lines)
    lines += ["", "Kernels each op runs, per device, and why:"]
    for op, row in facts["backends"].items():
        lines.append(f"  {op}: for {USED_BY.get(op, op)}")
        lines += [f"    {device:<8}{entry['reason']}" for device, entry in row.items()]
    problems = facts["problems"]
    lines.append("")
    if not problems:
        lines.append("No problems found.")
    else:
        lines.append(f"{len(problems)} problem{'s' if len(problems) > 1 else ''} found:")
        for number, p in enumerate(problems, 1):
            lines += [f"  {number}. {p['problem']}", f"     fix: {p['fix']}"]
    return "\n".join(lines)


def info() -> None:
    """python -m fastcv info: the installation's facts, without the ops and the problems."""
    print(render(collect(ops=False)))


def doctor(as_json: bool = False) -> int:
    """python -m fastcv doctor: prints the report; returns 0 when no problem was found, else 1."""
    facts = collect()
    print(json.dumps(facts, indent=2) if as_json else render(facts))
    sys.stdout.flush()
    return 1 if facts["problems"] else 0
