"""`python -m fastcv bench`: every case checked against its reference, then both timed in the same run.

A case that fails (its check, or an exception anywhere) is a row of the table and of the JSON, and the run
goes on with the others; `python -m fastcv` then exits non-zero naming them."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import traceback
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


def _progress_bar() -> bool:
    """A bar redrawn in place where stderr is a terminal; a line per case in logs."""
    return sys.stderr.isatty() or os.environ.get("FASTCV_PROGRESS") == "1"


def _progress(done: int, total: int, label: str) -> None:
    if not _progress_bar():
        print(f"[{done}/{total}] {label}", file=sys.stderr, flush=True)
        return
    width = 30
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label[:60]:<60}")
    sys.stderr.flush()


def _clear_progress() -> None:
    """Erases the bar, so that what is printed next starts on a clean line of the terminal."""
    if _progress_bar():
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()


def _fmt_time(s: float) -> str:
    return f"{s * 1e6:.1f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _cpu_model() -> str | None:
    """The CPU's model name (Linux's /proc/cpuinfo), which decides results more than the ISA does."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info(device: str) -> dict:
    import fastcv

    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fastcv": fastcv.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "cpu": _cpu_model() or platform.processor() or platform.machine(),
        "cpu_isa": fastcv.cpu.cpu_isa(),
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
        check_only: bool = False, out=None, match: str | None = None,
        cases: list[Case] | None = None, plot_path: str | None = None) -> list[dict]:
    """Checks (and unless check_only, times) each case, printing its row as soon as it is done. A case
    that fails is a row too, and the others still run: see failure_message. `cases` replaces all_cases;
    `out` is sys.stdout when the call is made (not when this module was imported, so redirection works).
    json_path and plot_path: where to write the figures as JSON and draw the speedups
    (fastcv.benchmarks.plot), which needs matplotlib, checked before anything runs."""
    out = out or sys.stdout
    if plot_path:
        from fastcv.benchmarks.plot import require_matplotlib

        require_matplotlib()
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    cases = [c for c in (all_cases(device) if cases is None else cases)
             if (not quick or c.quick) and (not ops or c.op in ops) and (not match or match in c.name)]
    budget = 0.3 if quick else 1.5
    info = machine_info(device)
    widths = _widths(cases, check_only)
    print(_title(info, check_only), _line(_head(check_only), widths), _line(("-" * w for w in widths), widths),
          sep="\n", file=out, flush=True)
    rows = []
    for i, case in enumerate(cases):
        _progress(i, len(cases), f"{case.op}: {case.name}")
        rows.append(run_case(case, device, budget, check_only))
        _clear_progress()
        print(_line(_cells(rows[-1], check_only), widths), file=out, flush=True)
    if check_only and not failure_message(rows):
        print(f"{len(rows)} cases agree with their references on {device}", file=out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"machine": info, "results": rows}, f, indent=2)
    if plot_path and rows:
        from fastcv.benchmarks.plot import plot_speedups

        plot_speedups([{"machine": info, "results": rows}], plot_path)
        print(f"wrote {plot_path}", file=out)
    elif plot_path:
        print(f"no cases ran: nothing drawn to {plot_path}", file=out)
    return rows


def run_case(case: Case, device: str, budget_s: float, check_only: bool) -> dict:
    """One row: status "ok"; or "mismatch" (the check failed) or "error" (an exception), with the stage it
    happened in and the error's text. A mismatch is not timed: timing a wrong answer means nothing."""
    row = {"op": case.op, "case": case.name, "reference": case.reference_name, "status": "ok", "agrees": None}
    stage = "inputs"
    try:
        args = case.make()
        stage = "fastcv"
        got = _call(case.fastcv, args, device)
        stage = "reference"
        expected = _call(case.reference, args, device)
        stage = "check"
        try:
            case.check(got, expected)
        except AssertionError:
            row["agrees"] = False
            raise
        row["agrees"] = True
        if not check_only:
            stage = "timing"
            row.update(_timings(case, args, got, device, budget_s))
    except Exception as exc:  # whatever one case raises is reported, and the run goes on
        _clear_progress()
        traceback.print_exc(file=sys.stderr)
        row.update(status="mismatch" if row["agrees"] is False else "error", stage=stage,
                   error="".join(traceback.format_exception_only(type(exc), exc)).strip())
    return row


def _call(fn, args: tuple, device: str):
    """One call, synchronised, so that an asynchronous CUDA error is blamed on the call that made it."""
    result = fn(*args)
    _sync(device)
    return result


def _timings(case: Case, args: tuple, got, device: str, budget_s: float) -> dict:
    t_fast, t_ref = time_pair(case, args, device, budget_s)
    row = dict(fastcv_s=t_fast, reference_s=t_ref, speedup=t_ref / t_fast)
    if case.work is not None:
        amount, unit = case.work(args, got)
        row.update(throughput=amount / t_fast, unit=unit)
        if case.peak is not None:
            peak, peak_name = case.peak()
            row.update(peak=peak, peak_name=peak_name)
    return row


def failure_message(rows: list[dict]) -> str | None:
    """Names the failed cases, or None when every case passed."""
    failed = [f"{r['op']}: {r['case']} ({r['status']} at {r['stage']})" for r in rows if r["status"] != "ok"]
    if not failed:
        return None
    return f"{len(failed)} of {len(rows)} cases failed: " + "; ".join(failed)


# Rows are printed as the cases finish, so the columns' widths are fixed beforehand: the names' from
# the cases, the figures' from their longest forms ("999.99 ms", "1000.00x").
def _head(check_only: bool) -> tuple:
    return ("op", "case", "result") if check_only else ("op", "case", "fastcv", "reference", "speedup", "throughput")


def _widths(cases: list[Case], check_only: bool) -> list[int]:
    op = max([len("op"), *(len(c.op) for c in cases)])
    name = max([len("case"), *(len(c.name) for c in cases)])
    return [op, name] + ([6] if check_only else [9, 9, 8, 10])


def _line(cells, widths: list[int]) -> str:
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()


def _cells(r: dict, check_only: bool) -> tuple:
    if r["status"] != "ok":
        error = r["error"].splitlines()[0]
        return r["op"], r["case"], f"FAILED ({r['status']} at {r['stage']}): {error[:120]}"
    if check_only:
        return r["op"], r["case"], "agrees"
    return (
        r["op"], r["case"], _fmt_time(r["fastcv_s"]), _fmt_time(r["reference_s"]), f"{r['speedup']:.2f}x",
        (f"{r['throughput']:.2f} {r['unit']}" if "throughput" in r else "")
        + (f" ({100 * r['throughput'] / r['peak']:.0f}% of {r['peak_name']} {r['peak']:.0f})"
           if "peak" in r else ""),
    )


def _title(info: dict, check_only: bool) -> str:
    if check_only:
        return f"fastcv {info['fastcv']} checked against its references on {info['device']}, torch {info['torch']}"
    return (
        f"fastcv {info['fastcv']} vs reference on {info['device']}"
        + (f" ({info['gpu']})" if "gpu" in info else f" ({info['threads']} threads, {info['cpu_isa']})")
        + f", torch {info['torch']}; speedup = reference time / fastcv time (median)"
    )
