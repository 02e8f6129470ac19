"""Modes side by side on one model and input: saved-for-backward bytes, peak live tensor bytes,
median step time (interleaved rounds) and the error against Eval mode.

One *step* is a forward and backward of ``sum(out * g)`` with a fixed random ``g``
(:class:`~convbn.experiments.common.FixedProjectionLoss`); parameter gradients are reset before
each step. Models run under ``model.train()``: in ``train`` the BNs use batch statistics, in
``eval``/``tune`` convbn keeps them frozen, ``deploy`` has no BN left.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

import convbn
from convbn.bench.memory import saved_tensor_bytes
from convbn.bench.peak import peak_live_tensor_bytes
from convbn.bench.timing import interleaved_timings

from .common import FixedProjectionLoss, ModeVariant, Progress, convert_variant, max_rel_err, mib, tensors_of

__all__ = ["ModeRow", "Comparison", "compare_modes", "compare_ticks", "format_table"]


@dataclass
class ModeRow:
    """One mode's numbers. Bytes are exact for the run; times are seconds per step."""

    name: str
    mode: str
    saved_bytes: int
    peak_bytes: int
    median_s: float
    times_s: List[float]
    time_ratio_vs_eval: Optional[Dict[str, float]]  # median, q1, q3, low, high of per-round ratios
    err_out_vs_eval: Optional[float]
    err_grad_input_vs_eval: Optional[float]
    blocks: Dict[str, int] = field(default_factory=dict)  # converted / fallback / skipped counts

    @property
    def max_err_vs_eval(self) -> Optional[float]:
        errs = [e for e in (self.err_out_vs_eval, self.err_grad_input_vs_eval) if e is not None]
        return max(errs) if errs else None


@dataclass
class Comparison:
    """Result of :func:`compare_modes`."""

    input_shape: List[int]
    dtype: str
    rounds: int
    warmup: int
    rows: List[ModeRow]

    def row(self, name: str) -> ModeRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no mode {name!r}; have {[r.name for r in self.rows]}")

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        for r, rd in zip(self.rows, d["rows"]):
            rd["max_err_vs_eval"] = r.max_err_vs_eval
        return d

    def table(self) -> str:
        has_eval = any(r.name == "eval" for r in self.rows)
        ev = self.row("eval") if has_eval else None
        headers = ["mode", "saved MiB", "peak MiB", "peak/eval", "step ms", "time/eval (IQR)",
                   "err vs eval: out | dL/dx"]
        body = []
        for r in self.rows:
            ratio = r.time_ratio_vs_eval
            body.append([
                r.name, f"{mib(r.saved_bytes):.1f}", f"{mib(r.peak_bytes):.1f}",
                f"{r.peak_bytes / ev.peak_bytes:.2f}" if ev and ev.peak_bytes else "-",
                f"{r.median_s * 1e3:.1f}",
                f"{ratio['median']:.2f} ({ratio['q1']:.2f}-{ratio['q3']:.2f})" if ratio else "-",
                f"{r.err_out_vs_eval:.0e} | {r.err_grad_input_vs_eval:.0e}" if r.max_err_vs_eval is not None else "-",
            ])
        return format_table(headers, body)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table: first column left-aligned, the others right-aligned."""
    cells = [list(map(str, headers))] + [list(map(str, r)) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def fmt(row: List[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def _block_counts(model: nn.Module) -> Dict[str, int]:
    rep = convbn.report(model)
    return {s: len(rep.by_status(s)) for s in ("converted", "fallback", "skipped")}


def _make_step(model: nn.Module, x: torch.Tensor, loss: Callable[[Any], torch.Tensor]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        loss(model(x)).backward()

    return step


def compare_modes(model: nn.Module, x: torch.Tensor, variants: Sequence[ModeVariant], *, rounds: int = 5,
                  warmup: int = 1, check_errors: bool = True, loss_seed: int = 0,
                  progress: Optional[Progress] = None) -> Comparison:
    """Measure every variant on a deep copy of ``model`` (``model`` itself is not changed).

    Args:
        model: a plain (unconverted) model with the BN statistics to use; dtype / memory format
            already set like ``x``.
        x: the input batch.
        variants: from :func:`~convbn.experiments.common.mode_variants`.
        rounds: timed rounds; each round runs every variant once (order rotates).
        warmup: untimed interleaved calls of each variant first.
        check_errors: also compute the output and input-gradient error against Eval mode.
        loss_seed: seed of the fixed projection ``g``.
        progress: ticked :func:`compare_ticks` times.

    Returns:
        A :class:`Comparison`.

    Example:
        >>> from convbn.models import small_resnet
        >>> from convbn.experiments.common import mode_variants
        >>> res = compare_modes(small_resnet(), torch.randn(2, 3, 16, 16), mode_variants(["eval", "tune"])[0],
        ...                     rounds=1, warmup=0)
        >>> res.row("tune").saved_bytes < res.row("eval").saved_bytes
        True
    """
    loss = FixedProjectionLoss(loss_seed)
    models: Dict[str, nn.Module] = {}
    for v in variants:
        m = convert_variant(copy.deepcopy(model), v, example_inputs=x)
        models[v.name] = m.train()

    ref_out = ref_grad = None
    if check_errors:
        ref_model = models.get("eval")
        if ref_model is None:
            ref_model = convert_variant(copy.deepcopy(model), ModeVariant("eval", "eval"), example_inputs=x).train()
        ref_out, ref_grad = _out_and_input_grad(ref_model, x, loss)

    rows: Dict[str, ModeRow] = {}
    steps: Dict[str, Callable[[], None]] = {}
    for v in variants:
        m = models[v.name]
        err_out = err_grad = None
        if check_errors:
            out, gx = _out_and_input_grad(m, x, loss)
            err_out, err_grad = max_rel_err(out, ref_out), max_rel_err(gx, ref_grad)
        saved = saved_tensor_bytes(lambda: loss(m(x)))
        step = _make_step(m, x, loss)
        for p in m.parameters():
            p.grad = None
        _, peak = peak_live_tensor_bytes(step)
        steps[v.name] = step
        rows[v.name] = ModeRow(v.name, v.mode, saved, peak, float("nan"), [], None, err_out, err_grad,
                               _block_counts(m))
        if progress is not None:
            progress.update(f"memory {v.name}")

    timed = {name: _ticking(step, progress, name) for name, step in steps.items()}
    res = interleaved_timings(timed, rounds=rounds, warmup=warmup)
    for name, row in rows.items():
        row.times_s = list(res.times[name])
        row.median_s = res.median(name)
        if "eval" in rows:
            r = res.ratio(name, "eval")
            row.time_ratio_vs_eval = {"median": r.median, "q1": r.q1, "q3": r.q3, "low": r.low, "high": r.high}
    return Comparison(list(x.shape), str(x.dtype).replace("torch.", ""), rounds, warmup,
                      [rows[v.name] for v in variants])


def compare_ticks(n_variants: int, rounds: int, warmup: int) -> int:
    """Progress ticks :func:`compare_modes` makes: one per variant measured, one per timed call."""
    return n_variants * (1 + rounds + warmup)


def _ticking(step: Callable[[], None], progress: Optional[Progress], name: str) -> Callable[[], None]:
    if progress is None:
        return step

    def run() -> None:
        step()
        progress.update(f"timing {name}")

    return run


def _out_and_input_grad(model: nn.Module, x: torch.Tensor, loss: Callable[[Any], torch.Tensor]):
    xr = x.detach().clone().requires_grad_(True)
    out = model(xr)
    (gx,) = torch.autograd.grad(loss(out), [xr])
    return torch.cat([t.detach().flatten().float() for t in tensors_of(out)]), gx.detach()
