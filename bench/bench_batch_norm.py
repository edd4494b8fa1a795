"""pytest-benchmark: fastcv's batch norm and its fused ReLU / residual variants against PyTorch's unfused
sequence (ResNet-50 layers)."""
from conftest import parametrize_cases, run_case

from fastcv.benchmarks import batch_norm


@parametrize_cases(batch_norm.cases)
def test_batch_norm(benchmark, case, provider):
    run_case(benchmark, case, provider)
