"""fastcv.ops: drop-in replacements for torch.nn.functional and torchvision.ops.

Importing this package registers every op as torch.ops.fastcv.<name>.
"""
from fastcv.ops.attention import scaled_dot_product_attention
from fastcv.ops.batch_norm import batch_norm, batch_norm_add_relu, batch_norm_relu, fold_batch_norm
from fastcv.ops.conv import conv2d, conv2d_fused, conv_transpose2d
from fastcv.ops.conv_bn import conv2d_batch_norm
from fastcv.ops.im2col import col2im, im2col
from fastcv.ops.nms import Detections, batched_nms, batched_nms_padded, nms
from fastcv.ops.roi_align import multi_scale_roi_align, roi_align

__all__ = ["scaled_dot_product_attention", "batch_norm", "batch_norm_relu", "batch_norm_add_relu", "fold_batch_norm", "nms", "batched_nms", "batched_nms_padded", "Detections", "roi_align", "multi_scale_roi_align", "im2col", "col2im", "conv2d", "conv2d_fused",
           "conv_transpose2d", "conv2d_batch_norm"]
