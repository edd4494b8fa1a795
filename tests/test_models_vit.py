"""fastcv.models.vit against torchvision's VisionTransformer (weights=None: nothing is downloaded), with the same
weights: state_dicts of every builder (keys, order, shapes; initial values and loads both ways at small sizes),
whole-network outputs and gradients in eval and training mode (tests/networks.py's checks and tolerances), which
kernels run, torch.compile, 30 training steps side by side, and the errors bad arguments raise."""
from __future__ import annotations

import collections
import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import vision_transformer as tv_vit

import fastcv.models as fm
from fastcv import nn as fnn
from fastcv.models.vit import ConvStemConfig, Encoder
from networks import CountOps, compare, prepare, train_synthetic

# torchvision's VisionTransformer with ViT-B/16's patches, depth and heads at ViT-Ti's width (192) and 32 x 32
# pixels (4 patches and the class token), as tests/test_convert.py's: ViT-B's 86 M parameters would only add
# memory traffic.
SMALL = dict(image_size=32, patch_size=16, num_layers=12, num_heads=12, hidden_dim=192, mlp_dim=768)
SHAPE = (2, 3, 32, 32)
# The convolutional stem and the pre-logits layer: 16 x 16 images, two stride-2 conv -> batch norm -> ReLU layers
# (total stride 4 = patch_size: 16 tokens and the class token), two blocks.
STEM = dict(image_size=16, patch_size=4, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, representation_size=24)
STEM_SHAPE = (2, 3, 16, 16)
_BUILT: dict[str, nn.Module] = {}


def _stem_configs(config_class) -> list:
    return [config_class(16, 3, 2), config_class(24, 3, 2)]


def _torchvision(name: str) -> nn.Module:
    if name == "small":
        return torchvision.models.VisionTransformer(**SMALL)
    return torchvision.models.VisionTransformer(**STEM, conv_stem_configs=_stem_configs(tv_vit.ConvStemConfig))


def _fastcv(name: str) -> nn.Module:
    if name == "small":
        return fm.VisionTransformer(**SMALL)
    return fm.VisionTransformer(**STEM, conv_stem_configs=_stem_configs(ConvStemConfig))


def _original(name: str) -> nn.Module:
    """A fresh copy of the torchvision network, prepared as tests/networks.py prepares networks (no dropout, a
    head that is not zero, calibrated batch norms; built once per session)."""
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = prepare(_torchvision(name), SHAPE if name == "small" else STEM_SHAPE)
    return copy.deepcopy(_BUILT[name])


def _input(name: str) -> torch.Tensor:
    return torch.randn(SHAPE if name == "small" else STEM_SHAPE, generator=torch.Generator().manual_seed(2))


def _maker(name: str):
    def make(model: nn.Module, form: str = "fastcv") -> nn.Module:
        """fastcv's network with model's weights, dtype and mode."""
        net = _fastcv(name).to(next(model.parameters()).dtype)
        net.load_state_dict(model.state_dict())
        return net.train(model.training)
    return make


# ------------------------------------------------------------------------------------------------ state_dicts


BUILDERS = ["vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"]


@pytest.mark.parametrize("builder", BUILDERS)
def test_builders_state_dicts_are_torchvisions(builder):
    """Each builder's network has torchvision's keys in torchvision's order, with its shapes (built on the meta
    device: ViT-H/14 has 632 M parameters), and torchvision's defaults (224 x 224 images)."""
    with torch.device("meta"):
        ours, theirs = getattr(fm, builder)(), getattr(torchvision.models, builder)()
        ours_384 = getattr(fm, builder)(image_size=448, num_classes=10)
        theirs_384 = getattr(torchvision.models, builder)(image_size=448, num_classes=10)
    for a, b in ((ours, theirs), (ours_384, theirs_384)):
        sd_a, sd_b = a.state_dict(), b.state_dict()
        assert list(sd_a) == list(sd_b)
        assert all(sd_a[k].shape == sd_b[k].shape for k in sd_b)
        assert (a.image_size, a.patch_size, a.seq_length) == (b.image_size, b.patch_size, b.seq_length)
    assert ours.image_size == 224 and ours_384.image_size == 448


@pytest.mark.parametrize("name", ["small", "stem"])
def test_state_dict_and_init_are_torchvisions(name):
    """The same keys, order and shapes, and from the same seed the same initial values (modules built in
    torchvision's order, initialised as torchvision initialises them), with the plain patch convolution and
    with the convolutional stem and pre-logits layer. fastcv's layers replace torch's."""
    torch.manual_seed(0)
    ours = _fastcv(name)
    torch.manual_seed(0)
    theirs = _torchvision(name)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    for k in sd_theirs:
        assert sd_ours[k].shape == sd_theirs[k].shape, k
        assert torch.equal(sd_ours[k], sd_theirs[k]), k
    kinds = collections.Counter(type(m) for m in ours.modules())
    assert kinds[nn.Conv2d] == kinds[nn.BatchNorm2d] == kinds[nn.MultiheadAttention] == 0
    assert kinds[fnn.MultiheadAttention] == ours.encoder.layers.__len__()
    assert kinds[fnn.Conv2d] == (1 if name == "small" else 3)


def test_torchvisions_conv_stem_config_is_accepted():
    """torchvision's ConvStemConfig (torch's batch norm) gives the same keys as fastcv's."""
    net = fm.VisionTransformer(**STEM, conv_stem_configs=_stem_configs(tv_vit.ConvStemConfig))
    assert list(net.state_dict()) == list(_torchvision("stem").state_dict())


@pytest.mark.parametrize("name", ["small", "stem"])
def test_state_dict_loads_both_ways(name):
    """Strict loads each way take the other network's values (batch norm buffers included)."""
    original = _original(name)
    gen = torch.Generator().manual_seed(4)
    for t in original.state_dict().values():
        if t.is_floating_point():
            t.mul_(1 + 0.1 * torch.rand(t.shape, generator=gen))
    ours = _fastcv(name)
    ours.load_state_dict(original.state_dict())
    fresh = _torchvision(name)
    fresh.load_state_dict(ours.state_dict())
    for k, v in original.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
        assert torch.equal(fresh.state_dict()[k], v), k


def test_old_mlp_keys_load():
    """Checkpoints from before torchvision's MLP blocks were Sequentials name their linear layers linear_1 and
    linear_2; like torchvision's, the network renames them when the state_dict carries no newer version."""
    net = _fastcv("stem")
    old = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v.clone() + 1
           for k, v in net.state_dict().items()}  # a plain dict: no version metadata
    assert any("linear_1" in k for k in old)
    fresh = _fastcv("stem")
    fresh.load_state_dict(old)
    assert torch.equal(fresh.encoder.layers.encoder_layer_1.mlp[3].bias,
                       old["encoder.layers.encoder_layer_1.mlp.linear_2.bias"])


# ------------------------------------------------------------------------------------------------ the network


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["small", "stem"])
def test_against_torchvision(name, training):
    """One forward and backward: float64 within 1e-10 of torchvision's float64 (outputs, every gradient, the
    stem's running statistics), float32 within 4x PyTorch's own float32 error (tests/networks.py)."""
    compare(f"vit {name}", _original(name), _input(name), _maker(name), training, forms=("fastcv",),
            exact_form="fastcv")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_runs_fastcvs_attention_and_convolution(training):
    """Each block's attention is one fastcv::attention_forward (and attention_backward in training), the patch
    projection fastcv::conv2d; PyTorch's attention and convolution ops run nowhere (they would be counted)."""
    net = _maker("small")(_original("small")).train(training)
    with torch.set_grad_enabled(training), CountOps() as ops:
        out = net(_input("small"))
        if training:
            out.square().sum().backward()
    assert ops.counts["fastcv::attention_forward"] == 12
    assert ops.counts["fastcv::attention_backward"] == (12 if training else 0)
    assert ops.counts["fastcv::conv2d"] == 1
    assert ops.counts["fastcv::conv2d_weight_grad"] == int(training)
    assert ops.torch_ops("attention", "conv") == []


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the network (fastcv's attention and convolution ops) without a graph
    break: eval outputs match eager's, and a training step's outputs and every gradient. Two blocks of the small
    ViT, as the compile time grows with the depth (the 12 blocks compile and match too, in 13 s for eval and
    24 s for training on two cores)."""
    torch.manual_seed(0)
    net = fm.VisionTransformer(**{**SMALL, "num_layers": 2})
    nn.init.normal_(net.heads.head.weight, std=0.02)  # not the zero head: gradients flow everywhere
    compiled = torch.compile(net, fullgraph=True)
    x = _input("small")
    net.eval()
    with torch.no_grad():
        out, expected = compiled(x), net(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    net.train()
    twin = copy.deepcopy(net)
    out = compiled(x)
    out.square().sum().backward()
    expected = twin(x)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * q.grad.abs().max().item(), msg=name)


# ------------------------------------------------------------------------------------------------ training


def test_training_30_steps():
    """The small ViT (4 classes) and torchvision's, from the same initial weights, trained side by side.
    float64: the same losses and parameters (30 steps of attention, layer norm and GELU gradients, momentum).
    float32: the tolerances are PyTorch's own float32 spread around float64 on this task, measured over four
    seeds (losses within 5.4e-4 relative, the loss falling to 5e-5 where a float32 softmax's rounding is relative
    to it; the parameter vector within 1.4e-7 of its norm; each parameter within 4.7e-4 of how far it moved),
    with a 10x margin. fastcv's own float32 spread from PyTorch's was at most 1.3e-4, 2.3e-8 and 3.8e-5."""
    torch.manual_seed(0)
    initial = torchvision.models.VisionTransformer(**SMALL, num_classes=4)
    ours = fm.VisionTransformer(**SMALL, num_classes=4)
    ours.load_state_dict(initial.state_dict())
    losses64, trained64 = train_synthetic(copy.deepcopy(initial), torch.float64)
    fast_losses64, fast64 = train_synthetic(copy.deepcopy(ours), torch.float64)
    torch.testing.assert_close(fast_losses64, losses64, rtol=1e-10, atol=0)
    for a, b in zip(fast64.state_dict().values(), trained64.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

    losses32, trained32 = train_synthetic(copy.deepcopy(initial), torch.float32)
    fast_losses32, fast32 = train_synthetic(copy.deepcopy(ours), torch.float32)
    assert losses32[-1] < 0.1 * losses32[0]  # it learns
    assert ((fast_losses32 - losses32).abs() / losses32).max() <= 5e-3
    vector = torch.cat([p.detach().flatten() for p in trained32.parameters()])
    fast_vector = torch.cat([p.detach().flatten() for p in fast32.parameters()])
    assert (fast_vector - vector).norm() <= 1.5e-6 * vector.norm()
    for (name, p), q, start in zip(fast32.named_parameters(), trained32.parameters(), initial.parameters()):
        assert (p - q).norm() <= 5e-3 * (q - start).norm(), name


# ------------------------------------------------------------------------------------------------ bad arguments


def test_bad_input():
    net = fm.VisionTransformer(**{**SMALL, "num_layers": 1})
    with pytest.raises(ValueError, match=r"built for 32 x 32 images \(height x width\), got 48 x 48"):
        net(torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match="built for 32 x 32 images .*got 32 x 16"):
        net(torch.randn(2, 3, 32, 16))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\], got \[3, 32, 32\]"):
        net(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\], got \[2, 1, 32, 32\]"):
        net(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"image_size \(30\) must be a multiple of patch_size \(16\)"):
        fm.VisionTransformer(**{**SMALL, "image_size": 30})
    with pytest.raises(ValueError, match=r"tokens \[N, 5, 192\].*got \[2, 4, 192\]"):
        net.encoder(torch.randn(2, 4, 192))
    assert isinstance(net.encoder, Encoder)
    with pytest.raises(TypeError, match="weights"):
        fm.vit_b_16(weights="IMAGENET1K_V1")
