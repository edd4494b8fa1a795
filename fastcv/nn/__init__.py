"""nn.Module wrappers around fastcv.ops, with torch/torchvision's constructors and state_dict names."""
from fastcv.nn.conv import Conv2d, ConvTranspose2d
from fastcv.nn.roi_align import MultiScaleRoIAlign, RoIAlign

__all__ = ["RoIAlign", "MultiScaleRoIAlign", "Conv2d", "ConvTranspose2d"]
