"""Norm layers convbn can fold: one entry per norm type, and a public way to register your own.

Each entry says how to read a layer's running mean/var, eps and affine weight/bias (Parameters or
frozen buffers), whether the layer ever normalizes with batch statistics (``frozen=False``: the
``torch.nn.BatchNorm`` rule; ``frozen=True``: always the running statistics), and which of the
layer's own submodules it applies after normalizing (timm's ``drop`` then ``act``).

Built in (recognised without importing torchvision, timm or detectron2):

============================================  =======  ==========================
type                                          frozen   applied after normalizing
============================================  =======  ==========================
``torch.nn.BatchNorm1d/2d/3d``, SyncBatchNorm  no       --
``torchvision.ops.misc.FrozenBatchNorm2d``     yes      --
detectron2 ``FrozenBatchNorm2d``               yes      --
timm ``BatchNormAct2d``, ``SyncBatchNormAct``  no       ``drop``, ``act``
timm ``FrozenBatchNormAct2d``                  yes      ``drop``, ``act``
============================================  =======  ==========================

A type is recognised only while it keeps its stock ``forward``: a subclass that overrides
``forward`` computes something convbn cannot know, and is reported as skipped with that reason.

    >>> import convbn, torch
    >>> class MyFrozenBN(torch.nn.Module):   # a user's frozen BN with its own buffer names
    ...     def __init__(self, c):
    ...         super().__init__()
    ...         self.register_buffer("scale", torch.ones(c)); self.register_buffer("shift", torch.zeros(c))
    ...         self.register_buffer("mu", torch.zeros(c)); self.register_buffer("var", torch.ones(c))
    ...     def forward(self, x):
    ...         s = self.scale / (self.var + 1e-5).sqrt()
    ...         return (x - self.mu[:, None, None]) * s[:, None, None] + self.shift[:, None, None]
    >>> convbn.register_norm(MyFrozenBN, frozen=True,
    ...     read=lambda m: convbn.NormParams(m.mu, m.var, 1e-5, m.scale, m.shift))
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), MyFrozenBN(4))
    >>> convbn.report(model).rows[0].kind
    'Conv2d->MyFrozenBN'
    >>> convbn.unregister_norm(MyFrozenBN)
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from .errors import ConvBNError

__all__ = ["NormParams", "NormType", "register_norm", "unregister_norm", "norm_type", "is_norm_layer", "norm_kind",
           "uses_batch_stats"]


@dataclass(frozen=True)
class NormParams:
    """What a norm layer normalizes with: ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``.

    ``weight``/``bias`` are ``None`` for a layer without affine parameters; they may be Parameters
    (trainable in eval/tune) or buffers (frozen layers: no gradients).
    """

    running_mean: Tensor
    running_var: Tensor
    eps: float
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None


def _read_standard(m: nn.Module) -> NormParams:
    affine = getattr(m, "affine", True)
    weight = getattr(m, "weight", None) if affine else None
    bias = getattr(m, "bias", None) if affine else None
    return NormParams(m.running_mean, m.running_var, float(m.eps), weight, bias)


def _drop_then_act(m: nn.Module) -> Tuple[nn.Module, ...]:
    return tuple(getattr(m, name) for name in ("drop", "act") if isinstance(getattr(m, name, None), nn.Module))


@dataclass(frozen=True)
class NormType:
    """One entry of the registry. ``matches(module)`` decides; the rest says how to run it.

    Attributes:
        name: shown in errors.
        matches: ``matches(module) -> bool``; true only for layers with the stock forward of the type.
        frozen: the layer always normalizes with its running statistics (no batch statistics, no
            running-stat updates); False means ``torch.nn.BatchNorm``'s train/eval rule.
        read: ``read(module) -> NormParams``.
        after: ``after(module) -> modules`` the layer's forward applies to the normalized tensor, in order.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    frozen: bool
    read: Callable[[nn.Module], NormParams] = _read_standard
    after: Callable[[nn.Module], Sequence[nn.Module]] = lambda m: ()

    def __reduce__(self):  # pickled by name (a model saved with torch.save holds its blocks' entries)
        return (_entry_named, (self.name,))


def _entry_named(name: str) -> NormType:
    for entry in [e for _, e in _REGISTERED] + list(_BUILTIN):
        if entry.name == name:
            return entry
    raise ConvBNError(f"this model was converted with the norm type {name!r}, which is not registered in this process; "
                      f"call convbn.register_norm for it before loading the model")


def _stock_class(module: nn.Module, qualified: Sequence[Tuple[str, str]]) -> Optional[type]:
    """The class of ``module``'s MRO named ``(module path, class name)`` in ``qualified``, if ``module``
    still uses that class's forward (import-free: we never import torchvision/timm/detectron2)."""
    for cls in type(module).__mro__:
        if (cls.__module__, cls.__name__) in qualified:
            return cls if type(module).forward is cls.__dict__.get("forward") else None
    return None


def _matcher(*qualified: Tuple[str, str]) -> Callable[[nn.Module], bool]:
    return lambda m: _stock_class(m, qualified) is not None


_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")
_probed: "weakref.WeakKeyDictionary[nn.Module, Tuple[object, Optional[float]]]" = weakref.WeakKeyDictionary()


def probed_frozen_eps(module: nn.Module) -> Optional[float]:
    """For a copy of a FrozenBatchNorm2d under another name (detectron2's, copied into DETR and many
    repos): a class named ``*FrozenBatchNorm*`` / ``*FrozenBN*`` with the four per-channel buffers is
    accepted only if its own forward, probed on a copy with tiny variances (so eps matters) for inputs with
    and without ``requires_grad``, equals ``(x - mean) / sqrt(var + eps) * weight + bias``. Returns eps."""
    name = type(module).__name__
    if "FrozenBatchNorm" not in name and "FrozenBN" not in name:
        return None
    bufs = [module._buffers.get(b) for b in _FROZEN_BUFFERS]
    if any(b is None or b.dim() != 1 or b.numel() != bufs[0].numel() or b.device.type == "meta" for b in bufs):
        return None
    key = type(module).forward
    hit = _probed.get(module)
    if hit is not None and hit[0] is key:
        return hit[1]
    if torch.fx._symbolic_trace.is_fx_tracing():  # the probe must run as plain eager code (analysis warms the cache)
        return None
    eps = _probe(module)
    _probed[module] = (key, eps)
    return eps


def _probe(module: nn.Module) -> Optional[float]:
    c = module._buffers["running_mean"].numel()
    g = torch.Generator().manual_seed(0)
    eps = float(getattr(module, "eps", 1e-5))
    try:
        clone = copy.deepcopy(module).to(torch.float64)
        with torch.no_grad():
            clone.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) * 1e-4 + 1e-6)
            clone.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64))
            clone.weight.copy_(torch.randn(c, generator=g, dtype=torch.float64))
            clone.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        x = torch.randn(2, c, 3, 3, generator=g, dtype=torch.float64)
        expected = F.batch_norm(x, clone.running_mean, clone.running_var, clone.weight, clone.bias, False, 0.0, eps)
        for grad in (False, True):
            with torch.enable_grad():
                out = clone(x.clone().requires_grad_(grad))
            if not torch.allclose(out.detach(), expected, rtol=1e-9, atol=1e-9):
                return None
    except Exception:  # a forward that cannot run on the probe is not recognised
        return None
    return eps


def _read_probed(m: nn.Module) -> NormParams:
    return NormParams(m.running_mean, m.running_var, probed_frozen_eps(m), m.weight, m.bias)


_TIMM = ("timm.layers.norm_act", "timm.models.layers.norm_act")
_BUILTIN: Tuple[NormType, ...] = (
    NormType("BatchNorm", lambda m: isinstance(m, _BatchNorm)
             and type(m).forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward), frozen=False),
    NormType("timm BatchNormAct2d", _matcher(*((p, "BatchNormAct2d") for p in _TIMM)), frozen=False,
             after=_drop_then_act),
    NormType("timm SyncBatchNormAct", _matcher(*((p, "SyncBatchNormAct") for p in _TIMM)), frozen=False,
             after=_drop_then_act),
    NormType("torchvision FrozenBatchNorm2d", _matcher(("torchvision.ops.misc", "FrozenBatchNorm2d")), frozen=True),
    NormType("detectron2 FrozenBatchNorm2d", _matcher(("detectron2.layers.batch_norm", "FrozenBatchNorm2d")),
             frozen=True),
    NormType("timm FrozenBatchNormAct2d", _matcher(*((p, "FrozenBatchNormAct2d") for p in _TIMM)), frozen=True,
             after=_drop_then_act),
    NormType("FrozenBatchNorm2d copy (verified by probe)", lambda m: probed_frozen_eps(m) is not None, frozen=True,
             read=_read_probed),
)
_REGISTERED: List[Tuple[type, NormType]] = []


def register_norm(
    cls: type,
    *,
    frozen: bool,
    read: Optional[Callable[[nn.Module], NormParams]] = None,
    after: Optional[Callable[[nn.Module], Sequence[nn.Module]]] = None,
) -> None:
    """Teach convbn a norm layer type, so Conv/Linear -> ``cls`` blocks are folded like BatchNorm.

    Args:
        cls: the ``nn.Module`` subclass. Its instances (and subclasses that keep ``cls.forward``)
            are recognised. A registration takes precedence over the built-in entries.
        frozen: ``True`` if the layer always normalizes with fixed statistics (like
            FrozenBatchNorm2d); ``False`` if it follows ``torch.nn.BatchNorm``'s train/eval rule, which
            requires ``cls`` to subclass ``torch.nn.modules.batchnorm._BatchNorm``.
        read: ``read(module) -> NormParams``; default reads ``running_mean``, ``running_var``, ``eps``,
            ``weight``, ``bias`` (``None`` when ``module.affine`` is False).
        after: ``after(module) -> sequence of modules`` that ``cls.forward`` applies, in order, to the
            normalized tensor (e.g. ``lambda m: (m.act,)``); default none.

    Raises:
        TypeError: ``cls`` is not an ``nn.Module`` subclass, or ``frozen=False`` for a class that is
            not a ``_BatchNorm``.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_norm expects an nn.Module subclass, got {cls!r}")
    if not isinstance(frozen, bool):
        raise TypeError(f"frozen must be True or False, got {frozen!r}")
    if not frozen and not issubclass(cls, _BatchNorm):
        raise TypeError(
            f"{cls.__name__} is registered with frozen=False, so convbn would run its training mode as "
            f"torch.nn.BatchNorm does (batch statistics, running-stat updates), but it is not a _BatchNorm subclass. "
            f"Register it with frozen=True if it always uses fixed statistics, or subclass torch.nn.BatchNorm2d")
    forward = cls.forward
    entry = NormType(f"registered {cls.__name__}", lambda m: isinstance(m, cls) and type(m).forward is forward,
                     frozen, read or _read_standard, after or (lambda m: ()))
    unregister_norm(cls)
    _REGISTERED.insert(0, (cls, entry))


def unregister_norm(cls: type) -> None:
    """Forget a :func:`register_norm` registration (no-op if ``cls`` was not registered)."""
    _REGISTERED[:] = [(c, e) for c, e in _REGISTERED if c is not cls]


def norm_type(module: nn.Module) -> Optional[NormType]:
    """The registry entry that recognises ``module``, or ``None``."""
    for _, entry in _REGISTERED:
        if entry.matches(module):
            return entry
    for entry in _BUILTIN:
        if entry.matches(module):
            return entry
    return None


_NORM_NAME_HINTS = ("BatchNorm", "FrozenBN", "GroupNorm", "LayerNorm", "InstanceNorm", "RMSNorm", "RmsNorm")


def is_norm_layer(module: nn.Module) -> bool:
    """Every layer the report lists: the registry's, and any other normalization layer (with a reason)."""
    if norm_type(module) is not None or isinstance(module, (_NormBase, nn.GroupNorm, nn.LayerNorm)):
        return True
    return any(h in cls.__name__ for cls in type(module).__mro__[:-1] for h in _NORM_NAME_HINTS)


_STOCK_BN_BASES = (nn.SyncBatchNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def norm_kind(module: nn.Module) -> str:
    """The name the report shows: the torch.nn base of a stock BN subclass, else the class name."""
    if norm_type(module) is not None and norm_type(module).name == "BatchNorm":
        for base in _STOCK_BN_BASES:
            if isinstance(module, base):
                return base.__name__
    return type(module).__name__


def unsupported_reason(module: nn.Module, name: str) -> str:
    """Why a norm layer the registry does not recognise is left alone."""
    cls = type(module).__name__
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)) or (
            not isinstance(module, _BatchNorm) and "BatchNorm" not in cls and "FrozenBN" not in cls):
        return (f"{cls} `{name}` normalizes with per-sample statistics, not running statistics, so there is "
                f"nothing to fold; it stays plain PyTorch")
    if "Frozen" in cls:
        return (f"{cls} `{name}` looks like a FrozenBatchNorm2d, but its forward does not compute "
                f"(x - running_mean) / sqrt(running_var + eps) * weight + bias (probed), so convbn leaves it alone; "
                f"register it with convbn.register_norm if it is a frozen BatchNorm")
    return (f"{cls} `{name}` overrides forward(), so convbn cannot know what it computes; give it a stock forward, "
            f"or register it with convbn.register_norm if it is a BatchNorm variant")


def uses_batch_stats(module: nn.Module, entry: NormType) -> bool:
    """``torch.nn.BatchNorm``'s rule (batch statistics in training, or without running ones); never for frozen."""
    if entry.frozen:
        return False
    return module.training or (module.running_mean is None and module.running_var is None)


def apply_after(module: nn.Module, entry: NormType, x: Tensor, skip: Optional[nn.Module] = None) -> Tensor:
    """Apply the modules the layer's own forward applies after normalizing (hooks fire; ``skip`` is fused)."""
    for m in entry.after(module):
        if m is not skip:
            x = m(x)
    return x


def check_params(module: nn.Module, entry: NormType, name: str) -> NormParams:
    """``entry.read(module)``, checked: per-channel vectors of one length."""
    try:
        p = entry.read(module)
    except Exception as e:
        raise ConvBNError(f"reading the statistics of `{name}` ({entry.name}) failed with {type(e).__name__}: {e}. "
                          f"Check the read= function given to convbn.register_norm") from e
    if not isinstance(p, NormParams):
        raise ConvBNError(f"the read= function of {entry.name} returned {type(p).__name__}, not convbn.NormParams")
    return p


def num_features(module: nn.Module, entry: NormType, name: str = "") -> Optional[int]:
    p = check_params(module, entry, name)
    return None if p.running_mean is None else int(p.running_mean.numel())


def _is_plain_identity(m: nn.Module) -> bool:
    return type(m) is nn.Identity and not (m._forward_hooks or m._forward_pre_hooks)


def fusable_relu(module: nn.Module, entry: NormType) -> Optional[nn.Module]:
    """The layer's own activation if it is a stock ``nn.ReLU`` that only drop=Identity precedes (fusable
    into train-variant kernels); ``None`` otherwise (then it is applied after, unfused)."""
    mods = list(entry.after(module))
    if not mods:
        return None
    *before, act = mods
    if type(act) is nn.ReLU and "forward" not in act.__dict__ and not (act._forward_hooks or act._forward_pre_hooks) \
            and all(_is_plain_identity(m) for m in before):
        return act
    return None

