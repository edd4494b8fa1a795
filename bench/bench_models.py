"""pytest-benchmark: whole networks, fastcv's (converted, patched, fastcv.models) against torchvision's, on the
cases of `python -m fastcv bench --models` (building them takes a minute: every network at full size)."""
from conftest import parametrize_cases, run_case

from fastcv.benchmarks import models


@parametrize_cases(models.cases)
def test_models(benchmark, case, provider):
    run_case(benchmark, case, provider)
