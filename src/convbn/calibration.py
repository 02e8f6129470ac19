"""Re-estimate BatchNorm running statistics on data, on a model in any convbn mode: ``recalibrate``.

Why a converted model needs this: in eval and tune the statistics are frozen even under ``model.train()``
(that is those modes' point), so ``torch.optim.swa_utils.update_bn`` -- which resets every BN and runs
the model in ``train()`` -- leaves them at their reset values (mean 0, variance 1). ``recalibrate`` runs
the model with each block's plain PyTorch forward for the duration of the call (convbn's instance
forwards are set aside and put back), so every recalibrated norm normalizes with its batch statistics,
exactly as ``update_bn`` does on a plain model, and nothing else about the model changes.

The statistics (``average=``):

* ``"population"`` (default): the exact statistics of each norm's input over every sample and position of
  every batch: ``mean = sum(x) / N`` and the unbiased ``var = sum((x - mean)**2) / (N - 1)``, ``N`` the
  total count per channel (accumulated in float64 with Chan's pairwise update, so neither the batch size
  nor the split into batches changes the result). With one batch this equals PyTorch's own update.
* ``"per_batch"``: PyTorch's ``momentum=None`` cumulative average -- the plain mean over batches of each
  batch's mean and unbiased variance, what ``torch.optim.swa_utils.update_bn`` and fvcore's precise BN
  store. It leaves out the spread of the batch means: for ``B`` batches of ``n`` values the population
  variance is ``((n - 1) * sum_b var_b + n * sum_b (mean_b - mean)**2) / (n * B - 1)``, this one
  ``sum_b var_b / B``; and batches of different sizes weigh the same.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import ConvBNError
from .norms import check_params, is_norm_layer, norm_kind, norm_type, unsupported_reason
from .runtime.base import InstalledForward
from .sharding import sharding_of

__all__ = ["recalibrate", "RecalibrationReport", "NormChange"]

AVERAGES = ("population", "per_batch")
_DROPOUT_NAMES = ("DropPath", "DropBlock2d", "DropBlock")  # timm's stochastic depth / DropBlock (not imported)


@dataclass(frozen=True)
class NormChange:
    """One norm layer of a :class:`RecalibrationReport`.

    Attributes:
        name: qualified name of the norm layer.
        kind: its class, as :func:`convbn.report` shows it (``"BatchNorm2d"``).
        status: ``"recalibrated"`` or ``"skipped"`` (statistics untouched; see ``reason``).
        reason: why it was skipped; empty otherwise.
        mean_change: ``max |new running_mean - old running_mean|`` over channels (NaN when skipped).
        var_change: ``max |new running_var / old running_var - 1|`` over channels (NaN when skipped).
        count: input values seen per channel (samples x positions).

    Example:
        >>> import convbn, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 1), torch.nn.BatchNorm1d(3))
        >>> convbn.recalibrate(m, [torch.randn(4, 2, 5)], progress=False).rows[0].count
        20
    """

    name: str
    kind: str
    status: str
    reason: str = ""
    mean_change: float = math.nan
    var_change: float = math.nan
    count: int = 0


class RecalibrationReport:
    """What :func:`recalibrate` did: one :class:`NormChange` per norm layer, printable as a table.

    Example:
        >>> import convbn, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> r = convbn.recalibrate(m, [torch.randn(2, 3, 8, 8)], progress=False)
        >>> r["1"].status, r.num_batches
        ('recalibrated', 1)
    """

    def __init__(self, rows: List[NormChange], num_batches: int, average: str):
        self.rows: Tuple[NormChange, ...] = tuple(rows)
        self.num_batches, self.average = num_batches, average

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, name: str) -> NormChange:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no norm layer named {name!r} in this report; names: {[r.name for r in self.rows]}")

    @property
    def recalibrated(self) -> List[NormChange]:
        return [r for r in self.rows if r.status == "recalibrated"]

    @property
    def skipped(self) -> List[NormChange]:
        return [r for r in self.rows if r.status == "skipped"]

    def summary(self) -> str:
        return (f"convbn.recalibrate ({self.average}): {len(self.recalibrated)} recalibrated, {len(self.skipped)} "
                f"skipped of {len(self.rows)} norm layers, {self.num_batches} batches")

    def __str__(self) -> str:
        table = [("norm", "kind", "status", "max|d mean|", "max|d var|/var", "reason")]
        for r in self.rows:
            done = r.status == "recalibrated"
            table.append((r.name, r.kind, r.status, f"{r.mean_change:.3g}" if done else "-",
                          f"{r.var_change:.3g}" if done else "-", r.reason))
        widths = [max(len(row[i]) for row in table) for i in range(5)]
        lines = [self.summary()] + ["  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5]
                                    for row in table]
        return "\n".join(line.rstrip() for line in lines)

    def __repr__(self) -> str:
        return f"<convbn.RecalibrationReport {self.summary()}>"


class _Population:
    """Exact per-channel count, mean and sum of squared deviations of a norm's input (float64, Chan et al.)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Optional[Tensor] = None
        self.m2: Optional[Tensor] = None

    def __call__(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if not isinstance(x, Tensor) or x.dim() < 2:
            return
        dims = [0] + list(range(2, x.dim()))
        n = x.numel() // x.shape[1]
        if n == 0:
            return
        x64 = x.detach().to(torch.float64)
        mean = x64.mean(dims)
        m2 = (x64 - mean.view([1, -1] + [1] * (x.dim() - 2))).square().sum(dims)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total


def _targets(model: nn.Module) -> Tuple[List[Tuple[str, nn.Module]], List[NormChange]]:
    """The norm layers whose statistics are re-estimated, and the rows of those that are not (with the reason)."""
    targets, skipped = [], []
    for name, m in model.named_modules():
        if not is_norm_layer(m):
            continue
        entry = norm_type(m)
        kind = norm_kind(m)
        if entry is None:
            skipped.append(NormChange(name, kind, "skipped", unsupported_reason(m, name)))
        elif entry.frozen:
            skipped.append(NormChange(name, kind, "skipped", (
                f"`{name}` is a frozen norm ({entry.name}): it never normalizes with batch statistics, so there is "
                f"nothing to re-estimate; its statistics are part of its weights. Replace it with a BatchNorm to "
                f"recalibrate it")))
        else:
            p = check_params(m, entry, name)
            if p.running_mean is None or p.running_var is None:
                skipped.append(NormChange(name, kind, "skipped", (
                    f"`{name}` has no running statistics (built with track_running_stats=False): it always "
                    f"normalizes with batch statistics")))
            else:
                targets.append((name, m))
    return targets, skipped


def _call(model: nn.Module, batch: Any, forward_fn: Optional[Callable[[nn.Module, Any], Any]]) -> None:
    if forward_fn is not None:
        forward_fn(model, batch)
        return
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise TypeError("recalibrate got an empty list/tuple as a batch; each batch must be a Tensor or a "
                            "(input, ...) tuple/list whose first element is the model's input")
        batch = batch[0]
    if isinstance(batch, dict):
        raise TypeError(
            f"recalibrate got a dict batch (keys {sorted(map(str, batch))}); it cannot know which entries are the "
            f"model's inputs. Pass forward_fn, e.g. forward_fn=lambda model, b: model(b['image'])")
    model(batch)


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: Optional[int] = None,
    progress: bool = True,
    average: str = "population",
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
) -> RecalibrationReport:
    """Re-estimate every BatchNorm's running mean and variance on ``batches``, in place, in any convbn mode.

    One forward per batch under ``torch.no_grad()``, with every recalibrated norm normalizing with its batch
    statistics (as ``torch.optim.swa_utils.update_bn`` and fvcore's precise BN do: each norm sees its input as
    the model computes it with batch-normalized layers upstream). Dropout modules (``nn.Dropout*``, timm
    ``DropPath``/``DropBlock``) are off; every other module keeps its ``train()``/``eval()`` state. The model
    stays converted (eval, tune, train, ``recompute=``/``fission=``): convbn's installed forwards are set
    aside for the call and put back, so hooks, parameters (bitwise), parameter objects and ``state_dict``
    keys are untouched. Afterwards every module's ``training`` flag, ``momentum`` and
    ``track_running_stats`` are as before -- also when a forward raises, and then the statistics too.

    What is re-estimated: every norm convbn recognises with batch statistics (``nn.BatchNorm1d/2d/3d``,
    ``SyncBatchNorm``, timm ``BatchNormAct2d``, your ``register_norm(..., frozen=False)`` types), whether
    converted or not, including one whose ``track_running_stats`` was switched off after construction
    (Lightning's ``BaseFinetuning.freeze``). Skipped, with the reason in the report: frozen norms
    (FrozenBatchNorm2d: fixed statistics by definition), norms without running statistics, norms convbn
    does not recognise, and a norm the forward never called (its statistics stay as they were).
    ``num_batches_tracked`` counts the batches, as after ``update_bn``.

    Args:
        model: the model, plain or converted. A model with deployed blocks raises: their statistics are
            already folded into the conv weights (recalibrate first, then ``convbn.deploy``).
        batches: an iterable (a ``DataLoader``); each batch is a Tensor passed as ``model(batch)``, or a
            tuple/list whose first element is (``update_bn``'s convention). Anything else: ``forward_fn``.
        num_batches: use at most this many batches (``None``: all).
        progress: print a progress line per batch to stderr.
        average: ``"population"`` (default): the exact mean and unbiased variance over all ``N`` values of
            each channel (``sum((x - mean)**2) / (N - 1)``); ``"per_batch"``: PyTorch's ``momentum=None``
            average of the per-batch means and unbiased variances (equal to ``update_bn`` on a plain model).
        forward_fn: ``forward_fn(model, batch)`` runs the model on one batch (e.g. a dict batch).

    Returns:
        A :class:`RecalibrationReport`: per norm layer, the status, the reason if skipped, and the change.

    Raises:
        ConvBNError: ``batches`` is empty; the model has deployed blocks or no norm to recalibrate; a
            SyncBatchNorm in a multi-process group with ``average="population"``; a sharded (FSDP) model.
        ValueError / TypeError: bad ``num_batches``, ``average`` or batch type.

    Example:
        >>> import convbn, torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        >>> _ = convbn.convert(model, "tune")
        >>> data = [torch.randn(4, 3, 8, 8) for _ in range(3)]
        >>> report = convbn.recalibrate(model, data, progress=False)
        >>> report.recalibrated[0].name
        '1'
        >>> x = torch.cat(data)
        >>> y = torch.nn.functional.conv2d(x, model[0].weight, model[0].bias)
        >>> torch.allclose(model[1].running_mean, y.mean((0, 2, 3)), atol=1e-6)
        True
    """
    from .api import _check_model, _deployed_rows  # api imports nothing from here

    _check_model(model, "recalibrate")
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None (all batches), got {num_batches!r}")
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(f"forward_fn must be callable as forward_fn(model, batch), got {type(forward_fn).__name__}")
    if isinstance(batches, (Tensor, dict)):
        raise TypeError(f"batches must be an iterable of batches (a DataLoader, a list of tensors), got one "
                        f"{type(batches).__name__}; wrap a single batch in a list: [batch]")
    deployed = _deployed_rows(model)
    if deployed:
        raise ConvBNError(
            f"cannot recalibrate: {len(deployed)} block(s) were deployed (e.g. `{deployed[0].conv}`), so their BN "
            f"statistics are folded into the conv weights and the BN is gone. Recalibrate the model before "
            f"deploying it: convbn.recalibrate(model, batches); shipped = convbn.deploy(model)")
    if sharding_of(model) is not None:
        raise ConvBNError(
            f"cannot recalibrate a sharded model ({sharding_of(model)}): each process would estimate the statistics "
            f"of its own data only. Recalibrate the unsharded model (e.g. loaded from a full state dict) in one "
            f"process, before sharding it")
    targets, skipped = _targets(model)
    if not targets:
        raise ConvBNError("recalibrate found no norm layer with running statistics to re-estimate"
                          + (": " + "; ".join(r.reason for r in skipped[:3]) if skipped else
                             " (the model has no BatchNorm layers)"))
    if average == "population":
        for name, m in targets:
            if isinstance(m, nn.SyncBatchNorm) and torch.distributed.is_available() and \
                    torch.distributed.is_initialized() and torch.distributed.get_world_size(m.process_group) > 1:
                raise ConvBNError(
                    f"`{name}` is a SyncBatchNorm in a process group of {torch.distributed.get_world_size()} "
                    f"processes: its forward normalizes with global batch statistics, but average='population' "
                    f"estimates from this process's inputs. Use average='per_batch' (SyncBatchNorm then averages "
                    f"the global batch statistics), or recalibrate in one process")

    modules = list(model.modules())
    training = [(m, m.training) for m in modules]
    forwards = [(m, m.__dict__["forward"]) for m in modules if isinstance(m.__dict__.get("forward"), InstalledForward)]
    saved = []
    for name, m in targets:
        p = check_params(m, norm_type(m), name)
        nbt = getattr(m, "num_batches_tracked", None)
        saved.append((name, m, p, p.running_mean.detach().clone(), p.running_var.detach().clone(),
                      None if nbt is None else nbt.detach().clone(), m.momentum,
                      getattr(m, "track_running_stats", True)))
    populations: Dict[nn.Module, _Population] = {m: _Population() for _, m in targets}
    handles = []
    seen = 0
    ok = False
    try:
        for m, fwd in forwards:  # the plain PyTorch forward of every block for the duration of the call
            del m.__dict__["forward"]
        for m in modules:
            if isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__ in _DROPOUT_NAMES:
                m.eval()
        for name, m, p, *_ in saved:
            with torch.no_grad():
                p.running_mean.zero_()
                p.running_var.fill_(1.0)
                if getattr(m, "num_batches_tracked", None) is not None:
                    m.num_batches_tracked.zero_()
            m.momentum = None
            if isinstance(m, _BatchNorm):
                m.track_running_stats = True
            m.train()
            handles.append(m.register_forward_pre_hook(populations[m]))
        with torch.no_grad():
            for batch in islice(batches, num_batches):
                _call(model, batch, forward_fn)
                seen += 1
                if progress:
                    total = f"/{num_batches}" if num_batches is not None else ""
                    print(f"\rconvbn.recalibrate: batch {seen}{total}", end="", file=sys.stderr, flush=True)
        if progress and seen:
            print(file=sys.stderr, flush=True)
        if seen == 0:
            raise ConvBNError("recalibrate got no batches: `batches` is empty (an exhausted iterator, an empty "
                              "DataLoader?). Pass an iterable with at least one batch")
        rows = _finish(saved, populations, average)
        ok = True
    finally:
        for h in handles:
            h.remove()
        for m, fwd in forwards:
            m.__dict__["forward"] = fwd
        for m, flag in training:
            m.training = flag
        for name, m, p, mean, var, nbt, momentum, track in saved:
            m.momentum = momentum
            if isinstance(m, _BatchNorm):
                m.track_running_stats = track
            if not ok:  # a failed call leaves the statistics as they were
                _restore(m, p, mean, var, nbt)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return RecalibrationReport(sorted(rows + skipped, key=lambda r: order.get(r.name, 0)), seen, average)


def _restore(m: nn.Module, p, mean: Tensor, var: Tensor, nbt: Optional[Tensor]) -> None:
    with torch.no_grad():
        p.running_mean.copy_(mean)
        p.running_var.copy_(var)
        if nbt is not None:
            m.num_batches_tracked.copy_(nbt)


def _finish(saved, populations: Dict[nn.Module, _Population], average: str) -> List[NormChange]:
    rows = []
    for name, m, p, mean, var, nbt, _, _ in saved:
        pop = populations[m]
        kind = norm_kind(m)
        if pop.mean is None:
            _restore(m, p, mean, var, nbt)
            rows.append(NormChange(name, kind, "skipped", (
                f"`{name}` was not called by the model's forward on these batches; its statistics are unchanged")))
            continue
        if average == "population":
            if pop.count < 2:
                raise ConvBNError(f"`{name}` saw {pop.count} value per channel in all batches; the unbiased variance "
                                  f"needs at least 2. Pass more or larger batches")
            with torch.no_grad():
                p.running_mean.copy_(pop.mean)
                p.running_var.copy_(pop.m2 / (pop.count - 1))
        new_mean, new_var = p.running_mean.detach(), p.running_var.detach()
        mean_change = float((new_mean.double() - mean.double()).abs().max())
        var_change = float((new_var.double() / var.double() - 1).abs().max())
        rows.append(NormChange(name, kind, "recalibrated", "", mean_change, var_change, pop.count))
    return rows
