"""`python -m fastcv bench --plot` (fastcv/benchmarks/plot.py): the speedups drawn from JSON files that
`--json` wrote, or from the run just made; the message when matplotlib is missing."""
import json
import sys

import pytest
import torch

from fastcv import __main__ as cli
from fastcv.benchmarks import Case, plot, runner

CPU = {"date": "2026-12-02T19:22:27+00:00", "fastcv": "0.1.0", "torch": "2.14.1", "device": "cpu",
       "cpu": "x86_64", "cpu_isa": "avx512", "threads": 2}
GPU = {"date": "2026-11-30T11:28:26+00:00", "fastcv": "0.1.0", "torch": "2.11.0", "device": "cuda",
       "cpu": "x86_64", "cpu_isa": "avx512", "threads": 16, "gpu": "NVIDIA H200"}


def _row(op, case, speedup=None, status="ok"):
    row = {"op": op, "case": case, "reference": "torch", "status": status, "agrees": status == "ok"}
    if speedup is not None:
        row.update(fastcv_s=1e-3 / speedup, reference_s=1e-3, speedup=speedup)
    else:
        row.update(stage="check", error="AssertionError: differs")
    return row


def _write(path, machine, rows):
    path.write_text(json.dumps({"machine": machine, "results": rows}))
    return str(path)


@pytest.fixture
def matplotlib():
    """Skips a test that draws where matplotlib is not installed (CI installs it with the test extra)."""
    return pytest.importorskip("matplotlib")


@pytest.fixture
def runs(tmp_path):
    """A CPU run (an op whose cases come back after another op's, and a failed case) and a GPU run that
    shares one case with it and has one of its own."""
    cpu = _write(tmp_path / "cpu.json", CPU, [
        _row("nms", "1,000 boxes", 17.1),
        _row("conv2d", "3x3", 0.85),
        _row("nms", "20,000 boxes", 125.0),
        _row("conv2d", "1x1", status="mismatch"),
    ])
    gpu = _write(tmp_path / "gpu.json", GPU, [_row("conv2d", "3x3", 2.5), _row("attention", "1k tokens", 0.6)])
    return cpu, gpu


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.usefixtures("matplotlib")
def test_plot_from_json_files_without_running(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "all_cases", lambda device: pytest.fail("--from must not run the benchmarks"))
    out = tmp_path / "speedups.png"
    cli.main(["bench", "--plot", str(out), "--from", *runs])
    assert _is_png(out) and out.stat().st_size < 200_000
    assert f"wrote {out}" in capsys.readouterr().out


@pytest.mark.usefixtures("matplotlib")
def test_the_figure_groups_cases_by_op_on_a_log_axis_with_a_1x_line(runs):
    fig = plot.speedup_figure([plot.load_run(p) for p in runs])
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    lo, hi = ax.get_xlim()
    assert lo < 0.6 and hi > 125  # every speedup drawn fits
    assert any(list(line.get_xdata()) == [1, 1] for line in ax.get_lines())  # the 1x line
    # An op's heading, then its cases, in the order they first appear; the GPU run's new op last.
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["nms", "1,000 boxes", "20,000 boxes", "conv2d", "3x3", "1x1", "attention", "1k tokens"]
    # One legend entry per run: CPU and GPU runs differ in colour and marker; the failed case is counted.
    (cpu, gpu) = fig.legends[0].legend_handles
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[0].startswith("CPU: avx512, 2 threads") and "(1 failed)" in labels[0]
    assert labels[1].startswith("GPU: NVIDIA H200")
    assert cpu.get_marker() != gpu.get_marker() and cpu.get_color() != gpu.get_color()
    texts = [t.get_text() for t in ax.texts]
    assert "failed (mismatch)" in texts and "125×" in texts and "0.85×" in texts


@pytest.mark.usefixtures("matplotlib")
def test_op_and_match_pick_the_cases_drawn_from_files(runs, tmp_path):
    picked = [plot.select(plot.load_run(p), ops=["nms", "conv2d"], match="0") for p in runs]
    labels = [t.get_text() for t in plot.speedup_figure(picked).axes[0].get_yticklabels()]
    assert labels == ["nms", "1,000 boxes", "20,000 boxes"]
    with pytest.raises(SystemExit, match="no cases to draw"):
        cli.main(["bench", "--plot", str(tmp_path / "none.png"), "--from", *runs, "--op", "roi_align"])


@pytest.mark.usefixtures("matplotlib")
def test_a_fresh_run_is_drawn_too(tmp_path, monkeypatch):
    case = Case("demo", "ones", make=lambda: (torch.ones(8),), fastcv=lambda x: x * 2, reference=lambda x: x + x,
                reference_name="x + x", check=torch.testing.assert_close)
    monkeypatch.setattr(runner, "all_cases", lambda device: [case])
    out = tmp_path / "run.svg"
    cli.main(["bench", "--quick", "--plot", str(out), "--json", str(tmp_path / "run.json")])
    assert out.read_text().lstrip().startswith("<?xml") and "ones" in out.read_text()


@pytest.mark.usefixtures("matplotlib")
def test_files_that_are_not_bench_json_are_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "test_nms", "stats": {}}]))  # pytest-benchmark's shape, say
    with pytest.raises(SystemExit, match="bad.json: not a file written by `python -m fastcv bench --json`"):
        cli.main(["bench", "--plot", str(tmp_path / "x.png"), "--from", str(bad)])
    with pytest.raises(SystemExit, match="missing.json"):
        cli.main(["bench", "--plot", str(tmp_path / "x.png"), "--from", str(tmp_path / "missing.json")])


def test_from_needs_plot(runs, capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--from", *runs])
    assert "--from needs --plot" in capsys.readouterr().err


def test_without_matplotlib_the_message_names_the_extra_before_anything_runs(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    monkeypatch.setattr(runner, "all_cases", lambda device: pytest.fail("nothing may run without matplotlib"))
    for argv in (["--from", *runs], []):
        with pytest.raises(SystemExit, match=r'needs matplotlib.*pip install "fastcv\[plot\]"'):
            cli.main(["bench", "--plot", str(tmp_path / "x.png"), *argv])
    with pytest.raises(ModuleNotFoundError, match=r'pip install "fastcv\[plot\]"'):
        runner.run(plot_path=str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()
