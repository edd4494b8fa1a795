"""fastcv.fatbin / `python -m fastcv archs`: the GPU code a compiled module holds, read with cuobjdump, against the
CUDA architectures asked for. The reading is tested on a small library nvcc builds here for a known list (nvcc and
cuobjdump are on CI's machine: nvcc for the CUDA build, cuobjdump in Triton's package or PyPI's)."""
from __future__ import annotations

import json
import shutil
import subprocess
import zipfile

import pytest

import fastcv
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


def test_the_installed_record_describes_this_module():
    """Every install (editable or wheel) carries the build's record in its metadata; it names the module's
    architectures and nvcc, and the CPU instruction sets compiled."""
    record = fatbin.installed_record()
    assert record is not None, "fastcv_build.json missing from the installed distribution's metadata"
    build = _C.build_info
    assert record["version"] == fastcv.__version__
    assert fatbin.asked(record["cuda_archs"]) == fatbin.asked(build["cuda_archs"])
    assert record["nvcc"] == build["nvcc"]
    assert record["nvcc_from"] in (("pip", "system") if build["nvcc"] else ("",))
    assert record["cpu_isas"] == list(build["cpu_isas"])


def _fake_wheel(path, record, module=b"not a real module"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("fastcv-0.1.0.dist-info/fastcv_build.json", json.dumps(record))
        z.writestr("fastcv/_C.cpython-311-x86_64-linux-gnu.so", module)
    return str(path)


def test_archs_wheel_checks_the_record_against_the_expected_list(tmp_path, capsys):
    """The record disagreeing with --expect fails before the module is read; a CPU-only record needs no
    cuobjdump. (The record against the module's real code: CI's packaging step, on the wheel it builds.)"""
    record = {"version": "0.1.0", "cuda_archs": "90a-real", "nvcc": "13.5.37", "nvcc_from": "pip",
              "cpu_isas": ["baseline"]}
    wheel = _fake_wheel(tmp_path / "fastcv-0.1.0-cp311-cp311-linux_x86_64.whl", record)
    with pytest.raises(SystemExit) as exit_:
        main(["archs", "--wheel", wheel, "--expect", "90-real"])
    out = capsys.readouterr().out
    assert exit_.value.code == 1
    assert "records CUDA architectures '90a-real', nvcc 13.5.37 (from pip), CPU instruction sets baseline" in out
    assert "PROBLEM: the wheel records '90a-real', not the expected '90-real'" in out
    cpu_only = _fake_wheel(tmp_path / "cpu.whl", dict(record, cuda_archs="", nvcc="", nvcc_from=""))
    with pytest.raises(SystemExit) as exit_:
        main(["archs", "--wheel", cpu_only, "--expect", ""])
    assert exit_.value.code == 0 and "nothing to check" in capsys.readouterr().out
    with zipfile.ZipFile(tmp_path / "other.whl", "w") as z:
        z.writestr("other-1.0.dist-info/METADATA", "")
    with pytest.raises(ValueError, match="not a fastcv wheel with one build record and one compiled module"):
        main(["archs", "--wheel", str(tmp_path / "other.whl")])


def test_archs_wheel_reads_the_module_it_carries(library, tmp_path, capsys):
    """A record that claims what the carried module lacks is caught by reading the module's code."""
    record = {"version": "0.1.0", "cuda_archs": "80-real;90a-real;90-virtual", "nvcc": "13.0", "nvcc_from": "system",
              "cpu_isas": ["baseline"]}
    with open(library, "rb") as f:
        module = f.read()
    wheel = _fake_wheel(tmp_path / "a.whl", record, module)
    with pytest.raises(SystemExit) as exit_:
        main(["archs", "--wheel", wheel])
    assert exit_.value.code == 0 and "exactly the architectures asked for" in capsys.readouterr().out
    wheel = _fake_wheel(tmp_path / "b.whl", dict(record, cuda_archs="80-real;90-real"), module)
    with pytest.raises(SystemExit) as exit_:
        main(["archs", "--wheel", wheel])
    out = capsys.readouterr().out
    assert exit_.value.code == 1 and "SASS missing for sm_90" in out and "PTX present but not asked for" in out
