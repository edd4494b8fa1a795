"""fastcv.convert against the networks it converts, with the same weights and inputs. The checks and their
tolerances (float64 exactness, float32 accuracy relative to PyTorch's own) are tests/networks.py's; the
networks are converted fused and swapped (fuse=False), in one mode and run in the other."""
from __future__ import annotations

import copy
import io
import pickle
import re
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import fastcv
from fastcv import nn as fnn
from networks import BATCH_NORMS, assert_as_accurate, compare, outputs, prepare, run, train_synthetic

# name -> (constructor, input shape). Small inputs; the networks' structure is torchvision's. The ViT is
# torchvision's VisionTransformer with ViT-B/16's patches, depth and heads at ViT-Ti's width (192, heads of 16)
# and 32 x 32 pixels (4 patches and the class token): ViT-B's 86 M parameters would only add memory traffic.
MODELS = {
    "resnet50": (lambda: torchvision.models.resnet50(), (2, 3, 64, 64)),
    "resnext50_32x4d": (lambda: torchvision.models.resnext50_32x4d(), (2, 3, 64, 64)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), (2, 3, 64, 64)),
    "vit_b_16": (lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=12,
                                                              num_heads=12, hidden_dim=192, mlp_dim=768),
                 (2, 3, 32, 32)),
    "fcn_resnet50": (lambda: torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None,
                                                                          aux_loss=True), (2, 3, 64, 64)),
}
CNNS = ["resnet50", "resnext50_32x4d", "mobilenet_v2", "fcn_resnet50"]
_BUILT: dict[str, nn.Module] = {}


def _original(name: str) -> nn.Module:
    """A fresh copy of the prepared torchvision network (built once per session)."""
    if name not in _BUILT:
        torch.manual_seed(0)
        ctor, shape = MODELS[name]
        _BUILT[name] = prepare(ctor(), shape)
    return copy.deepcopy(_BUILT[name])


def _input(name: str) -> torch.Tensor:
    return torch.randn(MODELS[name][1], generator=torch.Generator().manual_seed(2))


def _convert_warning_free(model: nn.Module, form: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # these networks convert without a warning
        return fastcv.convert(model, fuse=form == "fused")


def _compare(name: str, training: bool, convert_in: str, forms: tuple[str, ...]) -> None:
    """The converted network (fused and/or swapped; converted in mode convert_in, then switched to `training`)
    against the original, one forward and backward each, in float64 and in float32."""
    original = _original(name).train(convert_in == "train")
    compare(name, original, _input(name), _convert_warning_free, training, forms, exact_form="fused")


# ------------------------------------------------------------------------------------------------ the networks


@pytest.mark.parametrize("name", MODELS)
def test_layers_swapped_and_state_dict_round_trip(name):
    original = _original(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = fastcv.convert(original)
    swaps = {nn.Conv2d: fnn.Conv2d, nn.ConvTranspose2d: fnn.ConvTranspose2d, nn.BatchNorm2d: fnn.BatchNorm2d,
             nn.MultiheadAttention: fnn.MultiheadAttention}
    pairs = list(zip(original.modules(), converted.modules()))
    assert len(pairs) == len(list(original.modules())) == len(list(converted.modules()))
    for a, b in pairs:
        assert type(b) is swaps.get(type(a), type(a))
    assert any(type(b) in (fnn.Conv2d, fnn.MultiheadAttention) for _, b in pairs)
    # the same keys both ways; the converted network's values are the original's
    sd_original, sd_converted = original.state_dict(), converted.state_dict()
    assert list(sd_original) == list(sd_converted)
    for k in sd_original:
        assert torch.equal(sd_original[k], sd_converted[k]), k
    # loads both ways (strict), each taking the other's values
    gen = torch.Generator().manual_seed(4)
    for t in sd_original.values():
        if t.is_floating_point():
            t.mul_(1 + 0.1 * torch.rand(t.shape, generator=gen))
    converted.load_state_dict(original.state_dict())
    fresh = _original(name)
    fresh.load_state_dict(converted.state_dict())
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd_original[k]), k
    # the fused forwards use the loaded values (float32: the outputs differ by rounding, < 1e-4 of the largest)
    original.eval()
    converted.eval()
    with torch.no_grad():
        a, b = outputs(original(_input(name))), outputs(converted(_input(name)))
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-3 * a[k].abs().max(), k


@pytest.mark.parametrize("name", MODELS)
def test_eval(name):
    """Eval mode, fused and swapped: outputs and the gradients of every parameter (through the folded batch
    norms too), for a network converted in training mode and switched to eval afterwards."""
    _compare(name, training=False, convert_in="train", forms=("fused", "swapped"))


@pytest.mark.parametrize("name", MODELS)
def test_train(name):
    """Training mode: outputs, every parameter's gradient, running statistics and num_batches_tracked, for a
    network converted in eval mode and switched to training afterwards."""
    _compare(name, training=True, convert_in="eval", forms=("fused",))


def _fused_calls(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(function, arguments) of each fused call in the generated forwards (training-mode code)."""
    calls = []
    for m in model.modules():
        code = getattr(getattr(m.__dict__.get("forward"), "__func__", None), "__fastcv_code__", None)
        if code is not None:
            for fn, args in re.findall(r"fastcv_nn_fused_(\w+)\(([^)]*)\)", code[0]):
                calls.append((fn, [a.strip() for a in args.split(",")]))
    return calls


@pytest.mark.parametrize("name", CNNS)
def test_cnn_patterns_fused(name):
    """Every convolution -> batch norm of these CNNs is one fused chain, with the relu where there is one (not
    ReLU6: MobileNetV2's stay separate), and each ResNet block's junction (bn -> + identity -> relu) too."""
    converted = fastcv.convert(_original(name))
    calls = _fused_calls(converted)
    convs = sum(type(m) is fnn.Conv2d for m in converted.modules())
    bns = sum(type(m) is fnn.BatchNorm2d for m in converted.modules())
    chains = [args for fn, args in calls if fn == "conv_bn_act"]
    assert len(chains) == len(calls) == bns  # every batch norm follows a convolution; nothing else fuses
    assert convs - len(chains) == (2 if name == "fcn_resnet50" else 0)  # FCN's two classifier convolutions
    with_relu = sum(args[4] != "False" for args in chains)
    junctions = sum(args[3] != "None" for args in chains)
    if name == "mobilenet_v2":
        assert with_relu == junctions == 0
    else:
        blocks = 16  # ResNet-50's bottlenecks: three convolutions each, all followed by a relu
        assert junctions == blocks
        assert with_relu == 3 * blocks + 1 + (2 if name == "fcn_resnet50" else 0)  # + the stem (+ FCN's heads)


# ------------------------------------------------------------------------------------------------ the patterns


class Patterns(nn.Module):
    """Every form convert() fuses, and one it must not fold (a convolution whose output has another use)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(c)
        self.conv_a = nn.Conv2d(c, c, 3, padding="same", padding_mode="reflect")
        self.bn_a = nn.BatchNorm2d(c)
        self.conv_b = nn.Conv2d(c, c, 4, padding="same")  # an even kernel: 'same' pads one more at the end
        self.bn_b = nn.BatchNorm2d(c, momentum=None)  # the cumulative average
        self.conv_c = nn.Conv2d(c, c, 1)
        self.conv_d = nn.Conv2d(c, c, 3, padding=1, stride=2, groups=2)
        self.act = nn.ReLU(inplace=True)
        self.conv_e = nn.Conv2d(c, c, 3, padding=(2, 1), dilation=(2, 1))
        self.bn_e = nn.BatchNorm2d(c)
        self.bn_f = nn.BatchNorm2d(c, affine=False)
        self.conv_g = nn.Conv2d(c, c, 3, padding=1)
        self.bn_g = nn.BatchNorm2d(c)
        self.bn_1d = nn.BatchNorm1d(c)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))                      # conv -> bn -> F.relu
        y = torch.relu(self.bn_a(self.conv_a(x)) + x)                # conv -> bn -> + identity -> torch.relu
        y = self.bn_b(self.conv_b(y)).relu_()                        # conv -> bn -> Tensor.relu_
        y = F.relu(x + self.conv_c(y), inplace=True)                 # conv -> + identity -> relu (no bn)
        y = self.act(self.conv_d(y))                                 # conv -> nn.ReLU
        e = self.conv_e(y)                                           # used twice: not folded,
        z = F.relu(self.bn_e(e)) + 0.5 * e                           # but bn -> relu is fused
        z = torch.add(self.bn_f(z), y).relu()                        # bn -> torch.add -> Tensor.relu
        z = self.bn_g(self.conv_g(z))                                # conv -> bn, no relu
        return self.fc(F.relu(self.bn_1d(z.mean((2, 3)))))           # BatchNorm1d -> relu


def _randomise_batch_norms(model: nn.Module, seed: int = 5) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, BATCH_NORMS):
            m.running_mean.normal_(0, 0.3, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5, generator=gen)
                m.bias.data.normal_(0, 0.3, generator=gen)
    return model


def _check_against(original: nn.Module, converted: nn.Module, x: torch.Tensor, training: bool, rtol: float,
                   steps: int = 2) -> None:
    """A few forward and backward passes of both in the given mode: outputs, gradients, buffers within rtol of
    the largest value (per tensor)."""
    def close(a, b, what, least_scale=0.0):
        scale = max(b.abs().max().item(), least_scale)
        assert (a - b).abs().max().item() <= rtol * scale, f"{what}: {(a - b).abs().max().item():.3g}"
    original.train(training)
    converted.train(training)
    for step in range(steps):
        a, ga, ba = run(original, x + step, backward=True)
        b, gb, bb = run(converted, x + step, backward=True)
        close(b["out"], a["out"], "output")
        assert ga.keys() == gb.keys()
        gradient_scale = max(g.abs().max().item() for g in ga.values())  # see _assert_exact
        for n in ga:
            close(gb[n], ga[n], f"gradient of {n}", gradient_scale)
        for n in ba:
            close(bb[n].double(), ba[n].double(), f"buffer {n}")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # PyTorch's, about its own copy
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_every_pattern(training):
    torch.manual_seed(0)
    original = _randomise_batch_norms(Patterns()).double()
    converted = fastcv.convert(original)
    calls = [(fn, args[-2] != "None", args[-1] != "False") for fn, args in _fused_calls(converted)]
    assert calls == [  # (function, with an identity, with a relu), in the forward's order
        ("conv_bn_act", False, True), ("conv_bn_act", True, True), ("conv_bn_act", False, True),
        ("conv_act", True, True), ("conv_act", False, True), ("bn_act", False, True), ("bn_act", True, True),
        ("conv_bn_act", False, False), ("bn_act", False, True)]
    x = torch.randn(4, 3, 12, 10, dtype=torch.float64)
    _check_against(original, converted, x, training, rtol=1e-12)
    # float32: the same weights, the float32 rounding of a few layers
    _check_against(original.float(), converted.float(), x.float(), training, rtol=2e-4)


class Hazard(nn.Module):
    """Chains that must not move past an in-place write into their input or identity."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        h = self.conv(x)
        x.mul_(2)                                # after the convolution read x: the conv cannot move below
        y = F.relu(self.bn(h))                   # (the batch norm -> relu still fuses)
        identity = y.clone()
        out = self.bn2(self.conv2(y))
        identity.add_(1)                         # the identity changes before the add: nothing moves past it
        return F.relu(out + identity) + x


def test_in_place_writes_keep_their_order():
    torch.manual_seed(0)
    original = _randomise_batch_norms(Hazard()).double()
    converted = fastcv.convert(original)
    calls = [(fn, args[-2] != "None", args[-1] != "False") for fn, args in _fused_calls(converted)]
    assert calls == [("bn_act", False, True)]
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    for training in (False, True):
        original.train(training)
        converted.train(training)
        torch.testing.assert_close(converted(x.clone()), original(x.clone()), rtol=1e-12, atol=1e-12)


class ModeDependent(nn.Module):
    """A forward whose traced code depends on self.training."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return y * 2 if self.training else y - 1


@pytest.mark.parametrize("convert_in", ["train", "eval"])
def test_mode_switches_after_conversion(convert_in):
    torch.manual_seed(0)
    original = _randomise_batch_norms(ModeDependent()).double().train(convert_in == "train")
    converted = fastcv.convert(original)
    train_code, eval_code = converted.forward.__func__.__fastcv_code__
    assert train_code != eval_code and "fastcv_nn_fused_conv_bn_act" in train_code and "sub" in eval_code
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for training in (True, False, True, False):
        _check_against(original, converted, x, training, rtol=1e-12, steps=1)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.block = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:  # control flow on a value: torch.fx cannot trace this
            x = F.relu(self.bn(self.conv(x)))
        return self.block(x)


class GradModeInside(DataDependent):
    def forward(self, x):
        with torch.no_grad():  # a trace would drop this
            x = F.relu(self.bn(self.conv(x)))
        return self.block(x)


@pytest.mark.parametrize("cls", [DataDependent, GradModeInside])
def test_untraceable_module_keeps_its_forward_and_is_named(cls):
    torch.manual_seed(0)
    original = nn.Sequential(cls(), nn.Conv2d(3, 2, 1))
    _randomise_batch_norms(original).double().eval()
    with pytest.warns(UserWarning, match=r"could not trace") as record:
        converted = fastcv.convert(original)
    message = "\n".join(str(r.message) for r in record)
    assert {DataDependent: "'0' (DataDependent: TraceError",
            GradModeInside: "'0' (GradModeInside: RuntimeError: the forward uses torch.no_grad"}[cls] in message
    assert "forward" not in converted[0].__dict__  # its own forward, with the layers swapped
    assert type(converted[0].conv) is fnn.Conv2d and type(converted[0].bn) is fnn.BatchNorm2d
    assert [fn for fn, _ in _fused_calls(converted[0].block)] == ["conv_bn_act"]  # its child is fused
    for sign in (1, -1):
        x = sign * torch.rand(2, 3, 6, 6, dtype=torch.float64)
        expected = original(x)
        expected.sum().backward()
        out = converted(x)
        out.sum().backward()
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        for (n, p), q in zip(converted.named_parameters(), original.parameters()):
            assert (p.grad is None) == (q.grad is None), n


def test_unsupported_layers_stay_and_are_named_once():
    class OwnConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    shared = nn.Conv2d(2, 2, 1, dtype=torch.complex64)
    model = nn.Sequential(shared, shared, OwnConv(2, 2, 1), nn.LazyConv2d(2, 1),
                          nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(2))
    with pytest.warns(UserWarning, match="left these layers as PyTorch's") as record:
        converted = fastcv.convert(model, fuse=False)
    assert len(record) == 1
    message = str(record[0].message)
    assert "'0' (Conv2d with torch.complex64 parameters" in message and "'1'" not in message  # one module, once
    assert "'2' (OwnConv: a subclass of nn.Conv2d" in message
    assert "'3' (LazyConv2d: a lazy module not initialised yet" in message
    assert type(converted[0]) is nn.Conv2d and type(converted[2]) is OwnConv
    assert isinstance(converted[3], nn.LazyConv2d)
    # padding modes are supported: fastcv.nn.Conv2d pads as nn.Conv2d does
    assert type(converted[4]) is fnn.Conv2d and type(converted[5]) is fnn.BatchNorm2d
    x = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(converted[4](x), model[4](x))


def test_hooks_still_fire():
    """A hook on a layer of a fused chain makes that chain run as modules, so the hook sees what it saw."""
    torch.manual_seed(0)
    original = _randomise_batch_norms(ModeDependent()).double().eval()
    converted = fastcv.convert(original)
    seen = []
    converted.bn.register_forward_hook(lambda m, inp, out: seen.append(out))
    original.bn.register_forward_hook(lambda m, inp, out: seen.append(out))
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(converted(x), original(x), rtol=1e-12, atol=1e-12)
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], seen[1], rtol=1e-12, atol=1e-12)


def test_folded_weights_follow_the_parameters():
    """Eval mode without gradients caches the folded weights; every way of changing a parameter or a
    statistic afterwards is seen."""
    torch.manual_seed(0)
    original = _randomise_batch_norms(ModeDependent()).double().eval()
    converted = fastcv.convert(original)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)

    def agree():
        with torch.no_grad():
            torch.testing.assert_close(converted(x), original(x), rtol=1e-12, atol=1e-12)

    agree()
    agree()  # from the cache
    for model in (original, converted):  # an optimizer's in-place update
        with torch.no_grad():
            model.conv.weight.mul_(1.5)
            model.bn.running_var.add_(0.5)
    agree()
    gen = torch.Generator().manual_seed(9)
    state = {k: v + torch.rand(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point() else v
             for k, v in original.state_dict().items()}
    original.load_state_dict(state)
    converted.load_state_dict(state)
    agree()
    for model in (original, converted):  # a new parameter object
        model.bn.weight = nn.Parameter(torch.full((4,), 0.25, dtype=torch.float64))
    agree()
    for model in (original, converted):  # statistics updated by a training-mode forward
        model.train()(x)
        model.eval()
    agree()
    original.float()
    converted.float()  # a dtype change (new tensors of the same parameters)
    with torch.no_grad():
        torch.testing.assert_close(converted(x.float()), original(x.float()), rtol=1e-5, atol=1e-5)


def test_inplace_keeps_parameters_and_optimizer():
    torch.manual_seed(0)
    model = _randomise_batch_norms(Patterns()).double()
    twin = copy.deepcopy(model)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    assert fastcv.convert(model, inplace=True) is model
    assert all(a is b for a, b in zip(params, model.parameters()))
    x = torch.randn(4, 3, 12, 10, dtype=torch.float64)
    for m, opt in ((model, optimizer), (twin, twin_optimizer)):
        for step in range(3):
            opt.zero_grad()
            m(x + step).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_copies_pickles_and_second_conversion():
    torch.manual_seed(0)
    original = _randomise_batch_norms(Patterns()).double().eval()
    converted = fastcv.convert(original)
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    expected = original(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = fastcv.convert(converted)  # nothing left to do: the same forward
    assert _fused_calls(again) == _fused_calls(converted)
    copied = copy.deepcopy(converted)
    assert copied.forward.__self__ is copied and _fused_calls(copied) == _fused_calls(converted)
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # swapped, not fused: the class's forward
    assert type(loaded.conv_a) is fnn.Conv2d and loaded.forward.__func__ is Patterns.forward
    reconverted = fastcv.convert(pickle.loads(pickle.dumps(loaded)))
    assert _fused_calls(reconverted) == _fused_calls(converted)
    for model in (again, copied, loaded, reconverted):
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ training, compile


def _small_resnet(classes: int = 4) -> nn.Module:
    """A CIFAR-sized ResNet of torchvision's BasicBlocks: the stem, plain and downsampling junctions."""
    from torchvision.models.resnet import BasicBlock

    def down(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        BasicBlock(16, 16), BasicBlock(16, 32, stride=2, downsample=down(16, 32)),
        BasicBlock(32, 64, stride=2, downsample=down(32, 64)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))


def test_training_30_steps():
    """The original and its conversion trained side by side. float64: the same losses and parameters (the
    arithmetic of 30 steps: fusions, folds, momentum, running statistics). float32: training amplifies rounding
    (a ReLU input near 0 flips, and the trajectories part), so the tolerances are the measured spread of
    PyTorch's own float32 training around float64 on this task (losses within 8e-4, parameters within 1.3e-3 of
    the parameter vector's norm and 5% of how far each parameter moved, over four seeds) with margin: losses
    within 5e-3, parameters within 1e-2 of the norm and 20% of each parameter's distance travelled."""
    torch.manual_seed(0)
    initial = _small_resnet()
    losses64, trained64 = train_synthetic(copy.deepcopy(initial), torch.float64)
    fast_losses64, fast64 = train_synthetic(fastcv.convert(initial), torch.float64)
    torch.testing.assert_close(fast_losses64, losses64, rtol=1e-10, atol=0)
    for a, b in zip(fast64.state_dict().values(), trained64.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

    losses32, trained32 = train_synthetic(copy.deepcopy(initial), torch.float32)
    fast_losses32, fast32 = train_synthetic(fastcv.convert(initial), torch.float32)
    assert losses32[-1] < 0.8 * losses32[0]  # it learns
    assert ((fast_losses32 - losses32).abs() / losses32).max() <= 5e-3
    vector = torch.cat([p.detach().flatten() for p in trained32.parameters()])
    fast_vector = torch.cat([p.detach().flatten() for p in fast32.parameters()])
    assert (fast_vector - vector).norm() <= 1e-2 * vector.norm()
    for (name, p), q, start in zip(fast32.named_parameters(), trained32.parameters(), initial.parameters()):
        assert (p - q).norm() <= 0.2 * (q - start).norm(), name
    for name, b in trained32.named_buffers():  # running statistics
        torch.testing.assert_close(fast32.get_buffer(name), b, rtol=2e-2, atol=2e-3 * b.abs().max().item())


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the converted network (fused calls, fastcv's ops) without a graph
    break, in eval mode (folded) and in training mode (forward and backward)."""
    torch.manual_seed(0)
    original = _randomise_batch_norms(_small_resnet())
    converted = fastcv.convert(original)
    compiled = torch.compile(converted, fullgraph=True)
    x = torch.randn(4, 3, 32, 32)
    original.eval()
    converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), original(x), rtol=1e-4, atol=1e-5)
    original.train()
    converted.train()
    twin = copy.deepcopy(converted)
    out = compiled(x)
    out.square().sum().backward()
    expected = twin(x)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(converted.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * q.grad.abs().max().item(), msg=name)
    for name, b in converted.named_buffers():
        torch.testing.assert_close(b, twin.get_buffer(name), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_autocast_channels_last(training):
    """Under CPU autocast (bfloat16) and on channels_last input the converted network returns PyTorch's dtype
    and is as accurate as PyTorch's bfloat16 result (against float64), within ERROR_RATIO."""
    torch.manual_seed(0)
    original = _small_resnet()
    original.train()(torch.randn(16, 3, 32, 32))  # running statistics that are not (0, 1)
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    reference = copy.deepcopy(original).double().train(training)(x.double())
    for amp in (False, True):
        model = copy.deepcopy(original).train(training)
        converted = fastcv.convert(model)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            expected, out = model(x), converted(x)
        assert out.dtype == expected.dtype == (torch.bfloat16 if amp else torch.float32)
        assert_as_accurate(f"autocast={amp}", out, expected, reference)


def test_fused_chains_reject_other_activations_and_run_other_norms():
    """fastcv.nn.fused (what the rewritten graphs and fastcv.models call): an activation other than ReLU is
    refused (the fused kernels only apply ReLU), and a norm without running statistics runs as it is."""
    from fastcv.nn.fused import bn_act, conv_act, conv_bn_act

    torch.manual_seed(0)
    conv, norm = fnn.Conv2d(4, 4, 3, padding=1).eval(), nn.GroupNorm(2, 4).eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(conv_bn_act(x, conv, norm, relu=True), torch.relu(norm(conv(x))))
        bn = fnn.BatchNorm2d(4).eval()
        for call in (lambda: conv_bn_act(x, conv, bn, relu=nn.ReLU6()), lambda: bn_act(x, bn, relu=nn.GELU()),
                     lambda: conv_act(x, conv, relu=F.relu)):
            with pytest.raises(TypeError, match="relu must be False, True or an nn.ReLU module"):
                call()
