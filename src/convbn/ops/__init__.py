"""convbn's kernels as ``torch.library`` ops in the ``convbn`` namespace (the pattern of torchao's C++ ops).

Each op (``torch.ops.convbn.<name>``) has a reference in torch ops (every device but the CPU, and the CPU
when the kernel does not apply or could not be built), a CPU implementation that calls the C++ kernel, and
a fake implementation for ``torch.compile``; eager mode and compiled graphs call the same ops. The autograd
Functions of :mod:`convbn.functions` are built on them (the ops themselves are not differentiated: each
Function calls its forward op in ``forward`` and its backward op in ``backward``).

* :mod:`convbn.ops.bn_fission`: ``bn_fission_stats``, ``bn_fission_forward``, ``bn_fission_backward``.
* :mod:`convbn.ops.tune`: ``tune_fold``, ``tune_refold``, ``tune_epilogue``.

The C++ sources are ``csrc/*.cpp`` (package data), built on first use or ahead of time::

    convbn build-kernels          # or: python -m convbn.ops build

:func:`use_extension` (context-local) forces the references (``"torch"``) or requires the kernels
(``"extension"``).
"""

from ._build import build_kernels, extension_mode, use_extension
from . import bn_fission, tune  # noqa: F401 (defines the ops)

__all__ = ["build_kernels", "extension_mode", "use_extension", "bn_fission", "tune"]
