"""fastcv.fatbin / `python -m fastcv archs`: the GPU code a compiled module holds, read with cuobjdump, against the
CUDA architectures asked for. The reading is tested on a small library nvcc builds here for a known list (nvcc and
cuobjdump are on CI's machine: nvcc for the CUDA build, cuobjdump in Triton's package or PyPI's)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from fastcv import _C, fatbin
from fastcv.__main__ import main

KERNEL = '__global__ void k(float* x) { x[threadIdx.x] += 1.0f; }\nextern "C" void launch(float* x) { k<<<1, 32>>>(x); }\n'


def test_asked_parses_cmake_architecture_lists():
    assert fatbin.asked("80-real;90a-real;90-virtual") == ({"80", "90a"}, {"90"})
    assert fatbin.asked("90") == ({"90"}, {"90"})
    assert fatbin.asked("75-real,100a-real") == ({"75", "100a"}, set())  # the build records commas
    assert fatbin.asked("native") is None and fatbin.asked("all") is None
    with pytest.raises(ValueError, match="not a CUDA architecture: 'sm_90'"):
        fatbin.asked("sm_90")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A shared library with SASS for sm_80 and sm_90a and PTX for compute_90 (what FASTCV_CUDA_ARCHS
    "80-real;90a-real;90-virtual" gives)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None or fatbin.find_cuobjdump() is None:
        pytest.skip("needs nvcc and cuobjdump (CI's machine has both)")
    d = tmp_path_factory.mktemp("fatbin")
    (d / "k.cu").write_text(KERNEL)
    subprocess.run([nvcc, "-shared", "-Xcompiler", "-fPIC", "-o", str(d / "libk.so"), str(d / "k.cu"),
                    "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a",
                    "-gencode", "arch=compute_90,code=compute_90"], check=True, capture_output=True)
    return str(d / "libk.so")


def test_module_contents_and_verify(library):
    assert fatbin.module_contents(library) == ({"80", "90a"}, {"90"})
    assert fatbin.verify(library, "80-real;90a-real;90-virtual") == []
    assert fatbin.verify(library, "80-real;90a-real;90-virtual;100-real") == ["SASS missing for sm_100"]
    assert fatbin.verify(library, "80-real;90-virtual") == ["SASS present but not asked for: sm_90a"]
    assert fatbin.verify(library, "80-real;90a-real") == ["PTX present but not asked for: sm_90"]


def test_archs_command_exits_1_on_a_mismatch(library, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["archs", "--module", library, "--expect", "80-real;90a-real;90-virtual"])
    assert exit_.value.code == 0 and "exactly the architectures asked for" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["archs", "--module", library, "--expect", "80-real;90-real;90-virtual"])
    out = capsys.readouterr().out
    assert exit_.value.code == 1 and "SASS missing for sm_90" in out and "not asked for: sm_90a" in out


def test_this_build_holds_what_it_was_asked_for(capsys):
    """fastcv's own module: exactly its FASTCV_CUDA_ARCHS (CI builds sm_90 SASS only), or nothing for a CPU build."""
    archs = _C.build_info["cuda_archs"]
    if archs and fatbin.find_cuobjdump() is None:
        pytest.skip("needs cuobjdump to read the CUDA build")
    with pytest.raises(SystemExit) as exit_:
        main(["archs"])
    assert exit_.value.code == 0, capsys.readouterr().out
    if archs and fatbin.asked(archs) is not None:
        assert fatbin.module_contents(_C.__file__) == fatbin.asked(archs)
