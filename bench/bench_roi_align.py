"""pytest-benchmark: fastcv against torchvision on the cases of `python -m fastcv bench` (roi_align).

    pytest bench/bench_roi_align.py --benchmark-group-by=param:case_id
"""
import pytest
import torch

from fastcv.benchmarks import roi_align as roi_cases
from conftest import DEVICES

CASES = {device: roi_cases.cases(device) for device in DEVICES}
IDS = [(device, i) for device in DEVICES for i in range(len(CASES[device]))]


def _synced(fn, device):
    if device != "cuda":
        return fn

    def run(*args):
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    return run


@pytest.mark.parametrize("provider", ["fastcv", "torchvision"])
@pytest.mark.parametrize("case_id", IDS, ids=[f"{d}-{CASES[d][i].op}-{CASES[d][i].name}" for d, i in IDS])
def test_roi_align(benchmark, case_id, provider):
    device, index = case_id
    case = CASES[device][index]
    args = case.make()
    fn = case.fastcv if provider == "fastcv" else case.reference
    benchmark.group = f"{device} {case.op}: {case.name}"
    benchmark.extra_info.update(op=case.op, case=case.name, device=device, provider=provider)
    result = benchmark(_synced(fn, device), *args)
    if provider == "fastcv":
        case.check(result, case.reference(*args))
