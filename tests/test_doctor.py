"""python -m fastcv doctor: the report on this machine, and on pretend GPUs and builds."""
import json
import re
import subprocess
import sys
import types
import warnings

import pytest
import torch

import fastcv
from fastcv import _C, _backend, doctor, fatbin
from fastcv.__main__ import main

H200 = _backend.Gpu(0, "NVIDIA H200", (9, 0))
T4 = _backend.Gpu(1, "Tesla T4", (7, 5))


def test_doctor_on_this_machine():
    result = subprocess.run([sys.executable, "-m", "fastcv", "doctor"], capture_output=True, text=True, timeout=300)
    out = result.stdout
    for section in (f"fastcv      {fastcv.__version__}", "torch       ", "Python      ", "C++         ",
                    "CUDA        ", "CPU ISA     ", "threads     ", "Kernels each op runs, per device, and why:"):
        assert section in out, (section, out)
    for op in _backend.GPU_KERNELS:
        assert f"  {op}: for " in out
    assert f"    cpu     C++ ({fastcv.cpu.cpu_isa()})" in out
    if not torch.cuda.is_available():  # a machine without a GPU has nothing to fix, whatever its build
        assert "GPUs        none visible" in out and "No problems found." in out
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode == (1 if "problem" in out.split("why:")[1] else 0), out


def test_doctor_help_states_the_exit_status(capsys):
    with pytest.raises(SystemExit):
        main(["doctor", "--help"])
    assert "Exit status: 0 when no problem is found, 1 when there is one." in capsys.readouterr().out


def test_info_is_the_facts_without_the_ops(capsys):
    main(["info"])
    out = capsys.readouterr().out
    assert out.startswith(f"fastcv      {fastcv.__version__}") and "CPU ISA" in out
    assert "Kernels each op runs" not in out and "problem" not in out


def test_every_public_op_is_named():
    named = set(re.findall(r"\w+", " ".join(doctor.USED_BY.values())))
    assert set(doctor.USED_BY) == set(_backend.GPU_KERNELS)
    assert set(fastcv.ops.__all__) - {"Detections", "fold_batch_norm"} <= named


# ---------------------------------------------------------------- pretend GPUs and builds


@pytest.fixture
def pretend(monkeypatch):
    """Two GPUs torch sees (an H200 and a T4) and a CUDA build for sm_80 and sm_90 (PTX for newer);
    tests change the build or the settings from there."""
    monkeypatch.setattr(_backend, "_choices", {})
    monkeypatch.setattr(_backend, "_warned", set())
    for name in doctor.SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_backend, "CUDA_BUILT", True)
    monkeypatch.setattr(_backend, "CUDA_ARCHS", "80-real,90-real,90-virtual")
    monkeypatch.setattr(fatbin, "installed_record", lambda: None)  # the record's own test pretends one
    monkeypatch.setattr(_backend, "gpu", lambda index: (H200, T4)[index])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(total_memory=2**34))
    runtime = {"runtime_version": 13000, "driver_version": 13010, "error": "", "devices": [
        {"index": g.index, "name": g.name, "capability": g.capability} for g in (H200, T4)]}
    monkeypatch.setattr(_C, "cuda_runtime_info", lambda: runtime, raising=False)
    return runtime


def _run(capsys, *args):
    with pytest.raises(SystemExit) as exit_:
        main(["doctor", *args])
    return exit_.value.code, capsys.readouterr().out


def _gpu_tensor(index):
    return types.SimpleNamespace(is_cpu=False, is_cuda=True, device=torch.device("cuda", index))


def _selected(op, index):
    """What select() does with op on GPU `index`: its backend, or None when it raises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _backend.select(op, _gpu_tensor(index))
    except RuntimeError:
        return None


SCENARIOS = {
    "as built": {},
    "strict": {"env": {"FASTCV_STRICT": "1"}},
    "triton asked for": {"env": {"FASTCV_GPU_BACKEND": "triton"}},
    "no CUDA kernels": {"built": False},
    "no triton": {"triton": False},
    "architectures cover both": {"archs": "75-real,90-real"},
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_doctor_reports_what_select_does(pretend, monkeypatch, scenario):
    setup = SCENARIOS[scenario]
    for name, value in setup.get("env", {}).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(_backend, "CUDA_BUILT", setup.get("built", True))
    monkeypatch.setattr(_backend, "CUDA_ARCHS", setup.get("archs", "80-real,90-real,90-virtual"))
    monkeypatch.setattr(_backend, "triton_available", lambda: setup.get("triton", True))
    facts = doctor.collect()
    json.dumps(facts)  # what --json prints
    assert [g["sm"] for g in facts["gpus"]] == ["sm_90", "sm_75"]
    for op, row in facts["backends"].items():
        assert list(row) == ["cpu", "cuda:0", "cuda:1"]
        assert row["cpu"]["backend"] == _backend.select(op, torch.zeros(1))
        for index in (0, 1):
            assert row[f"cuda:{index}"]["backend"] == _selected(op, index), (op, index, row)
    assert bool(facts["problems"]) == (scenario != "architectures cover both")


def test_doctor_covered_gpu(pretend, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, out = _run(capsys)
    assert code == 0, out
    assert "GPU 0       NVIDIA H200 (sm_90, 16.0 GiB): covered by this build" in out
    assert "driver      supports CUDA up to 13.1" in out and "runtime     CUDA 13.0" in out
    assert "    cuda:0  CUDA C++: built for 80-real,90-real,90-virtual, the GPU is sm_90" in out
    assert "    cuda:0  Triton: conv2d has no CUDA C++ kernels" in out
    assert "No problems found." in out


def test_doctor_uncovered_gpu(pretend, capsys):
    code, out = _run(capsys)
    assert code == 1
    assert "GPU 1       Tesla T4 (sm_75, 16.0 GiB): NOT covered by this build's architectures" in out
    assert ("    cuda:1  Triton instead (warns once): the CUDA kernels, built for 80-real,90-real,90-virtual, cannot "
            "run on sm_75") in out
    assert ("    cuda:1  error: the CUDA kernels, built for 80-real,90-real,90-virtual, cannot run on sm_75, and "
            "im2col has no Triton kernels") in out
    problems = out.split("1 problem found:\n")[1]
    assert ("GPU 1 (Tesla T4, sm_75) is not covered by the CUDA architectures this build has (80-real,90-real,"
            "90-virtual): the ops with Triton kernels run those instead (with a warning); roi_align_backward, "
            "multi_scale_roi_align, im2col raise") in problems
    assert 'fix: cd ' in problems and 'FASTCV_CUDA_ARCHS="80-real;90-real;90-virtual;75-real" pip install' in problems
    code, out = _run(capsys, "--json")
    facts = json.loads(out)
    assert code == 1 and [g["covered"] for g in facts["gpus"]] == [True, False]
    assert facts["backends"]["nms"]["cuda:1"]["backend"] == "triton" and len(facts["problems"]) == 1


def test_doctor_strict(pretend, monkeypatch, capsys):
    monkeypatch.setenv("FASTCV_STRICT", "1")
    code, out = _run(capsys)
    assert code == 1 and "settings    FASTCV_STRICT=1" in out
    assert "    cuda:1  error: the CUDA kernels, built for 80-real,90-real,90-virtual, cannot run on sm_75, and " \
           "FASTCV_STRICT=1 forbids Triton's instead" in out
    assert "FASTCV_STRICT=1: every op with CUDA kernels raises there" in out


def test_doctor_no_cuda_kernels_with_a_gpu(pretend, monkeypatch, capsys):
    monkeypatch.setattr(_backend, "CUDA_BUILT", False)
    code, out = _run(capsys)
    assert code == 1 and "CUDA        kernels not built" in out
    assert "    cuda:0  Triton: no CUDA kernels in this build" in out
    assert ("this build has no CUDA kernels (nvcc was not found at build time, or FASTCV_WITH_CUDA=OFF), but there "
            "is a GPU: im2col, multi_scale_roi_align, roi_align_backward raise there") in out
    assert 'FASTCV_WITH_CUDA="ON" FASTCV_CUDA_ARCHS="75-real;90-real" pip install' in out


def test_doctor_triton_missing(pretend, monkeypatch, capsys):
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    code, out = _run(capsys)
    assert code == 1 and "triton      not installed" in out
    assert "triton is not installed: attention, conv2d cannot run on the GPU\n     fix: pip install triton" in out


def test_doctor_gpu_backend_triton(pretend, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("FASTCV_GPU_BACKEND", "triton")
    code, out = _run(capsys)
    assert code == 1 and "    cuda:0  Triton: FASTCV_GPU_BACKEND=triton" in out
    assert "which im2col, multi_scale_roi_align, roi_align_backward do not have" in out
    assert "fix: unset FASTCV_GPU_BACKEND" in out


def test_doctor_torch_cannot_see_the_gpus(pretend, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out = _run(capsys)
    assert code == 1 and "the CUDA runtime sees 2 GPU(s), but torch sees none" in out


def test_doctor_driver_too_old(pretend, capsys):
    pretend.update(error="CUDA driver version is insufficient for CUDA runtime version", devices=[],
                   driver_version=12040)
    code, out = _run(capsys)
    assert code == 1 and "cannot use the GPUs torch sees: CUDA driver version is insufficient" in out
    assert "the driver supports CUDA up to 12.4" in out


def test_doctor_torch_too_old(pretend, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    required = doctor._required_torch()
    if required is None:
        pytest.skip("fastcv's metadata is not installed (a source tree on sys.path)")
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    code, out = _run(capsys)
    assert code == 1 and f'torch 2.5.1+cpu is older than the torch>={required}' in out
    assert f'fix: pip install "torch>={required}"' in out


def test_doctor_module_from_another_build(pretend, monkeypatch, capsys):
    """The distribution's metadata records one build and the module imported is another (a stale _C left in a
    checkout after a rebuild elsewhere, say): the report names both and the rebuild."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    record = {"version": fastcv.__version__, "cuda_archs": "90a-real", "nvcc": "13.5.37", "nvcc_from": "pip",
              "cpu_isas": ["baseline", "avx2"]}
    monkeypatch.setattr(fatbin, "installed_record", lambda: record)
    code, out = _run(capsys)
    assert code == 1
    assert ("the compiled module holds CUDA architectures '80-real,90-real,90-virtual', but the installed "
            "distribution records '90a-real'") in out
    assert 'FASTCV_CUDA_ARCHS="90a-real"' in out
    assert ("metadata    fastcv-0.1.0.dist-info/fastcv_build.json: CUDA architectures '90a-real', nvcc 13.5.37 "
            "(pip), CPU baseline, avx2") in out
    record["cuda_archs"] = "80-real;90-real;90-virtual"  # the same list, written with semicolons
    code, out = _run(capsys)
    assert code == 0 and "No problems found." in out
