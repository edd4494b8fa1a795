"""nn.Module wrappers around fastcv.ops, with torch/torchvision's constructors and state_dict names."""
from fastcv.nn.roi_align import RoIAlign

__all__ = ["RoIAlign"]
