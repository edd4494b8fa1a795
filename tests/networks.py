"""Whole networks against torchvision's, with the same weights and inputs: what test_convert (converted
networks) and the test_models_* modules (fastcv.models) share.

Two checks per network and mode:
- float64: fastcv's network in float64 against the original in float64: outputs, every parameter's gradient and
  every buffer within EXACT_F64 of the largest reference value. Rounding is then 1e-16 per operation, so this
  checks the arithmetic itself: the fusions, the folds, the statistics updates.
- float32, the networks as users run them: fastcv's convolution sums each output's K = C_in * kh * kw products
  (up to 4608 in ResNet-50) in another order than oneDNN, and a folded batch norm rounds each folded weight once
  more, so fastcv's float32 result differs from PyTorch's by rounding compounded over the depth (and amplified
  by the batch norms of small batches). The check measures PyTorch's own float32 error on that network (against
  float64) and allows fastcv at most ERROR_RATIO times it, plus FLOOR of the largest reference value; measured
  ratios are up to 1.5 for outputs (errors up to 7e-5 of the largest value) and up to 3.1 for running
  statistics (where PyTorch's error is itself near FLOOR). Gradients (per parameter, in the L2 norm) get KINK of
  the reference's norm on top: a ReLU whose input lies within rounding of 0 takes the other branch in one of the
  two float32 computations, and at 64 x 64 pixels ResNet-50's last stage has 8 positions per channel, so one
  such flip moves a layer's gradient by percents. PyTorch's own float32 gradients of these networks differ from
  float64 by up to 4% (ResNeXt-50, training) for that reason, fastcv's by up to 4% too (FCN's head, whose error
  PyTorch happens to avoid), and the float64 check shows that nothing else contributes.

Dropout probabilities are set to 0 (random masks are not fastcv's business), and batch norms get weights,
biases and running statistics that are not the identity (calibrated on other images), so that folding them
into the convolutions changes the weights."""
from __future__ import annotations

import collections
import copy
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

EXACT_F64 = 1e-10
ERROR_RATIO = 4.0
FLOOR = 1e-6
KINK = 0.1

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def prepare(model: nn.Module, shape) -> nn.Module:
    """No dropout, batch norms that are not the identity, no zero-initialised weights (ViT's head)."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, nn.Linear) and not m.weight.any():
            m.weight.data.normal_(0, 0.02, generator=gen)
        if isinstance(m, BATCH_NORMS):
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.normal_(0, 0.2, generator=gen)
            m.momentum = None  # calibration: the average of the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, *shape[1:], generator=gen))
    for m in model.modules():
        if isinstance(m, BATCH_NORMS):
            m.momentum = 0.1
            m.running_var.clamp_(min=0.05)  # channels ReLU silenced in calibration: no 1/sqrt(eps) gains
            m.num_batches_tracked.zero_()
    return model


def outputs(out) -> dict[str, torch.Tensor]:
    return dict(out) if isinstance(out, dict) else {"out": out}


def run(model: nn.Module, x: torch.Tensor, backward: bool):
    """(outputs, parameter gradients, buffers) after one forward (and a backward of a fixed random
    projection of the outputs)."""
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(backward):
        outs = outputs(model(x))
    grads = {}
    if backward:
        gen = torch.Generator().manual_seed(3)
        loss = sum((o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)).sum()
                   for o in outs.values())
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return {k: v.detach() for k, v in outs.items()}, grads, buffers


def assert_exact(what: str, fast: torch.Tensor, ref: torch.Tensor, least_scale: float = 0.0) -> None:
    """float64 against float64: within EXACT_F64 of the largest reference value, or of least_scale: gradients
    that are 0 but for rounding (a bias's before a training-mode batch norm: its sum over the batch cancels)
    are compared on the scale of the largest gradient."""
    scale = max(ref.abs().max().item(), least_scale)
    error = (fast - ref).abs().max().item()
    assert error <= EXACT_F64 * scale, f"{what}: float64 error {error:.3g} (largest value {scale:.3g})"


def assert_as_accurate(what: str, fast: torch.Tensor, torch32: torch.Tensor, ref64: torch.Tensor,
                       norm: bool = False) -> None:
    """fastcv's float32 result is within ERROR_RATIO x PyTorch's float32 error of the float64 result (plus
    FLOOR of its largest value; see the module docstring). norm: errors in the L2 norm, plus KINK of the
    reference's (gradients)."""
    ref = ref64.double()
    measure = torch.linalg.vector_norm if norm else (lambda t: t.abs().max())
    scale = measure(ref).item()
    allowed_extra = (KINK if norm else FLOOR) * scale
    torch_error = measure(torch32.double() - ref).item()
    fast_error = measure(fast.double() - ref).item()
    assert fast_error <= ERROR_RATIO * torch_error + allowed_extra, (
        f"{what}: fastcv's float32 error {fast_error:.3g}, PyTorch's {torch_error:.3g} "
        f"({'L2 norm' if norm else 'largest value'} {scale:.3g})")


def compare(name: str, original: nn.Module, x: torch.Tensor, make: Callable[[nn.Module, str], nn.Module],
            training: bool, forms: tuple[str, ...], exact_form: str) -> None:
    """fastcv's networks against `original` (float32, prepared), one forward and backward each in mode
    `training`, in float64 and in float32. make(model, form) builds fastcv's network of that form from `model`
    (with its weights, in the mode `model` is in); exact_form is checked in float64, every form in `forms` in
    float32. Parameter and buffer names must be the original's."""
    original = copy.deepcopy(original)
    reference = copy.deepcopy(original).double()
    runs = {"ref": (reference, x.double()), "torch": (original, x), "exact64": (make(reference, exact_form),
                                                                                x.double())}
    for form in forms:
        runs[form] = (make(original, form), x)
    results = {}
    for key, (model, inp) in runs.items():
        model.train(training)
        results[key] = run(model, inp, backward=True)
    (ref_out, ref_grads, ref_bufs), (t_out, t_grads, t_bufs) = results["ref"], results["torch"]
    assert ref_grads.keys() == t_grads.keys() and ref_grads

    f_out, f_grads, f_bufs = results["exact64"]
    assert f_grads.keys() == ref_grads.keys() and f_bufs.keys() == ref_bufs.keys()
    assert f_out.keys() == ref_out.keys()
    for k in ref_out:
        assert_exact(f"{name} float64 output {k!r}", f_out[k], ref_out[k])
    gradient_scale = max(g.abs().max().item() for g in ref_grads.values())
    for n in ref_grads:
        assert_exact(f"{name} float64 gradient of {n}", f_grads[n], ref_grads[n], gradient_scale)
    for n in ref_bufs:
        assert_exact(f"{name} float64 buffer {n}", f_bufs[n].double(), ref_bufs[n].double())

    for form in forms:
        f_out, f_grads, f_bufs = results[form]
        assert f_grads.keys() == ref_grads.keys() and f_bufs.keys() == ref_bufs.keys()
        for k in ref_out:
            assert_as_accurate(f"{name} {form} output {k!r}", f_out[k], t_out[k], ref_out[k])
        for n in ref_grads:
            assert_as_accurate(f"{name} {form} gradient of {n}", f_grads[n], t_grads[n], ref_grads[n], norm=True)
        for n in ref_bufs:
            if n.endswith("num_batches_tracked"):
                assert f_bufs[n].item() == t_bufs[n].item() == int(training), n
            else:
                assert_as_accurate(f"{name} {form} buffer {n}", f_bufs[n], t_bufs[n], ref_bufs[n])


class CountOps(TorchDispatchMode):
    """Counts the operators that reach the dispatcher (aten::*, fastcv::*) and keeps fastcv's calls' arguments.
    Under a dispatch mode every fastcv op goes through the dispatcher, so none escapes the count."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.counts[name] += 1
        if name.startswith("fastcv::"):
            self.calls.append((name, args))
        return func(*args, **(kwargs or {}))

    def torch_ops(self, *words: str) -> list[str]:
        """PyTorch's operators that ran whose names contain one of `words` ("conv", "batch_norm", ...)."""
        return [n for n in self.counts if n.startswith("aten::") and any(w in n for w in words)]


def train_synthetic(model: nn.Module, dtype: torch.dtype, steps: int = 30, batch: int = 16, images: int = 64,
                    size: int = 32):
    """SGD with momentum on `images` synthetic size x size images of 4 classes (a fixed pattern per class under
    noise); returns the losses and the trained model."""
    gen = torch.Generator().manual_seed(0)
    patterns = torch.randn(4, 3, size, size, generator=gen)
    labels = torch.arange(images) % 4
    data = (patterns[labels] + 2.0 * torch.randn(images, 3, size, size, generator=gen)).to(dtype)
    model = model.to(dtype).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    losses = []
    for step in range(steps):
        i = step * batch % images
        loss = torch.nn.functional.cross_entropy(model(data[i:i + batch]), labels[i:i + batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64), model
