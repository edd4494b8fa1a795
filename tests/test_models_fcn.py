"""fastcv.models.fcn against torchvision's FCN (weights=None: nothing is downloaded), with the same weights:
state_dicts, whole-network outputs ("out" and "aux"), gradients and running statistics in eval and training mode
(tests/networks.py's checks and tolerances), the fused heads, and bad arguments."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import fastcv.models as fm
from networks import CountOps, compare, prepare

SHAPE = (2, 3, 64, 64)
_BUILT: dict[str, nn.Module] = {}


def _original() -> nn.Module:
    if "fcn" not in _BUILT:
        torch.manual_seed(0)
        model = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, aux_loss=True)
        _BUILT["fcn"] = prepare(model, SHAPE)
    return copy.deepcopy(_BUILT["fcn"])


def _make(model: nn.Module, form: str = "fastcv") -> nn.Module:
    net = fm.fcn_resnet50(aux_loss=True).to(next(model.parameters()).dtype)
    net.load_state_dict(model.state_dict())
    for m in net.modules():  # prepare() set the original's dropout to 0
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return net.train(model.training)


@pytest.mark.parametrize("config", [{}, {"aux_loss": True, "num_classes": 5}], ids=["default", "aux"])
@pytest.mark.parametrize("depth", ["fcn_resnet50", "fcn_resnet101"])
def test_state_dict_is_torchvisions(depth, config):
    ours = getattr(fm, depth)(**config)
    theirs = getattr(torchvision.models.segmentation, depth)(weights=None, weights_backbone=None, **config)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    assert all(sd_ours[k].shape == sd_theirs[k].shape for k in sd_theirs)
    ours.load_state_dict(sd_theirs)
    theirs.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_against_torchvision(training):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    compare("fcn_resnet50", _original(), x, _make, training, forms=("fastcv",), exact_form="fastcv")


def test_eval_folds_the_heads_batch_norms():
    """Eval: the backbone's 53 and the two heads' convolution -> batch norm pairs are folded (55 conv2d_fused, plus
    the heads' last 1 x 1 convolutions, which have no batch norm: plain conv2d), no PyTorch convolution."""
    net = _make(_original()).eval()
    with torch.no_grad(), CountOps() as ops:
        out = net(torch.randn(SHAPE))
    assert ops.counts["fastcv::conv2d_fused"] == 55 and ops.counts["fastcv::conv2d"] == 2
    assert ops.torch_ops("conv", "batch_norm") == []
    assert out["out"].shape == out["aux"].shape == (2, 21, 64, 64)


def test_bad_input():
    with pytest.raises(TypeError, match="weights"):
        fm.fcn_resnet50(weights_backbone="IMAGENET1K_V1")
    with pytest.raises(TypeError, match=r"unexpected arguments \['pretrained'\]"):
        fm.fcn_resnet50(pretrained=True)
    with pytest.raises(ValueError, match=r"expects images \[N, 3, H, W\]"):
        fm.fcn_resnet50()(torch.randn(1, 4, 32, 32))
