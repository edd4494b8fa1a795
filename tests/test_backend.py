"""The binding boundary, build information and the command line."""
import json
import subprocess
import sys
import warnings

import pytest
import torch

import fastcv
from fastcv import _C, _backend


@pytest.mark.parametrize(
    "archs,capability,covered",
    [
        ("80-real;90-real;90-virtual", (8, 0), True),
        ("80-real;90-real;90-virtual", (8, 6), True),  # sm_80 machine code runs on every 8.x GPU
        ("80-real;90-real;90-virtual", (7, 5), False),
        ("80-real;90-real;90-virtual", (10, 0), True),  # through compute_90 PTX
        ("80-real;90-real", (10, 0), False),
        ("86-real", (8, 0), False),  # newer machine code does not run on an older GPU
        ("90a-real", (9, 0), True),
        ("90a-real", (10, 0), False),  # arch-specific code runs only where it was built
        ("75-virtual", (12, 0), True),
        ("80", (8, 9), True),  # a bare number means real and virtual
        ("native", (7, 0), True),
        ("80-real,90-real", (9, 0), True),  # the comma form the build reports
    ],
)
def test_arch_covers(archs, capability, covered):
    assert _backend.arch_covers(archs, capability) is covered


def test_compiled_module_reads_tensors_and_rejects_others():
    # The bindings take torch tensors as they are; what they cannot run on is a clear ValueError.
    boxes, scores, keep = torch.rand(4, 4), torch.rand(4), torch.empty(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="fastcv's kernels take float32, .* got torch.complex64"):
        _C.nms_cpu(boxes.to(torch.complex64), scores, None, 0.5, keep, 1)
    with pytest.raises(ValueError, match="run on CPU and CUDA tensors, got one on meta"):
        _C.nms_cpu(boxes.to("meta"), scores, None, 0.5, keep, 1)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        _C.nms_cpu((0, (4, 4)), scores, None, 0.5, keep, 1)
    n = _C.nms_cpu(boxes, scores, None, 0.5, keep, 1)  # and a valid call runs
    assert 1 <= n <= 4


def test_temporary_argument_stays_valid_during_the_call():
    # _C.im2col_cpu(x.contiguous(), ...) passes a tensor nothing else holds: the call keeps it alive.
    from fastcv import ops
    import torch.nn.functional as F

    x = torch.randn(8, 24, 20).transpose(1, 2)  # not contiguous: im2col copies it
    for _ in range(20):
        assert torch.equal(ops.im2col(x, 3, padding=1), F.unfold(x, 3, padding=1))


def test_compiled_module_errors_are_value_errors():
    assert issubclass(_C.ArgError, ValueError)
    boxes, scores, keep = torch.rand(4, 4), torch.rand(4), torch.empty(4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"iou_threshold must be in \[0, 1\]"):
        _C.nms_cpu(boxes, scores, None, -0.5, keep, 1)


def test_build_info():
    info = _C.build_info
    assert info["version"] == fastcv.__version__
    assert isinstance(info["cuda"], bool) and info["cpu_isas"][0] == "baseline"
    if info["cuda"]:
        assert info["cuda_archs"] and info["nvcc"]
        runtime = _C.cuda_runtime_info()  # must not raise without a driver
        assert isinstance(runtime["devices"], list)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fastcv", *args], capture_output=True, text=True, timeout=600)


def test_cli_info():
    result = _cli("info")
    assert result.returncode == 0, result.stderr
    assert f"fastcv      {fastcv.__version__}" in result.stdout and "torch" in result.stdout


def test_cli_bench_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    result = _cli("bench", "--quick", "--op", "batched_nms", "--json", str(path))
    assert result.returncode == 0, result.stderr
    assert "speedup" in result.stdout
    data = json.loads(path.read_text())
    assert data["machine"]["device"] == "cpu"
    assert {r["op"] for r in data["results"]} == {"batched_nms"}
    assert all(r["agrees"] and r["fastcv_s"] > 0 and r["reference_s"] > 0 for r in data["results"])


def test_cli_check():
    result = _cli("check", "--op", "nms", "--quick")
    assert result.returncode == 0, result.stderr
    assert "agree with their references" in result.stdout


@pytest.mark.parametrize("use_openmp", [True, False])
def test_both_parallel_backends_give_the_same_results(use_openmp):
    from fastcv import ops
    from fastcv.benchmarks.nms import distinct_scores, random_boxes

    g = torch.Generator().manual_seed(31)
    boxes, scores = random_boxes(5000, generator=g), distinct_scores(5000, generator=g)
    expected = ops.nms(boxes, scores, 0.5)
    before = torch.get_num_threads()
    try:
        with _backend.forced(thread_pool=not use_openmp):
            torch.set_num_threads(2)
            assert ("openmp" in _C.parallel_backend()) == use_openmp
            assert torch.equal(ops.nms(boxes, scores, 0.5), expected)
            idxs = torch.randint(0, 30, (5000,), generator=g)
            assert torch.equal(ops.batched_nms(boxes, scores, idxs, 0.5), torchvision_batched(boxes, scores, idxs))
        assert "openmp" in _C.parallel_backend(), "forced() must restore torch's OpenMP team"
    finally:
        torch.set_num_threads(before)


def torchvision_batched(boxes, scores, idxs):
    import torchvision

    return torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)


# ---------------------------------------------------------------- backend selection


class _CudaTensor:
    """What select() reads of a CUDA tensor, for the selection rules on a machine without a GPU."""
    is_cpu, is_cuda = False, True

    def __init__(self, index=0):
        self.device = torch.device("cuda", index)


# Pretend GPUs: an H200, which the default architectures cover, and a T4, which they do not.
H200 = _backend.Gpu(0, "NVIDIA H200", (9, 0))
T4 = _backend.Gpu(1, "Tesla T4", (7, 5))


@pytest.fixture
def fresh_choices(monkeypatch):
    """select()'s decisions and warnings forgotten (they are kept per process), its settings unset."""
    monkeypatch.setattr(_backend, "_choices", {})
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.delenv("FASTCV_GPU_BACKEND", raising=False)
    monkeypatch.delenv("FASTCV_STRICT", raising=False)


@pytest.fixture
def cuda_build(monkeypatch, fresh_choices):
    """select() as in a build with CUDA kernels for sm_80 and sm_90 (and PTX for newer), with GPU 0 an
    H200 and GPU 1 a T4 (sm_75), which the build does not cover."""
    monkeypatch.setattr(_backend, "CUDA_BUILT", True)
    monkeypatch.setattr(_backend, "CUDA_ARCHS", "80-real,90-real,90-virtual")
    monkeypatch.setattr(_backend, "gpu", lambda index: (H200, T4)[index])


def test_cpu_tensors_run_the_cpp_kernels():
    t = torch.zeros(1)
    assert {_backend.select(op, t) for op in _backend.GPU_KERNELS} == {"cpu"}
    with pytest.raises(ValueError, match="CPU and CUDA tensors, got one on meta"):
        _backend.select("nms", torch.zeros(1, device="meta"))


def test_forced_triton_on_cpu_tensors():
    t = torch.zeros(1)
    with _backend.forced(backend="triton"):
        chosen = {op: _backend.select(op, t) for op in _backend.GPU_KERNELS}
    assert chosen == {op: "triton" if "triton" in kernels else "cpu" for op, kernels in _backend.GPU_KERNELS.items()}
    assert _backend.select("nms", t) == "cpu", "forced() must restore the selection"
    with pytest.raises(ValueError, match="forced to 'triton' only"):
        with _backend.forced(backend="cuda"):
            pass


def test_gpu_selection_with_cuda_kernels(cuda_build, monkeypatch):
    t = _CudaTensor()
    expected = {"nms": "cuda", "roi_align": "cuda", "roi_align_backward": "cuda", "multi_scale_roi_align": "cuda",
                "batch_norm": "cuda", "conv2d": "triton", "depthwise_conv2d": "cuda", "im2col": "cuda",
                "attention": "triton"}
    assert {op: _backend.select(op, t) for op in _backend.GPU_KERNELS} == expected
    monkeypatch.setenv("FASTCV_GPU_BACKEND", "triton")  # the user's switch: Triton wherever it exists
    assert _backend.select("nms", t) == "triton" and _backend.select("batch_norm", t) == "triton"
    with pytest.raises(RuntimeError, match="im2col on the GPU has CUDA kernels only"):
        _backend.select("im2col", t)


def test_gpu_selection_without_cuda_kernels(monkeypatch, fresh_choices):
    # A build without nvcc: Triton where an op has Triton kernels, else a clear error (im2col and col2im
    # once reached _C.im2col_cuda, which such a build does not have: an AttributeError).
    monkeypatch.setattr(_backend, "CUDA_BUILT", False)
    monkeypatch.setattr(_backend, "gpu", lambda index: H200)
    t = _CudaTensor()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a build without CUDA kernels runs Triton without a warning
        assert _backend.select("nms", t) == "triton" and _backend.select("attention", t) == "triton"
    for op in ("im2col", "roi_align_backward", "multi_scale_roi_align"):
        with pytest.raises(RuntimeError, match=f"{op} on the GPU needs its CUDA kernels, which this build does not"
                                               '.*FASTCV_WITH_CUDA="ON" FASTCV_CUDA_ARCHS="90-real"'):
            _backend.select(op, t)
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    monkeypatch.setattr(_backend, "_choices", {})
    with pytest.raises(RuntimeError, match=r"nms on the GPU runs Triton's kernels here \(no CUDA kernels in this "
                                           "build\\), which need the triton package.*pip install triton"):
        _backend.select("nms", t)


def test_uncovered_gpu_runs_triton_with_one_warning(cuda_build):
    covered, uncovered = _CudaTensor(0), _CudaTensor(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.select("nms", covered) == "cuda"  # the covered GPU: CUDA C++, silently
    with pytest.warns(UserWarning) as record:
        assert _backend.select("nms", uncovered) == "triton"
        for op in ("nms", "batch_norm", "depthwise_conv2d", "roi_align", "conv2d", "attention"):
            assert _backend.select(op, uncovered) == "triton"
    assert len(record) == 1, [str(w.message) for w in record]  # once per process and device
    message = str(record[0].message)
    for part in ("'80-real,90-real,90-virtual'", "Tesla T4", "sm_75", "FASTCV_STRICT=1",
                 'FASTCV_CUDA_ARCHS="80-real;90-real;90-virtual;75-real" pip install'):
        assert part in message, (part, message)
    assert _backend.select("nms", covered) == "cuda"
    # Ops without Triton kernels raise there, naming the architectures and that there is no fallback.
    for op in ("im2col", "roi_align_backward", "multi_scale_roi_align"):
        with pytest.raises(RuntimeError, match=f"built for architectures '80-real,90-real,90-virtual', which cannot "
                                               f"run on Tesla T4 .*sm_75.*its {op} has no Triton kernels.*"
                                               'Rebuild for it: .*FASTCV_CUDA_ARCHS="80-real;90-real;90-virtual;'
                                               '75-real"'):
            _backend.select(op, uncovered)


def test_uncovered_gpu_warns_once_per_device(cuda_build, monkeypatch):
    other = _backend.Gpu(2, "NVIDIA GeForce GTX 1080", (6, 1))
    monkeypatch.setattr(_backend, "gpu", lambda index: (H200, T4, other)[index])
    with pytest.warns(UserWarning) as record:
        for _ in range(3):
            _backend.select("nms", _CudaTensor(1)), _backend.select("nms", _CudaTensor(2))
    assert [m for w in record for m in ("Tesla T4", "GTX 1080") if m in str(w.message)] == ["Tesla T4", "GTX 1080"]


def test_uncovered_gpu_strict_raises(cuda_build, monkeypatch):
    monkeypatch.setenv("FASTCV_STRICT", "1")
    with pytest.raises(RuntimeError, match="built for architectures '80-real,90-real,90-virtual', which cannot run on "
                                           "Tesla T4 .*sm_75.*FASTCV_STRICT=1 forbids running Triton's kernels "
                                           'instead. Rebuild for it: .*FASTCV_CUDA_ARCHS="80-real;90-real;'
                                           '90-virtual;75-real" pip install'):
        _backend.select("nms", _CudaTensor(1))
    assert _backend.select("nms", _CudaTensor(0)) == "cuda"  # a covered GPU is not affected
    assert _backend.select("conv2d", _CudaTensor(1)) == "triton"  # nor an op that has Triton kernels only
    monkeypatch.setenv("FASTCV_STRICT", "0")
    with pytest.warns(UserWarning, match="Tesla T4"):
        assert _backend.select("nms", _CudaTensor(1)) == "triton"


def test_uncovered_gpu_without_triton_raises(cuda_build, monkeypatch):
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="cannot run on Tesla T4.*need the triton package, which is not installed"):
        _backend.select("nms", _CudaTensor(1))
    assert _backend.select("nms", _CudaTensor(0)) == "cuda"


def test_gpu_facts_come_from_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"GPU number {index}")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (12, 0))
    dev = _backend.gpu.__wrapped__(3)  # gpu() reads each device once per process
    assert dev == (3, "GPU number 3", (12, 0)) and dev.sm == "sm_120"


def test_choice_of_cpu_is_what_select_runs():
    t = torch.zeros(1)
    for forced in (None, "triton"):
        with _backend.forced(backend=forced):
            assert all(_backend.choice(op).backend == _backend.select(op, t) for op in _backend.GPU_KERNELS)


def test_triton_loader_names_the_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastcv.kernels.nms", None)  # makes the import raise ImportError
    with pytest.raises(RuntimeError, match="need the triton package"):
        _backend.triton("nms")


def test_geometry_crosses_by_name():
    # The kernels read a NamedTuple whose fields are their struct's, in order; anything else is refused
    # with the fields it needed, rather than read positionally.
    from fastcv.ops.conv import Conv2dGeometry
    from fastcv.ops.im2col import Im2colGeometry
    image = torch.randn(1, 2, 4, 4)
    good = Im2colGeometry(2, 4, 4, 3, 3, 1, 1, 1, 1, 1, 1, 4, 4)
    columns = torch.empty(1, 18, 16)
    _C.im2col_cpu(image, good, columns, 1)
    assert torch.equal(columns, torch.nn.functional.unfold(image, 3, padding=1))
    with pytest.raises(ValueError, match=r"im2col's geometry must be a NamedTuple of ints with the fields \(channels, "):
        _C.im2col_cpu(image, tuple(good), columns, 1)
    import collections
    renamed = collections.namedtuple("Renamed", ["c", *Im2colGeometry._fields[1:]])(*good)
    with pytest.raises(ValueError, match="im2col's geometry must be a NamedTuple"):
        _C.im2col_cpu(image, renamed, columns, 1)
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    out = torch.empty(1, 3, 3, 3)
    _C.conv2d_forward_cpu(x, w, None, None, False, out, Conv2dGeometry(1, 2, 5, 5, 3, 1, 3, 3, 1, 1, 0, 0, 1, 1, 3, 3), 1)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, w), rtol=1e-5, atol=1e-5)
