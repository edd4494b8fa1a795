"""fastcv.array: every op on NumPy arrays equals fastcv.ops on the same values as torch tensors (the same
kernels: exact equality), conversions (zero copy, read-only, non-contiguous, byte order, alignment),
fresh outputs, and errors. The CuPy tests at the end need CuPy and a GPU (they skip elsewhere)."""
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from fastcv import _backend, ops
from fastcv import array as fa

F32, F64 = np.float32, np.float64


# ---------------------------------------------------------------- cases: (function name, args, kwargs)


def _boxes(rng, shape, dtype, size=32.0):
    xy = rng.uniform(0, size, (*shape, 2))
    wh = rng.uniform(1, size / 2, (*shape, 2))
    return np.concatenate([xy, xy + wh], axis=-1).astype(dtype)


def _scores(rng, shape, dtype):
    n = int(np.prod(shape))
    return (rng.permutation(n).reshape(shape) / max(n, 1)).astype(dtype)  # distinct: no ties


def _case_nms(rng, dtype):
    return "nms", (_boxes(rng, (60,), dtype), _scores(rng, (60,), dtype), 0.4), {}


def _case_batched_nms(rng, dtype):
    idxs = rng.integers(0, 4, 60)
    return "batched_nms", (_boxes(rng, (60,), dtype), _scores(rng, (60,), dtype), idxs, 0.5), {}


def _case_batched_nms_int32_idxs(rng, dtype):
    idxs = rng.integers(0, 3, 40).astype(np.int32)
    return "batched_nms", (_boxes(rng, (40,), dtype), _scores(rng, (40,), dtype), idxs, 0.3), {}


def _case_padded(rng, dtype):
    return "batched_nms_padded", (_boxes(rng, (2, 30), dtype), _scores(rng, (2, 30, 3), dtype), 0.5, 0.1, 12), \
        {"pre_nms_top_k": 50}


def _case_padded_class_boxes(rng, dtype):
    return "batched_nms_padded", (_boxes(rng, (2, 20, 3), dtype), _scores(rng, (2, 20, 3), dtype), 0.5, 0.0, 8), {}


def _rois(rng, k, batch, dtype):
    return np.concatenate([rng.integers(0, batch, (k, 1)).astype(dtype), _boxes(rng, (k,), dtype, 14.0)], axis=1)


def _case_roi_align(rng, dtype):
    x = rng.standard_normal((2, 3, 16, 16)).astype(dtype)
    return "roi_align", (x, _rois(rng, 7, 2, dtype), (4, 3)), {"spatial_scale": 0.5, "sampling_ratio": 2,
                                                               "aligned": True}


def _case_roi_align_box_list(rng, dtype):
    x = rng.standard_normal((2, 3, 12, 12)).astype(dtype)
    return "roi_align", (x, [_boxes(rng, (3,), dtype, 10.0), _boxes(rng, (2,), dtype, 10.0)], 5), {}


def _case_multi_scale(rng, dtype):
    feats = [rng.standard_normal((2, 3, 16, 16)).astype(dtype), rng.standard_normal((2, 3, 8, 8)).astype(dtype)]
    boxes = [_boxes(rng, (4,), dtype, 60.0), _boxes(rng, (3,), dtype, 60.0)]
    return "multi_scale_roi_align", (feats, boxes, 3), {"sampling_ratio": 2, "image_shapes": [(64, 64)],
                                                        "canonical_scale": 16.0}


def _case_multi_scale_rois(rng, dtype):
    feats = [rng.standard_normal((1, 2, 16, 16)).astype(dtype), rng.standard_normal((1, 2, 8, 8)).astype(dtype)]
    return "multi_scale_roi_align", (feats, _rois(rng, 5, 1, dtype), (2, 2)), {"scales": [0.25, 0.125],
                                                                               "aligned": True}


def _case_im2col(rng, dtype):
    return "im2col", (rng.standard_normal((2, 3, 8, 7)).astype(dtype), 3), {"padding": 1, "stride": (1, 2)}


def _case_im2col_unbatched(rng, dtype):
    return "im2col", (rng.standard_normal((3, 6, 6)).astype(dtype), (2, 3)), {"dilation": 2}


def _case_col2im(rng, dtype):
    return "col2im", (rng.standard_normal((2, 3 * 9, 64)).astype(dtype), (8, 8), 3), {"padding": 1}


def _case_conv2d(rng, dtype):
    x = rng.standard_normal((2, 3, 9, 8)).astype(dtype)
    w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    return "conv2d", (x, w, rng.standard_normal(4).astype(dtype)), {"padding": "same"}


def _case_conv2d_groups_no_bias(rng, dtype):
    x = rng.standard_normal((1, 4, 10, 10)).astype(dtype)
    w = rng.standard_normal((6, 2, 3, 3)).astype(dtype)
    return "conv2d", (x, w, None, 2, 1, 1, 2), {}


def _case_conv2d_nhwc(rng, dtype):  # a transposed NHWC array: channels_last to the kernels, zero copy
    x = rng.standard_normal((2, 7, 7, 5)).astype(dtype).transpose(0, 3, 1, 2)
    w = rng.standard_normal((3, 5, 3, 3)).astype(dtype)
    return "conv2d", (x, w), {"stride": 2}


def _case_batch_norm(rng, dtype):
    x = rng.standard_normal((2, 3, 5, 4)).astype(dtype)
    mean, var = rng.standard_normal(3).astype(dtype), rng.uniform(0.5, 2, 3).astype(dtype)
    w, b = rng.standard_normal(3).astype(dtype), rng.standard_normal(3).astype(dtype)
    return "batch_norm", (x, mean, var, w, b), {"eps": 1e-3}


def _case_batch_norm_no_affine(rng, dtype):
    x = rng.standard_normal((4, 6)).astype(dtype)
    return "batch_norm", (x, rng.standard_normal(6).astype(dtype), rng.uniform(0.5, 2, 6).astype(dtype)), {}


def _case_attention(rng, dtype):
    q, k, v = (rng.standard_normal((2, 2, n, 8)).astype(dtype) for n in (5, 6, 6))
    return "scaled_dot_product_attention", (q, k, v), {"attn_mask": rng.random((5, 6)) > 0.3}


def _case_attention_causal(rng, dtype):
    q, k, v = (rng.standard_normal((3, 7, 16)).astype(dtype) for _ in range(3))
    return "scaled_dot_product_attention", (q, k, v), {"is_causal": True, "scale": 0.3}


def _case_attention_float_mask(rng, dtype):
    q, k, v = (rng.standard_normal((1, 4, n, 8)).astype(dtype) for n in (3, 9, 9))
    k, v = k[:, :2], v[:, :2]  # grouped-query attention: 4 query heads, 2 key/value heads
    mask = rng.standard_normal((1, 1, 3, 9)).astype(dtype)
    return "scaled_dot_product_attention", (q, k, v, mask), {"enable_gqa": True}


CASES = [_case_nms, _case_batched_nms, _case_batched_nms_int32_idxs, _case_padded, _case_padded_class_boxes,
         _case_roi_align, _case_roi_align_box_list, _case_multi_scale, _case_multi_scale_rois, _case_im2col,
         _case_im2col_unbatched, _case_col2im, _case_conv2d, _case_conv2d_groups_no_bias, _case_conv2d_nhwc,
         _case_batch_norm, _case_batch_norm_no_affine, _case_attention, _case_attention_causal,
         _case_attention_float_mask]
CASE_IDS = [c.__name__[len("_case_"):] for c in CASES]


def _map(fn, value):
    """fn on every array of an argument (lists of arrays included); everything else unchanged."""
    if isinstance(value, list) and value and isinstance(value[0], np.ndarray):
        return [fn(v) for v in value]
    return fn(value) if isinstance(value, np.ndarray) else value


def _torch(a, device="cpu"):
    """The reference path's tensor: an independent copy (in a's memory layout: an NHWC-strided array is
    channels_last to the kernels), not fastcv.array's conversion."""
    return torch.from_numpy(np.array(a, order="K", copy=True)).to(device)


def _reference(name, args, kwargs, device="cpu"):
    """fastcv.ops on tensor copies -> a tuple of NumPy arrays."""
    out = getattr(ops, name)(*(_map(lambda a: _torch(a, device), x) for x in args),
                             **{k: _map(lambda a: _torch(a, device), v) for k, v in kwargs.items()})
    return tuple(t.cpu().numpy() for t in (out if isinstance(out, tuple) else (out,)))


def _outputs(out):
    return tuple(out) if isinstance(out, tuple) else (out,)


def _assert_same(outs, refs):
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert type(o) is np.ndarray
        assert o.dtype == r.dtype and o.shape == r.shape
        np.testing.assert_array_equal(o, r, strict=True)


# ---------------------------------------------------------------- every op against fastcv.ops


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_numpy_matches_ops(case, dtype):
    name, args, kwargs = case(np.random.default_rng(0), dtype)
    out = getattr(fa, name)(*args, **kwargs)
    _assert_same(_outputs(out), _reference(name, args, kwargs))


@pytest.mark.parametrize("name", ["nms", "im2col", "conv2d", "batch_norm"])
def test_numpy_float16(name):
    case = {"nms": _case_nms, "im2col": _case_im2col, "conv2d": _case_conv2d, "batch_norm": _case_batch_norm}[name]
    _, args, kwargs = case(np.random.default_rng(1), np.float16)
    out = getattr(fa, name)(*args, **kwargs)
    assert out.dtype == (np.int64 if name == "nms" else np.float16)
    _assert_same(_outputs(out), _reference(name, args, kwargs))


def test_detections_fields():
    _, args, kwargs = _case_padded(np.random.default_rng(2), F32)
    det = fa.batched_nms_padded(*args, **kwargs)
    assert isinstance(det, fa.Detections) and det._fields == ops.Detections._fields
    assert det.boxes.shape == (2, 12, 4) and det.boxes.dtype == F32
    assert det.scores.shape == (2, 12) and det.scores.dtype == F32
    assert det.labels.dtype == det.indices.dtype == det.counts.dtype == np.int64
    assert det.counts.shape == (2,) and (det.counts > 0).all()
    assert len({d.ctypes.data for d in det}) == 5  # five separate arrays


def test_empty_inputs():
    assert fa.nms(np.zeros((0, 4), F32), np.zeros(0, F32), 0.5).shape == (0,)
    det = fa.batched_nms_padded(np.zeros((1, 0, 4), F32), np.zeros((1, 0, 2), F32), 0.5, 0.0, 3)
    np.testing.assert_array_equal(det.counts, [0])
    np.testing.assert_array_equal(det.labels, -np.ones((1, 3), np.int64))


# ---------------------------------------------------------------- conversions


class Spy:
    """Replaces fastcv.ops.<name> (fastcv.array looks it up at call time) and records its tensors."""

    def __init__(self, monkeypatch, name, result=None):
        self.calls, self.result, self.real = [], result, getattr(ops, name)
        monkeypatch.setattr(ops, name, self)

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.real(*args, **kwargs) if self.result is None else self.result(*args, **kwargs)


def test_contiguous_input_is_zero_copy(monkeypatch):
    spy = Spy(monkeypatch, "nms")
    _, (boxes, scores, thr), _ = _case_nms(np.random.default_rng(3), F32)
    fa.nms(boxes, scores, thr)
    (t_boxes, t_scores, _), _ = spy.calls[0]
    assert t_boxes.data_ptr() == boxes.ctypes.data and t_scores.data_ptr() == scores.ctypes.data


def test_strided_input_is_zero_copy(monkeypatch):
    spy = Spy(monkeypatch, "conv2d")
    _, (x, w), kwargs = _case_conv2d_nhwc(np.random.default_rng(4), F32)
    out = fa.conv2d(x, w, **kwargs)
    t = spy.calls[0][0][0]
    assert t.data_ptr() == x.ctypes.data and t.stride() == tuple(s // 4 for s in x.strides)
    assert t.is_contiguous(memory_format=torch.channels_last)
    # the kernels keep channels_last: the result is NCHW-shaped with NHWC memory, as fastcv.ops returns it
    assert out.transpose(0, 2, 3, 1).flags.c_contiguous


def test_list_of_arrays_is_zero_copy(monkeypatch):
    spy = Spy(monkeypatch, "multi_scale_roi_align")
    _, (feats, boxes, size), kwargs = _case_multi_scale(np.random.default_rng(5), F32)
    fa.multi_scale_roi_align(feats, boxes, size, **kwargs)
    (t_feats, t_boxes, *_), _ = spy.calls[0]
    assert [t.data_ptr() for t in t_feats] == [f.ctypes.data for f in feats]
    assert [t.data_ptr() for t in t_boxes] == [b.ctypes.data for b in boxes]


def test_output_is_the_op_result_zero_copy(monkeypatch):
    made, real = [], ops.im2col
    Spy(monkeypatch, "im2col", lambda *a: made.append(real(*a)) or made[-1])
    x = np.random.default_rng(6).standard_normal((1, 2, 5, 5)).astype(F32)
    out = fa.im2col(x, 2)
    assert out.ctypes.data == made[0].data_ptr()  # no copy back
    assert out.flags.writeable
    out2 = fa.im2col(x, 2)
    assert not np.shares_memory(out, out2)  # each call's result is its own
    out[...] = 0  # the caller owns it: writing it changes nothing else
    np.testing.assert_array_equal(out2, fa.im2col(x, 2))


def test_output_aliasing_an_input_is_copied(monkeypatch):
    Spy(monkeypatch, "im2col", lambda input, *a: input)  # an op returning its input (a view of it)
    x = np.arange(8, dtype=F32).reshape(1, 2, 2, 2)
    out = fa.im2col(x, 1)
    np.testing.assert_array_equal(out, x)
    assert not np.shares_memory(out, x)


def test_outputs_aliasing_each_other_are_copied(monkeypatch):
    def padded(boxes, scores, *args):
        t = torch.zeros((boxes.shape[0], 2), dtype=torch.int64)
        return t, t, torch.zeros(boxes.shape[0], dtype=torch.int64)  # labels and indices: one tensor

    Spy(monkeypatch, "batched_nms_padded", lambda *a: ops.Detections(torch.zeros(1, 2, 4), torch.zeros(1, 2),
                                                                      *padded(*a)))
    det = fa.batched_nms_padded(np.zeros((1, 3, 4), F32), np.zeros((1, 3, 1), F32), 0.5, 0.0, 2)
    assert not np.shares_memory(det.labels, det.indices)


def test_read_only_input_is_copied(monkeypatch):
    spy = Spy(monkeypatch, "nms")
    _, (boxes, scores, thr), _ = _case_nms(np.random.default_rng(7), F32)
    expected = fa.nms(boxes, scores, thr)
    ro_boxes = np.frombuffer(boxes.tobytes(), dtype=F32).reshape(boxes.shape)  # read-only memory
    ro_scores = scores.copy()
    ro_scores.setflags(write=False)
    assert not ro_boxes.flags.writeable and not ro_scores.flags.writeable
    np.testing.assert_array_equal(fa.nms(ro_boxes, ro_scores, thr), expected, strict=True)
    (t_boxes, t_scores, _), _ = spy.calls[-1]
    assert t_boxes.data_ptr() != ro_boxes.ctypes.data and t_scores.data_ptr() != ro_scores.ctypes.data
    assert not ro_scores.flags.writeable  # the caller's array is untouched


def test_read_only_raw_dlpack():
    """Why read-only arrays are copied: depending on NumPy's and torch's DLPack versions the export
    raises (NumPy >= 2 without the versioned protocol: BufferError) or hands torch a writable tensor over
    read-only memory. Either way fastcv.array never passes them to torch as they are."""
    a = np.ones(4, F32)
    a.setflags(write=False)
    try:
        t = torch.from_dlpack(a)
    except BufferError:
        pass
    else:
        assert t.data_ptr() == a.ctypes.data  # a writable torch view: fastcv.array copies instead
    b, c = np.ones((2, 3), F32), np.zeros((2, 3), F32)
    b.setflags(write=False)
    np.testing.assert_array_equal(fa.batch_norm(b, c[0], b[0], eps=0.0), b, strict=True)


def _variants(a):
    """Arrays with a's values that DLPack cannot pass as they are, or passes strided."""
    rev = np.ascontiguousarray(a[::-1])[::-1]  # negative stride on axis 0
    wide = np.zeros((*a.shape[:-1], a.shape[-1] * 2), a.dtype)
    wide[..., ::2] = a
    raw = np.zeros(a.nbytes + 1, np.uint8)  # misaligned: starts one byte into a buffer
    mis = raw[1:].view(a.dtype).reshape(a.shape)
    mis[...] = a
    fortran = np.asfortranarray(a)
    swapped = a.astype(a.dtype.newbyteorder("S"))  # non-native byte order
    return {"negative_strides": rev, "strided": wide[..., ::2], "misaligned": mis, "fortran": fortran,
            "byteswapped": swapped}


@pytest.mark.parametrize("variant", ["negative_strides", "strided", "misaligned", "fortran", "byteswapped"])
@pytest.mark.parametrize("case", [_case_batched_nms, _case_roi_align, _case_conv2d, _case_batch_norm,
                                  _case_attention, _case_col2im], ids=lambda c: c.__name__[len("_case_"):])
def test_non_contiguous_inputs(case, variant):
    name, args, kwargs = case(np.random.default_rng(8), F32)
    expected = _outputs(getattr(fa, name)(*args, **kwargs))
    changed = [_map(lambda a: _variants(a)[variant] if a.ndim >= 1 else a, x) for x in args]
    for orig, new in zip(args, changed):
        if isinstance(orig, np.ndarray):
            np.testing.assert_array_equal(new, orig)
    if variant == "misaligned":
        assert any(isinstance(x, np.ndarray) and not x.flags.aligned for x in changed)
    _assert_same(_outputs(getattr(fa, name)(*changed, **kwargs)), expected)


def test_negative_strides_are_copied_not_refused(monkeypatch):
    spy = Spy(monkeypatch, "nms")
    _, (boxes, scores, thr), _ = _case_nms(np.random.default_rng(9), F32)
    keep = fa.nms(boxes[::-1], scores[::-1], thr)
    t_boxes = spy.calls[0][0][0]
    assert t_boxes.is_contiguous() and t_boxes.data_ptr() != boxes.ctypes.data
    np.testing.assert_array_equal(keep, len(boxes) - 1 - fa.nms(boxes, scores, thr))


# ---------------------------------------------------------------- errors


def test_torch_tensor_raises_naming_argument():
    boxes, scores = np.zeros((2, 4), F32), np.zeros(2, F32)
    with pytest.raises(TypeError, match="scores is a torch.Tensor"):
        fa.nms(boxes, torch.from_numpy(scores), 0.5)
    with pytest.raises(TypeError, match="input is a torch.Tensor"):
        fa.conv2d(torch.zeros(1, 1, 3, 3), np.zeros((1, 1, 1, 1), F32))
    with pytest.raises(TypeError, match=r"features\[1\] is a torch.Tensor"):
        fa.multi_scale_roi_align([np.zeros((1, 1, 4, 4), F32), torch.zeros(1, 1, 2, 2)], np.zeros((0, 5), F32), 2,
                                 scales=[0.5, 0.25])


def test_not_an_array_raises_naming_argument():
    with pytest.raises(TypeError, match="boxes must be a numpy.ndarray or a cupy.ndarray, got builtins.list"):
        fa.nms([[0, 0, 1, 1]], np.ones(1, F32), 0.5)
    with pytest.raises(TypeError, match="weight must be a numpy.ndarray"):
        fa.conv2d(np.zeros((1, 1, 3, 3), F32), 1.0)
    with pytest.raises(TypeError, match="features must be a list"):
        fa.multi_scale_roi_align(np.zeros((1, 1, 4, 4), F32), np.zeros((0, 5), F32), 2, scales=[1.0])
    with pytest.raises(TypeError, match="masked array"):
        fa.im2col(np.ma.masked_array(np.zeros((1, 1, 3, 3), F32)), 1)


def test_unsupported_dtype_raises_naming_argument():
    with pytest.raises(TypeError, match="input: a object array cannot be passed"):
        fa.im2col(np.empty((1, 1, 2, 2), dtype=object), 1)


def test_op_errors_pass_through():
    with pytest.raises(ValueError, match="boxes must have shape"):
        fa.nms(np.zeros((3, 5), F32), np.zeros(3, F32), 0.5)
    with pytest.raises(TypeError, match="scores must have the dtype of boxes"):
        fa.nms(np.zeros((3, 4), F32), np.zeros(3, F64), 0.5)
    with pytest.raises(ValueError, match="iou_threshold"):
        fa.nms(np.zeros((3, 4), F32), np.zeros(3, F32), 2.0)


def test_batch_norm_is_inference_only():
    x, stat = np.zeros((2, 3), F32), np.ones(3, F32)
    with pytest.raises(ValueError, match="inference only"):
        fa.batch_norm(x, stat, stat, training=True)
    with pytest.raises(ValueError, match="running_mean and running_var"):
        fa.batch_norm(x, None, None)
    before = stat.copy()
    fa.batch_norm(x + 5, stat, stat, momentum=0.5)  # eval: running statistics are read, never updated
    np.testing.assert_array_equal(stat, before)


@pytest.fixture
def fake_cupy(monkeypatch):
    """A stand-in CuPy module, so the NumPy/CuPy mixing checks run without CuPy."""
    module = types.ModuleType("cupy")

    class ndarray:
        def __init__(self):
            self.device = types.SimpleNamespace(id=0)

    module.ndarray = ndarray
    monkeypatch.setitem(sys.modules, "cupy", module)
    return module


def test_mixed_numpy_and_cupy_raises_naming_argument(fake_cupy):
    with pytest.raises(TypeError, match="scores is a cupy array but boxes is a numpy array"):
        fa.nms(np.zeros((2, 4), F32), fake_cupy.ndarray(), 0.5)
    with pytest.raises(TypeError, match=r"boxes\[1\] is a numpy array but input is a cupy array"):
        fa.roi_align(fake_cupy.ndarray(), [fake_cupy.ndarray(), np.zeros((1, 4), F32)], 2)


def test_cupy_on_two_devices_raises(fake_cupy):
    a, b = fake_cupy.ndarray(), fake_cupy.ndarray()
    b.device.id = 1
    with pytest.raises(ValueError, match="scores is on GPU 1 but boxes is on GPU 0"):
        fa.nms(a, b, 0.5)


def test_import_does_not_import_cupy():
    code = ("import sys, numpy as np, fastcv.array as fa; assert 'cupy' not in sys.modules; "
            "fa.nms(np.zeros((1, 4), np.float32), np.zeros(1, np.float32), 0.5); assert 'cupy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ---------------------------------------------------------------- CuPy (a GPU and CuPy installed)


@pytest.fixture
def cp():
    cupy = pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("CuPy tests need a CUDA GPU that torch sees")
    if not _backend.CUDA_BUILT:  # as conftest's DEVICES: im2col and multi-level RoI Align have no Triton kernel
        pytest.skip("CuPy tests need fastcv's CUDA build")
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("CuPy sees no GPU")
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("CuPy sees no GPU")
    return cupy


def _to_cupy(cp, args, kwargs):
    return [_map(cp.asarray, x) for x in args], {k: _map(cp.asarray, v) for k, v in kwargs.items()}


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cupy_matches_ops(cp, case, dtype):
    name, args, kwargs = case(np.random.default_rng(0), dtype)
    c_args, c_kwargs = _to_cupy(cp, args, kwargs)
    outs = _outputs(getattr(fa, name)(*c_args, **c_kwargs))
    refs = _reference(name, args, kwargs, device="cuda")
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert type(o) is cp.ndarray and o.device.id == cp.cuda.Device().id
        assert o.dtype == r.dtype and o.shape == r.shape
        np.testing.assert_array_equal(cp.asnumpy(o), r, strict=True)


def test_cupy_zero_copy_and_fresh_outputs(cp, monkeypatch):
    spy = Spy(monkeypatch, "conv2d")
    x = cp.asarray(np.random.default_rng(1).standard_normal((1, 2, 6, 6)).astype(F32))
    w = cp.asarray(np.random.default_rng(2).standard_normal((3, 2, 3, 3)).astype(F32))
    out = fa.conv2d(x, w)
    t_x, t_w = spy.calls[0][0][:2]
    assert t_x.data_ptr() == x.data.ptr and t_w.data_ptr() == w.data.ptr
    Spy(monkeypatch, "im2col", lambda input, *a: input)
    same = fa.im2col(x, 1)
    assert same.data.ptr != x.data.ptr and bool((same == x).all())
    assert type(out) is cp.ndarray


def test_cupy_non_contiguous(cp):
    name, args, kwargs = _case_conv2d(np.random.default_rng(3), F32)
    expected = cp.asnumpy(fa.conv2d(*_to_cupy(cp, args, kwargs)[0], **kwargs))
    x = cp.asarray(args[0])
    rev = cp.ascontiguousarray(x[::-1])[::-1]  # negative strides: copied
    wide = cp.zeros((*x.shape[:-1], x.shape[-1] * 2), x.dtype)
    wide[..., ::2] = x  # positive strides: zero copy
    for variant in (rev, wide[..., ::2]):
        out = fa.conv2d(variant, cp.asarray(args[1]), cp.asarray(args[2]), **kwargs)
        np.testing.assert_array_equal(cp.asnumpy(out), expected, strict=True)


def test_cupy_runs_on_current_stream(cp, monkeypatch):
    streams = []
    real = ops.conv2d

    def spy(*args, **kwargs):
        streams.append((torch.cuda.current_stream().cuda_stream, torch.cuda.current_device()))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "conv2d", spy)
    rng = np.random.default_rng(4)
    x_np = rng.standard_normal((4, 16, 64, 64)).astype(F32)
    w_np = rng.standard_normal((16, 16, 3, 3)).astype(F32)
    expected = _reference("conv2d", (x_np, w_np), {"padding": 1}, device="cuda")[0]
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        # Queued on `stream` and not waited for: the op must run after them, on the same stream.
        big = cp.ones((4096, 4096), F32)
        for _ in range(4):
            big = big @ big / 4096
        x = cp.asarray(x_np) * big[0, 0]  # = x_np (times 1.0), ready only after the products
        out = fa.conv2d(x, cp.asarray(w_np), padding=1)
        out *= 1  # the caller's next work on the stream reads the result
    stream.synchronize()
    assert streams[-1] == (stream.ptr, cp.cuda.Device().id)
    np.testing.assert_array_equal(cp.asnumpy(out), expected, strict=True)
    # CuPy's default (null) stream is torch's default stream
    fa.conv2d(cp.asarray(x_np), cp.asarray(w_np), padding=1)
    assert streams[-1][0] == torch.cuda.default_stream().cuda_stream


def test_cupy_second_device(cp, monkeypatch):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    name, args, kwargs = _case_roi_align(np.random.default_rng(5), F32)
    with cp.cuda.Device(1):
        c_args, c_kwargs = _to_cupy(cp, args, kwargs)
    out = fa.roi_align(*c_args, **c_kwargs)  # called with device 0 current: runs on device 1
    assert out.device.id == 1
    np.testing.assert_array_equal(cp.asnumpy(out), _reference(name, args, kwargs, device="cuda:1")[0], strict=True)


def test_cupy_mixed_raises(cp):
    boxes = cp.zeros((2, 4), F32)
    with pytest.raises(TypeError, match="scores is a numpy array but boxes is a cupy array"):
        fa.nms(boxes, np.zeros(2, F32), 0.5)
    with pytest.raises(TypeError, match="scores is a torch.Tensor"):
        fa.nms(boxes, torch.zeros(2, device="cuda"), 0.5)
