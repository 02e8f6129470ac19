"""The one exception class convbn raises for problems with a model or a conversion."""

from __future__ import annotations

__all__ = ["ConvBNError"]


class ConvBNError(ValueError):
    """A model, its inputs or a requested conversion cannot be handled as asked.

    The message says what happened, why, and how to fix it. Subclasses ``ValueError`` so generic
    ``except ValueError`` handlers keep working. When ``convert`` raises it, the model is unchanged.
    """
