"""Deterministic memory measures: bytes saved for backward."""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import torch

from ..lowmem import OBSERVER

__all__ = ["saved_tensor_bytes"]


def _storage_key(t: torch.Tensor) -> Tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def saved_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of all storages autograd saves for backward while ``fn()`` runs.

    Every tensor packed by ``torch.autograd.graph.saved_tensors_hooks`` is counted by its storage,
    and each storage once (a view of a stored tensor, or a parameter saved by two ops, adds
    nothing). Parameters count too: they are what every mode saves alike.

    Args:
        fn: runs the forward pass (whose graph is kept alive by the returned value).

    Returns:
        The byte count. Deterministic: may be asserted in tests.

    Example:
        >>> conv = torch.nn.Conv2d(3, 8, 3, bias=False)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> saved_tensor_bytes(lambda: conv(x))  # conv saves x and its weight
        2400
    """
    storages: Dict[Tuple[str, int], int] = {}
    alive = []  # keep every packed tensor alive so a freed storage's address is never reused

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            storages.setdefault(_storage_key(t), t.untyped_storage().nbytes())
            alive.append(t)
        return t

    # convbn's low_memory hooks, pushed inside this forward, call ``pack`` with every tensor their stored
    # objects keep alive (an observer: its return value is not what they store)
    setattr(pack, OBSERVER, True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()  # the result (and with it the graph) is dropped on return, with ``alive``
    return sum(storages.values())
