"""patch_torchvision(): torchvision's detection models on fastcv's NMS and multi-level RoI Align; and
swap_detection_modules(model), what fastcv.convert does to one model instead.

torchvision's Faster, Mask and Keypoint R-CNN call `torchvision.ops.boxes.batched_nms` in the RPN and in
the box head's post-processing, and `torchvision.ops.MultiScaleRoIAlign` for the box and mask heads, which
pools each FPN level in a Python loop. Under the patch those calls run fastcv.ops.batched_nms (and nms)
and fastcv's one-call multi-level RoI Align, which give torchvision's results (see docs/ops.md) faster.
Every model built from torchvision's classes is affected, also those built before the patch.

swap_detection_modules(model) changes one model instead, with no global state: it re-classes the model's
MultiScaleRoIAlign, RegionProposalNetwork and RoIHeads modules to subclasses whose pooling, proposal filtering
and detection post-processing run fastcv's kernels (the post-processing as fastcv.models' detectors compute it:
one batched_nms_padded per stage, then cut to torchvision's lists). Their results are torchvision's; their
attributes, state_dict and hooks stay.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fastcv import ops

__all__ = ["patch_torchvision", "swap_detection_modules"]


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


# ------------------------------------------------------------------------------------------------ one model


def _cut(padded: Tensor, counts: list[int]) -> list[Tensor]:
    return [padded[b, :n] for b, n in enumerate(counts)]


def _filter_proposals(self, proposals: Tensor, objectness: Tensor, image_shapes: list[tuple[int, int]],
                      num_anchors_per_level: list[int]) -> tuple[list[Tensor], list[Tensor]]:
    """RegionProposalNetwork.filter_proposals on fastcv's select_proposals (one batched_nms_padded)."""
    from fastcv.models.detection import select_proposals

    objectness = objectness.detach().reshape(proposals.shape[0], -1)
    boxes, scores, valid = select_proposals(proposals, objectness, num_anchors_per_level, image_shapes,
                                            self.pre_nms_top_n(), self.post_nms_top_n(), self.nms_thresh,
                                            self.score_thresh, self.min_size)
    counts = valid.sum(1).tolist()
    return _cut(boxes, counts), _cut(scores, counts)


def _postprocess_detections(self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor],
                            image_shapes: list[tuple[int, int]]):
    """RoIHeads.postprocess_detections on fastcv's select_detections (one batched_nms_padded with a box per
    class); images with fewer proposals are padded to the most."""
    from fastcv.models.detection import select_detections

    sizes = [p.shape[0] for p in proposals]
    pad = torch.nn.utils.rnn.pad_sequence
    valid = pad([torch.ones(n, dtype=torch.bool, device=class_logits.device) for n in sizes], batch_first=True)
    boxes, scores, labels, counts = select_detections(
        pad(list(class_logits.split(sizes)), batch_first=True), pad(list(box_regression.split(sizes)), batch_first=True),
        pad(proposals, batch_first=True), valid, image_shapes, self.box_coder.weights, self.score_thresh,
        self.nms_thresh, self.detections_per_img)
    counts = counts.tolist()
    return _cut(boxes, counts), _cut(scores, counts), _cut(labels, counts)


def _swaps() -> dict[type, dict]:
    """torchvision's detection classes -> fastcv's methods for them ({} without torchvision)."""
    try:
        from torchvision.models.detection.roi_heads import RoIHeads
        from torchvision.models.detection.rpn import RegionProposalNetwork
        from torchvision.ops.poolers import MultiScaleRoIAlign
    except ImportError:  # no torchvision: no torchvision model to change
        return {}
    return {
        MultiScaleRoIAlign: {"forward": _multi_scale_forward},
        RegionProposalNetwork: {"filter_proposals": _filter_proposals},
        RoIHeads: {"postprocess_detections": _postprocess_detections},
    }


_SUBCLASSES: dict[type, type] = {}


def _fast_subclass(base: type, methods: dict) -> type:
    """The subclass of torchvision's `base` with fastcv's methods, one per base, named Fast<base> in this module
    (so a pickled converted model finds it)."""
    if base not in _SUBCLASSES:
        _SUBCLASSES[base] = type(f"Fast{base.__name__}", (base,), {"__module__": __name__, **methods})
    return _SUBCLASSES[base]


def __getattr__(name: str) -> type:
    if name.startswith("Fast"):  # only these: importlib asks modules for __path__ and such, and torchvision's
        for base, methods in _swaps().items():  # import must not happen then (it is slow, and optional)
            if name == f"Fast{base.__name__}":
                return _fast_subclass(base, methods)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def swap_detection_modules(model: nn.Module) -> list[str]:
    """Re-classes the torchvision detection modules of `model` in place (those exact classes, not subclasses of
    them with their own code) to run fastcv's kernels; returns their names."""
    swaps = _swaps()
    swapped = []
    for name, module in model.named_modules():
        methods = swaps.get(type(module))
        if methods is not None:
            module.__class__ = _fast_subclass(type(module), methods)
            swapped.append(name)
    return swapped
