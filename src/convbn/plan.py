"""Analysis -> plan: the mode each block will run in, and why. The report the user sees *is* the plan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .errors import ConvBNError
from .analysis import Analysis, Candidate
from .norms import check_params

__all__ = ["MODES", "TRAIN_VARIANTS", "BlockReport", "Report", "make_plan"]

MODES = ("train", "eval", "tune", "deploy")
TRAIN_VARIANTS = ("train+recompute", "train+fission")
_RUNNING_STAT_MODES = ("eval", "tune", "deploy")

FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class BlockReport:
    """One row of the report: a norm layer, the layer before it, and what convbn does with them.

    Attributes:
        conv: qualified name of the Conv/Linear (``None`` if the norm does not follow one).
        bn: qualified name of the norm layer (BatchNorm, FrozenBatchNorm2d, timm BatchNormAct2d, ...).
        kind: e.g. ``"Conv2d->BatchNorm2d"``.
        mode: the mode the block actually runs in.
        status: ``"converted"`` (runs in the requested mode), ``"fallback"`` (runs in another mode
            with the same function, e.g. eval instead of tune; see ``reason``), ``"skipped"``
            (left as plain PyTorch; see ``reason``).
        reason: why it is not ``"converted"``, or a note; empty otherwise.
    """

    conv: Optional[str]
    bn: str
    kind: str
    mode: str
    status: str
    reason: str = ""


class Report:
    """The plan of a conversion: one :class:`BlockReport` per norm layer of the model, printable as a table.

    Example:
        >>> import convbn, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> print(convbn.report(convbn.convert(m, "tune")).rows[0].status)
        converted
    """

    def __init__(self, rows: List[BlockReport], requested_mode: str, method: str, applied: bool,
                 notes: Optional[List[str]] = None):
        self.rows: Tuple[BlockReport, ...] = tuple(rows)
        self.requested_mode = requested_mode
        self.method = method
        self.applied = applied
        self.notes = list(notes or [])

    def __iter__(self) -> Iterator[BlockReport]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def by_status(self, status: str) -> List[BlockReport]:
        return [r for r in self.rows if r.status == status]

    @property
    def converted(self) -> List[BlockReport]:
        return self.by_status("converted")

    @property
    def fallback(self) -> List[BlockReport]:
        """Rows that run in another mode with the same function (e.g. eval instead of tune)."""
        return self.by_status("fallback")

    @property
    def skipped(self) -> List[BlockReport]:
        """Rows left as plain PyTorch."""
        return self.by_status("skipped")

    def summary(self) -> str:
        counts = {s: len(self.by_status(s)) for s in ("converted", "fallback", "skipped")}
        head = (f"convbn: mode '{self.requested_mode}'" if self.applied
                else f"convbn (not converted; what convert(model, '{self.requested_mode}') would do)")
        return (f"{head}: {counts['converted']} converted, {counts['fallback']} fallback, "
                f"{counts['skipped']} skipped of {len(self.rows)} norm layers (found by {self.method})")

    def __str__(self) -> str:
        cols = ("conv", "bn", "kind", "mode", "status", "reason")
        table = [cols] + [(r.conv or "-", r.bn, r.kind, r.mode, r.status, r.reason) for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(5)]
        lines = [self.summary()]
        for row in table:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5])
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(line.rstrip() for line in lines)

    def __repr__(self) -> str:
        return f"<convbn.Report {self.summary()}>"


def _call_filter(filter_fn: FilterFn, module: nn.Module, name: str) -> bool:
    try:
        keep = filter_fn(module, name)
    except Exception as e:
        raise ConvBNError(
            f"filter_fn raised {type(e).__name__}: {e} when called as filter_fn({type(module).__name__}, {name!r}). "
            f"filter_fn(module, qualified_name) must return True to convert the block, False to leave it"
        ) from e
    if not isinstance(keep, bool):
        raise TypeError(
            f"filter_fn must return a bool, got {type(keep).__name__} ({keep!r}) for {name!r}. "
            f"Example: filter_fn=lambda module, name: name.startswith('backbone.')")
    return keep


def _running_stats_problem(cand: Candidate) -> Optional[str]:
    bn_name = cand.bn_name
    p = check_params(cand.bn, cand.norm, bn_name)
    if not getattr(cand.bn, "track_running_stats", True) or p.running_var is None or p.running_mean is None:
        return (f"`{bn_name}` has track_running_stats=False: it always normalizes with batch statistics, which "
                f"cannot be frozen or folded; it stays plain PyTorch")
    rv, rm = p.running_var.detach(), p.running_mean.detach()
    if rv.device.type == "meta":  # no values to check (and no host sync)
        return None
    if not bool(torch.isfinite(rv).all()) or not bool(torch.isfinite(rm).all()):
        return (f"`{bn_name}` has non-finite running statistics (NaN/inf), so its eval output would be NaN; "
                f"reload a good checkpoint or re-estimate the statistics in train mode")
    if bool((rv < 0).any()):
        return (f"`{bn_name}` has a negative running_var (min {rv.min().item():.3g}); a variance cannot be "
                f"negative, so this checkpoint is corrupt; reload it or re-estimate the statistics")
    return None


def _linear_rank_reason(cand: Candidate) -> Optional[str]:
    """Linear -> BatchNorm1d folds only on 2-D input (on 3-D input BatchNorm1d normalizes axis 1)."""
    if not isinstance(cand.conv, nn.Linear) or cand.layer_output_dim in (None, 2):
        return None
    return (f"`{cand.conv_name}` outputs {cand.layer_output_dim}-D tensors: BatchNorm1d then normalizes "
            f"axis 1, not the Linear's features, so folding would be wrong")


def _train_variant_row(cand: Candidate, variant: str) -> Tuple[str, str, str]:
    """(run mode, status, reason) of a block in ``train+recompute`` / ``train+fission``."""
    bn_name = cand.bn_name
    if isinstance(cand.bn, nn.SyncBatchNorm):
        return "train", "fallback", (f"`{bn_name}` is a SyncBatchNorm: its training statistics are all-reduced across "
                                     f"processes, which {variant} does not do -> runs plain train")
    if variant == "train+recompute":
        if cand.conv is None:
            return "train", "fallback", (f"`{bn_name}` does not follow a Conv/Linear, so there is no layer output to "
                                         f"recompute -> runs plain train")
        if cand.reason is not None:
            return "train", "fallback", f"{cand.reason} -> runs plain train"
        if cand.proven_by != "torch.fx":
            return "train", "fallback", f"{_unproven_reason(cand)} -> runs plain train"
        if _linear_rank_reason(cand):
            return "train", "fallback", f"{_linear_rank_reason(cand)} -> runs plain train"
    functional = cand.functional_relu if variant == "train+fission" else None
    note = (f"ReLU `{cand.relu_name}` fused" if cand.relu is not None
            else "its own ReLU fused" if cand.inner_relu is not None
            else f"{functional} after it fused (while ICF's recorder runs: for input shapes where it pays, "
                 f"see convbn.icf.RootHooks)" if functional else "")
    return variant, "converted", note


def make_plan(analysis: Analysis, mode: str, filter_fn: Optional[FilterFn],
              train_variant: Optional[str] = None) -> List[Tuple[Candidate, BlockReport]]:
    """Decide, for every norm layer found, the mode it will run in and why.

    Requested ``eval``/``tune``/``deploy``: a block that cannot be folded but whose BN has sound
    running statistics runs in ``eval`` (status ``fallback``), so the whole model computes the same
    function as ``convert(model, "eval")`` -- frozen statistics everywhere, never a silent mix.
    Requested ``train`` with ``train_variant`` (``"train+recompute"`` / ``"train+fission"``): blocks
    the variant cannot run stay plain ``train`` (``fallback``), which is the same function.
    """
    plan: List[Tuple[Candidate, BlockReport]] = []
    for cand in analysis.candidates:
        conv_name, bn_name, kind = cand.conv_name, cand.bn_name, cand.kind
        select_module, select_name = (cand.conv, conv_name) if cand.conv is not None else (cand.bn, bn_name)

        def row(run_mode: str, status: str, reason: str = "") -> None:
            plan.append((cand, BlockReport(conv_name, bn_name, kind, run_mode, status, reason)))

        if cand.norm is None:  # a norm layer convbn does not know (the analysis says why)
            row("train", "skipped", cand.reason or "")
            continue
        if filter_fn is not None and not _call_filter(filter_fn, select_module, select_name):
            row("train", "skipped", "not selected by filter_fn")
            continue
        if mode == "train":
            if train_variant is None:
                row("train", "converted")
            else:
                row(*_train_variant_row(cand, train_variant))
            continue
        problem = _running_stats_problem(cand)
        if problem:
            row("train", "skipped", problem)
            continue
        if mode == "eval":
            row("eval", "converted")
            continue
        reason = cand.reason
        if reason is None and isinstance(cand.conv, nn.Linear):
            reason = _linear_rank_reason(cand)
            if reason is None and mode == "deploy" and cand.layer_output_dim is None:
                reason = (f"Linear->BatchNorm1d `{conv_name}` can only be folded for 2-D input, and without "
                          f"example_inputs convbn cannot prove the input is 2-D; pass example_inputs")
        if reason is None and cand.proven_by != "torch.fx":
            reason = _unproven_reason(cand)
        if reason is None and mode == "deploy" and _hook_kinds(cand):
            reason = (f"{_hook_kinds(cand)}; deploy removes the norm (its hooks would be lost) and the conv would see "
                      f"folded values. Remove the hooks first, or use tune")
        if reason is None and mode == "deploy" and _is_parametrized(cand.conv):
            reason = (f"`{conv_name}`'s weight is parametrized (torch.nn.utils.parametrize); deploy replaces the "
                      f"weight. Call parametrize.remove_parametrizations first, or use tune")
        if reason is not None:
            row("eval", "fallback", f"{reason} -> runs in eval mode (same function, no saving)")
            continue
        row(mode, "converted")
    return plan


def _unproven_reason(cand: Candidate) -> str:
    return (f"only a run on example_inputs showed `{cand.conv_name}` feeding `{cand.bn_name}` alone (torch.fx cannot "
            f"trace this part); another input could take a branch that also reads the conv output, which no run-time "
            f"check can see once the norm is folded in. Move the data-dependent control flow out of the module that "
            f"holds them, so torch.fx can trace it")


def _hook_kinds(cand: Candidate) -> str:
    """Which hooks on the block's modules deploy could not keep ('' if none)."""
    found = []
    for name, m in ((cand.conv_name, cand.conv), (cand.bn_name, cand.bn)):
        kinds = [k for k, table in (("forward", m._forward_hooks), ("forward pre", m._forward_pre_hooks),
                                    ("backward", m._backward_hooks), ("backward pre", m._backward_pre_hooks))
                 if any(not getattr(h, "_convbn_guard", False) for h in table.values())]
        if kinds:
            found.append(f"`{name}` has {'/'.join(kinds)} hooks")
    return ", ".join(found)


def _is_parametrized(module: Optional[nn.Module]) -> bool:
    return module is not None and torch.nn.utils.parametrize.is_parametrized(module)
