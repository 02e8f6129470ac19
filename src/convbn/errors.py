"""The one exception class convbn raises for problems with a model or a conversion."""

from __future__ import annotations

import os
import sys

__all__ = ["ConvBNError", "user_stacklevel"]


class ConvBNError(ValueError):
    """A model, its inputs or a requested conversion cannot be handled as asked.

    The message says what happened, why, and how to fix it. Subclasses ``ValueError`` so generic
    ``except ValueError`` handlers keep working. When ``convert`` raises it, the model is unchanged.
    """


def user_stacklevel() -> int:
    """``stacklevel`` for a warning issued by the caller of this function that points at the first frame
    outside convbn and torch: the user's line (a forward, ``loss.backward()``, ...)."""
    import torch

    dirs = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                 for m in (sys.modules["convbn"], torch) if getattr(m, "__file__", None))
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(dirs):
        frame, level = frame.f_back, level + 1
    return level
