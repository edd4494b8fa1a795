"""The runner behind `python -m fastcv bench` (fastcv/benchmarks/runner.py): how it times a pair of functions.

Timing is tested on a fake clock: each fake function advances it by a fixed cost, so batch sizes and
medians are exact and nothing depends on this machine's speed."""
import pytest
import torch

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
