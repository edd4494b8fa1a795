"""patch_torchvision(): torchvision's detection models on fastcv's NMS and multi-level RoI Align.

torchvision's Faster, Mask and Keypoint R-CNN call `torchvision.ops.boxes.batched_nms` in the RPN and in
the box head's post-processing, and `torchvision.ops.MultiScaleRoIAlign` for the box and mask heads, which
pools each FPN level in a Python loop. Under the patch those calls run fastcv.ops.batched_nms (and nms)
and fastcv's one-call multi-level RoI Align, which give torchvision's results (see docs/ops.md) faster.
Every model built from torchvision's classes is affected, also those built before the patch.
"""
from __future__ import annotations

from torch import Tensor

from fastcv import ops

__all__ = ["patch_torchvision"]


def _multi_scale_forward(self, x: dict[str, Tensor], boxes: list[Tensor],
                         image_shapes: list[tuple[int, int]]) -> Tensor:
    """torchvision.ops.MultiScaleRoIAlign.forward on fastcv's kernels: every level in one call."""
    features = [v for k, v in x.items() if k in self.featmap_names]
    return ops.multi_scale_roi_align(features, boxes, self.output_size, self.sampling_ratio, image_shapes,
                                     canonical_scale=self.canonical_scale, canonical_level=self.canonical_level)


def _targets():
    """(object, attribute, fastcv's replacement) for every place torchvision's detection code looks up."""
    import torchvision
    from torchvision.ops import boxes, poolers

    return [
        (boxes, "nms", ops.nms),
        (boxes, "batched_nms", ops.batched_nms),
        (torchvision.ops, "nms", ops.nms),
        (torchvision.ops, "batched_nms", ops.batched_nms),
        (poolers.MultiScaleRoIAlign, "forward", _multi_scale_forward),
    ]


class patch_torchvision:
    """Runs torchvision's detection models on fastcv's NMS and multi-level RoI Align.

    As a context manager the patch holds inside the block:

        with fastcv.patch_torchvision():
            detections = model(images)

    As a call it holds until undone: `patch = fastcv.patch_torchvision()`, later `patch.undo()`.
    Patches nest; each undo restores what its own patch replaced."""

    def __init__(self):
        self._saved = [(obj, name, getattr(obj, name)) for obj, name, _ in _targets()]
        for obj, name, replacement in _targets():
            setattr(obj, name, replacement)
        self.active = True

    def undo(self) -> None:
        if not self.active:
            return
        for obj, name, original in reversed(self._saved):
            setattr(obj, name, original)
        self.active = False

    def __enter__(self) -> "patch_torchvision":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    @staticmethod
    def is_active() -> bool:
        """Whether torchvision's detection ops currently run fastcv's (some patch is in force)."""
        from torchvision.ops import boxes
        return boxes.batched_nms is ops.batched_nms
