"""fastcv.models' two-stage detectors against torchvision's, with the same weights and images.

The detectors are torchvision's structure at small images (short side 224) with fewer proposals, so that a
forward takes seconds. The strict checks run in float64, where the two computations differ only by rounding
in the 16th digit, so every ranking, threshold and NMS decision is the same: the valid proposals, the
detections (boxes, scores, labels, in order) and the pasted masks must then agree to 1e-9 of their scale. (In
float32 the convolutions' different summation orders move scores by about 1e-6, enough to swap nearly tied
proposals; that run is checked against torchvision's own float32 error.)"""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torchvision.models.detection import roi_heads as tv_roi_heads

import fastcv
from fastcv.models import detection
from networks import assert_as_accurate, prepare

SMALL = dict(min_size=224, max_size=320, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150,
             box_detections_per_img=50)
BUILDERS = {
    "fasterrcnn_resnet50_fpn": (torchvision.models.detection.fasterrcnn_resnet50_fpn,
                                fastcv.models.fasterrcnn_resnet50_fpn),
    "maskrcnn_resnet50_fpn": (torchvision.models.detection.maskrcnn_resnet50_fpn, fastcv.models.maskrcnn_resnet50_fpn),
}
_BUILT: dict[str, torch.nn.Module] = {}


def _torchvision(name: str) -> torch.nn.Module:
    """torchvision's detector (weights=None), its ResNet's batch norms calibrated so they are not the identity,
    in eval mode (built once per session, copied per test)."""
    if name not in _BUILT:
        torch.manual_seed(0)
        model = BUILDERS[name][0](weights=None, weights_backbone=None, **SMALL)
        prepare(model.backbone.body, (1, 3, 64, 64))
        _BUILT[name] = model.eval()
    return copy.deepcopy(_BUILT[name])


def _fastcv(name: str, reference: torch.nn.Module) -> torch.nn.Module:
    model = BUILDERS[name][1](**SMALL)
    model.load_state_dict(reference.state_dict())
    return model.to(next(reference.parameters()).dtype).eval()


def _images(dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    return [torch.rand(3, 200, 260, generator=g, dtype=dtype), torch.rand(3, 240, 180, generator=g, dtype=dtype)]


@pytest.mark.parametrize("name", BUILDERS)
def test_state_dict_is_torchvisions(name):
    reference = _torchvision(name)
    model = BUILDERS[name][1]()
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    model.load_state_dict(theirs)  # strict, both ways
    back = BUILDERS[name][0](weights=None, weights_backbone=None)
    back.load_state_dict(model.state_dict())
    assert all(torch.equal(v, theirs[k]) for k, v in back.state_dict().items())


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 1e-9) -> None:
    scale = max(b.abs().max().item(), 1.0) if b.numel() else 1.0
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    error = (a - b).abs().max().item() if a.numel() else 0.0
    assert error <= rtol * scale, f"{what}: error {error:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("name", BUILDERS)
def test_proposals_and_detections_float64(name):
    reference = _torchvision(name).double()
    model = _fastcv(name, reference)
    images = _images(torch.float64)
    with torch.no_grad():
        expected = reference(images)
        # torchvision's proposals, from its own stages
        batch, _ = reference.transform(images)
        features = reference.backbone(batch.tensors)
        tv_proposals, _ = reference.rpn(batch, features)
        out = model(images)
        ours_batch, sizes = model.transform(images)
        maps = model.backbone(ours_batch)
        proposals, valid = model.rpn(maps, tuple(ours_batch.shape[-2:]), sizes)
    assert sizes == batch.image_sizes
    _close(ours_batch, batch.tensors, "transformed images", 1e-12)
    for b, tv in enumerate(tv_proposals):
        n = int(valid[b].sum())
        assert valid[b, :n].all() and n == tv.shape[0] > 0, f"image {b}: {n} proposals, torchvision {tv.shape[0]}"
        _close(proposals[b, :n], tv, f"image {b} proposals")
        assert (proposals[b, n:] == 0).all()
    results = detection.to_torchvision(out, model.original_sizes(images))
    assert len(results) == len(expected)
    for b, (ours, theirs) in enumerate(zip(results, expected)):
        count = theirs["boxes"].shape[0]
        assert 0 < count == int(out.counts[b])
        assert torch.equal(ours["labels"], theirs["labels"]), f"image {b} labels"
        _close(ours["scores"], theirs["scores"], f"image {b} scores")
        _close(ours["boxes"], theirs["boxes"], f"image {b} boxes")
        if "masks" in theirs:
            _close(ours["masks"], theirs["masks"], f"image {b} masks", 1e-9)
        # the padding
        assert (out.labels[b, count:] == 0).all() and (out.scores[b, count:] == 0).all()
        assert (out.boxes[b, count:] == 0).all()
    assert (out.masks is not None) == (name == "maskrcnn_resnet50_fpn")


def test_detections_float32_as_accurate_as_torchvisions():
    """float32, as users run it: on the leading detections where torchvision's float64 and float32 results and
    fastcv's float32 result agree on the labels (rounding reorders nearly tied detections further down), fastcv's
    scores and boxes are as close to the float64 result as torchvision's own float32 ones (networks.py's
    ERROR_RATIO; this untrained network amplifies rounding: torchvision's float32 scores are off by up to 4e-3)."""
    reference = _torchvision("fasterrcnn_resnet50_fpn")
    reference64 = copy.deepcopy(reference).double()
    model = _fastcv("fasterrcnn_resnet50_fpn", reference)
    images = _images()
    with torch.no_grad():
        truth = reference64([i.double() for i in images])
        theirs = reference(images)
        ours = detection.to_torchvision(model(images), model.original_sizes(images))
    for b, (t64, t32, f32) in enumerate(zip(truth, theirs, ours)):
        n = min(len(t64["labels"]), len(t32["labels"]), len(f32["labels"]))
        same = (t64["labels"][:n] == t32["labels"][:n]) & (t32["labels"][:n] == f32["labels"][:n])
        n = int(same.long().cumprod(0).sum())
        assert n >= 5, f"image {b}: only {n} leading detections agree"
        for key in ("scores", "boxes"):
            assert_as_accurate(f"image {b} {key}", f32[key][:n], t32[key][:n], t64[key][:n])


def test_compile_fullgraph_no_data_dependent_shapes():
    """torch.compile(fullgraph=True) traces the whole inference (it would break the graph at a data-dependent
    shape or a read of a tensor's value), and gives the eager result (in float64, where the compiled code's
    fused elementwise rounding cannot reorder detections)."""
    reference = _torchvision("maskrcnn_resnet50_fpn").double()
    model = _fastcv("maskrcnn_resnet50_fpn", reference)
    images = torch.stack(_images(torch.float64)[:1] * 2)  # one size: a batched tensor
    with torch.no_grad():
        eager = model(images)
        compiled = torch.compile(model, fullgraph=True)(images)
    assert torch.equal(compiled.counts, eager.counts) and torch.equal(compiled.labels, eager.labels)
    for field in ("boxes", "scores", "masks"):
        _close(getattr(compiled, field), getattr(eager, field), field)


def test_paste_masks_is_torchvisions():
    g = torch.Generator().manual_seed(5)
    masks = torch.rand(1, 40, 1, 28, 28, generator=g, dtype=torch.float64)
    # boxes overlapping the 100 x 120 image, some across its edges (for a box wholly left of or above the image
    # torchvision's paste raises: its negative slice end counts from the far edge; fastcv's pastes nothing)
    corner = torch.rand(40, 2, generator=g, dtype=torch.float64) * torch.tensor([120.0, 90.0]) - 10
    size = torch.rand(40, 2, generator=g, dtype=torch.float64) * 80 + 12
    corner[:4] = 30.0
    size[:4] = torch.tensor([[0.0, 0.0], [0.3, 5.0], [27.0, 27.0], [500.0, 400.0]], dtype=torch.float64)
    boxes = torch.cat([corner, corner + size], dim=1)
    expected = tv_roi_heads.paste_masks_in_image(masks[0], boxes, (100, 120), padding=1)
    pasted = detection.paste_masks(masks, boxes[None], (100, 120))
    assert pasted.shape == (1, 40, 1, 100, 120)
    _close(pasted[0], expected, "pasted masks", 1e-12)
    assert (expected > 0).sum() > 1000  # the boxes cover something
    outside = torch.tensor([[[-50.0, -40.0, -20.0, -10.0], [130.0, 10.0, 160.0, 30.0]]], dtype=torch.float64)
    assert not detection.paste_masks(masks[:, :2], outside, (100, 120)).any()


def test_bad_input():
    model = fastcv.models.fasterrcnn_resnet50_fpn(**SMALL).eval()
    with pytest.raises(ValueError, match=r"images must be a \[B, C, H, W\] tensor or a list"):
        model(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match=r"images\[1\] must be a \[C, H, W\] tensor"):
        model([torch.rand(3, 64, 64), torch.rand(64, 64)])
    with pytest.raises(TypeError, match=r"images\[0\] must be floating point"):
        model([torch.zeros(3, 64, 64, dtype=torch.uint8)])
    with pytest.raises(NotImplementedError, match="inference only"):
        model.train()([torch.rand(3, 64, 64)])
