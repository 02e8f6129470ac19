"""Interleaved wall-clock timing: medians and per-round ratios that survive machine drift.

Timing variant A for a while and then variant B lets thermal throttling, a noisy neighbour or a
frequency change land on one of them only. Here every round runs each variant once, in an order
that rotates (or is shuffled) from round to round, so drift hits all variants alike; the ratio of
two variants is taken *within* each round and then summarised across rounds.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ["Ratio", "TimingResult", "interleaved_timings", "isolated_interleaved_timings", "round_orders",
           "parameter_step", "add_benchmark_args", "FirstStepLog"]


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty sequence."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Ratio:
    """Summary over rounds of ``t_a / t_b`` (each ratio taken within one round).

    Attributes:
        median: median of the per-round ratios.
        low, high: smallest and largest per-round ratio.
        q1, q3: 25th and 75th percentiles (linear interpolation).
        values: the per-round ratios, in round order.
    """

    median: float
    low: float
    high: float
    q1: float
    q3: float
    values: Tuple[float, ...]

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def __str__(self) -> str:
        return f"{self.median:.3f}x (IQR {self.q1:.3f}-{self.q3:.3f}, range {self.low:.3f}-{self.high:.3f})"


@dataclass(frozen=True)
class TimingResult:
    """Per-round seconds of each variant, from :func:`interleaved_timings`.

    Attributes:
        times: variant name -> seconds of each round, in round order.
        orders: the order the variants ran in, for each round.
    """

    times: Dict[str, List[float]]
    orders: List[Tuple[str, ...]] = field(default_factory=list)

    def _series(self, name: str) -> List[float]:
        if name not in self.times:
            raise KeyError(f"no variant named {name!r}; the variants timed are {sorted(self.times)}")
        return self.times[name]

    def median(self, name: str) -> float:
        """Median seconds of variant ``name`` over the rounds."""
        return statistics.median(self._series(name))

    def medians(self) -> Dict[str, float]:
        """Median seconds of every variant."""
        return {name: self.median(name) for name in self.times}

    def ratio(self, a: str, b: str) -> Ratio:
        """Median and spread over rounds of ``t_a / t_b`` (> 1 means ``a`` is slower).

        Args:
            a: numerator variant.
            b: denominator variant (usually the baseline).

        Returns:
            A :class:`Ratio`.

        Example:
            >>> r = TimingResult({"new": [1.0, 2.0, 3.0], "old": [2.0, 2.0, 2.0]})
            >>> r.ratio("new", "old").median, r.ratio("new", "old").high
            (1.0, 1.5)
        """
        ta, tb = self._series(a), self._series(b)
        if any(t <= 0 for t in tb):
            raise ValueError(f"variant {b!r} has a round that took no time ({tb}); the clock is too "
                             f"coarse for it -- make each call do more work (e.g. loop inside it).")
        values = tuple(x / y for x, y in zip(ta, tb))
        return Ratio(median=statistics.median(values), low=min(values), high=max(values),
                     q1=_quantile(values, 0.25), q3=_quantile(values, 0.75), values=values)

    def to_dict(self) -> Dict[str, Any]:
        """Raw numbers and medians, ready for ``json.dump``."""
        return {"times": {k: list(v) for k, v in self.times.items()},
                "orders": [list(o) for o in self.orders],
                "medians": self.medians()}

    def __str__(self) -> str:
        width = max([len(n) for n in self.times] + [7])
        lines = [f"{'variant':<{width}}  median s   min s      max s"]
        for name, ts in self.times.items():
            lines.append(f"{name:<{width}}  {statistics.median(ts):<9.4g}  {min(ts):<9.4g}  {max(ts):<9.4g}")
        return "\n".join(lines)


def round_orders(names: Sequence[str], rounds: int, *, order: str = "rotate", seed: int = 0
                 ) -> List[Tuple[str, ...]]:
    """The order variants run in, for each round.

    Args:
        names: variant names.
        rounds: number of rounds.
        order: ``"rotate"`` (round ``r`` starts at variant ``r mod n``, so each variant is first
            equally often) or ``"shuffle"`` (a seeded random permutation per round).
        seed: seed for ``"shuffle"``.

    Returns:
        One tuple of names per round.

    Example:
        >>> round_orders(["a", "b", "c"], 4)
        [('a', 'b', 'c'), ('b', 'c', 'a'), ('c', 'a', 'b'), ('a', 'b', 'c')]
    """
    names = list(names)
    if order == "rotate":
        n = len(names)
        return [tuple(names[(r + i) % n] for i in range(n)) for r in range(rounds)]
    if order == "shuffle":
        rng = random.Random(seed)
        out = []
        for _ in range(rounds):
            perm = names[:]
            rng.shuffle(perm)
            out.append(tuple(perm))
        return out
    raise ValueError(f"order must be 'rotate' or 'shuffle', got {order!r}.")


def interleaved_timings(variants: Mapping[str, Callable[[], Any]], *, rounds: int = 10,
                        warmup: int = 2, order: str = "rotate", seed: int = 0,
                        clock: Callable[[], float] = time.perf_counter,
                        collect_garbage: bool = True) -> TimingResult:
    """Time several variants of the same work, interleaved round by round.

    Each variant is first called ``warmup`` times (untimed; warm-ups are interleaved too). Then
    every round calls each variant once, in the order given by :func:`round_orders`, and records
    its wall-clock seconds. Garbage is collected before each timed call (outside the timing) so a
    collection triggered by one variant is not billed to the next.

    Args:
        variants: name -> zero-argument callable doing one unit of work (e.g. one training step).
        rounds: timed rounds (>= 1); medians and ratios are over these.
        warmup: untimed calls of each variant before the first round (>= 0).
        order: ``"rotate"`` or ``"shuffle"``, see :func:`round_orders`.
        seed: seed for ``"shuffle"``.
        clock: returns seconds; injectable for tests.
        collect_garbage: run ``gc.collect()`` before each timed call.

    Returns:
        A :class:`TimingResult`; use ``.median(name)`` and ``.ratio(a, b)``.

    Example:
        >>> import torch
        >>> x = torch.randn(64, 64)
        >>> res = interleaved_timings({"mm": lambda: x @ x, "add": lambda: x + x}, rounds=3, warmup=1)
        >>> sorted(res.medians()), len(res.times["mm"]), res.ratio("mm", "add").median > 0
        (['add', 'mm'], 3, True)
    """
    if not variants:
        raise ValueError("variants is empty; pass a dict like {'eval': step_eval, 'tune': step_tune}.")
    for name, fn in variants.items():
        if not callable(fn):
            raise TypeError(f"variant {name!r} is a {type(fn).__name__}, not a callable; pass a "
                            f"zero-argument function, e.g. lambda: model(x).sum().backward().")
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}.")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}.")

    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()

    orders = round_orders(names, rounds, order=order, seed=seed)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for round_order in orders:
        for name in round_order:
            if collect_garbage:
                gc.collect()
            fn = variants[name]
            start = clock()
            fn()
            times[name].append(clock() - start)
    return TimingResult(times=times, orders=orders)


# glibc malloc: never mmap (so never munmap and fault pages back in), never trim the heap
STEADY_ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}


def _isolated_worker(conn, factory: Callable[[], Callable[[], Any]], threads: Optional[int]) -> None:
    try:
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        fn = factory()
        conn.send(("ready", None))
    except BaseException as exc:  # report, don't hang the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    while True:
        msg = conn.recv()
        if msg is None:
            return
        try:
            gc.collect()
            start = time.perf_counter()
            fn()
            conn.send(("ok", time.perf_counter() - start))
        except BaseException as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            return


def isolated_interleaved_timings(factories: Mapping[str, Callable[[], Callable[[], Any]]], *, rounds: int = 10,
                                 warmup: int = 2, order: str = "rotate", seed: int = 0,
                                 threads: Optional[int] = None, steady_allocator: bool = True) -> TimingResult:
    """:func:`interleaved_timings` with every variant in its own process.

    Variants that share a process share its memory allocator: one variant's allocation pattern can
    leave the heap in a state that makes another pay page faults (DenseNet121 training here: 0 vs
    ~5,000-9,000 minor faults per step depending on what ran before). Each variant here builds its
    work in a fresh ``spawn``-ed process; the parent still interleaves the rounds (only one process
    runs at a time), so machine drift hits all variants alike.

    Args:
        factories: name -> picklable zero-argument callable (a module-level function or a
            ``functools.partial`` of one) that builds the work *in the worker* and returns the
            zero-argument callable to time.
        rounds, warmup, order, seed: as :func:`interleaved_timings`.
        threads: ``torch.set_num_threads`` in every worker (default: the parent's count).
        steady_allocator: start the workers with glibc malloc told to keep freed memory
            (``MALLOC_MMAP_MAX_`` = 0: no allocation is served by a fresh ``mmap``, not even those
            above the 32 MiB cap of glibc's mmap threshold; ``MALLOC_TRIM_THRESHOLD_`` = 64 GiB: the
            heap is never trimmed), so a training step re-uses last step's pages instead of
            page-faulting fresh ones (ResNet-50 at 112 px has 51 MB activations: 20k-70k minor faults
            and ~10% sys time per step without it, ~0 with it). Every variant gets the same setting;
            this times the computation, as a production run with jemalloc/tcmalloc would see it.

    Returns:
        A :class:`TimingResult`.
    """
    import multiprocessing as mp

    if not factories:
        raise ValueError("factories is empty; pass a dict like {'eager': partial(build_step, 'eager')}.")
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}.")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}.")
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    ctx = mp.get_context("spawn")
    names = list(factories)
    conns, procs = {}, []
    env = STEADY_ALLOCATOR_ENV if steady_allocator else {}
    saved_env = {k: os.environ.get(k) for k in env}
    try:
        for name in names:  # built one after another: building never overlaps another worker
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_isolated_worker, args=(child, factories[name], threads), daemon=True)
            os.environ.update(env)  # read by the child's malloc at start-up
            try:
                proc.start()
            finally:
                for k, v in saved_env.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            procs.append(proc)
            conns[name] = parent
            _expect(parent, name, "ready")

        def run(name: str) -> float:
            conns[name].send("step")
            return _expect(conns[name], name, "ok")

        for _ in range(warmup):
            for name in names:
                run(name)
        orders = round_orders(names, rounds, order=order, seed=seed)
        times: Dict[str, List[float]] = {name: [] for name in names}
        for round_order in orders:
            for name in round_order:
                times[name].append(run(name))
        return TimingResult(times=times, orders=orders)
    finally:
        for conn in conns.values():
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


def _expect(conn, name: str, kind: str) -> Any:
    try:
        got, value = conn.recv()
    except EOFError:
        raise RuntimeError(f"variant {name!r}: its worker process died (out of memory, or a crash)") from None
    if got != kind:
        raise RuntimeError(f"variant {name!r} failed in its worker process: {value}")
    return value


def parameter_step(model: Any, x: Any) -> Callable[[], None]:
    """One training-style step to time or measure: ``model(x).sum().backward()`` with every
    parameter's ``.grad`` cleared first (so gradients never accumulate across repetitions).

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(3, 2)
        >>> step = parameter_step(m, torch.randn(4, 3))
        >>> step(); step()
        >>> m.weight.grad.shape
        torch.Size([2, 3])
    """
    params = list(model.parameters())

    def run() -> None:
        for p in params:
            p.grad = None
        model(x).sum().backward()

    return run


class FirstStepLog:
    """Seconds of each variant's first step (a ``torch.compile`` variant's compile time), reported by the
    variants' worker processes (:func:`isolated_interleaved_timings`) through a JSON-lines file.

    The parent creates it (removing a stale file) and hands :attr:`path`, a string, to the workers'
    factories; a worker calls :meth:`time_first_step`; the parent reads the seconds back with :meth:`read`,
    which removes the file.

    Example:
        >>> import tempfile, os
        >>> log = FirstStepLog(os.path.join(tempfile.mkdtemp(), "out.json"))
        >>> FirstStepLog.time_first_step(log.path, "compiled", lambda: None)
        >>> sorted(log.read()), os.path.exists(log.path)
        (['compiled'], False)
    """

    def __init__(self, out: str) -> None:
        root, _ = os.path.splitext(str(out))
        self.path = root + ".first_step.jsonl"
        if os.path.exists(self.path):
            os.remove(self.path)

    @staticmethod
    def time_first_step(path: str, variant: str, step: Callable[[], Any]) -> None:
        """Run ``step`` once (in a worker) and append ``{variant: seconds}`` to ``path``."""
        t0 = time.perf_counter()
        step()
        seconds = time.perf_counter() - t0
        with open(path, "a") as f:
            f.write(json.dumps({variant: seconds}) + "\n")

    def read(self) -> Dict[str, float]:
        """``{variant: seconds}`` of every worker that reported, and remove the file."""
        if not os.path.exists(self.path):
            return {}
        seconds: Dict[str, float] = {}
        with open(self.path) as f:
            for line in f:
                if line.strip():
                    seconds.update(json.loads(line))
        os.remove(self.path)
        return seconds


def add_benchmark_args(parser: Any, *, batch: int = 16, size: int = 112, rounds: int = 12, warmup: int = 2,
                       out: str = "") -> None:
    """The options every model-level benchmark script shares: --batch --size --rounds --warmup --out."""
    parser.add_argument("--batch", type=int, default=batch, help=f"batch size (default {batch})")
    parser.add_argument("--size", type=int, default=size, help=f"input height and width (default {size})")
    parser.add_argument("--rounds", type=int, default=rounds, help=f"interleaved timing rounds (default {rounds})")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"warm-up runs per variant (default {warmup})")
    parser.add_argument("--out", default=out, help=f"JSON output (default {out})")
