"""``ConvBNCallback`` for Lightning (``import lightning``): convert the model when fit starts, and at fit end
optionally recalibrate its BatchNorm statistics and keep (or save) a deployed copy.

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

    import lightning.pytorch as pl
    from convbn.integrations.lightning import ConvBNCallback

    trainer = pl.Trainer(callbacks=[ConvBNCallback("tune", export_deployed=True)])
"""

from __future__ import annotations

from ._callback import make_callback, missing_framework

__all__ = ["ConvBNCallback"]

try:
    import lightning.pytorch as _pl
except ImportError as _error:  # the module imports without the framework; the callback needs it
    _pl, _missing = None, _error


if _pl is None:
    __getattr__ = missing_framework(__name__, "lightning", _missing)
else:
    ConvBNCallback = make_callback(_pl.Callback, __name__)
