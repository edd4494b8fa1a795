import os

import pytest
import torch

# Triton kernels run on the CPU only through the interpreter, which must be switched on before triton
# decorates any kernel. On a machine with a GPU the real compiler is used instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastcv  # noqa: E402  (registers the ops)
from fastcv import _backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available() and _backend.CUDA_BUILT

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")),
]


# Ops whose GPU kernels are Triton's alone (attention) need a GPU but not the CUDA C++ build.
GPU_DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


# The CPU kernels are compiled per instruction set and one is picked at run time, so a CPU test proves
# only the path its machine picks. A module whose kernels depend on the ISA declares
# `pytestmark = pytest.mark.usefixtures("cpu_isa")`: each of its tests then runs under every ISA this
# CPU supports, forced (fastcv.cpu.force_cpu_isa).
CPU_ISAS = fastcv.cpu.available_cpu_isas()


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request):
    with fastcv.cpu.force_cpu_isa(request.param):
        yield request.param


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny tensors (`pytest.mark.usefixtures("one_thread")`): with two
    threads on a shared two-core machine, thread hand-offs cost more than the work (milliseconds per GEMM,
    about 100x the work, in the attention modules)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """A GPU test does not depend on the CPU's instruction set: it runs once, under the best one."""
    drop = []
    for item in items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        if params.get("cpu_isa", CPU_ISAS[-1]) != CPU_ISAS[-1] and "cuda" in map(str, params.values()):
            drop.append(item)
    if drop:
        dropped = set(map(id, drop))
        items[:] = [item for item in items if id(item) not in dropped]
        config.hook.pytest_deselected(items=drop)


def pytest_report_header(config):
    return (f"fastcv CPU instruction sets tested: {', '.join(CPU_ISAS)} "
            f"(compiled: {', '.join(fastcv.cpu.compiled_cpu_isas())})")


def triton_device() -> str:
    """Where the Triton kernel tests run: the GPU, compiled, or the CPU through the interpreter."""
    if torch.cuda.is_available():
        return "cuda"
    assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py must switch the interpreter on"
    return "cpu"
