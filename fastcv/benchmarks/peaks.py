"""The devices' measured ceilings, for the distance-to-peak figures next to the benchmarks' throughput: the
dense matrix-multiply rate of torch.mm in a dtype (oneDNN/MKL with torch's threads on the CPU, cuBLAS on the
GPU, float32 without TF32), fastcv's own GEMM micro-kernel on the CPU, and the GPU's device-to-device copy
bandwidth. bench/peaks/gpu_peaks.py records
the GPU's figures with these functions; the benchmark cases (fastcv.benchmarks.attention) divide by them."""
from __future__ import annotations

import functools
import time

import torch


def time_cuda(fn, reps: int = 20) -> float:
    """Seconds per call of fn on the current CUDA stream (CUDA events, one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


@functools.lru_cache(maxsize=None)
def matmul_gflops(device: str, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of an n x n by n x n torch.mm (2 n^3 flops): n = 8192 on a GPU (mean of several calls, far past
    the caches' reach, as a long kernel runs), n = 1024 on the CPU (the best of a few calls: these CPUs are
    shared, and the best call is the closest to what the cores can do). Measured once per process."""
    if device == "cuda":
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            seconds = time_cuda(lambda: a @ a, reps=5 if dtype == torch.float32 else 20)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        return 2 * n ** 3 / seconds / 1e9
    n = 1024
    a = torch.randn(n, n, dtype=dtype)
    out = torch.empty_like(a)
    torch.mm(a, a, out=out)  # warm-up: threads, packing buffers
    best = float("inf")
    for _ in range(8):
        start = time.perf_counter()
        torch.mm(a, a, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


@functools.lru_cache(maxsize=None)
def _kernel_gflops(threads: int, isa: str) -> float:
    from fastcv import _C

    return _C.gemm_tile_gflops(threads, 0.2)


def kernel_gflops() -> float:
    """GFLOP/s of fastcv's float32 GEMM micro-kernel on L1-resident panels with torch's threads and the ISA in
    use: the arithmetic ceiling of the CPU convolution (whatever it packs, it multiplies with this kernel)."""
    from fastcv import _C

    return _kernel_gflops(torch.get_num_threads(), _C.cpu_isa())


def copy_gbps() -> float:
    """GB/s (read + write) of a 1 GiB device-to-device copy on the GPU, far past the L2."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / time_cuda(lambda: y.copy_(x)) / 1e9
