"""nn.Module wrappers around fastcv.ops, with torch/torchvision's constructors and state_dict names."""
from fastcv.nn.attention import MultiheadAttention
from fastcv.nn.batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, fuse_conv_bn_eval
from fastcv.nn.conv import Conv2d, ConvTranspose2d
from fastcv.nn.roi_align import MultiScaleRoIAlign, RoIAlign
from fastcv.nn.sync_batch_norm import SyncBatchNorm

__all__ = ["RoIAlign", "MultiScaleRoIAlign", "Conv2d", "ConvTranspose2d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
           "SyncBatchNorm", "fuse_conv_bn_eval", "MultiheadAttention"]
