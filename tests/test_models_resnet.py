"""fastcv.models.resnet against torchvision's ResNet, ResNeXt and wide ResNet (weights=None: nothing is
downloaded), with the same weights: state_dicts (keys, order, shapes, initial values, loads both ways), whole-network
outputs, gradients and running statistics in eval and training mode (tests/networks.py's checks and tolerances),
which kernels run, 30 training steps side by side, torch.compile, and the errors bad arguments raise."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import fastcv.models as fm
from fastcv import nn as fnn
from fastcv.models.resnet import BasicBlock, ResNet
from networks import CountOps, ERROR_RATIO, compare, prepare, train_synthetic

SHAPE = (2, 3, 64, 64)
NETWORKS = ["resnet50", "resnext50_32x4d", "resnet18"]  # Bottleneck, grouped Bottleneck, BasicBlock
BUILDERS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
            "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]
_BUILT: dict[str, nn.Module] = {}


def _original(name: str) -> nn.Module:
    """A fresh copy of torchvision's network, prepared as tests/networks.py prepares networks (built once)."""
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = prepare(getattr(torchvision.models, name)(), SHAPE)
    return copy.deepcopy(_BUILT[name])


def _input() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))


def _maker(name: str):
    def make(model: nn.Module, form: str = "fastcv") -> nn.Module:
        """fastcv's network of that name with model's weights, dtype and mode."""
        net = getattr(fm, name)().to(next(model.parameters()).dtype)
        net.load_state_dict(model.state_dict())
        return net.train(model.training)

    return make


@pytest.mark.parametrize("name", BUILDERS)
def test_state_dict_and_init_are_torchvisions(name):
    """The same keys in the same order with the same shapes, and from the same seed the same initial values; every
    convolution and batch norm is fastcv's. (The meta device skips the arithmetic of the large ones' init.)"""
    torch.manual_seed(0)
    ours = getattr(fm, name)()
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)()
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    for k in sd_theirs:
        assert sd_ours[k].shape == sd_theirs[k].shape, k
        assert torch.equal(sd_ours[k], sd_theirs[k]), k
    assert all(type(m) not in (nn.Conv2d, nn.BatchNorm2d) for m in ours.modules())


def test_state_dict_loads_both_ways():
    original = _original("resnet50")
    gen = torch.Generator().manual_seed(4)
    for t in original.state_dict().values():
        if t.is_floating_point():
            t.mul_(1 + 0.1 * torch.rand(t.shape, generator=gen))
    ours = fm.resnet50()
    ours.load_state_dict(original.state_dict())
    fresh = torchvision.models.resnet50()
    fresh.load_state_dict(ours.state_dict())
    for k, v in original.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
        assert torch.equal(fresh.state_dict()[k], v), k


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", NETWORKS)
def test_against_torchvision(name, training):
    """One forward and backward: float64 within 1e-10 of torchvision's float64 (outputs, every gradient, every
    running statistic), float32 within 4x PyTorch's own float32 error (tests/networks.py)."""
    compare(name, _original(name), _input(), _maker(name), training, forms=("fastcv",), exact_form="fastcv")


def test_eval_folds_every_batch_norm_and_fuses_the_junctions():
    """Eval: each of ResNet-50's 53 convolution -> batch norm pairs is one fastcv::conv2d_fused (the batch norm
    folded), each block's junction its residual, and no PyTorch convolution or batch norm runs."""
    net = _maker("resnet50")(_original("resnet50")).eval()
    with torch.no_grad(), CountOps() as ops:
        net(_input())
    assert ops.counts["fastcv::conv2d_fused"] == 53
    with_residual = [args for name, args in ops.calls if name == "fastcv::conv2d_fused" and args[3] is not None]
    assert len(with_residual) == 16  # the 16 bottlenecks
    assert ops.torch_ops("conv", "batch_norm") == []


def test_training_fuses_relu_and_junction_into_the_batch_norms():
    """Training: fastcv's convolution and its gradients; batch_norm_relu wherever a ReLU follows (the stem and two
    per block), batch_norm_add_relu at each block's junction, a plain batch norm for each projection shortcut."""
    net = _maker("resnet50")(_original("resnet50")).train()
    with CountOps() as ops:
        net(_input()).square().sum().backward()
    relus = [args for name, args in ops.calls if name == "fastcv::batch_norm_train" and args[4]]
    junctions = [args for name, args in ops.calls if name == "fastcv::batch_norm_train" and args[3] is not None]
    assert ops.counts["fastcv::batch_norm_train"] == 53
    assert len(junctions) == 16 and len(relus) == 1 + 2 * 16 + 16
    assert ops.counts["fastcv::conv2d"] == ops.counts["fastcv::conv2d_weight_grad"] == 53
    assert ops.torch_ops("conv", "batch_norm") == []


def _train(model: nn.Module, dtype: torch.dtype):
    """train_synthetic on 32 images of 16 x 16, batch 8: small, because float64 training of the whole resnet18 is
    slow on two cores."""
    return train_synthetic(model, dtype, batch=8, images=32, size=16)


def test_training_30_steps_side_by_side():
    """fastcv's resnet18 and torchvision's from the same weights, 30 SGD steps each. float64: the same losses
    and parameters to 1e-7 (the arithmetic of 30 steps). float32: training amplifies rounding (a ReLU input near 0 flips
    and the trajectories part; this resnet18 drives the loss of its 32 images near 0, where relative spreads are
    large), so fastcv's float32 run is held to PyTorch's own float32 spread around the float64 trajectory, as
    tests/networks.py holds single passes: within ERROR_RATIO times it, plus 1e-3 of the first loss and of the
    parameter vector's norm."""
    torch.manual_seed(0)
    initial = torchvision.models.resnet18(num_classes=4)
    own = fm.resnet18(num_classes=4)
    own.load_state_dict(initial.state_dict())
    losses64, theirs64 = _train(copy.deepcopy(initial), torch.float64)
    fast_losses64, ours64 = _train(copy.deepcopy(own), torch.float64)
    # float64 rounding (1e-16) grows through 30 steps of a network this deep on batches this small to 1e-9 of
    # the losses: a wrong operation would differ at once, by far more
    torch.testing.assert_close(fast_losses64, losses64, rtol=1e-7, atol=0)
    for (k, a), b in zip(ours64.state_dict().items(), theirs64.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7 * b.abs().max().item(), msg=k)

    losses32, theirs32 = _train(copy.deepcopy(initial), torch.float32)
    fast_losses32, ours32 = _train(copy.deepcopy(own), torch.float32)
    assert losses32[-1] < 0.1 * losses32[0] and fast_losses32[-1] < 0.1 * fast_losses32[0]  # both learn
    spread = (losses32 - losses64).abs().max()
    assert (fast_losses32 - losses64).abs().max() <= ERROR_RATIO * spread + 1e-3 * losses64[0]

    def vector(model):
        return torch.cat([p.detach().double().flatten() for p in model.parameters()])

    truth = vector(theirs64)
    spread = (vector(theirs32) - truth).norm()
    assert (vector(ours32) - truth).norm() <= ERROR_RATIO * spread + 1e-3 * truth.norm()


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces ResNet-50 (conv_bn_act's fold and fused junctions, fastcv's ops)
    without a graph break: eval outputs, and a training forward and backward, as eager's."""
    original = _original("resnet50")
    net = _maker("resnet50")(original)
    twin = copy.deepcopy(net)
    compiled = torch.compile(net, fullgraph=True)
    x = _input()
    net.eval()
    twin.eval()
    with torch.no_grad():
        out, eager = compiled(x), twin(x)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4 * eager.abs().max().item())
    net.train()
    twin.train()
    out, eager = compiled(x), twin(x)
    out.square().sum().backward()
    eager.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4 * eager.abs().max().item())
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-3 * q.grad.abs().max().item(), msg=name)


def test_bad_input():
    net = fm.resnet18()
    with pytest.raises(ValueError, match=r"ResNet expects images \[N, 3, H, W\], got \[3, 64, 64\]"):
        net(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="BasicBlock only supports groups=1 and base_width=64"):
        fm.resnet18(groups=2)
    with pytest.raises(NotImplementedError, match="Dilation > 1 not supported in BasicBlock"):
        ResNet(BasicBlock, [2, 2, 2, 2], replace_stride_with_dilation=[False, True, True])
    with pytest.raises(ValueError, match="replace_stride_with_dilation should be None or a 3-element tuple"):
        fm.resnet50(replace_stride_with_dilation=[True])
    with pytest.raises(TypeError, match="weights"):
        fm.resnet50(weights="IMAGENET1K_V2")
    assert type(fm.resnet50().conv1) is fnn.Conv2d
