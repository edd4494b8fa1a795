"""pytest-benchmark: fastcv.ops.scaled_dot_product_attention against F.scaled_dot_product_attention (default
backend) on the cases of fastcv.benchmarks.attention (ViT-S/16, 1k and 4k tokens in float32; FlashAttention's
bfloat16 sizes on a GPU), causal and not, forward and forward+backward. Each result's extra_info carries the
GFLOP/s it reached (FlashAttention's count) and the device's measured torch.mm rate in that dtype."""
from conftest import parametrize_cases, run_case

from fastcv.benchmarks import attention


@parametrize_cases(attention.cases)
def test_attention(benchmark, case, provider):
    run_case(benchmark, case, provider)
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if stats is not None and stats.stats.median > 0:
        peak, peak_name = case.peak()
        benchmark.extra_info.update(gflops=case.tags["gflop"] / stats.stats.median, peak_gflops=peak,
                                    peak=peak_name)
