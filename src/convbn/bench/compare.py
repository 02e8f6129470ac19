"""Modes side by side on one model and input: saved-for-backward bytes, peak live tensor bytes,
median step time (each mode in its own process, interleaved rounds) and the error against Eval mode.

One *step* is a forward and backward of ``sum(out * g)`` with a fixed random ``g``
(:class:`FixedProjectionLoss`); parameter gradients are reset before each step. Models run under
``model.train()``: in ``train`` the BNs use batch statistics, in ``eval``/``tune`` convbn keeps them
frozen, ``deploy`` has no BN left. This is what ``convbn`` and ``convbn bench SPEC`` print.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import convbn
from convbn.errors import ConvBNError

from .memory import saved_tensor_bytes
from .peak import peak_live_tensor_bytes
from .timing import isolated_interleaved_timings

__all__ = ["ModeVariant", "mode_variants", "convert_variant", "FixedProjectionLoss", "tensors_of", "max_rel_err",
           "ModeRow", "Comparison", "compare_modes", "compare_ticks", "format_table"]


def mib(nbytes: float) -> float:
    return nbytes / 2 ** 20


# ----------------------------------------------------------------------------------------- modes
@dataclass(frozen=True)
class ModeVariant:
    """One column of a comparison: a ``convbn.convert`` mode plus keyword options.

    Attributes:
        name: label in tables, e.g. ``"train+recompute"``.
        mode: the ``convbn.convert`` mode.
        options: extra keyword arguments for ``convbn.convert`` (e.g. ``{"recompute": True}``).
    """

    name: str
    mode: str
    options: Dict[str, Any] = field(default_factory=dict)

    @property
    def is_train(self) -> bool:
        return self.mode == "train"


# Train variants added to convbn.convert by keyword: (label, keyword).
_TRAIN_OPTIONS = (("train+recompute", "recompute"), ("train+fission", "fission"))


def mode_variants(modes: Optional[Sequence[str]] = None,
                  convert: Callable[..., Any] = convbn.convert) -> Tuple[List[ModeVariant], List[str]]:
    """The variants to compare and notes about the ones left out.

    Args:
        modes: names among ``train``, ``train+recompute``, ``train+fission``, ``eval``, ``tune``,
            ``deploy``. ``None``: all of them that ``convert`` supports.
        convert: the conversion function whose keywords decide which train variants exist
            (``convbn.convert``; injectable for tests).

    Returns:
        ``(variants, notes)``. A train variant whose keyword ``convert`` does not accept is left out
        with a note when ``modes`` is ``None`` and raises ``ValueError`` when asked for explicitly.

    Example:
        >>> [v.name for v in mode_variants(["eval", "tune"])[0]]
        ['eval', 'tune']
    """
    params = inspect.signature(convert).parameters
    every = [ModeVariant("train", "train")]
    notes = []
    unsupported = {}
    for label, kw in _TRAIN_OPTIONS:
        if kw in params:
            every.append(ModeVariant(label, "train", {kw: True}))
        else:
            unsupported[label] = kw
            notes.append(f"{label} skipped: this convbn.convert has no `{kw}=` option yet")
    every += [ModeVariant(m, m) for m in ("eval", "tune", "deploy")]
    if modes is None:
        return every, notes
    by_name = {v.name: v for v in every}
    chosen = []
    for name in modes:
        name = name.strip().lower()
        if name in unsupported:
            raise ValueError(f"mode {name!r} needs convbn.convert(..., {unsupported[name]}=True), which this "
                             f"version of convbn does not have; drop it from --modes or update convbn")
        if name not in by_name:
            raise ValueError(f"unknown mode {name!r}; choose from {', '.join(by_name)}")
        if by_name[name] not in chosen:
            chosen.append(by_name[name])
    if not chosen:
        raise ValueError("no modes selected; pass e.g. --modes eval,tune")
    return chosen, []


def convert_variant(model: nn.Module, variant: ModeVariant, example_inputs: Any = None) -> nn.Module:
    """``convbn.convert(model, variant.mode, **variant.options)``; retried with ``example_inputs``
    when ``torch.fx`` cannot trace the model."""
    try:
        return convbn.convert(model, variant.mode, **variant.options)
    except ConvBNError:
        if example_inputs is None:
            raise
        return convbn.convert(model, variant.mode, example_inputs=example_inputs, **variant.options)


# ---------------------------------------------------------------------------------------- numbers
def tensors_of(out: Any) -> List[torch.Tensor]:
    """The floating-point tensors in a model output (tensor, tuple, list or dict)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in tensors_of(o)]
    return []


class FixedProjectionLoss:
    """``sum(out_i * g_i)`` with fixed random ``g_i`` (drawn once from ``seed``): a loss whose gradient
    with respect to the output does not depend on the output, so every mode backpropagates the same
    signal.

    Example:
        >>> loss = FixedProjectionLoss(seed=0)
        >>> out = torch.ones(2, 3)
        >>> bool(loss(out) == loss(out.clone()))
        True
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._g: Optional[List[torch.Tensor]] = None

    def __call__(self, out: Any) -> torch.Tensor:
        ts = tensors_of(out)
        if not ts:
            raise ValueError("the model returned no floating-point tensor; the comparison needs a tensor "
                             "(or a tuple/list/dict of tensors) as output")
        if self._g is None:
            gen = torch.Generator().manual_seed(self.seed)
            self._g = [torch.randn(t.shape, generator=gen) / max(t.numel(), 1) ** 0.5 for t in ts]
        return sum((t.float() * g).sum() for t, g in zip(ts, self._g))


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|a - e| / max|e|``: a scale-aware error."""
    a, e = actual.detach().double(), expected.detach().double()
    denom = e.abs().max().clamp_min(1e-30)
    return float((a - e).abs().max() / denom)


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
                  progress: Optional[Callable[[str], None]] = None) -> Comparison:
    """Measure every variant on a deep copy of ``model`` (``model`` itself is not changed).

    Args:
        model: a plain (unconverted) model with the BN statistics to use; dtype / memory format
            already set like ``x``.
        x: the input batch.
        variants: from :func:`mode_variants`.
        rounds: timed rounds; each round runs every variant once (order rotates), each variant in its
            own process (:func:`~convbn.bench.timing.isolated_interleaved_timings`: ``model`` and ``x``
            are pickled to the workers, so the model's class must be importable). ``0``: no timing.
        warmup: untimed interleaved calls of each variant first.
        check_errors: also compute the output and input-gradient error against Eval mode.
        loss_seed: seed of the fixed projection ``g``.
        progress: called with a short label :func:`compare_ticks` times.

    Returns:
        A :class:`Comparison`.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> res = compare_modes(net, torch.randn(2, 3, 16, 16), mode_variants(["eval", "tune"])[0], rounds=0)
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
        rows[v.name] = ModeRow(v.name, v.mode, saved, peak, float("nan"), [], None, err_out, err_grad,
                               _block_counts(m))
        if progress is not None:
            progress(f"memory {v.name}")
    if rounds < 0 or warmup < 0:
        raise ValueError(f"rounds and warmup must be >= 0, got rounds={rounds}, warmup={warmup}")
    if rounds == 0:
        return Comparison(list(x.shape), str(x.dtype).replace("torch.", ""), rounds, warmup,
                          [rows[v.name] for v in variants])
    factories = {v.name: functools.partial(_variant_step, model, x, v, loss_seed) for v in variants}
    res = isolated_interleaved_timings(factories, rounds=rounds, warmup=warmup)
    if progress is not None:
        progress("timing")
    for name, row in rows.items():
        row.times_s = list(res.times[name])
        row.median_s = res.median(name)
        if "eval" in rows:
            r = res.ratio(name, "eval")
            row.time_ratio_vs_eval = {"median": r.median, "q1": r.q1, "q3": r.q3, "low": r.low, "high": r.high}
    return Comparison(list(x.shape), str(x.dtype).replace("torch.", ""), rounds, warmup,
                      [rows[v.name] for v in variants])


def compare_ticks(n_variants: int, rounds: int) -> int:
    """Progress ticks :func:`compare_modes` makes: one per variant measured, one for the timing."""
    return n_variants + (1 if rounds > 0 else 0)


def _variant_step(model: nn.Module, x: torch.Tensor, variant: ModeVariant, loss_seed: int) -> Callable[[], None]:
    """Builds one variant's timed step in its worker process (``model`` arrives pickled: a private copy)."""
    m = convert_variant(model, variant, example_inputs=x).train()
    return _make_step(m, x, FixedProjectionLoss(loss_seed))


def _out_and_input_grad(model: nn.Module, x: torch.Tensor, loss: Callable[[Any], torch.Tensor]):
    xr = x.detach().clone().requires_grad_(True)
    out = model(xr)
    (gx,) = torch.autograd.grad(loss(out), [xr])
    return torch.cat([t.detach().flatten().float() for t in tensors_of(out)]), gx.detach()
