"""Fixtures of the model zoo: one module-scoped model per zoo case (pytest groups a case's tests, so one
model lives at a time), a per-case cache of conversions and runs, and a summary table at the end."""

from __future__ import annotations

import copy
import time
import warnings
from typing import Any, Callable, Dict, List

import pytest
import torch

from .models import ZOO, ZooCase

# Filled by the tests, printed by pytest_terminal_summary: case name -> column -> value.
ZOO_TABLE: Dict[str, Dict[str, Any]] = {}


class Failed:
    """A cached exception: every check that needs the value fails with the original error."""

    def __init__(self, what: str, exc: BaseException):
        self.what, self.exc = what, exc


class ZooModel:
    """A zoo case's pristine float64 model (never converted; checks deep-copy it) and a cache."""

    def __init__(self, case: ZooCase):
        self.case = case
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = case.model()
        self._memo: Dict[str, Any] = {}

    def copy(self) -> torch.nn.Module:
        return copy.deepcopy(self.model)

    def memo(self, key: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, computed once per case; an exception is cached too and re-raised on every use."""
        if key not in self._memo:
            try:
                self._memo[key] = fn()
            except Exception as e:  # noqa: BLE001 - re-raised to each check that needs it
                self._memo[key] = Failed(key, e)
        value = self._memo[key]
        if isinstance(value, Failed):
            raise AssertionError(f"{value.what} failed: {type(value.exc).__name__}: {value.exc}") from value.exc
        return value


def _ids(case: ZooCase) -> str:
    return case.name


@pytest.fixture(scope="module", params=ZOO, ids=_ids)
def zoo(request) -> ZooModel:
    case: ZooCase = request.param
    if case.unavailable:
        pytest.skip(f"{case.unavailable}: the zoo runs in the torch 2.14.1 + torchvision + timm leg")
    # One intra-op thread: on a shared 2-core machine two OpenMP threads spin-wait for each other and a
    # float64 forward+backward took 10-100x longer (CPU time) than with one; on a quiet machine one
    # thread costs at most 2x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start, start_cpu = time.perf_counter(), time.process_time()
    try:
        zm = ZooModel(case)
        yield zm
    finally:
        torch.set_num_threads(threads)
    row = ZOO_TABLE.setdefault(case.name, {})
    # CPU seconds (one thread: what a quiet machine takes) next to wall seconds (inflated by load).
    row["seconds"] = time.perf_counter() - start
    row["cpu_s"] = time.process_time() - start_cpu


def record(case: ZooCase, **values: Any) -> None:
    ZOO_TABLE.setdefault(case.name, {}).update(values)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not ZOO_TABLE:
        return
    cols = ["norms", "after_layer", "converted", "fallback", "skipped", "max_rel_err", "seconds", "cpu_s"]
    tr = terminalreporter
    tr.section("convbn model zoo (convert(model, 'tune'))")
    tr.write_line(f"{'model':46s} " + " ".join(f"{c:>11s}" for c in cols))
    totals: Dict[str, float] = {c: 0.0 for c in cols}
    for name in [c.name for c in ZOO if c.name in ZOO_TABLE]:
        row = ZOO_TABLE[name]
        cells = []
        for c in cols:
            v = row.get(c, "")
            if c in ("seconds", "cpu_s") and v != "":
                cells.append(f"{v:11.1f}")
            elif c == "max_rel_err" and v != "":
                cells.append(f"{v:11.1e}")
            else:
                cells.append(f"{v!s:>11s}")
            if isinstance(v, (int, float)) and c != "max_rel_err":
                totals[c] += v
        tr.write_line(f"{name:46s} " + " ".join(cells))
    tr.write_line(f"{'total':46s} " + " ".join(
        f"{totals[c]:11.1f}" if c in ("seconds", "cpu_s") else ("" if c == "max_rel_err" else f"{int(totals[c]):11d}")
        for c in cols))


def all_cases() -> List[ZooCase]:
    return list(ZOO)
