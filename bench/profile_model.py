"""Where a network's time goes: torch.profiler over inference or a training step of a torchvision
network, as torchvision builds it and as fastcv.convert() returns it.

    python bench/profile_model.py resnet50 --batch 8 --size 224 [--train] [--top 15]

Prints, for each version, the wall time per iteration, the ops that take the most self time (fastcv's
show as fastcv::<op>), and the share of the wall time the profiled ops account for: what is left is
Python and module overhead, which conversion should not add to.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch.profiler import ProfilerActivity, profile

import fastcv


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name.startswith("fcn"):
        return torchvision.models.segmentation.__dict__[name](weights=None, weights_backbone=None)
    return torchvision.models.__dict__[name](weights=None)


def step_fn(model: torch.nn.Module, images: torch.Tensor, train: bool):
    if not train:
        model.eval()

        def infer():
            with torch.inference_mode():
                model(images)

        return infer
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        out = model(images)
        out = out["out"] if isinstance(out, dict) else out
        out.float().mean().backward()
        optimizer.step()

    return train_step


def wall_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(label: str, fn, reps: int, top: int) -> None:
    wall = wall_time(fn, reps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    # Top-level ops only (not nested in another op): their total times add up to the profiled op time.
    top_level = [e for e in prof.events() if e.cpu_parent is None and not e.name.startswith("ProfilerStep")]
    op_time = sum(e.cpu_time_total for e in top_level) / 1e6
    print(f"\n== {label}: {wall * 1e3:.1f} ms per iteration (median of {reps}); the profiled ops take "
          f"{op_time * 1e3:.1f} ms in the profiled run, {100 * op_time / wall:.0f}% of the wall time")
    print(events.table(sort_by="self_cpu_time_total", row_limit=top))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("network", help="a torchvision builder: resnet50, mobilenet_v2, vit_b_16, fcn_resnet50, ...")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--train", action="store_true", help="a training step instead of inference")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    images = torch.rand(args.batch, 3, args.size, args.size)
    original = build(args.network)
    versions = [("torchvision", original), ("fastcv.convert(fuse=False)", fastcv.convert(original, fuse=False)),
                ("fastcv.convert(fuse=True)", fastcv.convert(original, fuse=True))]
    for label, model in versions:
        report(f"{args.network} {label}", step_fn(model, images, args.train), args.reps, args.top)


if __name__ == "__main__":
    main()
