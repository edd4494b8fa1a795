"""`python -m fastcv bench --plot PATH`: every case's speedup over its reference as a picture, from the run
just made or from JSON files that `--json` wrote (several runs, a CPU and a GPU one say, share the picture).

One row per case, grouped under its op; the speedup axis is logarithmic with a line at 1x (as fast as the
reference); each run has its own colour and marker, CPU runs circles and GPU runs triangles. Needs
matplotlib: `pip install "fastcv[plot]"`. The format follows PATH's extension (png, svg, pdf)."""
from __future__ import annotations

import io
import json
import os

INSTALL = 'pip install "fastcv[plot]"'

# Colours (colour-blind safe, Okabe and Ito's) and markers of the runs in order: CPU runs take the first
# list, GPU runs the second.
_CPU_STYLES = [("#0072B2", "o"), ("#009E73", "o"), ("#56B4E9", "o"), ("#000000", "o")]
_GPU_STYLES = [("#D55E00", "^"), ("#E69F00", "^"), ("#CC79A7", "^"), ("#F0E442", "^")]

ROW_INCHES = 0.15  # the height of one row (a case or an op's heading)


def require_matplotlib() -> None:
    """Raises ModuleNotFoundError naming the extra to install when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ModuleNotFoundError(f"drawing the speedups needs matplotlib, which cannot be imported ({e}); "
                                  f"install it with: {INSTALL}", name="matplotlib") from e


def load_run(path: str) -> dict:
    """A run as `python -m fastcv bench --json` wrote it: {"machine": {...}, "results": [row, ...]}."""
    with open(path) as f:
        run = json.load(f)
    if (not isinstance(run, dict) or not isinstance(run.get("machine"), dict)
            or not isinstance(run.get("results"), list)
            or not all(isinstance(r, dict) and "op" in r and "case" in r for r in run["results"])):
        raise ValueError(f"{path}: not a file written by `python -m fastcv bench --json` "
                         "(an object with 'machine' and 'results', each result with 'op' and 'case')")
    return run


def select(run: dict, ops: list[str] | None = None, match: str | None = None) -> dict:
    """The run with only the cases of these ops whose name contains `match` (as `bench --op/--match`)."""
    results = [r for r in run["results"] if (not ops or r["op"] in ops) and (not match or match in r["case"])]
    return {**run, "results": results}


def run_label(machine: dict) -> str:
    """What a run ran on, for the legend: 'GPU: NVIDIA H200, ...' or 'CPU: avx512, 2 threads, ...'."""
    if machine.get("device") == "cuda":
        where = f"GPU: {machine.get('gpu', 'CUDA')}"
    else:
        cpu = machine.get("cpu", "")
        model = f"{cpu}, " if cpu not in ("", "x86_64", "aarch64") else ""  # older runs recorded the architecture only
        where = f"CPU: {model}{machine.get('cpu_isa', '?')}, {machine.get('threads', '?')} threads"
    details = [f"torch {machine['torch']}" if "torch" in machine else None, str(machine.get("date", ""))[:10]]
    return ", ".join([where, *filter(None, details)])


def _rows(runs: list[dict]) -> list[tuple[str, list[str]]]:
    """(op, its cases) in the order they first appear across the runs, every case of an op together."""
    grouped: dict[str, list[str]] = {}
    for run in runs:
        for r in run["results"]:
            cases = grouped.setdefault(r["op"], [])
            if r["case"] not in cases:
                cases.append(r["case"])
    return list(grouped.items())


def _styles(runs: list[dict]) -> list[tuple[str, str]]:
    cpu = gpu = 0
    styles = []
    for run in runs:
        if run["machine"].get("device") == "cuda":
            styles.append(_GPU_STYLES[gpu % len(_GPU_STYLES)])
            gpu += 1
        else:
            styles.append(_CPU_STYLES[cpu % len(_CPU_STYLES)])
            cpu += 1
    return styles


def _speedup(row: dict) -> float | None:
    """The row's speedup, or None for a case that failed (or has no timing)."""
    s = row.get("speedup")
    ok = row.get("status", "ok") == "ok" and isinstance(s, (int, float)) and s > 0
    return s if ok else None


def _times(x: float, _pos=None) -> str:
    return f"{x:g}×"


def speedup_figure(runs: list[dict]):
    """The matplotlib Figure of the runs' speedups (not attached to pyplot, so no display is needed)."""
    require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    groups = _rows(runs)
    if not groups:
        raise ValueError("no cases to draw")
    # Row positions from the top: an op's heading, then its cases.
    labels, position, headings = [], {}, []
    for op, cases in groups:
        headings.append(len(labels))
        labels.append(op)
        for case in cases:
            position[(op, case)] = len(labels)
            labels.append(case)
    n = len(labels)

    speedups = [r["speedup"] for run in runs for r in run["results"] if _speedup(r) is not None]
    # Room for the figures written beyond the markers, away from the 1x line.
    low = min([1.0, *speedups]) / 2.4
    high = max([1.0, *speedups]) * 2.4

    # Inches above the rows (title, legend, the upper speedup labels) and below them (labels, axis title).
    legend_rows = len(runs) if len(runs) > 2 else 1
    top, bottom = 0.6 + 0.17 * legend_rows, 0.55
    height = top + ROW_INCHES * n + bottom
    fig = Figure(figsize=(11, height))
    ax = fig.add_axes((0.45, bottom / height, 0.53, ROW_INCHES * n / height))
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    ax.set_ylim(n - 0.5, -0.5)
    # Alternate ops on a light band; headings in bold.
    bounds = headings + [n]
    for k in range(len(groups)):
        if k % 2 == 0:
            ax.axhspan(bounds[k] - 0.5, bounds[k + 1] - 0.5, color="#f2f2f2", zorder=0, linewidth=0)
    ax.set_yticks(range(n), labels, fontsize=6.5)
    for i in headings:
        tick = ax.get_yticklabels()[i]
        tick.set_fontweight("bold")
        tick.set_fontsize(8)
    ax.tick_params(axis="y", length=0)
    ax.axvline(1.0, color="#333333", linewidth=1.0, zorder=1)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(_times))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="x", labelsize=8, top=True, labeltop=True)
    ax.grid(axis="x", which="major", color="#dddddd", linewidth=0.6, zorder=0)
    ax.set_axisbelow(True)
    ax.set_xlabel("speedup: reference time / fastcv time (median); right of the 1× line fastcv is faster",
                  fontsize=8)

    styles = _styles(runs)
    k = len(runs)
    handles = []
    for j, (run, (colour, marker)) in enumerate(zip(runs, styles)):
        offset = (j - (k - 1) / 2) * min(0.25, 0.8 / k)  # runs side by side within a row
        failed = 0
        for r in run["results"]:
            y = position[(r["op"], r["case"])] + offset
            s = _speedup(r)
            if s is None:
                failed += 1
                ax.text(1.0 / 1.05, y, f"failed ({r.get('status', 'no speedup')})", color=colour,
                        fontsize=5.5, va="center", ha="right", style="italic")
                continue
            ax.plot([1.0, s], [y, y], color=colour, linewidth=1.2, alpha=0.55, zorder=2,
                    solid_capstyle="butt")
            ax.plot([s], [y], marker=marker, color=colour, markersize=3.6, zorder=3, linestyle="none")
            ax.text(s * 1.12 if s >= 1 else s / 1.12, y, f"{s:.3g}×", fontsize=5.5, va="center",
                    ha="left" if s >= 1 else "right", color="#333333", zorder=3)
        label = run_label(run["machine"]) + (f" ({failed} failed)" if failed else "")
        handles.append(Line2D([], [], color=colour, marker=marker, linestyle="-", linewidth=1.2,
                              markersize=5, label=label))
    fig.suptitle("fastcv's speedup over its PyTorch / torchvision reference, per case", fontsize=10,
                 y=1 - 0.08 / height, va="top")
    fig.legend(handles=handles, loc="upper center", fontsize=8, frameon=False, ncol=1 if k > 2 else k,
               bbox_to_anchor=(0.5, 1 - 0.3 / height))
    return fig


def plot_speedups(runs: list[dict], path: str) -> None:
    """Draws the runs' speedups to `path`, in the format of its extension (png, svg, pdf...). A PNG is
    written with a palette of 256 colours: a quarter of the size of full colour, with the same look."""
    fig = speedup_figure(runs)
    options = dict(dpi=100, bbox_inches="tight", pad_inches=0.1, metadata=_metadata(path))
    if os.path.splitext(path)[1].lower() != ".png":
        fig.savefig(path, **options)
        return
    from PIL import Image  # a dependency of matplotlib's

    rendered = io.BytesIO()
    fig.savefig(rendered, format="png", **options)
    rendered.seek(0)
    with Image.open(rendered) as image:
        palette = image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        palette.save(path, optimize=True)


def _metadata(path: str) -> dict:
    """No software version or date in the file, so that the same runs give the same picture."""
    ext = os.path.splitext(path)[1].lower()
    return {".png": {"Software": None}, ".svg": {"Date": None, "Creator": None},
            ".pdf": {"CreationDate": None, "Creator": None, "Producer": None}}.get(ext, {})


def plot_files(paths: list[str], path: str, ops: list[str] | None = None, match: str | None = None) -> None:
    """Draws the runs in these JSON files (written by `bench --json`) to `path` without running anything."""
    require_matplotlib()
    runs = [select(load_run(p), ops, match) for p in paths]
    plot_speedups(runs, path)


