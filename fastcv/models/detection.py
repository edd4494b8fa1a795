"""Two-stage detection (Faster R-CNN and Mask R-CNN with a ResNet-FPN backbone) written from fastcv.nn and
fastcv.ops, with torchvision's module names: a state_dict of torchvision's fasterrcnn_resnet50_fpn or
maskrcnn_resnet50_fpn loads unchanged.

    net = fastcv.models.maskrcnn_resnet50_fpn().eval()
    net.load_state_dict(torchvision_maskrcnn.state_dict())
    out = net(images)                  # DetectorOutput: padded tensors, nothing waits for the device
    results = to_torchvision(out, net.original_sizes(images))   # torchvision's list of dicts (syncs)

The pipeline is torchvision's (normalise, resize, pad; ResNet-50 -> FPN; RPN; multi-level RoI Align; box head;
mask head), but in inference no shape depends on the data:
- proposals: the RPN's per-level top-k candidates go through one `batched_nms_padded` (the levels as its
  classes), and every image gets exactly `rpn_post_nms_top_n_test` proposal rows with a validity mask where
  torchvision indexes with booleans;
- the box head runs on every proposal row; invalid rows get no score, and the per-class boxes go through one
  `batched_nms_padded` with a box per class, so every image gets exactly `box_detections_per_img` detection rows
  and a count;
- the mask head runs on every detection row and returns each row's mask in its box's frame; `paste_masks` pastes
  them into the image with fixed shapes too.
So the detector runs with no host synchronisation, traces with torch.compile(fullgraph=True), and (on a GPU) can
be captured in a CUDA graph. On the valid rows the results are torchvision's: the same proposals, detections and
masks (tested with scores that have no ties). The differences: outputs are padded (zeros, label 0, count per
image) instead of per-image lists; masks stay in the box frame until `paste_masks` or `to_torchvision`; and the
detection post-processing runs NMS per class exactly, where torchvision's `batched_nms` shifts the boxes of each
class apart for fewer than 1000 candidate pairs on the CPU (which can flip a decision at the IoU threshold by
rounding).

Inference only: training (anchor matching, sampling, losses) is torchvision's; train a converted torchvision
detector (`fastcv.convert` + `fastcv.patch_torchvision`) and load its state_dict here for inference.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcv import nn as fnn
from fastcv.models._blocks import Conv2dNormActivation
from fastcv.models.resnet import Bottleneck, ResNetTrunk
from fastcv.nn.fused import conv_act
from fastcv.ops import batched_nms_padded

__all__ = ["DetectorOutput", "TwoStageDetector", "fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "paste_masks",
           "select_detections", "select_proposals", "to_torchvision"]

BOX_CLIP = math.log(1000.0 / 16)  # the largest log-scale a box regression may apply (torchvision's)


class DetectorOutput(NamedTuple):
    """A batch of detections, max_detections rows per image, best first; rows from counts[b] on are padding."""

    boxes: Tensor   # [B, M, 4] (x1, y1, x2, y2) in the input image's pixels, zeros after the count
    scores: Tensor  # [B, M], zeros after the count
    labels: Tensor  # [B, M] int64 class ids (1 .. num_classes - 1), 0 after the count
    counts: Tensor  # [B] int64
    masks: Tensor | None  # Mask R-CNN: [B, M, 1, 28, 28] mask probabilities in each box's frame


# ------------------------------------------------------------------------------------------------ boxes


def decode_boxes(codes: Tensor, reference: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """Boxes [..., K, 4] from regression codes [..., K * 4] relative to reference boxes [..., 4]: torchvision's
    BoxCoder.decode, operation for operation (so the rounding is the same)."""
    reference = reference.to(codes.dtype)
    widths = reference[..., 2] - reference[..., 0]
    heights = reference[..., 3] - reference[..., 1]
    ctr_x = (reference[..., 0] + 0.5 * widths).unsqueeze(-1)
    ctr_y = (reference[..., 1] + 0.5 * heights).unsqueeze(-1)
    widths, heights = widths.unsqueeze(-1), heights.unsqueeze(-1)
    wx, wy, ww, wh = weights
    dx = codes[..., 0::4] / wx
    dy = codes[..., 1::4] / wy
    dw = torch.clamp(codes[..., 2::4] / ww, max=BOX_CLIP)
    dh = torch.clamp(codes[..., 3::4] / wh, max=BOX_CLIP)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    half_w = 0.5 * (torch.exp(dw) * widths)
    half_h = 0.5 * (torch.exp(dh) * heights)
    return torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=-1)


def _image_limits(image_sizes: list[tuple[int, int]], like: Tensor) -> Tensor:
    """[B, 1, 4] of (w, h, w, h) per image, to clip boxes [B, N, 4] (or [B, 1, 1, 4] for [B, N, C, 4])."""
    limits = torch.tensor([[w, h, w, h] for h, w in image_sizes], dtype=like.dtype, device=like.device)
    return limits.reshape(len(image_sizes), *([1] * (like.dim() - 2)), 4)


def clip_boxes(boxes: Tensor, image_sizes: list[tuple[int, int]]) -> Tensor:
    """Boxes [B, ..., 4] clipped to each image's (height, width), as torchvision's clip_boxes_to_image."""
    return torch.minimum(boxes.clamp(min=0), _image_limits(image_sizes, boxes))


def _large_enough(boxes: Tensor, min_size: float) -> Tensor:
    """torchvision's remove_small_boxes as a mask: width and height at least min_size."""
    return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)


# ------------------------------------------------------------------------------------------------ input


class DetectionTransform(nn.Module):
    """torchvision's GeneralizedRCNNTransform for inference: normalise each image, resize it so that its short
    side is min_size (its long side at most max_size), and pad the batch to a multiple of size_divisible."""

    def __init__(self, min_size: int, max_size: int, image_mean: list[float], image_std: list[float],
                 size_divisible: int = 32):
        super().__init__()
        self.min_size, self.max_size = min_size, max_size
        self.image_mean, self.image_std = image_mean, image_std
        self.size_divisible = size_divisible

    def forward(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        resized = [self._resize(self._normalize(image)) for image in images]
        sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in resized]
        stride = self.size_divisible
        height = math.ceil(max(h for h, _ in sizes) / stride) * stride
        width = math.ceil(max(w for _, w in sizes) / stride) * stride
        batch = resized[0].new_zeros((len(resized), resized[0].shape[0], height, width))
        for i, image in enumerate(resized):
            batch[i, :, : image.shape[1], : image.shape[2]].copy_(image)
        return batch, sizes

    def _normalize(self, image: Tensor) -> Tensor:
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]

    def _resize(self, image: Tensor) -> Tensor:
        h, w = image.shape[-2:]
        scale = min(self.min_size / min(h, w), self.max_size / max(h, w))
        return F.interpolate(image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                             align_corners=False)[0]


def _as_image_list(images) -> list[Tensor]:
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be a [B, C, H, W] tensor or a list of [C, H, W] tensors, got shape "
                             f"{list(images.shape)}")
        images = list(images.unbind(0))
    images = list(images)
    if not images:
        raise ValueError("images must hold at least one image")
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3:
            raise ValueError(f"images[{i}] must be a [C, H, W] tensor, got "
                             f"{list(image.shape) if isinstance(image, Tensor) else type(image).__name__}")
        if not image.is_floating_point():
            raise TypeError(f"images[{i}] must be floating point (values in [0, 1]), got {image.dtype}")
    return images


# ------------------------------------------------------------------------------------------------ backbone


class FeaturePyramid(nn.Module):
    """torchvision's FeaturePyramidNetwork with its LastLevelMaxPool: a 1 x 1 lateral convolution per stage,
    top-down nearest upsampling added in the lateral convolution's epilogue, a 3 x 3 output convolution per
    level, and a stride-2 subsampling of the coarsest output ('pool')."""

    def __init__(self, in_channels_list: list[int], out_channels: int):
        super().__init__()
        plain = dict(norm_layer=None, activation_layer=None)
        self.inner_blocks = nn.ModuleList(Conv2dNormActivation(c, out_channels, 1, **plain) for c in in_channels_list)
        self.layer_blocks = nn.ModuleList(Conv2dNormActivation(out_channels, out_channels, 3, **plain)
                                          for _ in in_channels_list)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.constant_(m.bias, 0)

    def forward(self, stages: list[Tensor]) -> list[Tensor]:
        last = self.inner_blocks[-1](stages[-1])
        outputs = [self.layer_blocks[-1](last)]
        for i in range(len(stages) - 2, -1, -1):
            top_down = F.interpolate(last, size=stages[i].shape[-2:], mode="nearest")
            last = conv_act(stages[i], self.inner_blocks[i][0], identity=top_down)  # the sum in the epilogue
            outputs.insert(0, self.layer_blocks[i](last))
        outputs.append(F.max_pool2d(outputs[-1], 1, 2, 0))
        return outputs


class BackboneWithFPN(nn.Module):
    """ResNet's four stages (`body`) and the feature pyramid over them (`fpn`): five maps of out_channels."""

    def __init__(self, body: ResNetTrunk, in_channels_list: list[int], out_channels: int = 256):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramid(in_channels_list, out_channels)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.fpn(self.body(x))


def resnet50_fpn_backbone(norm_layer=None) -> BackboneWithFPN:
    """ResNet-50 without its classifier, and a 256-channel feature pyramid over its four stages."""
    body = ResNetTrunk(Bottleneck, [3, 4, 6, 3], norm_layer=norm_layer)
    return BackboneWithFPN(body, [256, 512, 1024, 2048], 256)


# ------------------------------------------------------------------------------------------------ proposals


class RPNHead(nn.Module):
    """Per level: a 3 x 3 convolution and ReLU, then per anchor an objectness logit and four box codes."""

    def __init__(self, in_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Sequential(Conv2dNormActivation(in_channels, in_channels, norm_layer=None))
        self.cls_logits = fnn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = fnn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.constant_(layer.bias, 0)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        hidden = [self.conv(f) for f in features]
        return [self.cls_logits(h) for h in hidden], [self.bbox_pred(h) for h in hidden]


def _per_location(t: Tensor, values: int) -> Tensor:
    """[B, A * values, H, W] -> [B, H * W * A, values]: the anchors of each location together, row-major."""
    b, _, h, w = t.shape
    return t.reshape(b, -1, values, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, values)


def select_proposals(boxes: Tensor, objectness: Tensor, level_sizes: list[int], image_sizes: list[tuple[int, int]],
                     pre_nms_top_n: int, post_nms_top_n: int, nms_thresh: float, score_thresh: float,
                     min_size: float) -> tuple[Tensor, Tensor, Tensor]:
    """torchvision's RPN filter_proposals with fixed shapes. boxes [B, N, 4] (decoded anchors) and objectness
    logits [B, N], the levels' anchors one after the other (level_sizes of them each).

    Per level, the pre_nms_top_n anchors with the highest objectness; their boxes clipped to the image; boxes
    narrower or lower than min_size and probabilities below score_thresh dropped; NMS per level at nms_thresh;
    the best post_nms_top_n kept. Returns proposals [B, post_nms_top_n, 4], their probabilities and their
    validity (the valid rows first, best first; the rest zeros)."""
    top, offset = [], 0
    for n in level_sizes:  # torchvision ranks the logits
        top.append(objectness[:, offset:offset + n].topk(min(pre_nms_top_n, n), dim=1).indices + offset)
        offset += n
    level = torch.cat([torch.full((t.shape[1],), i, device=boxes.device) for i, t in enumerate(top)])
    top = torch.cat(top, dim=1)
    prob = torch.sigmoid(objectness.gather(1, top))
    boxes = clip_boxes(boxes.gather(1, top.unsqueeze(-1).expand(-1, -1, 4)), image_sizes)

    # NMS per level: the levels are batched_nms_padded's classes; a dropped candidate gets no score at all
    keep = _large_enough(boxes, min_size) & (prob >= score_thresh)
    scores = prob.new_full((*prob.shape, len(level_sizes)), -math.inf)
    scores.scatter_(2, level.view(1, -1, 1).expand(prob.shape[0], -1, 1),
                    torch.where(keep, prob, -math.inf).unsqueeze(-1))
    found = batched_nms_padded(boxes, scores, nms_thresh, -math.inf, post_nms_top_n,
                               pre_nms_top_k=scores.shape[1] * scores.shape[2])
    valid = torch.arange(post_nms_top_n, device=boxes.device) < found.counts.unsqueeze(1)
    return found.boxes, found.scores, valid


def select_detections(class_logits: Tensor, box_codes: Tensor, proposals: Tensor, valid: Tensor,
                      image_sizes: list[tuple[int, int]], weights: tuple[float, float, float, float],
                      score_thresh: float, nms_thresh: float, detections_per_img: int):
    """torchvision's RoIHeads postprocess_detections with fixed shapes. class_logits [B, R, C], box_codes
    [B, R, C * 4] of proposals [B, R, 4] (valid [B, R]).

    Each class's box is decoded and clipped; the background class, pairs scoring at most score_thresh, boxes
    smaller than 0.01 pixel and invalid proposal rows drop out; NMS per class at nms_thresh (one
    batched_nms_padded with a box per class) keeps detections_per_img rows. Returns boxes [B, M, 4], scores
    [B, M], labels [B, M] (class ids, 0 for padding) and counts [B]."""
    batch, rows, num_classes = class_logits.shape
    boxes = decode_boxes(box_codes, proposals, weights)
    boxes = clip_boxes(boxes, image_sizes)[:, :, 1:]  # [B, R, C - 1, 4]: the background class has no box
    scores = F.softmax(class_logits, -1)[:, :, 1:]
    keep = valid.unsqueeze(-1) & _large_enough(boxes, 1e-2) & (scores > score_thresh)
    found = batched_nms_padded(boxes, torch.where(keep, scores, -math.inf), nms_thresh, -math.inf,
                               detections_per_img, pre_nms_top_k=rows * (num_classes - 1))
    labels = torch.where(found.labels >= 0, found.labels + 1, 0)
    return found.boxes, found.scores, labels, found.counts


class RegionProposalNetwork(nn.Module):
    """torchvision's RPN in inference, with fixed-size output: post_nms_top_n proposal rows per image and a mask
    of the valid ones (select_proposals). Anchors: one size per level, each at every aspect ratio, centred on
    each location of the level's map."""

    def __init__(self, head: RPNHead, sizes=((32,), (64,), (128,), (256,), (512,)),
                 aspect_ratios=((0.5, 1.0, 2.0),) * 5, pre_nms_top_n: int = 1000, post_nms_top_n: int = 1000,
                 nms_thresh: float = 0.7, score_thresh: float = 0.0, min_size: float = 1e-3):
        super().__init__()
        self.head = head
        self.sizes, self.aspect_ratios = sizes, aspect_ratios
        self.pre_nms_top_n, self.post_nms_top_n = pre_nms_top_n, post_nms_top_n
        self.nms_thresh, self.score_thresh, self.min_size = nms_thresh, score_thresh, min_size

    def cell_anchors(self, level: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The level's anchors centred on (0, 0), [A, 4], rounded to whole pixels (torchvision's)."""
        scales = torch.as_tensor(self.sizes[level], dtype=torch.float32)
        ratios = torch.as_tensor(self.aspect_ratios[level], dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round().to(dtype=dtype, device=device)

    def anchors(self, features: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        """Every level's anchors, [sum of H * W * A, 4], in the order of the head's flattened outputs."""
        per_level = []
        for level, feature in enumerate(features):
            h, w = feature.shape[-2:]
            stride_y, stride_x = image_size[0] // h, image_size[1] // w
            shifts_x = torch.arange(0, w, dtype=torch.int64, device=feature.device) * stride_x
            shifts_y = torch.arange(0, h, dtype=torch.int64, device=feature.device) * stride_y
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)
            cell = self.cell_anchors(level, feature.dtype, feature.device)
            per_level.append((shifts + cell.view(1, -1, 4)).reshape(-1, 4))
        return torch.cat(per_level)

    def forward(self, features: list[Tensor], image_size: tuple[int, int],
                image_sizes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """Proposals [B, post_nms_top_n, 4] and their validity [B, post_nms_top_n] (valid rows first)."""
        logits, codes = self.head(features)
        counts = [lg.shape[1] * lg.shape[2] * lg.shape[3] for lg in logits]
        objectness = torch.cat([_per_location(lg, 1) for lg in logits], dim=1).squeeze(-1).detach()
        codes = torch.cat([_per_location(c, 4) for c in codes], dim=1).detach()
        boxes = decode_boxes(codes, self.anchors(features, image_size).unsqueeze(0), (1.0, 1.0, 1.0, 1.0))
        boxes = boxes.squeeze(-2)  # [B, N, 4]: one box per anchor
        found_boxes, _, valid = select_proposals(boxes, objectness, counts, image_sizes, self.pre_nms_top_n,
                                                 self.post_nms_top_n, self.nms_thresh, self.score_thresh,
                                                 self.min_size)
        return found_boxes, valid


# ------------------------------------------------------------------------------------------------ RoI heads


class TwoMLPHead(nn.Module):
    """The box head: the pooled 7 x 7 features flattened, then two fully connected layers with ReLU."""

    def __init__(self, in_channels: int, representation_size: int):
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(start_dim=1)))))


class FastRCNNPredictor(nn.Module):
    """Class logits and per-class box codes of each RoI."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


class MaskRCNNHeads(nn.Sequential):
    """The mask head: 3 x 3 convolutions with ReLU over the pooled 14 x 14 features."""

    def __init__(self, in_channels: int, layers: tuple[int, ...] = (256, 256, 256, 256), dilation: int = 1):
        blocks, previous = [], in_channels
        for channels in layers:
            blocks.append(Conv2dNormActivation(previous, channels, norm_layer=None, dilation=dilation))
            previous = channels
        super().__init__(*blocks)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(layer.bias)


class MaskRCNNPredictor(nn.Sequential):
    """A 2 x 2 stride-2 transposed convolution (14 x 14 -> 28 x 28) with ReLU, then a mask logit per class."""

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int):
        super().__init__(OrderedDict([
            ("conv5_mask", fnn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)),
            ("relu", nn.ReLU(inplace=True)),
            ("mask_fcn_logits", fnn.Conv2d(dim_reduced, num_classes, 1, 1, 0)),
        ]))
        for name, param in self.named_parameters():
            if "weight" in name:
                nn.init.kaiming_normal_(param, mode="fan_out", nonlinearity="relu")


class RoIHeads(nn.Module):
    """Box (and mask) heads over fixed-size proposals, with fixed-size detections: every proposal row is pooled
    (multi-level RoI Align, one call) and classified, and select_detections keeps detections_per_img rows."""

    def __init__(self, box_roi_pool, box_head, box_predictor, score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 detections_per_img: int = 100, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), mask_roi_pool=None,
                 mask_head=None, mask_predictor=None):
        super().__init__()
        self.box_roi_pool, self.box_head, self.box_predictor = box_roi_pool, box_head, box_predictor
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        self.bbox_reg_weights = bbox_reg_weights
        self.mask_roi_pool, self.mask_head, self.mask_predictor = mask_roi_pool, mask_head, mask_predictor

    def forward(self, features: dict[str, Tensor], proposals: Tensor, valid: Tensor,
                image_sizes: list[tuple[int, int]]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        batch, rows = proposals.shape[:2]
        pooled = self.box_roi_pool(features, list(proposals.unbind(0)), image_sizes)
        class_logits, box_codes = self.box_predictor(self.box_head(pooled))
        boxes, scores, labels, counts = select_detections(
            class_logits.reshape(batch, rows, -1), box_codes.reshape(batch, rows, -1), proposals, valid, image_sizes,
            self.bbox_reg_weights, self.score_thresh, self.nms_thresh, self.detections_per_img)
        masks = None
        if self.mask_predictor is not None:
            masks = self._masks(features, boxes, labels, image_sizes)
        return boxes, scores, labels, counts, masks

    def _masks(self, features: dict[str, Tensor], boxes: Tensor, labels: Tensor,
               image_sizes: list[tuple[int, int]]) -> Tensor:
        """Each detection row's mask probabilities for its own class, [B, M, 1, 28, 28]."""
        batch, rows = boxes.shape[:2]
        pooled = self.mask_roi_pool(features, list(boxes.unbind(0)), image_sizes)
        logits = self.mask_predictor(self.mask_head(pooled))  # [B * M, C, 28, 28]
        own = logits.gather(1, labels.reshape(-1, 1, 1, 1).expand(-1, 1, *logits.shape[-2:]))
        return own.sigmoid().reshape(batch, rows, 1, *logits.shape[-2:])


# ------------------------------------------------------------------------------------------------ the detector


class TwoStageDetector(nn.Module):
    """Faster R-CNN (Mask R-CNN with a mask branch): transform, backbone, rpn and roi_heads, as torchvision's
    GeneralizedRCNN names them. forward(images) -> DetectorOutput in the input images' coordinates."""

    def __init__(self, backbone: BackboneWithFPN, rpn: RegionProposalNetwork, roi_heads: RoIHeads,
                 transform: DetectionTransform):
        super().__init__()
        self.transform, self.backbone, self.rpn, self.roi_heads = transform, backbone, rpn, roi_heads

    def forward(self, images) -> DetectorOutput:
        """images: a list of [3, H, W] float tensors (values in [0, 1], sizes may differ) or a [B, 3, H, W] one."""
        if self.training:
            raise NotImplementedError(
                "fastcv.models' detectors run inference only (call .eval()); to train, convert torchvision's "
                "detector with fastcv.convert and fastcv.patch_torchvision, then load its state_dict here")
        images = _as_image_list(images)
        original_sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        batch, image_sizes = self.transform(images)
        maps = self.backbone(batch)
        features = OrderedDict(zip(["0", "1", "2", "3", "pool"], maps))
        proposals, valid = self.rpn(maps, tuple(batch.shape[-2:]), image_sizes)
        boxes, scores, labels, counts, masks = self.roi_heads(features, proposals, valid, image_sizes)
        # back to the input images' pixels: torchvision's float32 ratios of the sizes
        original = torch.tensor([[w, h, w, h] for h, w in original_sizes], dtype=torch.float32)
        resized = torch.tensor([[w, h, w, h] for h, w in image_sizes], dtype=torch.float32)
        ratios = (original / resized).to(device=boxes.device, dtype=boxes.dtype)
        return DetectorOutput(boxes * ratios.unsqueeze(1), scores, labels, counts, masks)

    @staticmethod
    def original_sizes(images) -> list[tuple[int, int]]:
        """The (height, width) of each input image, as to_torchvision and paste_masks take them."""
        return [(int(i.shape[-2]), int(i.shape[-1])) for i in _as_image_list(images)]


def _detector(num_classes: int, with_masks: bool, min_size: int = 800, max_size: int = 1333, image_mean=None,
              image_std=None, rpn_pre_nms_top_n_test: int = 1000, rpn_post_nms_top_n_test: int = 1000,
              rpn_nms_thresh: float = 0.7, rpn_score_thresh: float = 0.0, box_score_thresh: float = 0.05,
              box_nms_thresh: float = 0.5, box_detections_per_img: int = 100, norm_layer=None) -> TwoStageDetector:
    backbone = resnet50_fpn_backbone(norm_layer)
    channels = backbone.out_channels
    rpn = RegionProposalNetwork(RPNHead(channels, 3), pre_nms_top_n=rpn_pre_nms_top_n_test,
                                post_nms_top_n=rpn_post_nms_top_n_test, nms_thresh=rpn_nms_thresh,
                                score_thresh=rpn_score_thresh)
    levels = ["0", "1", "2", "3"]
    mask_parts = {}
    if with_masks:
        mask_parts = dict(mask_roi_pool=fnn.MultiScaleRoIAlign(levels, 14, 2),
                          mask_head=MaskRCNNHeads(channels, (256, 256, 256, 256), 1),
                          mask_predictor=MaskRCNNPredictor(256, 256, num_classes))
    roi_heads = RoIHeads(fnn.MultiScaleRoIAlign(levels, 7, 2), TwoMLPHead(channels * 7 * 7, 1024),
                         FastRCNNPredictor(1024, num_classes), box_score_thresh, box_nms_thresh,
                         box_detections_per_img, **mask_parts)
    transform = DetectionTransform(min_size, max_size, image_mean or [0.485, 0.456, 0.406],
                                   image_std or [0.229, 0.224, 0.225])
    return TwoStageDetector(backbone, rpn, roi_heads, transform)


def fasterrcnn_resnet50_fpn(*, num_classes: int = 91, **kwargs) -> TwoStageDetector:
    """torchvision's fasterrcnn_resnet50_fpn for inference (its test-time arguments: min_size, max_size,
    image_mean, image_std, rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test, rpn_nms_thresh, rpn_score_thresh,
    box_score_thresh, box_nms_thresh, box_detections_per_img; norm_layer for the ResNet's batch norms)."""
    return _detector(num_classes, with_masks=False, **kwargs)


def maskrcnn_resnet50_fpn(*, num_classes: int = 91, **kwargs) -> TwoStageDetector:
    """torchvision's maskrcnn_resnet50_fpn for inference (arguments as fasterrcnn_resnet50_fpn's)."""
    return _detector(num_classes, with_masks=True, **kwargs)


# ------------------------------------------------------------------------------------------------ masks, lists


def _expanded_int_boxes(boxes: Tensor, scale: float) -> Tensor:
    """torchvision's expand_boxes (each box scaled about its centre) truncated to int64."""
    w_half = (boxes[..., 2] - boxes[..., 0]) * 0.5 * scale
    h_half = (boxes[..., 3] - boxes[..., 1]) * 0.5 * scale
    x_c = (boxes[..., 2] + boxes[..., 0]) * 0.5
    y_c = (boxes[..., 3] + boxes[..., 1]) * 0.5
    return torch.stack((x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half), dim=-1).to(torch.int64)


def _resize_matrix(start: Tensor, first: Tensor, stop: Tensor, extent: Tensor, source: int, positions: int,
                   dtype: torch.dtype) -> Tensor:
    """For boxes ([..., 1] int64 tensors): [..., positions, source] matrices that map a `source`-long mask
    axis to the image's `positions` pixels as torchvision's paste does it along that axis: the mask resized
    by F.interpolate(bilinear, align_corners=False) to `extent` pixels placed from `start`, kept on pixels in
    [first, stop) (zero rows elsewhere). Each row holds interpolate's two weights (its source positions and
    weights computed as interpolate computes them, in its precision: float64 for float64, else float32)."""
    pixel = torch.arange(positions, device=start.device)
    local = (pixel - start).to(dtype)
    ratio = torch.tensor(float(source), dtype=dtype, device=start.device) / extent.to(dtype)
    same = extent == source  # interpolate copies when the sizes agree
    real = torch.where(same, local, (ratio * (local + 0.5) - 0.5).clamp(min=0))
    index0 = real.floor().clamp(0, source - 1)
    weight1 = (real - index0).clamp(0, 1)
    index0 = index0.to(torch.int64)
    index1 = torch.where(index0 < source - 1, index0 + 1, index0)
    inside = ((pixel >= first) & (pixel < stop)).to(dtype)
    return (F.one_hot(index0, source).to(dtype) * ((1 - weight1) * inside).unsqueeze(-1)
            + F.one_hot(index1, source).to(dtype) * (weight1 * inside).unsqueeze(-1))


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], padding: int = 1) -> Tensor:
    """Masks [B, M, 1, S, S] in their boxes' frames -> [B, M, 1, H, W] in the image, as torchvision's
    paste_masks_in_image computes them (each mask padded by `padding`, its box expanded to match, resized
    bilinearly to the box's whole-pixel size and placed there), but with fixed shapes: no per-box loop and no
    data-dependent size, so no host synchronisation. The separable bilinear resize and the placement are two
    matrix products per mask, rows @ mask @ columns^T, whose matrices hold interpolate's weights. A box wholly
    left of or above the image pastes nothing (torchvision's paste raises there)."""
    batch, rows, _, size, _ = masks.shape
    height, width = image_size
    padded = F.pad(masks.reshape(batch, rows, size, size), (padding,) * 4)
    source = size + 2 * padding
    box = _expanded_int_boxes(boxes, float(source) / size).unsqueeze(-1)  # [B, M, 4, 1]
    x0, y0, x1, y1 = box.unbind(-2)
    dtype = torch.float64 if masks.dtype == torch.float64 else torch.float32
    across = _resize_matrix(x0, x0.clamp(min=0), (x1 + 1).clamp(max=width), (x1 - x0 + 1).clamp(min=1), source,
                            width, dtype)   # [B, M, W, S']
    down = _resize_matrix(y0, y0.clamp(min=0), (y1 + 1).clamp(max=height), (y1 - y0 + 1).clamp(min=1), source,
                          height, dtype)    # [B, M, H, S']
    pasted = down @ (padded.to(dtype) @ across.transpose(-1, -2))
    return pasted.to(masks.dtype).unsqueeze(2)


def to_torchvision(detections: DetectorOutput, original_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
    """torchvision's output: per image a dict of boxes, labels, scores (and masks pasted into the image),
    cut to its count. This reads the counts, so it waits for the device."""
    results = []
    for b, count in enumerate(detections.counts.tolist()):
        result = {"boxes": detections.boxes[b, :count], "labels": detections.labels[b, :count],
                  "scores": detections.scores[b, :count]}
        if detections.masks is not None:
            result["masks"] = paste_masks(detections.masks[b:b + 1, :count], detections.boxes[b:b + 1, :count],
                                          original_sizes[b])[0]
        results.append(result)
    return results
