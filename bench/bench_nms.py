"""pytest-benchmark: fastcv against torchvision on the nms family's cases (`python -m fastcv bench`)."""
from conftest import parametrize_cases, run_case

from fastcv.benchmarks import nms


@parametrize_cases(nms.cases)
def test_nms(benchmark, case, provider):
    run_case(benchmark, case, provider)
