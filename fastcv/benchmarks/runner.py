"""`python -m fastcv bench`: every case checked against its reference, then both timed in the same run."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from datetime import datetime, timezone
from time import perf_counter

import torch

from fastcv.benchmarks import Case, all_cases


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_calls(fn, args, device: str, count: int) -> float:
    """Seconds per call of `count` calls in a row, with one synchronisation before and after."""
    _sync(device)
    start = perf_counter()
    for _ in range(count):
        fn(*args)
    _sync(device)
    return (perf_counter() - start) / count


BATCH_TARGET_S = 1e-3  # a sample of the faster function lasts this long: far above the timer's and a sync's cost


def batch_size(fast_s: float, slow_s: float, budget_s: float, min_reps: int) -> int:
    """Calls per timed sample, the same for both functions so that each pays the same synchronisation and
    timer overhead per call: enough for the faster one's sample to last BATCH_TARGET_S, at most 100, and
    few enough that min_reps samples of the slower one stay within the budget."""
    n = min(100.0, BATCH_TARGET_S / max(fast_s, 1e-9), budget_s / (min_reps * max(slow_s, 1e-9)))
    return max(1, int(n))


def time_pair(case: Case, args: tuple, device: str, budget_s: float, min_reps: int = 3) -> tuple[float, float]:
    """Median seconds per call of fastcv and of the reference, measured alternately so that drift in
    the machine's speed (these machines are shared) affects both alike."""
    fns = (case.fastcv, case.reference)
    # Warm-up (lazy initialisation, caches, allocator; run's check made the very first calls), timed to
    # choose the batch size once for both.
    warm = [_time_calls(fn, args, device, 1) for fn in fns]
    batch = batch_size(min(warm), max(warm), budget_s, min_reps)
    samples = ([], [])
    spent, reps = 0.0, 0
    while reps < min_reps or (spent < budget_s and reps < 1000):
        # Each side goes first every other round, so that neither always inherits the other's caches or clocks.
        for k in (0, 1) if reps % 2 == 0 else (1, 0):
            t = _time_calls(fns[k], args, device, batch)
            samples[k].append(t)
            spent += t * batch
        reps += 1
    return statistics.median(samples[0]), statistics.median(samples[1])


def _progress(done: int, total: int, label: str) -> None:
    if not sys.stderr.isatty() and os.environ.get("FASTCV_PROGRESS") != "1":
        print(f"[{done}/{total}] {label}", file=sys.stderr, flush=True)
        return
    width = 30
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label[:60]:<60}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _fmt_time(s: float) -> str:
    return f"{s * 1e6:.1f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def machine_info(device: str) -> dict:
    import fastcv
    from fastcv import _C

    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fastcv": fastcv.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "cpu_isa": _C.build_info["cpu_isa"],
        "threads": torch.get_num_threads(),
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run(device: str = "cpu", quick: bool = False, ops: list[str] | None = None, json_path: str | None = None,
        check_only: bool = False, out=sys.stdout, match: str | None = None) -> list[dict]:
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    cases = [c for c in all_cases(device)
             if (not quick or c.quick) and (not ops or c.op in ops) and (not match or match in c.name)]
    budget = 0.3 if quick else 1.5
    rows = []
    for i, case in enumerate(cases):
        _progress(i, len(cases), f"{case.op}: {case.name}")
        args = case.make()
        got, expected = case.fastcv(*args), case.reference(*args)
        case.check(got, expected)  # a mismatch stops the run: timing a wrong answer means nothing
        row = {"op": case.op, "case": case.name, "reference": case.reference_name, "agrees": True}
        if not check_only:
            t_fast, t_ref = time_pair(case, args, device, budget)
            row.update(fastcv_s=t_fast, reference_s=t_ref, speedup=t_ref / t_fast)
            if case.work is not None:
                amount, unit = case.work(args, got)
                row.update(throughput=amount / t_fast, unit=unit)
                if case.peak is not None:
                    peak, peak_name = case.peak()
                    row.update(peak=peak, peak_name=peak_name)
        rows.append(row)
    _progress(len(cases), len(cases), "done")
    info = machine_info(device)
    if check_only:
        print(f"{len(rows)} cases agree with their references on {device}", file=out)
    else:
        print(format_table(rows, info), file=out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"machine": info, "results": rows}, f, indent=2)
    return rows


def format_table(rows: list[dict], info: dict) -> str:
    head = ("op", "case", "fastcv", "reference", "speedup", "throughput")
    body = [
        (
            r["op"], r["case"], _fmt_time(r["fastcv_s"]), _fmt_time(r["reference_s"]), f"{r['speedup']:.2f}x",
            (f"{r['throughput']:.2f} {r['unit']}" if "throughput" in r else "")
            + (f" ({100 * r['throughput'] / r['peak']:.0f}% of {r['peak_name']} {r['peak']:.0f})"
               if "peak" in r else ""),
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    title = (
        f"fastcv {info['fastcv']} vs reference on {info['device']}"
        + (f" ({info['gpu']})" if "gpu" in info else f" ({info['threads']} threads, {info['cpu_isa']})")
        + f", torch {info['torch']}; speedup = reference time / fastcv time (median)"
    )
    return "\n".join([title, line(head), line("-" * w for w in widths), *map(line, body)])
