"""The runner behind `python -m fastcv bench` and `check` (fastcv/benchmarks/runner.py): failing cases
are reported and the run goes on; how it times a pair of functions. Also bench/conftest.py's CUDA
synchronisation (pytest-benchmark).

Timing is tested on a fake clock: each fake function advances it by a fixed cost, so batch sizes and
medians are exact and nothing depends on this machine's speed."""
import importlib.util
import io
import json
import pathlib

import pytest
import torch

from fastcv import __main__ as cli
from fastcv.benchmarks import Case, runner


class FakeClock:
    def __init__(self, monkeypatch):
        self.now = 0.0
        self.calls = []  # the name of every function called, in order
        monkeypatch.setattr(runner, "perf_counter", lambda: self.now)

    def fn(self, name, cost_s):
        def call(*args):
            self.calls.append(name)
            self.now += cost_s

        return call


def _case(fastcv, reference, check=torch.testing.assert_close, make=lambda: (torch.ones(3),), name="case"):
    return Case("demo", name, make=make, fastcv=fastcv, reference=reference, reference_name="demo reference",
                check=check)


def _rounds(calls, batch):
    """The timed calls after the two warm-up calls, one (first side, second side) pair per round."""
    timed = calls[2:]
    assert len(timed) % (2 * batch) == 0
    rounds = [timed[i:i + 2 * batch] for i in range(0, len(timed), 2 * batch)]
    for r in rounds:
        assert r[:batch] == [r[0]] * batch and r[batch:] == [r[batch]] * batch and r[0] != r[batch], r
    return [(r[0], r[batch]) for r in rounds]


def test_batch_size_is_set_by_the_faster_side_within_the_budget():
    assert runner.batch_size(1e-6, 2e-6, 0.3, 3) == 100  # both far below the timer's comfort: capped
    assert runner.batch_size(1e-4, 2e-4, 0.3, 3) == 10  # the faster side's sample lasts 1 ms
    assert runner.batch_size(1e-5, 2e-3, 0.3, 3) == 50  # three samples of the slower side fit in 0.3 s
    assert runner.batch_size(2e-3, 1.0, 0.3, 3) == 1


def test_both_sides_are_timed_in_batches_of_the_same_size(monkeypatch):
    clock = FakeClock(monkeypatch)
    case = _case(clock.fn("fastcv", 1e-5), clock.fn("reference", 2e-3))
    t_fast, t_ref = runner.time_pair(case, (), "cpu", budget_s=0.3)
    assert clock.calls[:2] == ["fastcv", "reference"]
    rounds = _rounds(clock.calls, runner.batch_size(1e-5, 2e-3, 0.3, 3))  # 50 calls of each per round
    assert len(rounds) >= 3
    assert t_fast == pytest.approx(1e-5) and t_ref == pytest.approx(2e-3)


def test_the_side_that_runs_first_alternates(monkeypatch):
    clock = FakeClock(monkeypatch)
    case = _case(clock.fn("fastcv", 1e-3), clock.fn("reference", 1e-3))
    runner.time_pair(case, (), "cpu", budget_s=0.02)
    rounds = _rounds(clock.calls, 1)
    assert len(rounds) == 10  # 2 ms a round until the 20 ms budget is spent
    assert rounds == [("fastcv", "reference"), ("reference", "fastcv")] * 5


def _boom(*args):
    raise RuntimeError("boom in fastcv")


def _mixed_cases(out=None):
    """A passing case, one that fails its check, one whose fastcv call raises, one whose inputs cannot be
    made. The second's inputs record what had been printed when it started (`seen`)."""
    seen = []

    def make_after_first():
        seen.append(out.getvalue() if out is not None else "")
        return (torch.ones(3),)

    double = lambda x: x * 2  # noqa: E731
    cases = [
        _case(double, lambda x: x + x, name="passes"),
        _case(lambda x: x * 3, lambda x: x + x, make=make_after_first, name="disagrees"),
        _case(_boom, lambda x: x + x, name="raises"),
        _case(double, double, make=lambda: 1 / 0, name="no inputs"),
    ]
    return cases, seen


@pytest.mark.parametrize("check_only", [False, True])
def test_failing_cases_are_reported_and_the_others_still_run(tmp_path, check_only):
    out = io.StringIO()
    cases, seen = _mixed_cases(out)
    path = tmp_path / "bench.json"
    rows = runner.run(cases=cases, quick=True, json_path=str(path), check_only=check_only, out=out)

    assert [(r["case"], r["status"], r.get("stage"), r["agrees"]) for r in rows] == [
        ("passes", "ok", None, True),
        ("disagrees", "mismatch", "check", False),
        ("raises", "error", "fastcv", None),
        ("no inputs", "error", "inputs", None),
    ]
    assert "passes" in seen[0]  # the passing row was printed before the next case began
    if not check_only:
        assert rows[0]["fastcv_s"] > 0 and rows[0]["reference_s"] > 0
        assert all("fastcv_s" not in r for r in rows[1:])
    text = out.getvalue()
    assert "FAILED (mismatch at check): AssertionError" in text
    assert "FAILED (error at fastcv): RuntimeError: boom in fastcv" in text
    assert "agree with their references" not in text

    results = json.loads(path.read_text())["results"]
    assert results == rows
    assert "Tensor-likes are not close" in results[1]["error"]
    assert results[2]["error"] == "RuntimeError: boom in fastcv"
    assert results[3]["error"].startswith("ZeroDivisionError")


def test_a_failing_timing_is_reported_after_the_check_passed():
    calls = []

    def fastcv(x):  # the check's call passes; the first timed call raises
        calls.append(1)
        if len(calls) > 1:
            raise MemoryError("out of memory while timing")
        return x

    (row,) = runner.run(cases=[_case(fastcv, lambda x: x)], out=io.StringIO())
    assert (row["status"], row["stage"], row["agrees"]) == ("error", "timing", True)
    assert "out of memory while timing" in row["error"]


@pytest.mark.parametrize("command", ["bench", "check"])
def test_cli_exits_non_zero_naming_the_failed_cases(monkeypatch, tmp_path, capsys, command):
    cases, _ = _mixed_cases()
    monkeypatch.setattr(runner, "all_cases", lambda device: cases)
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--quick"])
    message = str(exit_.value.code)  # a message, not 0: the process exits with status 1
    assert message.startswith(f"python -m fastcv {command}: 3 of 4 cases failed")
    for name in ("disagrees (mismatch at check)", "raises (error at fastcv)", "no inputs (error at inputs)"):
        assert f"demo: {name}" in message
    assert "demo: passes" not in message
    assert "passes" in capsys.readouterr().out


def test_cli_exits_normally_when_every_case_passes(monkeypatch, capsys):
    cases, _ = _mixed_cases()
    monkeypatch.setattr(runner, "all_cases", lambda device: cases[:1])
    cli.main(["check"])
    assert "1 cases agree with their references on cpu" in capsys.readouterr().out


def _bench_conftest():
    """bench/conftest.py, imported by path under its own name (tests/ has a conftest module of its own)."""
    path = pathlib.Path(__file__).parents[1] / "bench" / "conftest.py"
    spec = importlib.util.spec_from_file_location("fastcv_bench_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SaysCuda(torch.Tensor):
    """A CPU tensor that claims to be on a GPU, so that the CUDA detection is tested on any machine."""

    @property
    def is_cuda(self):
        return True


def _pyramid(tensor):
    """Multi-scale RoI Align's argument structure: feature maps by name, boxes per image, image sizes."""
    return {"p2": tensor(), "p3": tensor()}, [tensor(), tensor()], [(800, 1088), (800, 1088)]


def test_bench_conftest_finds_tensors_on_cuda_in_nested_arguments():
    on_cuda = _bench_conftest().on_cuda
    says_cuda = lambda: torch.zeros(1).as_subclass(SaysCuda)  # noqa: E731
    assert not on_cuda(_pyramid(lambda: torch.zeros(1)))
    assert on_cuda(_pyramid(says_cuda))
    assert on_cuda(({"p2": torch.zeros(1), "p3": says_cuda()}, [], []))  # one map is enough
    assert on_cuda(([torch.zeros(1), (says_cuda(),)],))
    assert not on_cuda((1.0, "x", None))


class FakeBenchmark:
    """pytest-benchmark's fixture, reduced to what run_case uses: one call of the timed function."""

    def __init__(self):
        self.extra_info = {}

    def __call__(self, fn, *args):
        return fn(*args)


def test_bench_conftest_synchronises_multi_scale_cases(monkeypatch):
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: syncs.append(1))
    case = _case(lambda *a: torch.zeros(1), lambda *a: torch.zeros(1),
                 make=lambda: _pyramid(lambda: torch.zeros(1).as_subclass(SaysCuda)))
    _bench_conftest().run_case(FakeBenchmark(), case, "fastcv")
    assert syncs == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_conftest_finds_real_cuda_tensors():
    on_cuda = _bench_conftest().on_cuda
    assert on_cuda(_pyramid(lambda: torch.zeros(1, device="cuda")))
