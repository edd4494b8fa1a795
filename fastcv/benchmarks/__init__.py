"""Benchmark cases: each op's cases against its PyTorch/torchvision reference.

Used by `python -m fastcv bench` (fastcv/benchmarks/runner.py) and by pytest-benchmark (bench/), so both
time the same inputs. Each op contributes a module here with a `cases(device)` function.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Case:
    op: str  # the fastcv op, e.g. "nms"
    name: str  # what the inputs are, e.g. "20,000 boxes"
    make: Callable[[], tuple]  # builds the inputs (on the case's device)
    fastcv: Callable[..., Any]
    reference: Callable[..., Any]
    reference_name: str  # e.g. "torchvision.ops.nms"
    check: Callable[[Any, Any], None]  # raises AssertionError when the two results disagree
    # (amount of work, unit per second) for one fastcv call, from its inputs and output
    work: Callable[[tuple, Any], tuple[float, str]] | None = None
    quick: bool = True  # part of `bench --quick`
    # (rate in the unit of `work`, what it is) of the device's ceiling for this case, e.g. the measured
    # GEMM rate (fastcv.benchmarks.peaks); the table shows the throughput as a fraction of it
    peak: Callable[[], tuple[float, str]] | None = None
    tags: dict = field(default_factory=dict)


def all_cases(device: str) -> list[Case]:
    from fastcv.benchmarks import attention, batch_norm, conv2d, depthwise, im2col, nms, overhead, roi_align

    return (nms.cases(device) + roi_align.cases(device) + im2col.cases(device) + conv2d.cases(device)
            + depthwise.cases(device) + batch_norm.cases(device) + attention.cases(device)
            + overhead.cases(device))
