"""pytest-benchmark: fastcv against F.unfold / F.fold on the im2col and col2im cases."""
from conftest import parametrize_cases, run_case

from fastcv.benchmarks import im2col


@parametrize_cases(im2col.cases)
def test_im2col(benchmark, case, provider):
    run_case(benchmark, case, provider)
