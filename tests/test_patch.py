"""fastcv.patch_torchvision(): torchvision's detection models on fastcv's NMS and multi-level RoI Align,
compared with the same models unpatched (same weights, same inputs)."""
import pytest
import torch
import torchvision
from torchvision.models import detection
from torchvision.ops import boxes as box_ops, poolers

import fastcv
from fastcv import ops


def _model(builder, **kwargs):
    """A torchvision detector with random weights (nothing downloaded) at a small image size, keeping
    every detection (score threshold 0) so that the comparison covers many boxes."""
    torch.manual_seed(0)
    return builder(weights=None, weights_backbone=None, min_size=192, max_size=192, box_score_thresh=0.0,
                   box_detections_per_img=40, **kwargs)


def _images():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 192, 192, generator=g), torch.rand(3, 160, 192, generator=g)]


def _assert_same_detections(got, expected):
    """fastcv's RoI Align and NMS give torchvision's results: the same boxes kept in the same order. The
    pooled features may differ from torchvision's in the last bit of float32 (another summation order
    of the four bilinear terms), which the heads carry into scores and box deltas: 1e-5 relative."""
    for g, e in zip(got, expected):
        assert g.keys() == e.keys()
        assert torch.equal(g["labels"], e["labels"])
        for key in g:
            if key != "labels":
                torch.testing.assert_close(g[key], e[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("builder", [detection.fasterrcnn_resnet50_fpn, detection.maskrcnn_resnet50_fpn],
                         ids=["faster_rcnn", "mask_rcnn"])
def test_detection_inference_matches_torchvision(builder):
    model = _model(builder).eval()
    images = _images()
    with torch.no_grad():
        expected = model(images)
        with fastcv.patch_torchvision():
            got = model(images)
    assert len(expected[0]["boxes"]) > 10, "the comparison needs detections"
    _assert_same_detections(got, expected)


def test_detection_training_matches_torchvision():
    """Train mode: the RPN's and the heads' losses, and the gradients that flow back through fastcv's
    RoI Align backward into the backbone, as torchvision's."""
    model = _model(detection.fasterrcnn_resnet50_fpn).train()
    images = _images()
    targets = [{"boxes": torch.tensor([[10.0, 20, 90, 120], [50, 40, 150, 110]]), "labels": torch.tensor([3, 7])},
               {"boxes": torch.tensor([[5.0, 5, 60, 70]]), "labels": torch.tensor([1])}]
    params = [p for p in model.parameters() if p.requires_grad]

    def losses_and_grads():
        torch.manual_seed(2)  # the RPN and the heads sample proposals at random
        losses = model(images, targets)
        grads = torch.autograd.grad(sum(losses.values()), params, allow_unused=True)
        return losses, grads

    expected_losses, expected_grads = losses_and_grads()
    with fastcv.patch_torchvision():
        losses, grads = losses_and_grads()
    for name in expected_losses:
        torch.testing.assert_close(losses[name], expected_losses[name], rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, expected_grads):
        if e is None:
            assert g is None
        else:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)  # float32 sums over many boxes, reordered


def test_patch_calls_fastcv_and_undo_restores(monkeypatch):
    originals = (box_ops.nms, box_ops.batched_nms, torchvision.ops.nms, torchvision.ops.batched_nms,
                 poolers.MultiScaleRoIAlign.forward)
    calls = {"batched_nms": 0, "multi_scale_roi_align": 0}
    for name in calls:
        original = getattr(ops, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(ops, name, spy)
    model = _model(detection.fasterrcnn_resnet50_fpn).eval()
    patch = fastcv.patch_torchvision()  # the plain call: holds until undone
    try:
        assert fastcv.patch_torchvision.is_active()
        with fastcv.patch_torchvision():  # nested: its exit leaves the outer patch in force
            pass
        assert fastcv.patch_torchvision.is_active() and box_ops.batched_nms is ops.batched_nms
        with torch.no_grad():
            model(_images())
    finally:
        patch.undo()
    # the RPN's NMS per image, the box head's per image; one RoI Align call for both images
    assert calls == {"batched_nms": 4, "multi_scale_roi_align": 1}
    assert (box_ops.nms, box_ops.batched_nms, torchvision.ops.nms, torchvision.ops.batched_nms,
            poolers.MultiScaleRoIAlign.forward) == originals
    assert not fastcv.patch_torchvision.is_active()
    patch.undo()  # a second undo changes nothing
    assert box_ops.batched_nms is originals[1]


@pytest.mark.filterwarnings("ignore:fastcv.convert")  # the detectors' own modules do not trace (data-dependent)
@pytest.mark.parametrize("builder", [detection.fasterrcnn_resnet50_fpn, detection.maskrcnn_resnet50_fpn],
                         ids=["faster_rcnn", "mask_rcnn"])
def test_convert_swaps_this_models_detection_modules(builder):
    """fastcv.convert re-classes the model's MultiScaleRoIAlign, RPN and RoI heads (nothing global changes), and
    the converted detector gives the original's detections (float64: the convolutions' summation order cannot
    reorder them), in eval mode and, for the RPN's proposals, in training mode (the losses)."""
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.rpn import RegionProposalNetwork

    from fastcv import patch

    model = _model(builder).double().eval()
    converted = fastcv.convert(model)
    assert not fastcv.patch_torchvision.is_active()
    assert type(model.rpn) is RegionProposalNetwork and type(model.roi_heads) is RoIHeads
    assert type(converted.rpn) is patch.FastRegionProposalNetwork and isinstance(converted.rpn, RegionProposalNetwork)
    assert type(converted.roi_heads) is patch.FastRoIHeads
    assert type(converted.roi_heads.box_roi_pool) is patch.FastMultiScaleRoIAlign
    assert list(converted.state_dict()) == list(model.state_dict())
    images = [i.double() for i in _images()]
    with torch.no_grad():
        expected, got = model(images), converted(images)
    assert len(expected[0]["boxes"]) > 10
    for g, e in zip(got, expected):
        assert torch.equal(g["labels"], e["labels"])
        for key in g:
            if key != "labels":
                torch.testing.assert_close(g[key], e[key], rtol=1e-9, atol=1e-9)

    targets = [{"boxes": torch.tensor([[10.0, 20, 90, 120]], dtype=torch.float64), "labels": torch.tensor([3])}
               for _ in images]
    if builder is detection.maskrcnn_resnet50_fpn:
        for t, image in zip(targets, images):
            t["masks"] = torch.zeros(1, *image.shape[1:], dtype=torch.uint8)
            t["masks"][0, 20:120, 10:90] = 1
    results = []
    for m in (model, converted):
        m.train()
        torch.manual_seed(2)  # the RPN and the heads sample proposals at random
        results.append(m(images, targets))
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-9, atol=1e-12)


def test_importing_fastcv_does_not_import_torchvision():
    """torchvision is optional (the detection swaps import it when a model needs them): `import fastcv` must not
    load it, also not through fastcv.patch's lazy class lookup (importlib asks modules for __path__)."""
    import subprocess
    import sys

    code = "import sys, fastcv, fastcv.models; assert 'torchvision' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
