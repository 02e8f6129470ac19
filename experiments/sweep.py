"""The efficiency sweep of paper Table 6 / Figure 3 on CPU: modes x batch sizes x input sizes.

By default two one-dimensional sweeps that share their centre point (batch sizes at the middle
input size, input sizes at the middle batch size) -- what Figure 3 plots; ``grid=True`` measures
every combination.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from .common import (ExperimentError, Progress, input_shape, make_input, memory_format_for, mode_variants,
                     resolve_model)
from convbn.bench.compare import compare_modes, compare_ticks, format_table
from convbn.bench.stats import calibrate_if_untouched

__all__ = ["SweepConfig", "sweep_points", "run_sweep", "sweep_table", "CSV_COLUMNS"]


@dataclass
class SweepConfig:
    """Settings of :func:`run_sweep` (validated in ``__post_init__``)."""

    model: str = "small_resnet"
    batch_sizes: Tuple[int, ...] = (2, 4, 8, 16)
    input_sizes: Tuple[int, ...] = (32, 64, 96)
    modes: Optional[Tuple[str, ...]] = None
    dims: Optional[int] = None
    channels: Optional[int] = None
    dtype: str = "float32"
    channels_last: bool = False
    rounds: int = 3
    warmup: int = 1
    grid: bool = False
    check_errors: bool = False
    seed: int = 0
    notes: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("batch_sizes", "input_sizes"):
            vals = tuple(getattr(self, name))
            if not vals or any((not isinstance(v, int)) or v < 1 for v in vals):
                raise ExperimentError(f"{name} must be positive integers, got {vals!r}")
            setattr(self, name, vals)
        if self.rounds < 1 or self.warmup < 0:
            raise ExperimentError(f"rounds must be >= 1 and warmup >= 0, got rounds={self.rounds}, "
                                  f"warmup={self.warmup}")


def sweep_points(cfg: SweepConfig) -> Tuple[List[Tuple[int, int]], int, int]:
    """``(points, fixed_batch, fixed_size)``: the (batch, size) pairs to measure and the centre."""
    fixed_batch = cfg.batch_sizes[len(cfg.batch_sizes) // 2]
    fixed_size = cfg.input_sizes[len(cfg.input_sizes) // 2]
    if cfg.grid:
        pts = [(b, s) for s in cfg.input_sizes for b in cfg.batch_sizes]
    else:
        pts = [(b, fixed_size) for b in cfg.batch_sizes] + [(fixed_batch, s) for s in cfg.input_sizes]
    return list(dict.fromkeys(pts)), fixed_batch, fixed_size


def run_sweep(cfg: SweepConfig, progress: bool = True) -> Dict[str, Any]:
    """Measure every mode at every sweep point; returns a JSON-ready dict with ``records``.

    Example:
        >>> res = run_sweep(SweepConfig(batch_sizes=(2,), input_sizes=(8,), modes=("eval", "tune"), rounds=1,
        ...                             warmup=0), progress=False)
        >>> sorted(r["mode"] for r in res["records"])
        ['eval', 'tune']
    """
    from .common import parse_dtype

    variants, notes = mode_variants(cfg.modes)
    dtype = parse_dtype(cfg.dtype)
    model = resolve_model(cfg.model, in_channels=cfg.channels, dims=cfg.dims)
    points, fixed_batch, fixed_size = sweep_points(cfg)
    calib_shape = input_shape(cfg.model, max(2, min(cfg.batch_sizes)), input_size=min(cfg.input_sizes),
                              in_channels=cfg.channels, dims=cfg.dims)
    calibrated = calibrate_if_untouched(model, make_input(calib_shape, cfg.seed + 1))
    if calibrated:
        notes.append("BN statistics calibrated (the model was freshly initialised)")
    bar = Progress(len(points) * compare_ticks(len(variants), cfg.rounds), "bench", enabled=progress)
    records: List[Dict[str, Any]] = []
    for b, s in points:
        shape = input_shape(cfg.model, b, input_size=s, in_channels=cfg.channels, dims=cfg.dims)
        x = make_input(shape, cfg.seed, dtype)
        fmt = memory_format_for(x, cfg.channels_last)
        x = x.contiguous(memory_format=fmt)
        m = _copy_to(model, dtype, fmt)
        try:
            res = compare_modes(m, x, variants, rounds=cfg.rounds, warmup=cfg.warmup,
                                check_errors=cfg.check_errors, progress=bar)
        except RuntimeError as e:
            raise ExperimentError(f"measuring {cfg.model} at batch {b}, input {shape[2:]} failed: {e}. Try "
                                  f"smaller --batch-sizes / --input-sizes, or another --dtype") from None
        for r in res.rows:
            records.append({
                "batch_size": b, "input_size": s, "input_shape": list(shape), "mode": r.name,
                "saved_bytes": r.saved_bytes, "peak_bytes": r.peak_bytes, "median_s": r.median_s,
                "times_s": r.times_s, "time_ratio_vs_eval": r.time_ratio_vs_eval,
                "max_err_vs_eval": r.max_err_vs_eval, "blocks": r.blocks,
            })
    return {
        "experiment": "bench (paper Table 6 / Figure 3)",
        "config": {k: v for k, v in vars(cfg).items() if k != "notes"},
        "modes": [v.name for v in variants], "fixed_batch": fixed_batch, "fixed_size": fixed_size,
        "notes": notes + cfg.notes, "records": records,
    }


def _copy_to(model: torch.nn.Module, dtype: torch.dtype, fmt: torch.memory_format) -> torch.nn.Module:
    import copy

    m = copy.deepcopy(model).to(dtype)
    if fmt is not torch.contiguous_format:
        m = m.to(memory_format=fmt)
    return m


CSV_COLUMNS = ("batch_size", "input_size", "mode", "saved_bytes", "peak_bytes", "median_s",
               "time_ratio_vs_eval", "time_ratio_q1", "time_ratio_q3")


def csv_rows(result: Dict[str, Any]) -> List[List[Any]]:
    rows = []
    for r in result["records"]:
        ratio = r["time_ratio_vs_eval"] or {}
        rows.append([r["batch_size"], r["input_size"], r["mode"], r["saved_bytes"], r["peak_bytes"],
                     f"{r['median_s']:.6f}", ratio.get("median", ""), ratio.get("q1", ""), ratio.get("q3", "")])
    return rows


def sweep_table(result: Dict[str, Any]) -> str:
    """One line per (batch, size): peak MiB and median ms of each mode, and tune's ratios vs eval."""
    from .common import mib

    modes = result["modes"]
    by_point: Dict[Tuple[int, int], Dict[str, Dict[str, Any]]] = {}
    for r in result["records"]:
        by_point.setdefault((r["batch_size"], r["input_size"]), {})[r["mode"]] = r
    headers = ["batch", "size"] + [f"{m} MiB" for m in modes] + [f"{m} ms" for m in modes]
    has_ratio = "eval" in modes and "tune" in modes
    if has_ratio:
        headers += ["tune/eval mem", "tune/eval time (IQR)"]
    body = []
    for (b, s), rs in by_point.items():
        row = ([b, s] + [f"{mib(rs[m]['peak_bytes']):.1f}" for m in modes]
               + [f"{rs[m]['median_s'] * 1e3:.1f}" for m in modes])
        if has_ratio:
            t = rs["tune"]["time_ratio_vs_eval"]
            row += [f"{rs['tune']['peak_bytes'] / rs['eval']['peak_bytes']:.2f}",
                    f"{t['median']:.2f} ({t['q1']:.2f}-{t['q3']:.2f})"]
        body.append(row)
    return format_table(headers, body)
