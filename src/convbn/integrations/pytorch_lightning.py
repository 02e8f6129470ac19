"""``ConvBNCallback`` for the ``pytorch_lightning`` package (Lightning 2.x under its old
name): convert the model when fit starts, and at fit end optionally recalibrate its BatchNorm statistics and
keep (or save) a deployed copy.

* Fit start (after every callback's ``setup``, e.g. ``BaseFinetuning``'s freeze, and after the model is on its
  device): ``convbn.convert(model, mode, filter_fn=...)``, ``mode="tune"`` by default. train/eval/tune keep the
  parameters, their names and ``state_dict`` keys, so the optimizer Lightning built keeps working and every
  checkpoint loads into the plain, unconverted model (``strict=True``).
* ``BaseFinetuning``: its ``freeze(train_bn=False)`` sets ``requires_grad=False`` (honoured as is) and
  ``track_running_stats=False`` on the frozen BNs; in eval/tune the statistics are frozen anyway, so those
  BNs are converted (their buffers are what eval normalizes with) and the flag is left as ``BaseFinetuning``
  set it. Unfreezing later changes nothing convbn depends on.
* Fit end: ``recalibrate_batches="train"`` (the train dataloader) or any iterable runs
  :func:`convbn.recalibrate`; ``export_deployed=True`` keeps ``convbn.deploy(model)`` in ``callback.deployed``,
  a path also saves it there with ``torch.save`` (on global rank 0; load with ``torch.load(path,
  weights_only=False)``). The trained model itself stays converted.

Usage (the runnable example is in ``docs/integrations/lightning.md``, run by the tests)::

    import pytorch_lightning as pl
    from convbn.integrations.pytorch_lightning import ConvBNCallback

    trainer = pl.Trainer(callbacks=[ConvBNCallback("tune", export_deployed=True)])
"""

from __future__ import annotations

from ._callback import ConvBNCallbackLogic, missing_framework

__all__ = ["ConvBNCallback"]

try:
    import pytorch_lightning as _pl
except ImportError as _error:  # the module imports without the framework; the callback needs it
    _pl, _missing = None, _error


if _pl is None:
    __getattr__ = missing_framework(__name__, "pytorch_lightning", _missing)
else:

    class ConvBNCallback(ConvBNCallbackLogic, _pl.Callback):
        """A Lightning ``Callback`` that runs the LightningModule's Conv->BN blocks in a convbn mode.

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
            >>> from convbn.integrations.pytorch_lightning import ConvBNCallback
            >>> ConvBNCallback("tune", filter_fn=lambda m, name: name.startswith("backbone.")).mode
            'tune'
        """
