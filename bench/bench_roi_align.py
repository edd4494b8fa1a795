"""pytest-benchmark: fastcv against torchvision on roi_align and multi_scale_roi_align's cases."""
from conftest import parametrize_cases, run_case

from fastcv.benchmarks import roi_align


@parametrize_cases(roi_align.cases)
def test_roi_align(benchmark, case, provider):
    run_case(benchmark, case, provider)
