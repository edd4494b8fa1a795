"""fastcv.models: the reference networks of a computer-vision course written from fastcv.nn and fastcv.ops, one
file per family. Each network has torchvision's module names, so its state_dict is torchvision's (same keys, same
shapes) and torchvision's weights load unchanged:

    net = fastcv.models.resnet50()
    net.load_state_dict(torchvision.models.resnet50(weights=...).state_dict())

Builders take torchvision's arguments except `weights` (fastcv downloads nothing)."""
from fastcv.models.detection import TwoStageDetector, fasterrcnn_resnet50_fpn, maskrcnn_resnet50_fpn
from fastcv.models.fcn import FCN, fcn_resnet50, fcn_resnet101
from fastcv.models.mobilenet import MobileNetV2, mobilenet_v2
from fastcv.models.resnet import (ResNet, ResNetTrunk, resnet18, resnet34, resnet50, resnet101, resnet152,
                                  resnext50_32x4d, resnext101_32x8d, resnext101_64x4d, wide_resnet50_2,
                                  wide_resnet101_2)
from fastcv.models.vit import VisionTransformer, vit_b_16, vit_b_32, vit_h_14, vit_l_16, vit_l_32

__all__ = ["ResNet", "ResNetTrunk", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
           "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
           "MobileNetV2", "mobilenet_v2",
           "VisionTransformer", "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14",
           "FCN", "fcn_resnet50", "fcn_resnet101",
           "TwoStageDetector", "fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn"]
