"""Shared machinery of the pytest-benchmark files: each bench_<op>.py times the cases of
fastcv.benchmarks.<op> (the ones `python -m fastcv bench` runs) for fastcv and for the reference."""
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def parametrize_cases(cases_fn):
    """A parametrize mark over (device, case index) x provider, with readable ids."""
    cases = {device: cases_fn(device) for device in DEVICES}
    ids = [(device, i) for device in DEVICES for i in range(len(cases[device]))]
    names = [f"{d}-{cases[d][i].op}-{cases[d][i].name}" for d, i in ids]

    def mark(fn):
        fn = pytest.mark.parametrize("provider", ["fastcv", "reference"])(fn)
        return pytest.mark.parametrize("case", [cases[d][i] for d, i in ids], ids=names)(fn)

    return mark


def on_cuda(obj) -> bool:
    """Whether any tensor in obj is on a GPU, looking inside dicts, lists and tuples: the multi-scale RoI
    Align cases pass a dict of feature maps and a list of box tensors."""
    if isinstance(obj, torch.Tensor):
        return obj.is_cuda
    if isinstance(obj, dict):
        obj = list(obj.values())
    return isinstance(obj, (list, tuple)) and any(on_cuda(x) for x in obj)


def run_case(benchmark, case, provider):
    """Times one provider on the case's inputs (synchronising CUDA), then checks fastcv's result."""
    args = case.make()
    fn = case.fastcv if provider == "fastcv" else case.reference
    sync = on_cuda(args)

    def run(*a):
        out = fn(*a)
        if sync:
            torch.cuda.synchronize()
        return out

    benchmark.group = f"{case.op}: {case.name}"
    benchmark.extra_info.update(op=case.op, case=case.name, provider=provider)
    result = benchmark(run, *args)
    if provider == "fastcv":
        case.check(result, case.reference(*args))
