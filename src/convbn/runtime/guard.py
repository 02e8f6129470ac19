"""Run-time guard for what no trace can prove: a fused block output that no next stage takes.

Each block has an *owner*: the lowest module containing its conv, its norm and a fused ReLU. A pre-hook
and a hook on the owner bracket the owner's forward. Inside it the block fuses; a call of the conv
(or norm) from outside it -- a user calling ``model.backbone.conv1(x)`` directly -- runs as plain
PyTorch. When the owner's forward returns, a fused output still waiting for its next stage (a branch
skipped the norm, the conv output was returned or kept) raises :class:`~convbn.ConvBNError`: the values
it holds already include the norm, so whoever got them has the wrong numbers. A forward that raised
leaves no stale state: the next owner call starts clean.

The traces proved the data flow for the module attributes as they were at conversion (``if self.flag:``
is decided while tracing). Each owner's pre-hook compares the plain attributes (bools, numbers, strings,
tuples of them) of the owner, its submodules and its ancestors with those values; while one differs, the
owner's blocks run unfused -- plain PyTorch's data flow, the same function -- and ``fallback_reason``
says which attribute. Attributes a forward changes by itself (counters) are not watched.

The hooks are found by type (never by handle), so ``deepcopy``, pickling and ``revert`` handle them.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Set, Tuple

from torch import nn

from .base import Block, NotScriptable

__all__ = ["OwnerEnter", "OwnerExit", "install_guards", "remove_guards"]


_SIMPLE = (bool, int, float, str, type(None))
_MISSING = object()


def _plain(v: Any) -> bool:
    return isinstance(v, _SIMPLE) or (isinstance(v, tuple) and all(isinstance(x, _SIMPLE) for x in v))


class AttributeWatch:
    """The plain attributes of some modules as they were at conversion."""

    def __init__(self, modules: List[Tuple[str, nn.Module]], volatile: Set[str]):
        self.entries = []
        for name, m in modules:
            for k, v in m.__dict__.items():
                path = f"{name}.{k}" if name else k
                if not k.startswith("_") and k != "training" and _plain(v) and path not in volatile:
                    self.entries.append((m, path, k, v))

    def changed(self) -> Optional[str]:
        for m, path, k, v in self.entries:
            now = m.__dict__.get(k, _MISSING)
            if now is not v and now != v:
                return (f"attribute `{path}` was {v!r} at conversion and is "
                        f"{'gone' if now is _MISSING else repr(now)} now")
        return None


class OwnerEnter(NotScriptable):
    """Forward pre-hook on an owner: the blocks may fuse (unless an attribute changed since conversion);
    stale state of a failed forward is dropped."""

    _convbn_guard = True
    __name__ = "convbn_owner_enter"

    def __init__(self, blocks: List[Block], watch: Optional[AttributeWatch] = None):
        self.blocks, self.watch = blocks, watch

    def __call__(self, module: nn.Module, args: Any) -> None:
        stale = self.watch.changed() if self.watch is not None else None
        for b in self.blocks:
            if b._owner_depth == 0:
                b._pending = None
                b._stale = stale
                if stale is not None:
                    b.fallback_reason = f"{stale}: runs unfused (same function); convert again to fuse it"
            b._owner_depth += 1


class OwnerExit(NotScriptable):
    """Forward hook on an owner: every fused output of its blocks must have been taken."""

    _convbn_guard = True
    __name__ = "convbn_owner_exit"

    def __init__(self, blocks: List[Block]):
        self.blocks = blocks

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        for b in self.blocks:
            b._owner_depth = max(0, b._owner_depth - 1)
        for b in self.blocks:
            if b._owner_depth == 0:
                b.release()


def _owner_name(names: List[str]) -> str:
    parts = [n.split(".") if n else [] for n in names]
    common: List[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    # the owner contains the stages, so it is their common parent (never one of the stages itself)
    if any(len(p) == len(common) for p in parts):
        common = common[:-1]
    return ".".join(common)


def install_guards(model: nn.Module, blocks: List[Block], volatile: Set[str] = frozenset()) -> None:
    """Bracket each owner's forward for the blocks that hand a fused output from one module to the next."""
    by_owner: Dict[str, List[Block]] = {}
    for b in blocks:
        stages = [n for n in (b.conv_name if "conv" in b.roles else None, b.bn_name, b.relu_name) if n is not None]
        if getattr(b, "functional_relu", None) is not None:  # the relu call may be anywhere up to the root
            by_owner.setdefault("", []).append(b)
            continue
        if len(stages) < 2:
            continue
        by_owner.setdefault(_owner_name(stages), []).append(b)
    modules = dict(model.named_modules())
    for name, owned in by_owner.items():
        owner = modules[name]
        parts = name.split(".") if name else []
        ancestors = [(".".join(parts[:i]), modules[".".join(parts[:i])]) for i in range(len(parts))]
        inside = [(f"{name}.{n}" if name and n else n or name, m) for n, m in owner.named_modules()]
        owner.register_forward_pre_hook(OwnerEnter(owned, AttributeWatch(ancestors + inside, set(volatile))))
        owner.register_forward_hook(OwnerExit(owned))


def remove_guards(model: nn.Module) -> None:
    for m in model.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key in [k for k, h in hooks.items() if getattr(h, "_convbn_guard", False)]:
                del hooks[key]
