"""pytest-benchmark: fastcv's depthwise convolution against F.conv2d (MobileNetV2 layers)."""
from conftest import parametrize_cases, run_case

from fastcv.benchmarks import depthwise


@parametrize_cases(depthwise.cases)
def test_depthwise_conv2d(benchmark, case, provider):
    run_case(benchmark, case, provider)
