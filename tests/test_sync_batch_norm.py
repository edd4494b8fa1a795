"""fastcv.nn.SyncBatchNorm in two processes on the CPU (gloo), against one process on the whole batch.

The two processes are started once for the module (the `pair` fixture: spawned, a gloo process group
through a FileStore in a temporary folder) and run one function per test on both ranks; each call has
a timeout, and a rank that raises, dies or hangs fails the test with its traceback and restarts the
pair. Every reference is computed in this (parent) process without a process group.

torch.nn.SyncBatchNorm cannot be the reference here: it refuses CPU inputs once a process group exists
(ValueError, "expected input tensor to be on GPU") and its statistics kernels (batch_norm_stats,
batch_norm_gather_stats_with_counts, ...) exist for CUDA only. The reference for the distributed
forward and backward is therefore (a) fastcv.nn.BatchNorm or nn.BatchNorm on the concatenated batch in
one process, and (b) in the same two processes, batch norm written in PyTorch ops whose statistics are
summed by torch.distributed.nn.functional.all_reduce, the differentiable all-reduce, so autograd gives
the exact gradient of the sum of both processes' losses. test_torch_sync_batch_norm_refuses_cpu keeps
the reason checked.
"""
from __future__ import annotations

import io
import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fastcv.nn
from fastcv.nn import SyncBatchNorm

WORLD = 2
TIMEOUT = 60  # seconds for one call on both ranks (each takes well under 5)


# ---------------------------------------------------------------- the two processes


def _dumps(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _serve(rank: int, init_file: str, tasks, results) -> None:
    """A rank's loop: join the gloo group, then run (function, args) tasks until None comes."""
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=TIMEOUT))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        return
    while (task := tasks.get()) is not None:
        try:
            fn, args = _loads(task)
            results.put((rank, True, _dumps(fn(rank, *args))))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class Pair:
    """Two spawned processes in one gloo group; run(fn, *args) calls fn(rank, *args) on both and returns
    [result of rank 0, result of rank 1]."""

    def __init__(self):
        self.procs = []

    def _start(self):
        ctx = mp.get_context("spawn")  # a fresh interpreter: imports this checkout's fastcv, as the parent
        self.folder = tempfile.TemporaryDirectory()
        init_file = os.path.join(self.folder.name, "store")
        self.tasks = [ctx.Queue() for _ in range(WORLD)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_serve, args=(rank, init_file, self.tasks[rank], self.results), daemon=True)
                      for rank in range(WORLD)]
        for p in self.procs:
            p.start()

    def close(self):
        for q, p in zip(getattr(self, "tasks", []), self.procs):
            if p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        self.procs = []
        if hasattr(self, "folder"):
            self.folder.cleanup()

    def run(self, fn, *args, timeout: float = TIMEOUT):
        if not self.procs or not all(p.is_alive() for p in self.procs):
            self.close()
            self._start()
        task = _dumps((fn, args))
        for q in self.tasks:
            q.put(task)
        out, deadline = {}, time.monotonic() + timeout
        while len(out) < WORLD:
            try:
                rank, ok, value = self.results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close()
                    why = f"rank(s) {dead} died" if dead else f"no answer within {timeout} s (hung in a collective?)"
                    pytest.fail(f"{fn.__name__}: {why}; answered: {sorted(out)}")
                continue
            if not ok:
                self.close()
                pytest.fail(f"{fn.__name__} raised on rank {rank}:\n{value}")
            out[rank] = _loads(value)
        return [out[r] for r in range(WORLD)]


@pytest.fixture(scope="module")
def pair():
    p = Pair()
    yield p
    p.close()


# ---------------------------------------------------------------- helpers


def _offsets(sizes, rank):
    return sum(sizes[:rank]), sum(sizes[:rank + 1])


def _assert_close(actual, expected, dtype, what, tol=None):
    """float64: 1e-12 relative to the tensor's largest magnitude, the rounding of sums of a few hundred terms
    computed in another order. float32: `tol` (stated per test) likewise."""
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    atol = (tol if tol is not None else 1e-12 if dtype == torch.float64 else 1e-5) * scale
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")


def _bn(dim, c, **kwargs):
    return {2: fastcv.nn.BatchNorm1d, 3: fastcv.nn.BatchNorm1d, 4: fastcv.nn.BatchNorm2d,
            5: fastcv.nn.BatchNorm3d}[dim](c, **kwargs)


def _layout(t, channels_last):
    if not channels_last:
        return t
    return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)


# ---------------------------------------------------------------- (1) DistributedDataParallel


def _net(dtype):
    """A small convolutional net with fastcv's and PyTorch's batch norms of ranks 4 and 2, one with
    momentum=None (the cumulative average over num_batches_tracked)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), fastcv.nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 6), fastcv.nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5))
    with torch.no_grad():  # affine parameters away from their initial ones and zeros
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.to(dtype)


def _batches(dtype, total, steps=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(total, 3, 6, 6, generator=g, dtype=dtype) * 2 + 1, torch.randint(0, 5, (total,), generator=g))
            for _ in range(steps)]


def _sgd_steps(net, batches, shard, loss_scale, channels_last):
    """SGD with momentum on each batch's `shard` (a slice); the loss is sum(cross entropy) * loss_scale.
    Returns each step's output and parameter gradients, and the final state_dict."""
    model = net.module if isinstance(net, DistributedDataParallel) else net
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    steps = []
    for x, target in batches:
        x = _layout(x[shard], channels_last)
        out = net(x)
        loss = F.cross_entropy(out, target[shard], reduction="sum") * loss_scale
        opt.zero_grad()
        loss.backward()
        steps.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        opt.step()
    return steps, model.state_dict()


def _ddp_worker(rank, dtype, sizes, channels_last, state, batches):
    net = _net(dtype)
    net.load_state_dict(state)
    net = SyncBatchNorm.convert_sync_batchnorm(net)
    assert sum(isinstance(m, SyncBatchNorm) for m in net.modules()) == 3
    ddp = DistributedDataParallel(net)
    lo, hi = _offsets(sizes, rank)
    # this process's loss: its samples' sum * WORLD / N (see test_ddp_equals_one_process)
    return _sgd_steps(ddp, batches, slice(lo, hi), WORLD / sum(sizes), channels_last)


@pytest.mark.parametrize("dtype, sizes, channels_last, tol", [
    (torch.float64, (4, 4), False, None),
    (torch.float64, (3, 5), True, None),
    (torch.float64, (0, 8), False, None),
    (torch.float32, (4, 4), True, 2e-5),
])
def test_ddp_equals_one_process(pair, dtype, sizes, channels_last, tol):
    """Three SGD steps of the net, converted and under DistributedDataParallel on two processes, each with its
    shard of the batch, against the unconverted net on the whole batch in one process.

    Gradients: process r's loss is L_r = (W / N) sum_{i in shard r} l_i (W = 2 processes, N samples in all).
    SyncBatchNorm's backward all-reduces sum(dy) and sum(dy * xhat), so each process's input gradient is that
    of L_0 + L_1, and the parameter gradients of the two processes sum to d(L_0 + L_1); DDP averages them:
    d(L_0 + L_1) / W = d(sum_i l_i / N), the gradient of the mean loss over the whole batch, which is the
    one-process reference's loss. (Equal shards with each process's mean loss are the usual case of this.)
    Outputs, every parameter's gradient at every step, then parameters and running statistics (the last
    batch norm has momentum=None) after the steps must agree.

    Tolerance, of each tensor's largest magnitude: float64 1e-12 (sums in another order; measured 4e-15);
    float32 2e-5, the worst-case rounding of a sum of 288 float32 values per channel (288 u = 1.7e-5), the
    two sides summing in different orders (measured: 1e-6 after three steps)."""
    net = _net(dtype)
    state = net.state_dict()
    batches = _batches(dtype, sum(sizes))
    results = pair.run(_ddp_worker, dtype, sizes, channels_last, state, batches)
    ref_steps, ref_state = _sgd_steps(net, batches, slice(None), 1 / sum(sizes), channels_last)
    for step, (ref_out, ref_grads) in enumerate(ref_steps):
        out = torch.cat([r[0][step][0] for r in results])
        _assert_close(out, ref_out, dtype, f"step {step} output", tol)
        for rank, r in enumerate(results):
            for name, grad in r[0][step][1].items():
                _assert_close(grad, ref_grads[name], dtype, f"step {step} rank {rank} grad {name}", tol)
    for rank, r in enumerate(results):
        assert r[1].keys() == ref_state.keys()
        for name, value in r[1].items():
            if value.is_floating_point():
                _assert_close(value, ref_state[name], dtype, f"rank {rank} final {name}", tol)
            else:
                assert torch.equal(value, ref_state[name]), name


# ---------------------------------------------------------------- (2) the module: unequal and empty batches


def _module_worker(rank, sizes, x_all, g_all, identity_all, kwargs, relu, channels_last, state, calls):
    """`calls` forward/backward passes of a SyncBatchNorm on this rank's rows of x_all; the loss of each
    is sum(y * g)."""
    bn = SyncBatchNorm(x_all.shape[1], **kwargs).to(x_all.dtype)
    bn.load_state_dict(state)
    bn.relu = relu
    lo, hi = _offsets(sizes, rank)
    out = []
    for _ in range(calls):
        x = _layout(x_all[lo:hi].clone(), channels_last).requires_grad_()
        identity = None
        if identity_all is not None:
            identity = _layout(identity_all[lo:hi].clone(), channels_last).requires_grad_()
        bn.zero_grad()
        y = bn(x, identity)
        (y * g_all[lo:hi]).sum().backward()
        out.append((y.detach(), x.grad, identity.grad if identity is not None else None,
                    {n: p.grad.clone() for n, p in bn.named_parameters()}))
    return out, bn.state_dict()


def _module_reference(x_all, g_all, identity_all, kwargs, relu, channels_last, state, calls):
    bn = _bn(x_all.dim(), x_all.shape[1], **kwargs).to(x_all.dtype)
    bn.load_state_dict(state)
    bn.relu = relu
    out = []
    for _ in range(calls):
        x = _layout(x_all.clone(), channels_last).requires_grad_()
        identity = None if identity_all is None else _layout(identity_all.clone(), channels_last).requires_grad_()
        bn.zero_grad()
        y = bn(x, identity)
        (y * g_all).sum().backward()
        out.append((y.detach(), x.grad, identity.grad if identity is not None else None,
                    {n: p.grad.clone() for n, p in bn.named_parameters()}))
    return out, bn.state_dict()


def _check_module(pair, sizes, tail, dtype=torch.float64, channels_last=False, identity=False, relu=False, tol=None,
                  calls=2, **kwargs):
    c = 4
    g = torch.Generator().manual_seed(2)
    total = sum(sizes)
    x_all = torch.randn(total, c, *tail, generator=g, dtype=dtype) * 3 + 2
    g_all = torch.randn(total, c, *tail, generator=g, dtype=dtype)
    identity_all = torch.randn(total, c, *tail, generator=g, dtype=dtype) if identity else None
    ref = _bn(x_all.dim(), c, **kwargs).to(dtype)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5, generator=g)
            if ref.bias is not None:
                ref.bias.uniform_(-0.5, 0.5, generator=g)
    state = ref.state_dict()
    results = pair.run(_module_worker, sizes, x_all, g_all, identity_all, kwargs, relu, channels_last, state, calls)
    ref_calls, ref_state = _module_reference(x_all, g_all, identity_all, kwargs, relu, channels_last, state, calls)
    for call, (y, gx, gid, gparams) in enumerate(ref_calls):
        got = [r[0][call] for r in results]
        for rank, (lo, hi) in enumerate(_offsets(sizes, r) for r in range(WORLD)):
            assert got[rank][0].shape == y[lo:hi].shape
            if channels_last and hi > lo:
                assert got[rank][0].stride() == _layout(y[lo:hi].contiguous(), True).stride(), "output layout"
            _assert_close(got[rank][0], y[lo:hi], dtype, f"call {call} rank {rank} output", tol)
            _assert_close(got[rank][1], gx[lo:hi], dtype, f"call {call} rank {rank} grad input", tol)
            if gid is not None:
                _assert_close(got[rank][2], gid[lo:hi], dtype, f"call {call} rank {rank} grad identity", tol)
        for name, grad in gparams.items():  # local sums, which add up to the whole batch's gradient
            _assert_close(got[0][3][name] + got[1][3][name], grad, dtype, f"call {call} grad {name}", tol)
    for rank, r in enumerate(results):
        assert r[1].keys() == ref_state.keys()
        for name, value in r[1].items():
            if value.is_floating_point():
                _assert_close(value, ref_state[name], dtype, f"rank {rank} {name}", tol)
            else:
                assert torch.equal(value, ref_state[name]), name


@pytest.mark.parametrize("sizes", [(3, 5), (0, 6), (5, 0), (1, 2)])
@pytest.mark.parametrize("tail, channels_last", [((), False), ((5,), False), ((3, 5), False), ((3, 5), True),
                                                 ((2, 3, 3), False), ((2, 3, 3), True)],
                         ids=["rank2", "rank3", "rank4", "rank4-channels_last", "rank5", "rank5-channels_last"])
def test_unequal_and_empty_batches(pair, sizes, tail, channels_last):
    """Per-process batches of different sizes, one of them empty (torch's SyncBatchNorm supports an empty
    batch: it still takes part in the collectives, with a zero count), against one process on the
    concatenated batch; loss sum(y * g) on each process, so the reference's input gradient is the sum of
    both losses' and the parameter gradients are the sum of the processes' local ones. (1, 2) with rank 2 is
    one value per channel on a process, which the group's count of 3 allows. Two calls: the running
    statistics after both, momentum 0.1."""
    _check_module(pair, sizes, tail, channels_last=channels_last)


@pytest.mark.parametrize("kwargs", [dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
                                    dict(bias=False)], ids=["momentum-none", "no-affine", "no-running", "no-bias"])
def test_module_options(pair, kwargs):
    if "bias" in kwargs and "bias" not in nn.BatchNorm2d.__init__.__code__.co_varnames:
        pytest.skip("this torch's batch norms have no bias argument")
    _check_module(pair, (3, 5), (3, 5), calls=3, **kwargs)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("identity, relu", [(True, False), (False, True)], ids=["identity", "relu"])
def test_fused_identity_relu(pair, channels_last, identity, relu):
    """forward(input, identity): relu(bn(input) + identity), with identity's gradient; module.relu = True:
    relu(bn(input)); as fastcv.nn.BatchNorm2d."""
    _check_module(pair, (3, 5), (3, 5), channels_last=channels_last, identity=identity, relu=relu)


def test_all_empty(pair):
    """Both batches empty: an empty output, the running statistics untouched, the batch counted."""
    _check_module(pair, (0, 0), (3, 5))


@pytest.mark.parametrize("tail, channels_last", [((3, 5), False), ((3, 5), True)])
def test_float32(pair, tail, channels_last):
    """float32: 2e-5 of each tensor's magnitude, a few times the worst-case rounding of a per-channel sum of
    120 values (120 u = 7e-6), summed in different orders on the two sides (measured: under 1e-6); the group's
    statistics are merged in float64."""
    _check_module(pair, (3, 5), tail, dtype=torch.float32, channels_last=channels_last, tol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision(pair, dtype):
    """bfloat16 and float16, the module converted with .to(dtype) as model.half() converts it (fastcv's kernels
    compute in float32 with float32 statistics and parameters): each side rounds its float32 results once, so
    the two may differ by an ulp of the dtype where the float32 values straddle a rounding boundary: 2 u(dtype)
    of each tensor's magnitude (bfloat16 7.8e-3, float16 9.8e-4)."""
    tol = 2 * {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    _check_module(pair, (3, 5), (3, 5), dtype=dtype, channels_last=True, identity=True, tol=tol)


# ---------------------------------------------------------------- (3) against PyTorch in the same processes


def _torch_sync_bn(x, weight, bias, eps):
    """Batch norm over both processes in PyTorch ops; the statistics' sums go through the differentiable
    all_reduce, so backward gives the gradient of the sum of both processes' losses."""
    from torch.distributed.nn.functional import all_reduce
    c = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    shape = (c,) + (1,) * (x.dim() - 2)
    count = all_reduce(torch.full((1,), x.numel() // c, dtype=x.dtype))
    mean = all_reduce(x.sum(dims)) / count
    var = all_reduce((x - mean.view(shape)).square().sum(dims)) / count
    return (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps) * weight.view(shape) + bias.view(shape)


def _against_torch_worker(rank, sizes, x_all, g_all, weight, bias):
    lo, hi = _offsets(sizes, rank)
    out = {}
    for name in ("fastcv", "torch"):
        x = x_all[lo:hi].clone().requires_grad_()
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        if name == "fastcv":
            bn = SyncBatchNorm(x.shape[1]).to(x.dtype)
            with torch.no_grad():
                bn.weight.copy_(w)
                bn.bias.copy_(b)
            y = bn(x)
            y.mul(g_all[lo:hi]).sum().backward()
            out[name] = (y.detach(), x.grad, bn.weight.grad, bn.bias.grad)
        else:
            y = _torch_sync_bn(x, w, b, 1e-5)
            y.mul(g_all[lo:hi]).sum().backward()
            out[name] = (y.detach(), x.grad, w.grad, b.grad)
    return out


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_against_pytorch_distributed(pair, dtype, tol):
    """Forward, input gradient and the local weight and bias gradients against batch norm in PyTorch ops with
    torch.distributed.nn's differentiable all_reduce, in the same two processes (sizes 3 and 5, [N, 4, 6, 6]).
    float64 1e-12; float32 2e-5 of each tensor's magnitude: both sides sum 288 values per channel in
    float32 (PyTorch's summation and fastcv's blockwise two-pass one), each within 288 u = 1.7e-5 in the
    worst case (measured: 2e-7)."""
    g = torch.Generator().manual_seed(3)
    sizes = (3, 5)
    x_all = torch.randn(8, 4, 6, 6, generator=g, dtype=dtype) * 3 + 2
    g_all = torch.randn(8, 4, 6, 6, generator=g, dtype=dtype)
    weight = torch.rand(4, generator=g, dtype=dtype) + 0.5
    bias = torch.randn(4, generator=g, dtype=dtype)
    for rank, r in enumerate(pair.run(_against_torch_worker, sizes, x_all, g_all, weight, bias)):
        for what, got, expected in zip(("output", "grad input", "grad weight", "grad bias"), r["fastcv"], r["torch"]):
            _assert_close(got, expected, dtype, f"rank {rank} {what}", tol)


def _torch_refuses_worker(rank):
    try:
        nn.SyncBatchNorm(3).train()(torch.randn(4, 3, 2, 2))
    except (ValueError, NotImplementedError, RuntimeError) as e:
        return str(e)
    return None


def test_torch_sync_batch_norm_refuses_cpu(pair):
    """Why torch.nn.SyncBatchNorm is not the reference on the CPU (see the module notes): it raises for a
    CPU input in a process group. If a later torch accepts CPU inputs, compare against it here."""
    for message in pair.run(_torch_refuses_worker):
        assert message is not None, "torch.nn.SyncBatchNorm now runs on the CPU: use it as a reference"


# ---------------------------------------------------------------- finite differences


def _finite_difference_worker(rank, sizes, x_all, g_all, identity_all, weight, bias):
    """Central differences of the group's loss sum_r sum(y_r * g_r) in a few elements of each process's input
    and of the (shared) weight, against the analytic gradients (for the weight: the processes' local
    gradients summed, as DDP would before averaging)."""
    lo, hi = _offsets(sizes, rank)
    bn = SyncBatchNorm(x_all.shape[1], track_running_stats=False).double()
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    x, identity, g = x_all[lo:hi].clone(), identity_all[lo:hi], g_all[lo:hi]

    def loss():
        local = (bn(x, identity) * g).sum().detach().reshape(1)
        dist.all_reduce(local)
        return local.item()

    xg = x.clone().requires_grad_()
    (bn(xg, identity) * g).sum().backward()
    grad_w = bn.weight.grad.clone()
    dist.all_reduce(grad_w)
    h, checks = 1e-6, []
    with torch.no_grad():
        for r in range(WORLD):  # the same sequence of forwards on both ranks; only rank r perturbs its input
            for k in (0, 7, 29):
                flat = x.view(-1)
                saved = flat[k].item()
                flat[k] = saved + h if rank == r else saved
                plus = loss()
                flat[k] = saved - h if rank == r else saved
                minus = loss()
                flat[k] = saved
                if rank == r:
                    checks.append(("input", k, (plus - minus) / (2 * h), xg.grad.view(-1)[k].item()))
        for k in range(x.shape[1]):
            saved = bn.weight[k].item()
            bn.weight[k] = saved + h
            plus = loss()
            bn.weight[k] = saved - h
            minus = loss()
            bn.weight[k] = saved
            checks.append(("weight", k, (plus - minus) / (2 * h), grad_w[k].item()))
    return checks


def test_finite_differences(pair):
    """float64, sizes 2 and 3 of [N, 3, 2, 3] with a fused identity and ReLU: central differences with
    h = 1e-6 are within about h^2 * |f'''| + 1e-16 |loss| / h of the derivative, so 1e-7 absolute on
    derivatives of order one."""
    g = torch.Generator().manual_seed(4)
    sizes = (2, 3)
    x_all = torch.randn(5, 3, 2, 3, generator=g, dtype=torch.float64)
    g_all = torch.randn(5, 3, 2, 3, generator=g, dtype=torch.float64)
    identity_all = torch.randn(5, 3, 2, 3, generator=g, dtype=torch.float64)
    weight = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(3, generator=g, dtype=torch.float64)
    for rank, checks in enumerate(pair.run(_finite_difference_worker, sizes, x_all, g_all, identity_all, weight,
                                           bias)):
        assert len(checks) == 3 + 3
        for what, k, numeric, analytic in checks:
            assert abs(numeric - analytic) <= 1e-7, f"rank {rank} d/d{what}[{k}]: {numeric} vs {analytic}"


# ---------------------------------------------------------------- (5) no synchronisation


def _no_sync_worker(rank):
    """A process group of one process (each rank its own), and eval mode in the pair's group: fastcv.nn's
    BatchNorm path, bit for bit, and no collective (the ranks make different numbers of calls)."""
    groups = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
    g = torch.Generator().manual_seed(5 + rank)
    x = torch.randn(3 + rank, 4, 3, 3, generator=g)
    sync = SyncBatchNorm(4, process_group=groups[rank])
    ref = fastcv.nn.BatchNorm2d(4)
    for _ in range(1 + rank):
        assert torch.equal(sync(x), ref(x))
    assert all(torch.equal(a, b) for a, b in zip(sync.state_dict().values(), ref.state_dict().values()))
    world = SyncBatchNorm(4).eval()
    world.load_state_dict(ref.state_dict())
    for _ in range(1 + 2 * rank):
        assert torch.equal(world(x), ref.eval()(x))
    return True


def test_no_sync_in_group_of_one_and_eval(pair):
    assert pair.run(_no_sync_worker) == [True, True]


@pytest.mark.parametrize("shape, cls", [((6, 4), fastcv.nn.BatchNorm1d), ((3, 4, 5), fastcv.nn.BatchNorm1d),
                                        ((3, 4, 3, 5), fastcv.nn.BatchNorm2d),
                                        ((2, 4, 2, 3, 3), fastcv.nn.BatchNorm3d)])
@pytest.mark.parametrize("kwargs", [{}, dict(momentum=None), dict(track_running_stats=False)])
def test_single_process_is_fastcv_batch_norm(shape, cls, kwargs):
    """Without a process group (this process has none): fastcv.nn.BatchNorm's forward, bit for bit, in
    training and eval, with gradients, the fused identity and ReLU, and channels_last."""
    assert not dist.is_initialized()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(*shape, generator=g)
    if x.dim() >= 4:
        x = _layout(x, True)
    identity = torch.randn(*shape, generator=g)
    sync, ref = SyncBatchNorm(4, **kwargs), cls(4, **kwargs)
    with torch.no_grad():
        for m in (sync, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, 4))
            m.bias.copy_(torch.linspace(-0.5, 0.5, 4))
    for mode in ("train", "eval", "train"):
        for m in (sync, ref):
            getattr(m, mode)()
            m.zero_grad()
        for args in ((), (identity,)):
            xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
            ys, yr = sync(xs, *args), ref(xr, *args)
            assert torch.equal(ys, yr) and ys.stride() == yr.stride()
            ys.sum().backward()
            yr.sum().backward()
            assert torch.equal(xs.grad, xr.grad)
    for a, b in zip(list(sync.parameters()) + list(sync.buffers()), list(ref.parameters()) + list(ref.buffers())):
        assert torch.equal(a, b) and (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad)


# ---------------------------------------------------------------- (4) convert_sync_batchnorm


def test_convert_sync_batchnorm():
    """Every batch norm becomes a fastcv SyncBatchNorm holding the same parameter and buffer tensors (as
    torch's conversion keeps them), with the same state_dict keys and values, mode, options and fused ReLU;
    a batch norm at the top is returned converted, other modules in place."""
    fused = fastcv.nn.BatchNorm2d(8)
    fused.relu = True
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), fastcv.nn.BatchNorm2d(8, momentum=None), fused,
        nn.Sequential(nn.SyncBatchNorm(8, eps=1e-3), fastcv.nn.BatchNorm2d(8, affine=False),
                      fastcv.nn.BatchNorm2d(8, track_running_stats=False)),
        nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4), fastcv.nn.BatchNorm3d(4))
    model[2].eval()
    model[1].qconfig = "qconfig"
    with torch.no_grad():
        for i, m in enumerate(m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            if m.affine:
                m.weight.fill_(1 + i)
            if m.running_mean is not None:
                m.running_mean.fill_(i)
                m.num_batches_tracked.fill_(i)
    before = {n: t for n, t in model.state_dict(keep_vars=True).items()}
    old = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    group = object()  # stands for a process group: only stored
    converted = SyncBatchNorm.convert_sync_batchnorm(model, group)
    assert converted is model
    new = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(new) == len(old) == 8 and all(type(m) is SyncBatchNorm for m in new)
    after = converted.state_dict(keep_vars=True)
    assert list(after) == list(before)
    for name, t in before.items():
        assert after[name] is t, name  # the same tensor objects
    for o, m in zip(old, new):
        assert (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, m.training) == \
            (o.num_features, o.eps, o.momentum, o.affine, o.track_running_stats, o.training)
        assert m.process_group is group
        assert m.relu == (o is fused)
    assert new[0].qconfig == "qconfig"
    top = fastcv.nn.BatchNorm2d(8)
    out = SyncBatchNorm.convert_sync_batchnorm(top)
    assert type(out) is SyncBatchNorm and out.weight is top.weight and out.running_var is top.running_var
    assert out.process_group is None
    # a state_dict saved from torch's nn.SyncBatchNorm loads into fastcv's and back
    torch_bn, ours = nn.SyncBatchNorm(8), SyncBatchNorm(8)
    torch_bn.running_mean.fill_(3)
    ours.load_state_dict(torch_bn.state_dict())
    assert torch.equal(ours.running_mean, torch_bn.running_mean)
    ours.running_var.fill_(2)
    torch_bn.load_state_dict(ours.state_dict())
    assert torch.equal(torch_bn.running_var, ours.running_var)


# ---------------------------------------------------------------- (6) bad input


def test_bad_input_raises_like_torch():
    """Rank 1 and zero channels raise ValueError, as torch's SyncBatchNorm; rank 6 (which PyTorch's
    F.batch_norm accepts) raises ValueError: fastcv's kernels take ranks 2 to 5. Nothing is counted."""
    for shape in ((4,), (4, 0, 3)):
        with pytest.raises(ValueError) as torch_error:
            nn.SyncBatchNorm(shape[1] if len(shape) > 1 else 4)(torch.randn(shape))
        bn = SyncBatchNorm(shape[1] if len(shape) > 1 else 4)
        with pytest.raises(ValueError) as error:
            bn(torch.randn(shape))
        assert str(error.value) == str(torch_error.value)
        assert bn.num_batches_tracked.item() == 0
    bn = SyncBatchNorm(2)
    with pytest.raises(ValueError, match="rank 2 to 5"):
        bn(torch.randn(2, 2, 1, 1, 1, 2))
    assert bn.num_batches_tracked.item() == 0


def _bad_input_worker(rank):
    """In the group: the same checks before any collective (every rank raises, none waits), and one value
    per channel over the whole group (sizes 1 and 0 of [N, 3]) raises on both ranks once the count is
    known, leaving the statistics and the counter alone."""
    messages = []
    bn = SyncBatchNorm(3)
    for x in (torch.randn(3), torch.randn(2, 3, 1, 1, 1, 2), torch.randn(2, 3, 4).double(),
              torch.randn(1 - rank, 3)):
        try:
            bn(x)
            messages.append(None)
        except (ValueError, TypeError) as e:
            messages.append(f"{type(e).__name__}: {e}")
    assert bn.num_batches_tracked.item() == 0 and torch.equal(bn.running_mean, torch.zeros(3))
    y = bn(torch.randn(1, 3))  # one value per channel here, two in the group: allowed
    assert y.shape == (1, 3) and bn.num_batches_tracked.item() == 1
    return messages


def test_bad_input_in_group(pair):
    for messages in pair.run(_bad_input_worker):
        assert all(m is not None for m in messages), messages
        assert messages[0].startswith("ValueError: expected at least 2D input")
        assert "rank 2 to 5" in messages[1]
        assert messages[2].startswith("TypeError: running_mean must be torch.float64")  # a float32 module
        assert messages[3].startswith("ValueError: Expected more than 1 value per channel")
