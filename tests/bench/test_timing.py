"""Deterministic parts of interleaved timing: call order, bookkeeping and ratio math (fake clocks)."""

from __future__ import annotations

import doctest
import json
from typing import Callable, Dict, List

import pytest

import convbn.bench.timing as timing_mod
from convbn.bench.timing import Ratio, TimingResult, interleaved_timings, round_orders


class FakeClock:
    """A clock that advances only when a variant 'runs' for a scripted duration."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_variants(clock: FakeClock, durations: Dict[str, List[float]], log: List[str]
                  ) -> Dict[str, Callable[[], None]]:
    """Each call of variant ``name`` logs itself and advances the clock by its next duration."""
    iters = {name: iter(ds) for name, ds in durations.items()}

    def make(name: str) -> Callable[[], None]:
        def run() -> None:
            log.append(name)
            clock.now += next(iters[name])
        return run

    return {name: make(name) for name in durations}


def test_docstring_examples_run() -> None:
    result = doctest.testmod(timing_mod)
    assert result.attempted >= 3 and result.failed == 0


def test_rotation_puts_each_variant_first_equally_often() -> None:
    orders = round_orders(["a", "b", "c"], 6)
    assert [o[0] for o in orders] == ["a", "b", "c", "a", "b", "c"]
    assert all(sorted(o) == ["a", "b", "c"] for o in orders)


def test_shuffle_is_seeded_permutation() -> None:
    one = round_orders(list("abcd"), 20, order="shuffle", seed=3)
    assert one == round_orders(list("abcd"), 20, order="shuffle", seed=3)
    assert one != round_orders(list("abcd"), 20, order="shuffle", seed=4)
    assert all(sorted(o) == list("abcd") for o in one)
    assert len(set(one)) > 1


def test_warmup_then_interleaved_rounds_call_order_and_times() -> None:
    clock, log = FakeClock(), []
    durations = {"a": [9.0, 9.0, 1.0, 2.0, 3.0], "b": [9.0, 9.0, 10.0, 20.0, 30.0]}
    res = interleaved_timings(make_variants(clock, durations, log), rounds=3, warmup=2,
                              clock=clock, collect_garbage=False)
    assert log == ["a", "b", "a", "b",  # warm-up
                   "a", "b", "b", "a", "a", "b"]  # rotated rounds
    assert res.orders == [("a", "b"), ("b", "a"), ("a", "b")]
    assert res.times == {"a": [1.0, 2.0, 3.0], "b": [10.0, 20.0, 30.0]}  # warm-ups not recorded
    assert res.median("a") == 2.0 and res.medians() == {"a": 2.0, "b": 20.0}


def test_ratio_is_per_round_then_summarised() -> None:
    # Round-wise ratios a/b: 1.0, 0.5, 2.0, 1.5, 1.0 -> median 1.0; the ratio of medians would be 1.2.
    res = TimingResult({"a": [1.0, 1.0, 4.0, 3.0, 5.0], "b": [1.0, 2.0, 2.0, 2.0, 5.0]})
    r = res.ratio("a", "b")
    assert isinstance(r, Ratio)
    assert r.values == (1.0, 0.5, 2.0, 1.5, 1.0)
    assert r.median == 1.0 and (r.low, r.high) == (0.5, 2.0)
    assert (r.q1, r.q3) == (1.0, 1.5) and r.iqr == 0.5
    assert res.ratio("b", "a").median == 1.0
    assert "1.000x" in str(r)


def test_quartiles_interpolate_linearly() -> None:
    res = TimingResult({"a": [1.0, 2.0, 3.0, 4.0], "b": [1.0] * 4})
    r = res.ratio("a", "b")
    assert (r.q1, r.median, r.q3) == (1.75, 2.5, 3.25)


def test_result_serialises_and_prints() -> None:
    res = TimingResult({"eval": [1.0, 3.0], "tune": [2.0, 2.0]}, orders=[("eval", "tune"), ("tune", "eval")])
    data = json.loads(json.dumps(res.to_dict()))
    assert data["medians"] == {"eval": 2.0, "tune": 2.0}
    assert data["orders"] == [["eval", "tune"], ["tune", "eval"]]
    text = str(res)
    assert "eval" in text and "tune" in text and "median" in text


def test_errors_name_the_problem_and_fix() -> None:
    with pytest.raises(ValueError, match="variants is empty"):
        interleaved_timings({})
    with pytest.raises(TypeError, match="'x' is a int, not a callable"):
        interleaved_timings({"x": 3})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="rounds must be an int >= 1"):
        interleaved_timings({"x": lambda: None}, rounds=0)
    with pytest.raises(ValueError, match="warmup must be an int >= 0"):
        interleaved_timings({"x": lambda: None}, warmup=-1)
    with pytest.raises(ValueError, match="'rotate' or 'shuffle'"):
        interleaved_timings({"x": lambda: None}, order="random")
    with pytest.raises(KeyError, match="variants timed are \\['a'\\]"):
        TimingResult({"a": [1.0]}).median("b")
    with pytest.raises(ValueError, match="took no time"):
        TimingResult({"a": [1.0], "b": [0.0]}).ratio("a", "b")


# ---------------------------------------------------------------- process-isolated timings
def _sleeper(seconds: float):  # factory: runs in the worker, returns the work to time
    import time as _time

    return lambda: _time.sleep(seconds)


def _pid_recorder(path: str):
    import os as _os

    def step():
        with open(path, "a") as f:
            f.write(f"{_os.getpid()}\n")
    return step


def _broken_factory():
    raise ValueError("cannot build this variant")


def test_isolated_timings_interleave_separate_processes(tmp_path):
    import functools
    import os

    from convbn.bench.timing import isolated_interleaved_timings

    paths = {k: str(tmp_path / f"{k}.txt") for k in ("a", "b")}
    res = isolated_interleaved_timings({"short": functools.partial(_sleeper, 0.005),
                                        "long": functools.partial(_sleeper, 0.03),
                                        "a": functools.partial(_pid_recorder, paths["a"]),
                                        "b": functools.partial(_pid_recorder, paths["b"])},
                                       rounds=4, warmup=1, threads=1)
    assert all(len(v) == 4 for v in res.times.values())
    assert res.orders[1] == ("long", "a", "b", "short")  # rotated
    assert res.ratio("long", "short").median > 2.5
    pids = {k: set(open(p).read().split()) for k, p in paths.items()}
    assert len(pids["a"]) == len(pids["b"]) == 1 and pids["a"] != pids["b"]  # one process per variant...
    assert str(os.getpid()) not in pids["a"] | pids["b"]  # ...and none is the parent


def test_isolated_timings_report_a_failing_variant():
    from convbn.bench.timing import isolated_interleaved_timings

    with pytest.raises(RuntimeError, match="'bad' failed in its worker process: ValueError: cannot build"):
        isolated_interleaved_timings({"bad": _broken_factory}, rounds=1, warmup=0, threads=1)
    with pytest.raises(ValueError, match="rounds"):
        isolated_interleaved_timings({"x": _broken_factory}, rounds=0)


def _allocator_checker(expected: dict):
    import os as _os

    seen = {k: _os.environ.get(k) for k in expected}
    if seen != expected:
        raise ValueError(f"worker malloc environment {seen}")
    return lambda: None


@pytest.mark.parametrize("steady", [True, False])
def test_isolated_workers_get_the_steady_allocator_and_the_parent_keeps_its_environment(steady, monkeypatch):
    import functools
    import os

    from convbn.bench.timing import STEADY_ALLOCATOR_ENV, isolated_interleaved_timings

    for k in STEADY_ALLOCATOR_ENV:
        monkeypatch.delenv(k, raising=False)
    expected = dict(STEADY_ALLOCATOR_ENV) if steady else {k: None for k in STEADY_ALLOCATOR_ENV}
    isolated_interleaved_timings({"w": functools.partial(_allocator_checker, expected)}, rounds=1, warmup=0,
                                 threads=1, steady_allocator=steady)
    assert all(k not in os.environ for k in STEADY_ALLOCATOR_ENV)


def test_first_step_log_collects_each_workers_seconds_and_drops_a_stale_file(tmp_path):
    out = tmp_path / "bench.json"
    stale = tmp_path / "bench.first_step.jsonl"
    stale.write_text(json.dumps({"old": 1.0}) + "\n")
    log = timing_mod.FirstStepLog(str(out))
    assert log.path == str(stale) and not stale.exists()
    calls: List[int] = []
    for name in ("compiled", "fission+compiled"):
        timing_mod.FirstStepLog.time_first_step(log.path, name, lambda: calls.append(1))
    seconds = log.read()
    assert sorted(seconds) == ["compiled", "fission+compiled"] and calls == [1, 1]
    assert all(s >= 0 for s in seconds.values()) and not stale.exists()
    assert log.read() == {}
