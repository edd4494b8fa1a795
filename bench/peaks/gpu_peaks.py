"""The GPU's measured ceilings, for the distance-to-peak figures: device-to-device copy bandwidth
(read + write) and dense bfloat16 / float32 matrix-multiply rates, timed with CUDA events."""
import json
import sys

import torch


def _time(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def main():
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # 1 GiB, far past the L2
    y = torch.empty_like(x)
    copy = 2 * x.numel() / _time(lambda: y.copy_(x)) / 1e9
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bf16 = 2 * 8192 ** 3 / _time(lambda: a @ a) / 1e12
    torch.backends.cuda.matmul.allow_tf32 = False
    f = a.float()
    fp32 = 2 * 8192 ** 3 / _time(lambda: f @ f, reps=5) / 1e12
    result = {"gpu": torch.cuda.get_device_name(), "copy_GBps": copy, "bf16_matmul_TFLOPs": bf16,
              "fp32_matmul_TFLOPs": fp32}
    print(json.dumps(result))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as out:
            json.dump(result, out)


if __name__ == "__main__":
    main()
