"""The GPU's measured ceilings, for the distance-to-peak figures: device-to-device copy bandwidth
(read + write) and dense bfloat16 / float32 matrix-multiply rates, timed with CUDA events
(fastcv.benchmarks.peaks, which the benchmarks use as well)."""
import json
import sys

import torch

from fastcv.benchmarks.peaks import copy_gbps, matmul_gflops


def main():
    copy = copy_gbps()
    bf16 = matmul_gflops("cuda", torch.bfloat16) / 1e3
    fp32 = matmul_gflops("cuda", torch.float32) / 1e3
    result = {"gpu": torch.cuda.get_device_name(), "copy_GBps": copy, "bf16_matmul_TFLOPs": bf16,
              "fp32_matmul_TFLOPs": fp32}
    print(json.dumps(result))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as out:
            json.dump(result, out)


if __name__ == "__main__":
    main()
