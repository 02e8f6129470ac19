"""``convert(model, "train", fission=True, low_memory=True)``: no BN(-ReLU) output and no channel
concatenation is stored for backward.

A DenseNet layer normalizes the concatenation of every earlier layer's output, so plain training
stores, per layer, that concatenation (the BN input) and its BN-ReLU output (the next conv's input):
O(L^2) memory per dense block. Both are cheap to recompute exactly:

* a concatenation from its pieces (each stored once, by reference, whatever number of later
  concatenations contain it): one copy;
* a fission BN(-ReLU) output from its input and the batch statistics the forward measured (one
  normalize pass with the same kernel and the same per-channel constants: bitwise the forward's values).

How: while the model's forward runs (eagerly, with grad enabled), convbn's root hooks push a pair of
``torch.autograd.graph.saved_tensors_hooks``. When an op saves a tensor for backward, the pack hook
looks it up: a fission output or a recorded concatenation (same tensor object, same version) is stored
as a *recipe* (references to its pieces / its input, the statistics, the affine parameters and their
versions); any other tensor is stored as itself. The unpack hook (in backward) rebuilds the tensor
under ``no_grad``; a concatenation rebuilt for a BN output's recipe is kept for the one BN backward
that needs it next, then dropped.

Autograd's in-place check is kept: every stored tensor, piece, BN input and affine parameter is
checked against the version it had when saved, and a change raises the same ``RuntimeError`` plain
PyTorch raises. A recipe only ever rebuilds the value the forward used, so a tensor modified in place
*after* an op saved it (which plain PyTorch refuses in backward) gets the gradient of what was computed.

Limits (as ``torch.utils.checkpoint`` and torchvision's ``memory_efficient=True``, which recompute
from their inputs too): a piece whose memory is written *outside* version tracking (``.data``, NumPy)
between the forward and the backward would be read changed. Inside the forward such writes are seen
(ICF's trust rules: the piece is then stored as itself). When the caller's own saved-tensor hooks are
active (``torch.utils.checkpoint``, ``save_on_cpu``) they are left in charge and this forward stores
tensors as plain training does (one warning per model); under ``torch.func`` transforms (which disable
saved-tensor hooks) and ``torch.compile`` the same.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .errors import user_stacklevel

__all__ = ["SavedRecipes", "OBSERVER"]

OBSERVER = "_convbn_observer"  # an attribute on a pack hook that only watches what is saved (a memory meter)


def _check_version(t: Tensor, version: int, what: str) -> None:
    if t._version != version:
        raise RuntimeError(
            f"one of the variables needed for gradient computation has been modified by an inplace operation: "
            f"[{t.type()} {list(t.shape)}] ({what}) is at version {t._version}; expected version {version} instead. "
            f"(convbn low_memory stores this tensor by reference for backward, as autograd does; make the change "
            f"out of place, or after backward.)")


class _Held:
    """A tensor stored as itself (detached: no reference cycle through its graph), with its version."""

    __slots__ = ("t", "version", "what")

    def __init__(self, t: Tensor, what: str = "a tensor saved for backward"):
        self.t, self.version, self.what = t.detach(), t._version, what

    def tensors(self) -> List[Tensor]:
        return [self.t]

    def get(self) -> Tensor:
        _check_version(self.t, self.version, self.what)
        return self.t


class _Cat:
    """``torch.cat(leaves, dim=1)``, rebuilt on demand. ``uses``: unpacks expected (the tensor itself
    saved, or a BN output's recipe built on it); a rebuilt value is kept until the last of them."""

    __slots__ = ("leaves", "uses", "value")

    def __init__(self, leaves: List[_Held]):
        self.leaves, self.uses, self.value = leaves, 0, None

    def tensors(self) -> List[Tensor]:
        return [h.t for h in self.leaves]

    def valid(self) -> bool:
        return all(h.t._version == h.version for h in self.leaves)

    def get(self) -> Tensor:
        value = self.value
        if value is None:
            pieces = [h.get() for h in self.leaves]
            with torch.no_grad():
                value = torch.cat(pieces, dim=1)
        self.uses -= 1
        self.value = value if self.uses > 0 else None
        return value


class _Norm:
    """A fission BN(-ReLU) output: its input (held or a ``_Cat``) normalized again with the forward's
    batch statistics and affine parameters (checked unchanged)."""

    __slots__ = ("source", "mean", "var", "params", "eps", "relu")

    def __init__(self, source, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 eps: float, relu: bool):
        self.source, self.mean, self.var, self.eps, self.relu = source, mean, var, eps, relu
        self.params = [None if p is None else _Held(p, "a BatchNorm affine parameter") for p in (weight, bias)]

    def tensors(self) -> List[Tensor]:
        return self.source.tensors() + [self.mean, self.var] + [h.t for h in self.params if h is not None]

    def get(self) -> Tensor:
        from .functions.bn_fission import bn_relu_train_forward
        from .ops.bn_fission import geometry

        x = self.source.get()
        if geometry(x)[3] is None:  # as the forward did (bn_relu_train)
            x = x.contiguous()
        weight, bias = (None if h is None else h.get() for h in self.params)
        with torch.no_grad():
            return bn_relu_train_forward(x, weight, bias, self.eps, self.relu, stats=(self.mean, self.var))[0]


class SavedRecipes:
    """The per-forward table tensor -> recipe, and the saved-tensor hooks that use it."""

    def __init__(self) -> None:
        self.table: Dict[int, Tuple[weakref.ref, int, object]] = {}
        self.warned = False
        self.recipes_packed = 0  # tensors stored as recipes (for tests and benchmarks)

    def __getstate__(self) -> dict:  # weakrefs are transient
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def clear(self) -> None:
        self.table.clear()

    def _recipe(self, t: Tensor):
        entry = self.table.get(id(t))
        if entry is not None and entry[0]() is t and entry[1] == t._version:
            return entry[2]
        return None

    # ---------------------------------------------------------------- registration (during the forward)
    def record_cat(self, out: Tensor, parts: List[Tensor], trusted: Sequence[bool]) -> None:
        """``out = cat(parts, dim=1)``: stored as its leaves (a part that is itself an unchanged recorded
        concatenation contributes its leaves: MONAI's DenseNet concatenates the previous concatenation).
        Every part must be trusted (``trusted[i]``: produced in this forward, see :mod:`convbn.icf`), else
        ``out`` is stored as itself."""
        leaves: List[_Held] = []
        for p, trust in zip(parts, trusted):
            sub = self._recipe(p)
            if isinstance(sub, _Cat) and sub.valid():
                leaves.extend(sub.leaves)
            elif trust:
                leaves.append(_Held(p, "a piece of a torch.cat"))
            else:
                return
        self.table[id(out)] = (weakref.ref(out), out._version, _Cat(leaves))

    def record_norm(self, out: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                    bias: Optional[Tensor], eps: float, relu: bool) -> None:
        """``out`` = fission BN(-ReLU) of ``x`` with batch statistics ``(mean, var)``."""
        source = self._recipe(x)
        source = source if isinstance(source, _Cat) else _Held(x, "the input of a BatchNorm")
        self.table[id(out)] = (weakref.ref(out), out._version, _Norm(source, mean, var, weight, bias, eps, relu))

    # ---------------------------------------------------------------- the hooks
    def hooks(self, observer: Optional[Callable[[Tensor], object]] = None):
        """``(pack, unpack)``. ``observer``: called with every tensor a stored object keeps alive."""

        def pack(t: Tensor):
            recipe = self._recipe(t) if not t.is_inference() else None
            if recipe is None:
                held = _Held(t)
                if observer is not None:
                    observer(t)
                return held
            self.recipes_packed += 1
            for r in (recipe, getattr(recipe, "source", None)):
                if isinstance(r, _Cat):
                    r.uses += 1
            if observer is not None:
                for k in recipe.tensors():
                    observer(k)
            return recipe

        def unpack(stored) -> Tensor:
            return stored.get()

        return pack, unpack

    def push(self, owner: str = "the model") -> bool:
        """Push the hooks for one forward if nothing prevents it; returns whether they were pushed."""
        if not torch.is_grad_enabled() or torch.is_inference_mode_enabled() or \
                not torch._C._autograd._saved_tensors_hooks_is_enabled():
            return False
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        observer = None
        if top is not None:
            if not getattr(top[0], OBSERVER, False):
                if not self.warned:
                    self.warned = True
                    warnings.warn(
                        f"convbn low_memory: saved-tensor hooks of the caller (torch.utils.checkpoint, "
                        f"save_on_cpu, ...) are active during the forward of {owner}; they stay in charge and "
                        f"this forward stores tensors as plain training does (same result, no memory saving). "
                        f"Drop one of the two to silence this.", stacklevel=user_stacklevel())
                return False
            observer = top[0]
        torch._C._autograd._push_saved_tensors_default_hooks(*self.hooks(observer))
        return True

    @staticmethod
    def pop() -> None:
        torch._C._autograd._pop_saved_tensors_default_hooks()
