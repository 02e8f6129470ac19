"""The Lightning callback's logic, independent of which package (``lightning`` or ``pytorch_lightning``)
provides the ``Callback`` base class. Imports no framework."""

from __future__ import annotations

import os
import types
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..api import _check_mode, convert, deploy
from ..calibration import AVERAGES, RecalibrationReport, recalibrate
from ..plan import Report

PathLike = Union[str, "os.PathLike[str]"]


@contextmanager
def _frozen_flags_as_tracked(model: nn.Module) -> Iterator[None]:
    """Lightning's ``BaseFinetuning.freeze(train_bn=False)`` marks a frozen BN with ``track_running_stats=False``
    (keeping its buffers) to mean "do not update the statistics". eval and tune never update them and normalize
    with exactly those buffers, so for the conversion such a BN counts as tracked; the flag is put back."""
    flipped = [m for m in model.modules() if isinstance(m, _BatchNorm) and not m.track_running_stats
               and m.running_mean is not None and m.running_var is not None]
    for m in flipped:
        m.track_running_stats = True
    try:
        yield
    finally:
        for m in flipped:
            m.track_running_stats = False


class ConvBNCallbackLogic:
    """Mixed into the framework's ``Callback`` by :mod:`convbn.integrations.lightning`; see ``ConvBNCallback``."""

    def __init__(
        self,
        mode: str = "tune",
        *,
        filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
        module: Optional[str] = None,
        example_inputs: Any = None,
        recompute: bool = False,
        fission: bool = False,
        low_memory: bool = False,
        recalibrate_batches: Union[None, str, Iterable[Any]] = None,
        recalibrate_num_batches: Optional[int] = None,
        recalibrate_average: str = "population",
        forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
        export_deployed: Union[bool, PathLike] = False,
    ) -> None:
        super().__init__()
        mode = _check_mode(mode)
        if mode == "deploy":
            raise ValueError("ConvBNCallback(mode='deploy') would fold the BNs into new conv Parameters that the "
                             "optimizer Lightning built does not hold. Train in 'tune' (or 'eval') and pass "
                             "export_deployed=True (or a path) to get the folded copy at fit end")
        if filter_fn is not None and not callable(filter_fn):
            raise TypeError(f"filter_fn must be callable as filter_fn(module, qualified_name) -> bool, got "
                            f"{type(filter_fn).__name__}")
        if module is not None and not isinstance(module, str):
            raise TypeError(f"module must be the attribute path of a submodule (e.g. 'model' or 'net.backbone') or "
                            f"None for the LightningModule itself, got {type(module).__name__}")
        if isinstance(recalibrate_batches, str) and recalibrate_batches != "train":
            raise ValueError(f"recalibrate_batches must be None, 'train' (the trainer's train dataloader) or an "
                             f"iterable of batches, got {recalibrate_batches!r}")
        if recalibrate_average not in AVERAGES:
            raise ValueError(f"recalibrate_average must be one of {AVERAGES}, got {recalibrate_average!r}")
        if not isinstance(export_deployed, (bool, str, os.PathLike)):
            raise TypeError(f"export_deployed must be True/False or a file path, got {type(export_deployed).__name__}")
        self.mode, self.filter_fn, self.module, self.example_inputs = mode, filter_fn, module, example_inputs
        self.recompute, self.fission, self.low_memory = recompute, fission, low_memory
        self.recalibrate_batches, self.recalibrate_num_batches = recalibrate_batches, recalibrate_num_batches
        self.recalibrate_average, self.forward_fn, self.export_deployed = recalibrate_average, forward_fn, \
            export_deployed
        self.report: Optional[Report] = None
        self.recalibration: Optional[RecalibrationReport] = None
        self.deployed: Optional[nn.Module] = None

    def target(self, pl_module: nn.Module) -> nn.Module:
        """The module this callback converts: ``pl_module`` or its submodule at ``self.module``."""
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError:
            raise AttributeError(
                f"ConvBNCallback(module={self.module!r}): {type(pl_module).__name__} has no submodule {self.module!r}; "
                f"its children are {[n for n, _ in pl_module.named_children()]}") from None

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        # after every callback's setup (BaseFinetuning freezes there) and after the model is on its device
        model = self.target(pl_module)
        ctx = _frozen_flags_as_tracked(model) if self.mode in ("eval", "tune") else _nothing()
        with ctx:
            convert(model, self.mode, example_inputs=self.example_inputs, filter_fn=self.filter_fn,
                    recompute=self.recompute, fission=self.fission, low_memory=self.low_memory)
        from ..api import report

        self.report = report(model)

    def on_fit_end(self, trainer: Any, pl_module: nn.Module) -> None:
        model = self.target(pl_module)
        if self.recalibrate_batches is not None:
            batches = trainer.train_dataloader if self.recalibrate_batches == "train" else self.recalibrate_batches
            if batches is None:
                raise ValueError("ConvBNCallback(recalibrate_batches='train'): the trainer has no train dataloader "
                                 "at fit end; pass the batches (an iterable / DataLoader) instead")
            device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
            self.recalibration = recalibrate(model, batches, num_batches=self.recalibrate_num_batches, progress=False,
                                             average=self.recalibrate_average,
                                             forward_fn=self.forward_fn or _default_forward(device))
        if self.export_deployed is not False:
            self.deployed = deploy(model)
            if not isinstance(self.export_deployed, bool) and getattr(trainer, "is_global_zero", True):
                torch.save(self.deployed, os.fspath(self.export_deployed))


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _default_forward(device: torch.device) -> Callable[[nn.Module, Any], Any]:
    """update_bn's convention (a Tensor, or a tuple/list whose first element is the input), moved to ``device``."""

    def forward(model: nn.Module, batch: Any) -> Any:
        if isinstance(batch, (list, tuple)) and batch:
            batch = batch[0]
        if isinstance(batch, dict):
            raise TypeError(f"ConvBNCallback cannot know which entries of a dict batch (keys "
                            f"{sorted(map(str, batch))}) are the model's input; pass "
                            f"forward_fn=lambda model, b: model(b['image'].to(device))")
        if isinstance(batch, torch.Tensor):
            batch = batch.to(device)
        return model(batch)

    return forward


def missing_framework(module: str, package: str, error: ImportError) -> Callable[[str], Any]:
    """The module ``__getattr__`` of an integration whose framework is not installed: importing the module
    works (so its docs and the doctest collection do), asking for the callback says what to install."""

    def __getattr__(name: str) -> Any:
        if name == "ConvBNCallback":
            raise ImportError(f"{module}.ConvBNCallback needs the `{package}` package ({error}). Install it with "
                              f"pip install {package} (it keeps your torch), or call convbn.convert in your own "
                              f"training loop")
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


_CALLBACK_DOC = """A Lightning ``Callback`` that runs the LightningModule's Conv->BN blocks in a convbn mode.

Args:
    mode: ``"tune"`` (default), ``"eval"`` or ``"train"`` (``"deploy"`` is refused: use ``export_deployed``).
    filter_fn: passed to :func:`convbn.convert` (``filter_fn(module, qualified_name) -> bool``, names
        relative to the converted module).
    module: attribute path of the submodule to convert (``"model"``, ``"net.backbone"``); default the
        LightningModule itself.
    example_inputs, recompute, fission, low_memory: passed to :func:`convbn.convert`.
    recalibrate_batches: ``None`` (default, no recalibration), ``"train"`` (the trainer's train dataloader)
        or an iterable of batches, for :func:`convbn.recalibrate` at fit end.
    recalibrate_num_batches, recalibrate_average: :func:`convbn.recalibrate`'s ``num_batches`` and ``average``.
    forward_fn: ``forward_fn(module, batch)`` for recalibration; default: the batch, or its first element,
        moved to the module's device.
    export_deployed: ``True``: ``callback.deployed = convbn.deploy(module)`` at fit end; a path: also
        ``torch.save`` it there.

Attributes:
    report: :func:`convbn.report` of the conversion (after fit start).
    recalibration: the :class:`convbn.RecalibrationReport` (after fit end, if recalibrated).
    deployed: the folded copy (after fit end, if ``export_deployed``).

Example:
    >>> from {module} import ConvBNCallback
    >>> ConvBNCallback("tune", filter_fn=lambda m, name: name.startswith("backbone.")).mode
    'tune'
"""


def make_callback(base: type, module: str) -> type:
    """``ConvBNCallback`` for one framework: :class:`ConvBNCallbackLogic` mixed into its ``Callback`` ``base``,
    documented (and doctested) as a class of ``module``."""
    namespace = {"__doc__": _CALLBACK_DOC.format(module=module), "__module__": module,
                 "__qualname__": "ConvBNCallback"}
    return types.new_class("ConvBNCallback", (ConvBNCallbackLogic, base), exec_body=lambda ns: ns.update(namespace))
