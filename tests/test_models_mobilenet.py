"""fastcv.models.mobilenet against torchvision's MobileNetV2 (weights=None: nothing is downloaded), with the same
weights: state_dicts (keys, order, shapes, initial values, loads both ways), whole-network outputs, gradients and
running statistics in eval and training mode (tests/networks.py's checks and tolerances), which kernels run,
torch.compile, and the errors bad arguments raise."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import fastcv.models as fm
from fastcv import nn as fnn
from fastcv.models.mobilenet import InvertedResidual, MobileNetV2
from networks import CountOps, compare, prepare

SHAPE = (2, 3, 64, 64)
# Every kind of block with the fewest layers (for torch.compile, whose time grows with the graph): the stem, an
# inverted residual without expansion (t = 1), one with expansion and stride 2, one with the skip connection (the
# second of the [6, 24, 2, 2] stage: stride 1, 24 -> 24 channels), the last 1 x 1 convolution and the classifier.
SHORT_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2]]
_BUILT: dict[str, nn.Module] = {}


def _original() -> nn.Module:
    """A fresh copy of torchvision's mobilenet_v2, prepared as tests/networks.py prepares networks (no dropout,
    calibrated batch norms; built once per session)."""
    if "mobilenet_v2" not in _BUILT:
        torch.manual_seed(0)
        _BUILT["mobilenet_v2"] = prepare(torchvision.models.mobilenet_v2(), SHAPE)
    return copy.deepcopy(_BUILT["mobilenet_v2"])


def _input() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))


def _make(model: nn.Module, form: str = "fastcv") -> nn.Module:
    """fastcv's mobilenet_v2 with model's weights, dtype and mode (dropout 0, as prepare leaves the original)."""
    net = fm.mobilenet_v2(dropout=0.0).to(next(model.parameters()).dtype)
    net.load_state_dict(model.state_dict())
    return net.train(model.training)


# ------------------------------------------------------------------------------------------------ state_dicts


CONFIGS = {
    "default": {},
    "narrow": {"width_mult": 0.5, "num_classes": 10},
    "wide": {"width_mult": 1.4, "round_nearest": 4},  # last_channel grows with width_mult > 1
    "short": {"inverted_residual_setting": SHORT_SETTING, "dropout": 0.5},
}


@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_and_init_are_torchvisions(config):
    """The same keys in the same order with the same shapes, and from the same seed the same initial values
    (the modules are built in torchvision's order and initialised as torchvision initialises them)."""
    kwargs = CONFIGS[config]
    torch.manual_seed(0)
    ours = fm.mobilenet_v2(**kwargs)
    torch.manual_seed(0)
    theirs = torchvision.models.mobilenet_v2(**kwargs)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    for k in sd_theirs:
        assert sd_ours[k].shape == sd_theirs[k].shape, k
        assert torch.equal(sd_ours[k], sd_theirs[k]), k
    assert ours.last_channel == theirs.last_channel
    assert all(type(m) is not nn.Conv2d and type(m) is not nn.BatchNorm2d for m in ours.modules())
    assert sum(type(m) is fnn.Conv2d for m in ours.modules()) == sum(
        isinstance(m, nn.Conv2d) for m in theirs.modules())


def test_state_dict_keys_named_in_the_brief():
    keys = set(fm.mobilenet_v2().state_dict())
    for k in ("features.0.0.weight", "features.0.1.running_var", "features.1.conv.0.0.weight",
              "features.1.conv.1.weight", "features.2.conv.1.0.weight", "features.2.conv.2.weight",
              "features.2.conv.3.num_batches_tracked", "features.18.0.weight", "classifier.1.weight"):
        assert k in keys, k


def test_state_dict_loads_both_ways():
    """Strict loads each way take the other network's values (all of them, buffers included)."""
    original = _original()
    gen = torch.Generator().manual_seed(4)
    for t in original.state_dict().values():
        if t.is_floating_point():
            t.mul_(1 + 0.1 * torch.rand(t.shape, generator=gen))
    ours = fm.mobilenet_v2()
    ours.load_state_dict(original.state_dict())
    fresh = torchvision.models.mobilenet_v2()
    fresh.load_state_dict(ours.state_dict())
    for k, v in original.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
        assert torch.equal(fresh.state_dict()[k], v), k


# ------------------------------------------------------------------------------------------------ the network


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_against_torchvision(training):
    """One forward and backward: float64 within 1e-10 of torchvision's float64 (outputs, every gradient, every
    running statistic), float32 within 4x PyTorch's own float32 error (tests/networks.py)."""
    compare("mobilenet_v2", _original(), _input(), _make, training, forms=("fastcv",), exact_form="fastcv")


def test_eval_runs_fastcvs_fused_convolutions():
    """Eval mode: each of the 52 convolution -> batch norm pairs is one fastcv::conv2d_fused (the batch norm
    folded), the 10 skip connections are its residual, and no PyTorch convolution or batch norm runs."""
    net = _make(_original()).eval()
    x = _input()
    with torch.no_grad(), CountOps() as ops:
        out = net(x)
    convs = sum(type(m) is fnn.Conv2d for m in net.modules())
    skips = sum(getattr(m, "use_res_connect", False) for m in net.modules())
    assert (convs, skips) == (52, 10)
    assert ops.counts["fastcv::conv2d_fused"] == convs
    with_residual = [args for name, args in ops.calls if name == "fastcv::conv2d_fused" and args[3] is not None]
    assert len(with_residual) == skips
    assert ops.torch_ops("conv", "batch_norm") == []
    with torch.no_grad():
        expected = _original().eval()(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_training_runs_fastcvs_convolutions_and_batch_norms():
    """Training mode, forward and backward: fastcv's convolution, batch norm and their gradients, PyTorch's
    nowhere (its conv/batch norm ops would be counted)."""
    net = _make(_original()).train()
    with CountOps() as ops:
        net(_input()).square().sum().backward()
    for op in ("conv2d", "batch_norm_train", "batch_norm_update_running", "batch_norm_backward",
               "conv2d_weight_grad"):
        assert ops.counts[f"fastcv::{op}"] == 52, op
    assert ops.counts["fastcv::conv2d_input_grad"] == 51  # not for the image
    assert ops.torch_ops("conv", "batch_norm") == []


def test_torch_compile_fullgraph_eval():
    """torch.compile(fullgraph=True) traces the network (conv_bn_act's fold, fastcv's ops) without a graph break
    and computes eager's outputs. SHORT_SETTING (every kind of block) keeps the compilation to seconds: the whole
    mobilenet_v2 compiles and matches too, in 25 s on two cores with a cold compile cache."""
    torch.manual_seed(0)
    original = prepare(torchvision.models.mobilenet_v2(inverted_residual_setting=SHORT_SETTING), SHAPE).eval()
    net = fm.mobilenet_v2(inverted_residual_setting=SHORT_SETTING)
    net.load_state_dict(original.state_dict())
    net.eval()
    compiled = torch.compile(net, fullgraph=True)
    x = _input()
    with torch.no_grad():
        out, eager, expected = compiled(x), net(x), original(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5 * eager.abs().max().item())
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


# ------------------------------------------------------------------------------------------------ bad arguments


def test_bad_input():
    net = fm.mobilenet_v2()
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\], got \[3, 64, 64\]"):
        net(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\], got \[2, 1, 64, 64\]"):
        net(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match="stride must be 1 or 2, got 3"):
        InvertedResidual(16, 16, stride=3, expand_ratio=6)
    with pytest.raises(ValueError, match="inverted_residual_setting"):
        MobileNetV2(inverted_residual_setting=[])
    with pytest.raises(ValueError, match="inverted_residual_setting"):
        MobileNetV2(inverted_residual_setting=[[1, 16, 1]])
    with pytest.raises(TypeError, match="weights"):
        fm.mobilenet_v2(weights="IMAGENET1K_V1")
