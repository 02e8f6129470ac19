"""``convbn::bn_relu_train_native``: BN fission's train-mode forward and backward as one C++ dispatcher op
with its autograd formula registered in C++ (``csrc/bn_fission_native.cpp``).

Why: the ``convbn::bn_fission_*`` ops are called from a Python ``autograd.Function`` and reach their
kernel through a Python CPU implementation and ``ctypes``: ~50 us of interpreter work per layer and
direction. At DenseNet sizes a layer's kernels take 10-100 us, so that overhead decided whether fission
beat eager PyTorch. This op runs the same kernels (the source is ``#include``-d, so the arithmetic is one
and the results are bit for bit the ctypes path's) with everything around them in C++: one dispatcher call
forward, one C++ autograd node backward.

It is an eager-mode fast path, not a new function: :func:`convbn.functions.bn_fission.bn_relu_train`
calls it only where the kernels apply (the CPU, float32/float64, contiguous or channels-last input,
contiguous float32/float64 parameters and buffers, a float momentum) outside ``torch.compile`` and
``torch.func``, and the ``convbn::bn_fission_*`` ops everywhere else (every other device, ``meta``,
compiled graphs, transforms, ``use_extension("torch")``). ``create_graph=True`` differentiates PyTorch's
own BN backward ops, as the Python Function does.

The library is built against the installed torch's headers (``-std=c++20``, its C++ ABI), cached like the
other kernels (key: both sources, the flags, the torch version, the CPU's features) and built ahead of
time by ``convbn build-kernels``; without a compiler it warns once and the Python path runs.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from ._build import CSRC, TorchOpLibrary

__all__ = ["LIB", "op"]

LIB = TorchOpLibrary("bn_fission_native", os.path.join(CSRC, "bn_fission_native.cpp"), {},
                     "BN fission autograd", includes=[os.path.join(CSRC, "bn_fission.cpp")])


def op() -> Optional[Callable]:
    """``torch.ops.convbn.bn_relu_train_native`` once the library is loaded (built on the first call),
    else ``None`` (``use_extension("torch")``, or no build)."""
    return torch.ops.convbn.bn_relu_train_native.default if LIB.get() else None
