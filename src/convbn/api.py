"""Public entry points: ``convert``, ``revert``, ``report``, ``deploy``. Docstrings and dispatch only."""

from __future__ import annotations

import copy
import dataclasses
import difflib
from typing import Any, Callable, List, Optional

import torch
from torch import nn

from . import icf
from .lowmem import SavedRecipes
from .errors import ConvBNError
from .analysis import analyze
from .plan import MODES, BlockReport, Report, make_plan
from .runtime import INSTALLED_MODES, install, installed_block, make_block, uninstall
from .runtime.deploy import apply_fold, fold
from .runtime.guard import install_guards, remove_guards
from .sharding import check_not_sharded

__all__ = ["convert", "revert", "report", "deploy"]

_STATE = "_convbn_state"


class _State:
    """Kept in the model's ``__dict__`` (not a buffer, not in ``state_dict``)."""

    def __init__(self, report: Report, deployed: List[BlockReport]):
        self.report, self.deployed = report, deployed


def _check_model(model: Any, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"convbn.{fn} expects a torch.nn.Module, got {type(model).__name__}. "
                        f"Pass the model object itself, e.g. convbn.{fn}(model, ...)")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise ConvBNError(
            f"convbn.{fn} got a {type(model).__name__} wrapper. Convert the model before wrapping it, or pass "
            f"the wrapped model itself: convbn.{fn}(wrapper.module, ...)"
            + (" (DataParallel is not supported: its replicas would share convbn's per-module state; use "
               "DistributedDataParallel)" if isinstance(model, nn.DataParallel) else ""))
    if isinstance(model, torch.jit.ScriptModule):  # a wrapper too: its Python modules are gone
        raise ConvBNError(f"convbn.{fn} cannot change a TorchScript module ({type(model).__name__}); convert the "
                          f"eager model before torch.jit.script / torch.jit.trace")


def _check_mode(mode: Any) -> str:
    if not isinstance(mode, str) or mode.lower() not in MODES:
        hint = difflib.get_close_matches(str(mode).lower(), MODES, n=1)
        raise ConvBNError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}"
                          + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    return mode.lower()


def _state(model: nn.Module) -> Optional[_State]:
    return model.__dict__.get(_STATE)


def convert(
    model: nn.Module,
    mode: str,
    *,
    example_inputs: Any = None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    recompute: bool = False,
    fission: bool = False,
    low_memory: bool = False,
) -> nn.Module:
    """Put every Conv/Linear -> BatchNorm block of ``model`` into ``mode``, in place.

    Modes (paper Table 2):

    * ``"train"``: PyTorch's own behaviour -- BN follows ``model.train()`` / ``model.eval()``.
    * ``"eval"``: BN normalizes with its running statistics even under ``model.train()`` (statistics
      frozen; conv weight/bias and BN gamma/beta stay trainable) -- the "norm_eval" of fine-tuning.
    * ``"tune"``: eval's exact function and gradients, computed by folding the BN into the conv
      weight on the fly; saves only the conv input for backward (Deploy's memory).
    * ``"deploy"``: BN folded into the conv permanently (inference). The conv's ``weight`` and
      ``bias`` become new trainable Parameters holding the folded values and the BN module is
      replaced by ``nn.Identity`` -- so ``state_dict`` has the folded ``conv.weight``/``conv.bias``
      and no BN keys, and loading it into the original architecture fails loudly (missing keys)
      instead of applying the BN twice. Irreversible: ``revert`` raises.

    The model object, its class and attributes stay the user's. In train/eval/tune its
    ``state_dict`` keys, parameter names and parameter objects are unchanged (optimizers keep
    working); forward hooks still fire. In tune, the conv's forward hooks see the *block* output
    (already normalized) and the BN's hooks see that tensor pass through; in eval the conv is
    stock. Call again any time to switch modes (e.g. alternate train/tune, paper App. K).

    Two ways to make ``"train"`` cheaper, with PyTorch's exact train-mode semantics (batch
    statistics, running statistics and ``num_batches_tracked`` updated, ``momentum=None``):

    * ``recompute=True``: each Conv/Linear -> BN (-> ``nn.ReLU``) block is one autograd Function that
      saves only the conv input and per-channel vectors; backward recomputes the conv output.
    * ``fission=True``: every BN (-> ``nn.ReLU``) uses one-sweep, cancellation-free statistics, a
      single normalize+affine+ReLU pass and a split backward (C++ kernel, pure-torch fallback).

    The two cannot be combined (recompute already fuses the BN into its conv's Function). A fused
    ``nn.ReLU`` module becomes a pass-through (its hooks see the block output pass).

    ``fission=True, low_memory=True`` (for DenseNets): no BN(-ReLU) output and no channel
    concatenation is stored for backward; backward rebuilds a concatenation from its pieces (stored
    once) and a BN output from its input and the batch statistics (one normalize pass, bitwise the
    forward's values). O(L) instead of O(L^2) activation memory per dense block, like torchvision's
    ``memory_efficient=True`` but without recomputing any convolution (see :mod:`convbn.lowmem`).

    A block that cannot be folded runs in eval (``fallback``) when its BN has running statistics,
    otherwise stays plain PyTorch (``skipped``); :func:`report` says which and why.

    Args:
        model: any ``nn.Module``.
        mode: ``"train"``, ``"eval"``, ``"tune"`` or ``"deploy"``.
        example_inputs: optional input for ``model(...)`` (a Tensor, a tuple of positional args or
            a dict of kwargs). Needed when ``torch.fx`` cannot trace the model; also lets convbn prove
            that Linear -> BatchNorm1d inputs are 2-D.
        filter_fn: ``filter_fn(module, qualified_name) -> bool``, called with each block's
            Conv/Linear (or the BN, for a BN that follows no layer); ``False`` leaves the block
            alone: plain PyTorch, so under ``model.train()`` it uses and updates batch statistics
            (reported as ``skipped: not selected by filter_fn``).
        recompute: with ``mode="train"``: recompute the conv output in backward.
        fission: with ``mode="train"``: BN fission-n-fusion.
        low_memory: with ``fission=True``: recompute BN outputs and concatenations in backward
            instead of storing them.

    Returns:
        ``model`` itself (so ``model = convbn.convert(model, "tune")`` also works).

    Raises:
        ConvBNError: unknown mode, untraceable model without ``example_inputs``, example inputs that
            do not run, ``filter_fn`` raising, switching a deployed block, or a wrapper (DDP,
            DataParallel, TorchScript) instead of the model it wraps. The model is unchanged.
        TypeError: ``model`` is not an ``nn.Module``, or ``filter_fn`` is not callable / returns a
            non-bool.

    Example:
        >>> import convbn, torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        >>> x = torch.randn(2, 3, 16, 16)
        >>> expected = model.eval()(x)
        >>> _ = model.train()
        >>> _ = convbn.convert(model, "tune")
        >>> torch.allclose(model(x), expected, atol=1e-5)
        True
        >>> _ = convbn.revert(model)
    """
    _check_model(model, "convert")
    check_not_sharded(model, "convert")
    mode = _check_mode(mode)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable as filter_fn(module, qualified_name) -> bool, got "
                        f"{type(filter_fn).__name__}. Example: filter_fn=lambda m, name: name.startswith('backbone.')")
    variant = _train_variant(mode, recompute, fission)
    if not isinstance(low_memory, bool):
        raise TypeError(f"low_memory must be True or False, got {low_memory!r}")
    if low_memory and not fission:
        raise ConvBNError("low_memory=True recomputes fission BN outputs in backward: it needs "
                          "convbn.convert(model, 'train', fission=True, low_memory=True)")
    analysis = analyze(model, example_inputs)
    plan = make_plan(analysis, mode, filter_fn, variant)
    previously_deployed = _deployed_rows(model)
    newly_deployed: List[BlockReport] = []
    _apply(model, plan, mode, newly_deployed, analysis.volatile, low_memory)
    rows = previously_deployed + [r for _, r in plan]
    notes = analysis.notes + ([_LOW_MEMORY_NOTE] if low_memory else [])
    model.__dict__[_STATE] = _State(Report(rows, variant or mode, analysis.method, True, notes),
                                    previously_deployed + newly_deployed)
    _rescope_submodule_states(model)
    return model


def _prefixed(row: BlockReport, prefix: str) -> BlockReport:
    add = (lambda n: n if n is None else f"{prefix}.{n}") if prefix else (lambda n: n)
    return dataclasses.replace(row, conv=add(row.conv), bn=add(row.bn))


def _deployed_rows(model: nn.Module) -> List[BlockReport]:
    """Deployed blocks of ``model`` and of every submodule converted on its own, named from ``model``."""
    rows: List[BlockReport] = []
    for name, m in model.named_modules():
        sub = _state(m)
        if sub is not None:
            rows += [_prefixed(r, name) for r in sub.deployed if _prefixed(r, name) not in rows]
    return rows


def _rescope_submodule_states(model: nn.Module) -> None:
    """After converting ``model``, a submodule's own report is the part of this plan under it."""
    state = _state(model)
    for name, m in model.named_modules():
        if not name or _state(m) is None:
            continue
        cut = len(name) + 1
        inside = [dataclasses.replace(r, conv=r.conv[cut:] if r.conv and r.conv.startswith(name + ".") else r.conv,
                                      bn=r.bn[cut:]) for r in state.report.rows if r.bn.startswith(name + ".")]
        deployed = [r for r in inside if r.mode == "deploy"]
        m.__dict__[_STATE] = _State(Report(inside, state.report.requested_mode, state.report.method, True,
                                           state.report.notes), deployed)


def _live(model: nn.Module, report: Report) -> Report:
    """``report`` with every row checked against what is installed now (a later convert/revert of a
    submodule may have changed a block; a hook registered since, or a call that could not fold, makes a
    block run unfused)."""
    modules = dict(model.named_modules())
    rows, changed = [], False
    for r in report.rows:
        bn = modules.get(r.bn)
        if r.mode == "deploy" or bn is None:
            rows.append(r)
            continue
        block = installed_block(bn)
        live = block.mode if block is not None else ("train" if r.mode not in INSTALLED_MODES else None)
        if live is None or (r.mode in INSTALLED_MODES and live != r.mode):
            live = live or "train"
            rows.append(dataclasses.replace(r, mode=live, status="skipped" if live == "train" else r.status,
                                            reason=f"changed by a later convbn.convert/revert of a submodule: "
                                                   f"runs {live}"))
            changed = True
        elif block is not None and r.status == "converted" and block.live_reason():
            rows.append(dataclasses.replace(r, status="fallback", reason=block.live_reason()))
            changed = True
        else:
            rows.append(r)
    if not changed:
        return report
    return Report(rows, report.requested_mode, report.method, report.applied, report.notes)


def _train_variant(mode: str, recompute: Any, fission: Any) -> Optional[str]:
    for name, value in (("recompute", recompute), ("fission", fission)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if (recompute or fission) and mode != "train":
        which = "recompute" if recompute else "fission"
        raise ConvBNError(f"{which}=True applies to mode 'train' only (batch statistics); mode {mode!r} uses running "
                          f"statistics and tune already saves no BN input. Use convbn.convert(model, 'train', "
                          f"{which}=True)")
    if recompute and fission:
        raise ConvBNError("recompute=True and fission=True cannot be combined: recompute already computes the BN "
                          "(and ReLU) inside the conv's Function, so there is no separate BN left to fission. "
                          "Pick one: recompute for memory, fission for BN speed")
    return "train+recompute" if recompute else "train+fission" if fission else None


_LOW_MEMORY_NOTE = ("low_memory: BN outputs and concatenations are not stored for backward; backward rebuilds them "
                    "from the concatenated pieces and the batch statistics")


def _apply(model: nn.Module, plan, mode: str, deployed: List[BlockReport], volatile=frozenset(),
           low_memory: bool = False) -> None:
    """Install the plan; on any failure restore every instance forward and root hook as it was."""
    before = {id(m): (m, m.__dict__.get("forward")) for m in model.modules() if installed_block(m) is not None}
    cache = icf.StatsCache() if any(row.mode == "train+fission" for _, row in plan) else None
    if cache is not None and low_memory:
        cache.recipes = SavedRecipes()
    before_guards = [(m, dict(m._forward_pre_hooks), dict(m._forward_hooks),
                      dict(getattr(m, "_forward_hooks_always_called", {}))) for m in model.modules()]
    folds, blocks, undo_folds = [], [], []
    try:
        for m, _ in before.values():
            uninstall(m)
        icf.remove_root_hooks(model)
        remove_guards(model)
        for cand, row in plan:
            if row.mode in INSTALLED_MODES:
                blocks.append(make_block(cand, row.mode, cache))
                install(blocks[-1])
            elif row.mode == "deploy":
                folds.append((cand, row, fold(cand)))
        install_guards(model, blocks, volatile)
        if cache is not None:
            icf.install_root_hooks(model, cache)
        for cand, row, (weight, bias) in folds:  # the only parameter changes: last, each undoable
            undo_folds.append(apply_fold(model, cand, weight, bias))
    except BaseException:
        for undo in reversed(undo_folds):
            undo()
        for m in model.modules():
            uninstall(m)
        for m, fwd in before.values():
            m.__dict__["forward"] = fwd
        for m, pre, post, always in before_guards:  # hooks exactly as they were (ours and the user's, in order)
            for table, saved in ((m._forward_pre_hooks, pre), (m._forward_hooks, post),
                                 (getattr(m, "_forward_hooks_always_called", {}), always)):
                table.clear()
                table.update(saved)
        raise
    deployed.extend(row for _, row, _ in folds)


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert`: plain PyTorch modules again, parameters and buffers untouched.

    Raises ``ConvBNError`` (model unchanged) if any block was deployed: its BN was folded away.

    Example:
        >>> import convbn, torch
        >>> m = convbn.convert(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2)), "tune")
        >>> "forward" in convbn.revert(m)[0].__dict__
        False
    """
    _check_model(model, "revert")
    deployed = _deployed_rows(model)
    if deployed:
        names = ", ".join(f"`{r.conv}`" for r in deployed[:5])
        raise ConvBNError(
            f"cannot revert: {len(deployed)} block(s) were deployed ({names}...), which folded their BN into "
            f"the conv permanently. Reload the model from a checkpoint, or use convbn.deploy(model) next time: it "
            f"returns a folded copy and leaves the original intact")
    for m in model.modules():
        uninstall(m)
    icf.remove_root_hooks(model)
    remove_guards(model)
    for m in model.modules():
        m.__dict__.pop(_STATE, None)
    return model


def report(model: nn.Module, mode: Optional[str] = None, *, example_inputs: Any = None,
           filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, recompute: bool = False,
           fission: bool = False) -> Report:
    """The plan of ``model``'s conversion: one row per norm layer with its layer, mode, status, reason.

    For a converted model this is the plan :func:`convert` applied (pass no ``mode``, or the applied
    one). For a plain model it is what ``convert(model, mode or "tune", ...)`` *would* do, and nothing
    changes (a forward that updates buffers or attributes is undone). The arguments are
    :func:`convert`'s; ``report(model, "train", recompute=True)`` previews mode ``"train+recompute"``.

    Raises:
        ConvBNError: ``mode`` differs from the mode ``model`` is converted to (the report of a converted
            model is the applied plan; preview another mode on an unconverted copy).

    Example:
        >>> import convbn, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> convbn.report(m).rows[0].kind
        'Conv2d->BatchNorm2d'
    """
    _check_model(model, "report")
    state = _state(model)
    if state is not None:
        applied = state.report.requested_mode
        if mode is not None:
            checked = _check_mode(mode)
            asked = _train_variant(checked, recompute, fission) or checked
        if mode is not None and asked != applied:
            raise ConvBNError(
                f"report(model, {mode!r}): this model is converted to {applied!r}, and its report is the plan that was "
                f"applied. Call convbn.report(model) for it, or preview {mode!r} on an unconverted copy: "
                f"convbn.report(convbn.revert(copy.deepcopy(model)), {mode!r})")
        return _live(model, state.report)
    mode = _check_mode(mode if mode is not None else "tune")
    variant = _train_variant(mode, recompute, fission)
    check_not_sharded(model, "report")
    analysis = analyze(model, example_inputs)
    plan = make_plan(analysis, mode, filter_fn, variant)
    return Report([r for _, r in plan], variant or mode, analysis.method, False, analysis.notes)


def deploy(model: nn.Module, *, example_inputs: Any = None,
           filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> nn.Module:
    """A deep copy of ``model`` with every foldable BN folded into its conv; ``model`` is untouched.

    For "train in tune, ship deploy". The copy is put in ``eval()`` *before* converting (so a trace
    on ``example_inputs`` runs as inference does, e.g. with a batch of one) and stays in eval.

    Example:
        >>> import convbn, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
        >>> shipped = convbn.deploy(m)
        >>> type(shipped[1]).__name__, type(m[1]).__name__
        ('Identity', 'BatchNorm2d')
    """
    _check_model(model, "deploy")
    check_not_sharded(model, "deploy")
    return convert(copy.deepcopy(model).eval(), "deploy", example_inputs=example_inputs, filter_fn=filter_fn)
