"""Whole networks (`python -m fastcv bench --models`): torchvision's detectors with and without
fastcv.patch_torchvision(), end to end and in their RoI stage alone. Images per second are the
reciprocal of the times; each case's speedup is the original's time over fastcv's.

Sizes are the issue's: batch 2 at 800x800 for detection. Weights are random (nothing is downloaded),
with the score threshold at 0 so that the box head post-processes a full set of detections, as a
trained model on a busy image does.
"""
from __future__ import annotations

import torch

import fastcv
from fastcv.benchmarks import Case

DETECTION_SIZE, DETECTION_BATCH = 800, 2


def _detector(name: str, device: str):
    from torchvision.models import detection

    torch.manual_seed(0)
    model = getattr(detection, name)(weights=None, weights_backbone=None, box_score_thresh=0.0)
    return model.eval().to(device)


def _images(device: str, batch: int, size: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, size, size, generator=g).to(device) for _ in range(batch)]


def _patched(fn):
    def run(*args):
        with fastcv.patch_torchvision():
            return fn(*args)

    return run


def _same_detections(got, expected):
    """The same boxes kept, in the same order (see tests/test_patch.py for the tolerance)."""
    for g, e in zip(got, expected):
        for key in e:
            if key == "labels":
                assert torch.equal(g[key], e[key]), "labels differ"
            else:
                torch.testing.assert_close(g[key], e[key], rtol=1e-4, atol=1e-4)


def _roi_stage_inputs(model, images):
    """The RoI stage's inputs: the backbone's feature maps, the RPN's proposals and the image sizes."""
    with torch.inference_mode():
        image_list, _ = model.transform(images)
        features = model.backbone(image_list.tensors)
        proposals, _ = model.rpn(image_list, features)
    return features, proposals, image_list.image_sizes


def _roi_stage(model):
    """Multi-level RoI Align, the box head and predictor, and the post-processing NMS."""
    def run(features, proposals, image_sizes):
        with torch.inference_mode():
            detections, _ = model.roi_heads(features, proposals, image_sizes)
        return detections

    return run


def _end_to_end(model):
    def run(images):
        with torch.inference_mode():
            return model(images)

    return run


def detection_cases(device: str) -> list[Case]:
    out = []
    size = f"batch {DETECTION_BATCH} at {DETECTION_SIZE}x{DETECTION_SIZE}"
    for name in ("fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn"):
        model = _detector(name, device)
        images = lambda: (_images(device, DETECTION_BATCH, DETECTION_SIZE),)  # noqa: E731
        stage = lambda m=model: _roi_stage_inputs(m, _images(device, DETECTION_BATCH, DETECTION_SIZE))  # noqa: E731
        out.append(Case(
            name, f"RoI stage (multi-level RoI Align, box head, NMS), {size}, inference", make=stage,
            fastcv=_patched(_roi_stage(model)), reference=_roi_stage(model),
            reference_name=f"torchvision {name}", check=_same_detections))
        out.append(Case(
            name, f"end to end, {size}, inference", make=images, fastcv=_patched(_end_to_end(model)),
            reference=_end_to_end(model), reference_name=f"torchvision {name}", check=_same_detections))
    return out


def cases(device: str) -> list[Case]:
    return detection_cases(device)
