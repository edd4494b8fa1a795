"""Whole networks (`python -m fastcv bench --models`): torchvision's classification and segmentation
networks against their fastcv.convert() versions and against fastcv.models' networks with the same weights,
inference and a training step (forward, backward, SGD step); torchvision's detectors with and without
fastcv.patch_torchvision(), end to end and in their RoI stage alone, and against fastcv.models' sync-free
detectors end to end. Each case's speedup is the original's time over fastcv's; images per second are in
the throughput column.

Sizes: batch 8 at 224x224 for classification, batch 2 at 520x520 for FCN, batch 2 at 800x800 for
detection. Weights are random (nothing is downloaded); the detectors keep every detection (score
threshold 0), so that the box head post-processes a full set, as a trained model on a busy image does.
"""
from __future__ import annotations

import copy

import torch

import fastcv
import fastcv.models  # noqa: F401  (fastcv.models.<builder>)
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


def _pooling_and_nms_inputs(model, images):
    """The RoI stage's inputs, and the box head's class logits and box regression for the proposals."""
    features, proposals, image_sizes = _roi_stage_inputs(model, images)
    with torch.inference_mode():
        pooled = model.roi_heads.box_roi_pool(features, proposals, image_sizes)
        logits, regression = model.roi_heads.box_predictor(model.roi_heads.box_head(pooled))
    return features, proposals, image_sizes, logits, regression


def _pooling_and_nms(model):
    """The two steps fastcv replaces, without the box head between them: the multi-level RoI Align of the
    proposals and the post-processing (box decoding, score filter, per-class NMS)."""
    def run(features, proposals, image_sizes, logits, regression):
        with torch.inference_mode():
            pooled = model.roi_heads.box_roi_pool(features, proposals, image_sizes)
            boxes, scores, labels = model.roi_heads.postprocess_detections(logits, regression, proposals,
                                                                          image_sizes)
        return [{"pooled": pooled.sum((1, 2, 3))}] + [{"boxes": b, "scores": s, "labels": lab}
                                                      for b, s, lab in zip(boxes, scores, labels)]

    return run


def _end_to_end(model):
    def run(images):
        with torch.inference_mode():
            return model(images)

    return run


def _models_end_to_end(model):
    """fastcv.models' detector, then its padded output cut and its masks pasted as torchvision returns them."""
    from fastcv.models.detection import to_torchvision

    def run(images):
        with torch.inference_mode():
            return to_torchvision(model(images), model.original_sizes(images))

    return run


def _similar_detections(got, expected):
    """A float32 network with random weights amplifies rounding (fastcv's convolutions sum in another order),
    so nearly tied detections may swap or change: the same number per image, and at least 90% of each image's
    detections found in the other's result with the same label and a box within one pixel (tests/
    test_models_detection.py checks the exact equality in float64)."""
    for g, e in zip(got, expected):
        assert len(g["labels"]) == len(e["labels"]), "detection counts differ"
        close = (g["boxes"][:, None] - e["boxes"][None]).abs().amax(-1) <= 1.0
        same = close & (g["labels"][:, None] == e["labels"][None])
        assert same.any(1).float().mean() >= 0.9, "fewer than 90% of the detections agree"


def _fastcv_detector(name: str, original):
    model = getattr(fastcv.models, name)(box_score_thresh=0.0)
    model.load_state_dict(original.state_dict())
    return model.eval().to(next(original.parameters()).device)


def detection_cases(device: str) -> list[Case]:
    out = []
    size = f"batch {DETECTION_BATCH} at {DETECTION_SIZE}x{DETECTION_SIZE}"
    for name in ("fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn"):
        model = _detector(name, device)
        images = lambda: (_images(device, DETECTION_BATCH, DETECTION_SIZE),)  # noqa: E731
        stage = lambda m=model: _roi_stage_inputs(m, _images(device, DETECTION_BATCH, DETECTION_SIZE))  # noqa: E731
        pooling = lambda m=model: _pooling_and_nms_inputs(m, _images(device, DETECTION_BATCH, DETECTION_SIZE))  # noqa: E731
        out.append(Case(
            name, f"RoI pooling + post-processing NMS (no box head), {size}, inference", make=pooling,
            fastcv=_patched(_pooling_and_nms(model)), reference=_pooling_and_nms(model),
            reference_name=f"torchvision {name}", check=_same_detections))
        out.append(Case(
            name, f"RoI stage (multi-level RoI Align, box head, NMS), {size}, inference", make=stage,
            fastcv=_patched(_roi_stage(model)), reference=_roi_stage(model),
            reference_name=f"torchvision {name}", check=_same_detections))
        out.append(Case(
            name, f"end to end, {size}, inference", make=images, fastcv=_patched(_end_to_end(model)),
            reference=_end_to_end(model), reference_name=f"torchvision {name}", check=_same_detections))
        out.append(Case(
            name, f"fastcv.convert, end to end, {size}, inference", make=images,
            fastcv=_end_to_end(fastcv.convert(model)), reference=_end_to_end(model),
            reference_name=f"torchvision {name}", check=_similar_detections))
        out.append(Case(
            name, f"fastcv.models (sync-free), end to end, {size}, inference", make=images,
            fastcv=_models_end_to_end(_fastcv_detector(name, model)), reference=_end_to_end(model),
            reference_name=f"torchvision {name}", check=_similar_detections))
    return out


# ---------------------------------------------------------------- classification and segmentation

NETWORKS = [  # (torchvision builder, batch, image size)
    ("resnet50", 8, 224),
    ("mobilenet_v2", 8, 224),
    ("vit_b_16", 8, 224),
    ("fcn_resnet50", 2, 520),
]


def _network(name: str, device: str) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    builder = getattr(torchvision.models.segmentation if name.startswith("fcn") else torchvision.models, name)
    extra = {"weights_backbone": None} if name.startswith("fcn") else {}
    return builder(weights=None, **extra).to(device)


def _logits(out) -> torch.Tensor:
    return out["out"] if isinstance(out, dict) else out


def _inference(model):
    def run(images):
        with torch.inference_mode():
            return _logits(model(images))

    return run


def _training_step(model):
    """Forward, backward and an SGD step with momentum on a fixed cross-entropy target; returns the loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def run(images, target):
        torch.manual_seed(0)  # the same dropout masks on both sides (MobileNetV2's classifier), so the losses compare
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(_logits(model(images)), target)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return run


def _close_logits(got, expected):
    """Folding batch norm into the convolutions and fastcv's own summation orders change float32 sums of
    up to 4608 terms (ResNet's 3x3x512 convolutions) and carry them through 50 layers: 1e-3 of the
    logits' scale."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * scale)


def _images_per_second(batch: int):
    return lambda args, out: (batch, "images/s")


def classification_cases(device: str) -> list[Case]:
    out = []
    for name, batch, size in NETWORKS:
        original = _network(name, device)
        fresh = copy.deepcopy(original)
        converted = fastcv.convert(original, fuse=True)
        classes = 21 if name.startswith("fcn") else 1000
        g = torch.Generator().manual_seed(1)
        images = torch.rand(batch, 3, size, size, generator=g).to(device)
        target = (torch.randint(0, classes, (batch, size, size) if name.startswith("fcn") else (batch,),
                                generator=g)).to(device)
        shape = f"batch {batch} at {size}x{size}"
        out.append(Case(
            name, f"{shape}, inference", make=lambda x=images: (x,),
            fastcv=lambda x, m=converted: _inference(m.eval())(x), reference=lambda x, m=original: _inference(m.eval())(x),
            reference_name=f"torchvision {name}", check=_close_logits, work=_images_per_second(batch)))
        out.append(Case(
            name, f"{shape}, training step (forward, backward, SGD)", make=lambda x=images, t=target: (x, t),
            fastcv=_train_mode(converted), reference=_train_mode(original), reference_name=f"torchvision {name}",
            check=_close_logits, work=_images_per_second(batch)))
        # a pair of its own: the cases above train `original`
        twin = copy.deepcopy(fresh)
        own = _fastcv_network(name, twin)
        out.append(Case(
            name, f"fastcv.models, {shape}, inference", make=lambda x=images: (x,),
            fastcv=lambda x, m=own: _inference(m.eval())(x), reference=lambda x, m=twin: _inference(m.eval())(x),
            reference_name=f"torchvision {name}", check=_close_logits, work=_images_per_second(batch)))
        out.append(Case(
            name, f"fastcv.models, {shape}, training step (forward, backward, SGD)",
            make=lambda x=images, t=target: (x, t), fastcv=_train_mode(own), reference=_train_mode(twin),
            reference_name=f"torchvision {name}", check=_close_logits, work=_images_per_second(batch)))
    return out


def _fastcv_network(name: str, original) -> torch.nn.Module:
    """fastcv.models' network of that name with the original's weights (a copy: the training steps move them)."""
    model = getattr(fastcv.models, name)()
    model.load_state_dict(original.state_dict())
    return model.to(next(original.parameters()).device)


def _train_mode(model):
    step = _training_step(model)

    def run(images, target):
        model.train()
        return step(images, target)

    return run


def cases(device: str) -> list[Case]:
    return classification_cases(device) + detection_cases(device)
