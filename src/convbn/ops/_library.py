"""The ``convbn`` operator namespace and the helper that defines each op.

Ops are defined with ``torch.library.Library`` (``define`` + ``impl``) rather than
``torch.library.custom_op``: the same dispatcher entry, fake implementation and ``torch.compile``
support, at ~5 us per eager call instead of ~20-30 us (Python wrapping around the dispatcher), which
matters for ops called once per layer and direction.

Each op has:
  * a reference implementation in torch ops -- what every device but the CPU runs (registered as
    ``CompositeExplicitAutograd``, and explicitly for ``Meta``, so a ``meta`` run executes it and
    proves it has no host synchronisation);
  * a CPU implementation that calls the C++ kernel when it applies (dtype, layout, kernel built,
    ``use_extension``) and the reference otherwise;
  * a fake implementation (shapes and dtypes only) for ``FakeTensor`` / ``torch.compile``.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["define_op"]

LIBRARY = torch.library.Library("convbn", "DEF")


def define_op(schema: str, reference: Callable, cpu: Callable, fake: Callable):
    """Define ``convbn::<schema>`` with its reference, CPU and fake implementations; returns the op."""
    name = schema.split("(", 1)[0]
    LIBRARY.define(schema)
    LIBRARY.impl(name, reference, "CompositeExplicitAutograd")
    LIBRARY.impl(name, cpu, "CPU")
    torch.library.register_fake(f"convbn::{name}", fake, lib=LIBRARY)
    LIBRARY.impl(name, reference, "Meta")  # after register_fake (which registers the fake for Meta too)
    return getattr(torch.ops.convbn, name).default
