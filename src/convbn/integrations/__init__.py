"""Optional integrations with training frameworks. Each submodule imports its framework; ``import convbn``
imports none of them.

* :mod:`convbn.integrations.lightning` -- ``ConvBNCallback`` for ``lightning.pytorch`` (Lightning 2.x).
* :mod:`convbn.integrations.pytorch_lightning` -- the same callback for the ``pytorch_lightning`` package.
"""
