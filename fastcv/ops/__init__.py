"""fastcv.ops: drop-in replacements for torch.nn.functional and torchvision.ops.

Importing this package registers every op as torch.ops.fastcv.<name>.
"""
from fastcv.ops.conv import conv2d, conv2d_fused, conv_transpose2d
from fastcv.ops.im2col import col2im, im2col
from fastcv.ops.nms import Detections, batched_nms, batched_nms_padded, nms
from fastcv.ops.roi_align import multi_scale_roi_align, roi_align

__all__ = ["nms", "batched_nms", "batched_nms_padded", "Detections", "roi_align", "multi_scale_roi_align", "im2col", "col2im", "conv2d", "conv2d_fused",
           "conv_transpose2d"]
