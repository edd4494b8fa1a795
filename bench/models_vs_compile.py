"""ResNet-50 (batch 8 at 224, float32, NCHW) on the CPU: fastcv.convert'ed against eager PyTorch and against
torch.compile'd PyTorch, and fastcv's converted network under torch.compile, inference and SGD training step
(median of 5 after 2 warm-up calls, which also compile). What `python -m fastcv bench --models` does not yet
time: the compiled references take minutes to build.
    python bench/models_vs_compile.py [out.json]"""
import copy
import json
import sys
import time
import warnings

import torch
import torchvision

import fastcv


def median_seconds(fn, reps=5):
    fn(), fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[reps // 2]


def main():
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    base = torchvision.models.resnet50()
    images, target = torch.rand(8, 3, 224, 224), torch.randint(0, 1000, (8,))

    def training_step(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

        def step():
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), target).backward()
            optimizer.step()
        return step

    models = {"torch eager": lambda: copy.deepcopy(base),
              "torch.compile": lambda: torch.compile(copy.deepcopy(base)),
              "fastcv.convert": lambda: fastcv.convert(copy.deepcopy(base), fuse=True),
              "torch.compile(fastcv.convert)": lambda: torch.compile(fastcv.convert(copy.deepcopy(base), fuse=True))}
    results = {}
    for name, make in models.items():
        model = make().eval()
        with torch.no_grad():
            results[f"inference, {name}"] = median_seconds(lambda: model(images))
        results[f"training step, {name}"] = median_seconds(training_step(make().train()))
        print(f"{name}: inference {results[f'inference, {name}'] * 1e3:.0f} ms, "
              f"training step {results[f'training step, {name}'] * 1e3:.0f} ms", flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "cpu_isa": fastcv.cpu.cpu_isa(), "seconds": results}, f, indent=1)


if __name__ == "__main__":
    main()
