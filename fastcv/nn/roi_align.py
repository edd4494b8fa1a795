from __future__ import annotations

from torch import Tensor, nn

from fastcv.ops.roi_align import multi_scale_roi_align, roi_align


class RoIAlign(nn.Module):
    """Drop-in for torchvision.ops.RoIAlign."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool = False):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")


class MultiScaleRoIAlign(nn.Module):
    """Drop-in for torchvision.ops.MultiScaleRoIAlign: every level in one call (see
    fastcv.ops.multi_scale_roi_align)."""

    def __init__(self, featmap_names: list[str], output_size, sampling_ratio: int, *, canonical_scale: int = 224,
                 canonical_level: int = 4):
        super().__init__()
        self.featmap_names = featmap_names
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        # torchvision's selection: the maps named in featmap_names, in the dict's order
        features = [v for k, v in x.items() if k in self.featmap_names]
        if not features:
            raise ValueError(f"none of featmap_names {self.featmap_names} is among the feature maps {list(x)}")
        return multi_scale_roi_align(features, boxes, self.output_size, self.sampling_ratio, image_shapes,
                                     canonical_scale=self.canonical_scale, canonical_level=self.canonical_level)

    def extra_repr(self) -> str:
        return f"featmap_names={self.featmap_names}, output_size={self.output_size}, sampling_ratio={self.sampling_ratio}"
