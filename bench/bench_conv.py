"""pytest-benchmark: fastcv.ops.conv2d / conv_transpose2d against F.conv2d / F.conv_transpose2d on the
ResNet-50, MobileNetV2 and FCN cases of fastcv.benchmarks.conv2d (forward and forward+backward)."""
from conftest import parametrize_cases, run_case

from fastcv.benchmarks import conv2d


@parametrize_cases(conv2d.cases)
def test_conv(benchmark, case, provider):
    run_case(benchmark, case, provider)
