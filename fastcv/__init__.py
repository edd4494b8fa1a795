"""fastcv: hand-written CPU, CUDA and Triton kernels for computer-vision deep learning.

    import fastcv.ops as ops
    keep = ops.nms(boxes, scores, 0.5)      # drop-in for torchvision.ops.nms
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fastcv")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from fastcv import cpu, nn, ops  # noqa: E402  (registers torch.ops.fastcv.*; cpu reads FASTCV_CPU_ISA)
from fastcv.convert import convert  # noqa: E402  (the function: it shadows its module's name here)
from fastcv.patch import patch_torchvision  # noqa: E402

__all__ = ["convert", "cpu", "nn", "ops", "patch_torchvision", "__version__"]
