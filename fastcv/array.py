"""fastcv.array: fastcv's ops on NumPy arrays (CPU) and CuPy arrays (GPU), returning the caller's array type.

    from fastcv import array as fa
    keep = fa.nms(boxes, scores, 0.5)          # boxes, scores: numpy.ndarray -> numpy.ndarray
    y = fa.conv2d(x, w, b, padding=1)           # cupy.ndarray in -> cupy.ndarray out, on x's device

Each function has the signature and semantics of its fastcv.ops namesake (fastcv/ops/*.py, docs/ops.md):
it converts its array arguments to torch tensors through DLPack, runs the op, and converts the results
back. Scalars, tuples, lists of sizes and None pass through unchanged. The module is named after what it
takes (arrays), as fastcv.ops and fastcv.nn are; it shadows nothing (Python's `array` is a top-level
module, this is fastcv.array).

Conversions (inputs):
- Zero copy: a NumPy or CuPy array is viewed as a tensor (torch.from_dlpack), any positive strides
  included; the kernels read the caller's memory.
- Copied, for NumPy: read-only arrays (NumPy < 2.1 refuses to export them through DLPack with a
  BufferError, and torch has no read-only tensors: a view would hand writable memory to torch), arrays
  with negative strides (torch tensors cannot have them), non-native byte order and misaligned data (DLPack
  refuses the first; the kernels assume aligned elements). The copy is a C-contiguous, aligned,
  native-order array of the same values; the caller's array is never written.
- Arguments of one call must all be NumPy arrays or all CuPy arrays (on one GPU); a torch.Tensor, a mix,
  a list in an array's place or a masked array raises TypeError naming the argument (use fastcv.ops for
  tensors).

Results: fresh arrays the caller owns: views of the tensors the op allocated for this call (zero copy
back), never of its inputs (an output that shares memory with an input or another output is copied).

CuPy: the op runs on the arrays' device and on CuPy's current stream there (wrapped as a
torch.cuda.ExternalStream), so it is ordered after the caller's CuPy work and before what the caller
queues next, without synchronising the host. CuPy is imported only when a CuPy array is passed (it is
found in sys.modules: a caller with CuPy arrays has imported it); the optional extra `fastcv[cupy]`
installs it.

Inference only: no autograd (everything runs under torch.no_grad()); batch_norm takes running statistics
and rejects training=True.
"""
from __future__ import annotations

import contextlib
import sys

import numpy as np
import torch

from fastcv import ops

__all__ = ["nms", "batched_nms", "batched_nms_padded", "Detections", "roi_align", "multi_scale_roi_align", "im2col",
           "col2im", "conv2d", "batch_norm", "scaled_dot_product_attention"]


# ---------------------------------------------------------------- conversions


def _cupy():
    """CuPy's module if the caller has imported it, else None (never imports it)."""
    return sys.modules.get("cupy")


def _kind(x, arg: str) -> str:
    """'numpy' or 'cupy' for an array argument; TypeError naming `arg` for anything else."""
    if isinstance(x, np.ndarray):
        if isinstance(x, np.ma.MaskedArray):
            raise TypeError(f"{arg} is a numpy masked array: its mask would be ignored; pass a plain ndarray")
        return "numpy"
    cp = _cupy()
    if cp is not None and isinstance(x, cp.ndarray):
        return "cupy"
    if isinstance(x, torch.Tensor):
        raise TypeError(f"{arg} is a torch.Tensor: fastcv.array takes NumPy or CuPy arrays (use fastcv.ops for "
                        f"tensors)")
    raise TypeError(f"{arg} must be a numpy.ndarray or a cupy.ndarray, got {type(x).__module__}.{type(x).__name__}")


def _numpy_exportable(x: np.ndarray) -> np.ndarray:
    """x itself when DLPack can hand it to torch as is, else a C-contiguous, aligned, native-order, writable
    copy (see the module notes: read-only, negative strides, byte order, alignment)."""
    if (x.flags.writeable and x.flags.aligned and x.dtype.isnative
            and all(s >= 0 for s in x.strides)):
        return x
    return np.array(x, dtype=x.dtype.newbyteorder("="), order="C", copy=True)


def _tensor(x, kind: str, arg: str) -> torch.Tensor:
    if kind == "numpy":
        x = _numpy_exportable(x)
    elif any(s < 0 for s in x.strides):  # CuPy: torch tensors cannot have negative strides either
        x = _cupy().ascontiguousarray(x)
    try:
        return torch.from_dlpack(x)
    except (BufferError, RuntimeError, TypeError, ValueError) as e:  # e.g. an object or structured dtype
        raise TypeError(f"{arg}: a {x.dtype} array cannot be passed to torch through DLPack ({e})") from e


class _Export:
    """A result tensor as a DLPack producer for cupy.from_dlpack, exported without stream synchronisation:
    it was computed on the caller's current CuPy stream, the stream cupy.from_dlpack names (torch's own
    __dlpack__ would compare it with torch's current stream, and refuses CuPy's per-thread default one)."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def __dlpack_device__(self):
        return self.t.__dlpack_device__()

    def __dlpack__(self, *, stream=None, **kwargs):
        return self.t.__dlpack__(stream=-1, **kwargs)


class _Call:
    """One call's arrays as tensors, and its results back as arrays of the caller's kind.

        with _Call(boxes=boxes, scores=scores) as c:
            return c.out(ops.nms(c["boxes"], c["scores"], iou_threshold))

    Arguments may be arrays, None (stays None) or, for those named in `lists_ok` (where the op takes a list
    of tensors), lists/tuples of arrays (named arg[i]). Entering converts them within the op's context
    (no_grad; for CuPy the arrays' device and CuPy's current stream there)."""

    def __init__(self, lists_ok=(), **arrays):
        self.kind = self.first = self.device = None
        self.arrays = arrays
        for arg, value in arrays.items():
            if isinstance(value, (list, tuple)) and arg in lists_ok:
                arrays[arg] = list(value)
                for i, x in enumerate(value):
                    self._classify(x, f"{arg}[{i}]")
            elif value is not None:
                self._classify(value, arg)
        if self.kind is None:
            raise TypeError(f"{next(iter(arrays))} must be a numpy.ndarray or a cupy.ndarray")

    def _classify(self, x, arg: str) -> None:
        kind = _kind(x, arg)
        if self.kind is None:
            self.kind, self.first = kind, arg
            self.device = x.device.id if kind == "cupy" else None
        elif kind != self.kind:
            raise TypeError(f"{arg} is a {kind} array but {self.first} is a {self.kind} array: pass arrays of one "
                            f"kind (all NumPy or all CuPy)")
        elif kind == "cupy" and x.device.id != self.device:
            raise ValueError(f"{arg} is on GPU {x.device.id} but {self.first} is on GPU {self.device}: pass arrays "
                             f"on one device")

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(torch.no_grad())
        if self.kind == "cupy":
            cp = _cupy()
            self._stack.enter_context(cp.cuda.Device(self.device))
            self._stack.enter_context(torch.cuda.device(self.device))
            ptr = cp.cuda.get_current_stream().ptr
            # CuPy's null stream is CUDA's legacy default stream, torch's default stream too.
            stream = torch.cuda.default_stream(self.device) if ptr == 0 else \
                torch.cuda.ExternalStream(ptr, device=torch.device("cuda", self.device))
            self._stack.enter_context(torch.cuda.stream(stream))
        try:
            self.tensors = {arg: self._convert(value, arg) for arg, value in self.arrays.items()}
        except BaseException:
            self._stack.close()
            raise
        # Storage of every input: an output found there is copied (the caller owns its results).
        self._seen = {t.untyped_storage().data_ptr() for t in self._flat(self.tensors.values()) if t.numel()}
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def _convert(self, value, arg: str):
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            return [_tensor(x, self.kind, f"{arg}[{i}]") for i, x in enumerate(value)]
        return _tensor(value, self.kind, arg)

    @staticmethod
    def _flat(values):
        for v in values:
            if isinstance(v, list):
                yield from v
            elif v is not None:
                yield v

    def __getitem__(self, arg: str):
        return self.tensors[arg]

    def out(self, t: torch.Tensor):
        """A result tensor -> a fresh array of the caller's kind (zero copy unless it aliases an input)."""
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in self._seen:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            self._seen.add(ptr)
        if self.kind == "numpy":
            return np.from_dlpack(t)
        return _cupy().from_dlpack(_Export(t))


# ---------------------------------------------------------------- nms


def nms(boxes, scores, iou_threshold: float):
    """fastcv.ops.nms (torchvision.ops.nms): boxes [N, 4], scores [N] -> int64 kept indices."""
    with _Call(boxes=boxes, scores=scores) as c:
        return c.out(ops.nms(c["boxes"], c["scores"], iou_threshold))


def batched_nms(boxes, scores, idxs, iou_threshold: float):
    """fastcv.ops.batched_nms (torchvision.ops.batched_nms): NMS within each category of idxs [N]."""
    with _Call(boxes=boxes, scores=scores, idxs=idxs) as c:
        return c.out(ops.batched_nms(c["boxes"], c["scores"], c["idxs"], iou_threshold))


# batched_nms_padded's result: fastcv.ops.Detections, its fields holding arrays of the caller's type.
Detections = ops.Detections


def batched_nms_padded(boxes, scores, iou_threshold: float, score_threshold: float, max_detections: int,
                       pre_nms_top_k: int = 1000) -> Detections:
    """fastcv.ops.batched_nms_padded: boxes [B, N, 4] or [B, N, C, 4], scores [B, N, C] -> Detections."""
    with _Call(boxes=boxes, scores=scores) as c:
        det = ops.batched_nms_padded(c["boxes"], c["scores"], iou_threshold, score_threshold, max_detections,
                                     pre_nms_top_k)
        return Detections(*(c.out(t) for t in det))


# ---------------------------------------------------------------- roi_align


def roi_align(input, boxes, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False):
    """fastcv.ops.roi_align (torchvision.ops.roi_align): boxes an array [K, 5] or a list of arrays [L, 4]."""
    with _Call(("boxes",), input=input, boxes=boxes) as c:
        return c.out(ops.roi_align(c["input"], c["boxes"], output_size, spatial_scale, sampling_ratio, aligned))


def multi_scale_roi_align(features, boxes, output_size, sampling_ratio: int = -1, image_shapes=None, *,
                          scales=None, canonical_scale: float = 224.0, canonical_level: int = 4,
                          aligned: bool = False):
    """fastcv.ops.multi_scale_roi_align: features a list of arrays [N, C, H_l, W_l], finest first."""
    if not isinstance(features, (list, tuple)):
        raise TypeError(f"features must be a list of arrays (one per pyramid level), got {type(features).__name__}")
    with _Call(("features", "boxes"), features=features, boxes=boxes) as c:
        return c.out(ops.multi_scale_roi_align(c["features"], c["boxes"], output_size, sampling_ratio, image_shapes,
                                               scales=scales, canonical_scale=canonical_scale,
                                               canonical_level=canonical_level, aligned=aligned))


# ---------------------------------------------------------------- im2col, col2im, conv2d


def im2col(input, kernel_size, dilation=1, padding=0, stride=1):
    """fastcv.ops.im2col (F.unfold): [N, C, H, W] or [C, H, W] -> [N, C*kh*kw, L] (or [C*kh*kw, L])."""
    with _Call(input=input) as c:
        return c.out(ops.im2col(c["input"], kernel_size, dilation, padding, stride))


def col2im(input, output_size, kernel_size, dilation=1, padding=0, stride=1):
    """fastcv.ops.col2im (F.fold): [N, C*kh*kw, L] or [C*kh*kw, L] -> [N, C, H, W] (or [C, H, W])."""
    with _Call(input=input) as c:
        return c.out(ops.col2im(c["input"], output_size, kernel_size, dilation, padding, stride))


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1):
    """fastcv.ops.conv2d (F.conv2d). A transposed NHWC array (x.transpose(0, 3, 1, 2)) is channels_last to
    the kernels, and its result is too: an NCHW-shaped array with NHWC memory."""
    with _Call(input=input, weight=weight, bias=bias) as c:
        return c.out(ops.conv2d(c["input"], c["weight"], c["bias"], stride, padding, dilation, groups))


# ---------------------------------------------------------------- batch_norm, attention


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training: bool = False,
               momentum: float | None = 0.1, eps: float = 1e-5):
    """fastcv.ops.batch_norm in evaluation mode (F.batch_norm with training=False): normalises input
    [N, C, *spatial] with the given running statistics; momentum is unused, as in F.batch_norm's eval.
    Inference only: training=True (batch statistics, in-place running-statistic updates) raises."""
    if training:
        raise ValueError("fastcv.array.batch_norm is inference only (training=False, running statistics given); "
                         "use fastcv.ops.batch_norm on tensors to train")
    if running_mean is None or running_var is None:
        raise ValueError("fastcv.array.batch_norm needs running_mean and running_var (inference only)")
    with _Call(input=input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias) as c:
        return c.out(ops.batch_norm(c["input"], c["running_mean"], c["running_var"], c["weight"], c["bias"],
                                    False, momentum, eps))


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None, enable_gqa: bool = False):
    """fastcv.ops.scaled_dot_product_attention (F.scaled_dot_product_attention); attn_mask boolean (True
    attends) or additive. dropout_p > 0 draws from torch's generator, as the op does."""
    with _Call(query=query, key=key, value=value, attn_mask=attn_mask) as c:
        return c.out(ops.scaled_dot_product_attention(c["query"], c["key"], c["value"], c["attn_mask"], dropout_p,
                                                      is_causal, scale, enable_gqa))
