"""Deterministic memory measure: peak bytes of live tensor storages (not process RSS).

``LiveTensorMeter`` is a ``TorchDispatchMode``: every aten op run while it is active -- the forward,
the autograd engine's backward ops (``ones_like`` for the seed gradient, ``*_backward`` kernels,
gradient accumulation) and factory ops such as ``torch.empty`` -- passes through it. Each output
whose storage is neither already tracked nor the storage of one of the op's inputs is a new
allocation: its ``nbytes`` is added once, and a ``weakref.finalize`` on the storage (whose Python
object PyTorch keeps alive exactly as long as the storage itself) subtracts it when the storage is
freed. Views, ``detach`` and in-place ops therefore allocate nothing, and a storage shared by many
views is counted once.

What it cannot see: workspace that kernels allocate internally without returning it (e.g. oneDNN
scratch buffers), allocator caching/fragmentation, and tensors without a storage (sparse, opaque
MKL-DNN tensors). Pre-existing storages (parameters, inputs) are not part of ``peak``; pass them as
``baseline`` to have their bytes reported separately.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple, Union

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorMeter", "peak_live_tensor_bytes", "storage_bytes"]

BaselineItem = Union[torch.Tensor, torch.nn.Module, Iterable[Any]]


def _storage(t: torch.Tensor) -> Optional[torch.UntypedStorage]:
    """The tensor's untyped storage, or ``None`` for tensors without real memory behind them."""
    if t.device.type == "meta" or t.is_sparse:
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # opaque/mkldnn/nested/functional tensors
        return None


def _iter_tensors(items: Iterable[Any]) -> Iterable[torch.Tensor]:
    for item in items:
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, torch.nn.Module):
            yield from item.parameters()
            yield from item.buffers()
        elif isinstance(item, dict):
            yield from _iter_tensors(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            yield from _iter_tensors(item)
        else:
            raise TypeError(
                f"baseline items must be tensors, nn.Modules or (nested) lists/tuples/dicts of them; "
                f"got {type(item).__name__}. Pass e.g. baseline=(model, x)."
            )


def storage_bytes(*items: BaselineItem) -> int:
    """Bytes of the distinct storages behind some tensors and modules, each storage counted once.

    Args:
        *items: tensors, ``nn.Module`` s (their parameters and buffers) or nested lists/tuples/dicts
            of them.

    Returns:
        The sum of ``nbytes`` over distinct storages (a view adds nothing to its base).

    Example:
        >>> x = torch.zeros(10)
        >>> storage_bytes(x, x[2:], x.view(2, 5))
        40
    """
    seen: Dict[int, int] = {}
    for t in _iter_tensors(items):
        s = _storage(t)
        if s is not None:
            seen.setdefault(id(s), s.nbytes())
    return sum(seen.values())


class LiveTensorMeter(TorchDispatchMode):
    """Context manager that tracks bytes of tensor storages allocated while it is active.

    Attributes (valid during and after the ``with`` block):
        peak: most bytes of storages allocated inside the block that were alive at the same time.
        current: bytes of those storages alive now (frozen at exit).
        baseline: bytes of the distinct storages of the ``baseline`` objects, taken at entry.
        peak_total: ``baseline + peak``.
        allocated: total bytes ever allocated inside the block (a freed-and-reallocated buffer
            counts twice).
        num_allocations: number of storages allocated inside the block.
        peak_op: name of the aten op whose output set the peak, e.g. ``"aten.mm.default"``.

    Args:
        baseline: optional tensors / modules that exist before the block (parameters, inputs);
            their bytes are reported as ``baseline``, never mixed into ``peak``.

    Example:
        >>> x = torch.zeros(1000)             # 4000 bytes, allocated before the meter
        >>> with LiveTensorMeter(baseline=x) as meter:
        ...     a = x + 1                     # +4000
        ...     b = a * 2                     # +4000 -> 8000 live
        ...     del a                         # -4000
        ...     c = b.view(10, 100)           # a view allocates nothing
        >>> meter.peak, meter.current, meter.baseline
        (8000, 4000, 4000)
    """

    def __init__(self, baseline: BaselineItem = ()) -> None:
        super().__init__()
        self._baseline_items = baseline
        self.baseline = 0
        self.peak = 0
        self.current = 0
        self.allocated = 0
        self.num_allocations = 0
        self.peak_op: Optional[str] = None
        self._sizes: Dict[int, int] = {}  # id(storage) -> bytes counted for it
        self._finalizers: List[weakref.finalize] = []
        self._active = False

    @property
    def peak_total(self) -> int:
        return self.baseline + self.peak

    def __enter__(self) -> "LiveTensorMeter":
        self.baseline = storage_bytes(self._baseline_items)
        self.peak = self.current = self.allocated = self.num_allocations = 0  # reusable meter
        self.peak_op = None
        self._active = True
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            # Storages still alive (outputs, .grad) must not call back into a finished meter.
            self._active = False
            for f in self._finalizers:
                f.detach()
            self._finalizers.clear()
            self._sizes.clear()

    def _free(self, key: int) -> None:
        if self._active:
            self.current -= self._sizes.pop(key, 0)

    def _track(self, s: torch.UntypedStorage, op_name: str) -> None:
        key = id(s)
        nbytes = s.nbytes()
        old = self._sizes.get(key)
        if old is None:
            self._sizes[key] = nbytes
            self.num_allocations += 1
            self.allocated += nbytes
            self.current += nbytes
            # The finalizer holds the key only: referencing ``s`` would keep it alive forever.
            self._finalizers.append(weakref.finalize(s, self._free, key))
        elif old != nbytes:  # resized in place (resize_, out= ops growing their output)
            self._sizes[key] = nbytes
            self.current += nbytes - old
            self.allocated += max(nbytes - old, 0)
        else:
            return
        if self.current > self.peak:
            self.peak = self.current
            self.peak_op = op_name

    def __torch_dispatch__(self, func: Any, types: Any, args: Tuple[Any, ...] = (),
                           kwargs: Optional[Dict[str, Any]] = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs, _ = tree_flatten((args, kwargs))
        input_ids: Set[int] = set()
        for t in inputs:
            if isinstance(t, torch.Tensor):
                s = _storage(t)
                if s is not None:
                    input_ids.add(id(s))
        outputs, _ = tree_flatten(out)
        for t in outputs:
            if not isinstance(t, torch.Tensor):
                continue
            s = _storage(t)
            if s is None:
                continue
            # An output aliasing an input (view, detach, in-place, out=) is new only if it was
            # tracked before and has grown; an untracked input storage is pre-existing.
            if id(s) in input_ids and id(s) not in self._sizes:
                continue
            self._track(s, str(func))
        return out


def peak_live_tensor_bytes(fn: Callable[[], Any]) -> Tuple[Any, int]:
    """Run ``fn()`` and return its result with the peak bytes of tensor storages it had alive.

    Only storages allocated while ``fn`` runs count (its forward, ``backward()`` and anything else
    it does); parameters and inputs that already existed do not. For those, use
    :class:`LiveTensorMeter` with ``baseline=`` or :func:`storage_bytes`.

    Args:
        fn: the work to measure, e.g. ``lambda: model(x).sum().backward()``.

    Returns:
        ``(result, peak_bytes)``. Deterministic for a deterministic ``fn``: may be asserted in
        tests.

    Example:
        >>> w = torch.zeros(100, 100, requires_grad=True)
        >>> x = torch.zeros(8, 100)
        >>> _, peak = peak_live_tensor_bytes(lambda: (x @ w).sum().backward())
        >>> peak  # x@w (3200) dies once the loss exists; backward: loss + seed grad (4+4) + w.grad
        40008
    """
    with LiveTensorMeter() as meter:
        result = fn()
    return result, meter.peak


def retained_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of storages allocated by ``fn()`` that are still alive when it returns, its result kept.

    For a forward pass this is what the autograd graph retains for backward (plus the output),
    whatever mechanism keeps it -- ordinary saved tensors, ``torch.utils.checkpoint``'s own stash
    (which bypasses outer ``saved_tensors_hooks``), or a custom Function. Pre-existing tensors
    (parameters, inputs) are not counted.

    Example:
        >>> w = torch.randn(100, 100, requires_grad=True)
        >>> x = torch.randn(10, 100)
        >>> retained_bytes(lambda: (x @ w).relu())  # x @ w is freed; relu keeps its output
        4000
    """
    with LiveTensorMeter() as meter:
        result = fn()
    del result
    return meter.current
