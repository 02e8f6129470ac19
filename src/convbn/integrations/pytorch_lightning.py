"""``ConvBNCallback`` for the ``pytorch_lightning`` package (Lightning 2.x under its old name): the same callback
as :mod:`convbn.integrations.lightning` (see there), built on ``pytorch_lightning.Callback``::

    import pytorch_lightning as pl
    from convbn.integrations.pytorch_lightning import ConvBNCallback

    trainer = pl.Trainer(callbacks=[ConvBNCallback("tune", export_deployed=True)])
"""

from __future__ import annotations

from ._callback import make_callback, missing_framework

__all__ = ["ConvBNCallback"]

try:
    import pytorch_lightning as _pl
except ImportError as _error:  # the module imports without the framework; the callback needs it
    _pl, _missing = None, _error


if _pl is None:
    __getattr__ = missing_framework(__name__, "pytorch_lightning", _missing)
else:
    ConvBNCallback = make_callback(_pl.Callback, __name__)
