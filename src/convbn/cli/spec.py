"""Model specs of the CLI: build the user's model from a string, and inputs it accepts.

Specs:
    ``package.module:factory``   your own code: ``factory()`` (plus ``in_channels=`` / ``dims=`` when you
                                 pass ``--channels`` / ``--dims``) must return an ``nn.Module``
    ``torchvision:NAME``         ``torchvision.models.get_model(NAME, weights=None)`` (no download)
    ``timm:NAME``                ``timm.create_model(NAME, pretrained=False)``
    ``monai:NAME``               a MONAI network (``monai:resnet50``, ``monai:unet``, ...), BatchNorm

torchvision, timm and MONAI are imported only when a spec names them.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .options import CLIError

__all__ = ["Workload", "build_model", "build_workload", "monai_models", "split_spec"]

_PREFIXES = ("monai", "torchvision", "timm")


def split_spec(spec: str) -> Tuple[str, str]:
    """``(prefix, name)`` of ``PREFIX:NAME``; prefix is ``monai``/``torchvision``/``timm`` or a module path.

    Example:
        >>> split_spec("mypkg.nets:build"), split_spec("timm:efficientnet_b0")
        (('mypkg.nets', 'build'), ('timm', 'efficientnet_b0'))
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise CLIError(f"model spec {spec!r} is not PREFIX:NAME. Use package.module:factory for your own model "
                       f"(e.g. mypkg.nets:build), torchvision:NAME, timm:NAME or monai:NAME "
                       f"({', '.join(monai_models())}).")
    prefix, name = (part.strip() for part in spec.strip().split(":", 1))
    if not prefix or not name:
        raise CLIError(f"model spec {spec!r} has an empty part; write PREFIX:NAME, e.g. torchvision:resnet50")
    return prefix, name


def _import_optional(module: str, spec: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception as e:  # a broken install (e.g. torchvision built for another torch) raises RuntimeError
        package = module.split(".")[0]
        raise CLIError(f"{spec!r} needs {package}, which is not importable here ({type(e).__name__}: {e}). "
                       f"Install a version matching torch {torch.__version__} with `pip install {package}`.") from None


def load_factory(prefix: str, name: str, spec: str) -> Callable[..., Any]:
    """The callable ``name`` (dotted) of module ``prefix``, from a ``package.module:factory`` spec.

    Raises:
        ImportError: the module does not import; ValueError: it has no such attribute; TypeError: the
        attribute is not callable. Each message names the spec and says how to fix it.

    Example:
        >>> load_factory("torch.nn", "Identity", "torch.nn:Identity")
        <class 'torch.nn.modules.linear.Identity'>
    """
    try:
        obj: Any = importlib.import_module(prefix)
    except ImportError as e:
        raise ImportError(f"cannot import module {prefix!r} of model spec {spec!r} ({e}). Check the spelling and "
                          f"that the module is on sys.path (e.g. `pip install -e .` your package, or run from its "
                          f"directory).") from None
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {prefix!r} has no attribute {name!r} (from model spec {spec!r}); the part "
                             f"after ':' must name a callable that returns an nn.Module")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec!r} names a {type(obj).__name__}, not a callable returning an nn.Module")
    return obj


# ------------------------------------------------------------------------------------------ MONAI
@dataclass(frozen=True)
class _Monai:
    build: Callable[[Any, int, int], nn.Module]  # (monai.networks.nets, in_channels, dims) -> model
    in_channels: int
    size: Callable[[int], int]  # dims -> spatial side of the default input


def _cls_size(d: int) -> int:
    return 224 if d == 2 else 32


def _seg_size(d: int) -> int:
    return 128 if d == 2 else 32


_MONAI: Dict[str, _Monai] = {
    **{f"resnet{k}": _Monai(lambda nets, c, d, k=k: getattr(nets, f"resnet{k}")(
        spatial_dims=d, n_input_channels=c, num_classes=10), 3, _cls_size) for k in (18, 34, 50)},
    "densenet121": _Monai(lambda nets, c, d: nets.DenseNet121(spatial_dims=d, in_channels=c, out_channels=10),
                          3, _cls_size),
    "seresnet50": _Monai(lambda nets, c, d: nets.SEResNet50(spatial_dims=d, in_channels=c, num_classes=10),
                         3, _cls_size),
    "efficientnet-b0": _Monai(lambda nets, c, d: nets.EfficientNetBN(
        "efficientnet-b0", pretrained=False, spatial_dims=d, in_channels=c, num_classes=10), 3, _cls_size),
    "unet": _Monai(lambda nets, c, d: nets.UNet(spatial_dims=d, in_channels=c, out_channels=2,
                                                channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2,
                                                norm="batch"), 1, _seg_size),
    "basicunet": _Monai(lambda nets, c, d: nets.BasicUNet(spatial_dims=d, in_channels=c, out_channels=2,
                                                          norm="batch"), 1, _seg_size),
    "segresnet": _Monai(lambda nets, c, d: nets.SegResNet(spatial_dims=d, in_channels=c, out_channels=2,
                                                          norm="batch"), 1, _seg_size),
}


def monai_models() -> List[str]:
    """The ``monai:NAME`` specs the CLI knows how to build (each with BatchNorm everywhere).

    Example:
        >>> "monai:resnet50" in monai_models()
        True
    """
    return [f"monai:{n}" for n in _MONAI]


# ------------------------------------------------------------------------------------------ build
def build_model(spec: str, *, in_channels: Optional[int] = None, dims: Optional[int] = None) -> nn.Module:
    """Build the model a spec names (freshly initialised, in training mode).

    Args:
        spec: see the module docstring.
        in_channels: input channels (MONAI nets, timm's ``in_chans``; passed to your factory as
            ``in_channels=`` when given).
        dims: spatial dimensions (MONAI nets; passed to your factory as ``dims=`` when given).

    Raises:
        CLIError: unknown name, a package that is not importable, a factory that does not return a module.

    Example:
        >>> build_model("torch.nn:Identity")
        Identity()
    """
    prefix, name = split_spec(spec)
    if prefix == "monai":
        entry = _MONAI.get(name.lower())
        if entry is None:
            raise CLIError(f"unknown MONAI model {name!r}; choose from {', '.join(monai_models())}, or build it "
                           f"yourself and pass package.module:factory")
        nets = _import_optional("monai.networks.nets", spec)
        return entry.build(nets, entry.in_channels if in_channels is None else in_channels, dims or 2)
    if prefix in ("torchvision", "timm") and dims not in (None, 2):
        raise CLIError(f"{spec!r} is a 2-D model, got --dims {dims}")
    if prefix == "torchvision":
        tv = _import_optional("torchvision.models", spec)
        if name not in tv.list_models():
            raise CLIError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
        builder = tv.get_model_builder(name)
        kwargs: Dict[str, Any] = {"weights": None}
        if "weights_backbone" in inspect.signature(builder).parameters:
            kwargs["weights_backbone"] = None  # no download (the backbone then has nn.BatchNorm2d)
        if in_channels not in (None, 3):
            raise CLIError(f"{spec!r} takes 3-channel images, got --channels {in_channels}")
        return builder(**kwargs)
    if prefix == "timm":
        timm = _import_optional("timm", spec)
        if name not in timm.list_models():
            raise CLIError(f"timm has no model {name!r}; see timm.list_models('*pattern*')")
        return timm.create_model(name, pretrained=False, **({} if in_channels is None else {"in_chans": in_channels}))
    try:
        obj = load_factory(prefix, name, spec)
    except (ImportError, ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    kwargs = {k: v for k, v in (("in_channels", in_channels), ("dims", dims)) if v is not None}
    model = obj(**kwargs)
    if not isinstance(model, nn.Module):
        raise CLIError(f"{spec!r} returned a {type(model).__name__}, not an nn.Module; the factory must build and "
                       f"return the model")
    return model


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class Workload:
    """A built model and inputs it accepts.

    Attributes:
        model: the model (a detector is put in ``eval()``: without targets it only runs that way).
        example_inputs: positional arguments of ``model(*example_inputs)``; pass as
            ``convbn.report(model, mode, example_inputs=example_inputs)``.
        kind: ``"batch"`` (one batch tensor) or ``"detection"`` (a list of 3xHxW images).
        description: one line for the output, e.g. ``"a list of 2 images 3x224x224"``.
    """

    model: nn.Module
    example_inputs: Tuple[Any, ...]
    kind: str
    description: str

    @property
    def batch(self) -> torch.Tensor:
        """The batch tensor of a ``"batch"`` workload."""
        if self.kind != "batch":
            raise CLIError(f"this command needs a model that takes one batch tensor; this model takes "
                           f"{self.description} (a detector): use `convbn inspect` for it")
        return self.example_inputs[0]


def is_detector(model: nn.Module) -> bool:
    """torchvision detection models (Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS, SSD) take a list of images."""
    return type(model).__module__.startswith("torchvision.models.detection")


def _default_side(spec: str, model: nn.Module, dims: int) -> Optional[int]:
    prefix, name = split_spec(spec)
    if prefix == "monai":
        return _MONAI[name.lower()].size(dims)
    if prefix == "timm":
        size = getattr(model, "pretrained_cfg", {}).get("input_size") or (3, 224, 224)
        return int(size[-1])
    if prefix == "torchvision":
        return 299 if name.startswith("inception") else 224
    return None


def _default_channels(spec: str, model: nn.Module) -> int:
    prefix, name = split_spec(spec)
    if prefix == "monai":
        return _MONAI[name.lower()].in_channels
    return 3


def build_workload(spec: str, *, batch_size: int = 2, input_size: Optional[int] = None,
                   in_channels: Optional[int] = None, dims: Optional[int] = None, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> Workload:
    """Build the model of ``spec`` and seeded random inputs suited to its kind.

    Classifiers and segmentation nets get a ``(batch, channels, *spatial)`` tensor; torchvision
    detectors a *list* of ``batch`` images ``3 x size x size`` (their forward takes a list). Your own
    model's input is unknown to convbn: pass ``input_size`` (and ``in_channels`` / ``dims``).

    Example:
        >>> w = build_workload("torch.nn:Identity", input_size=4)
        >>> w.kind, tuple(w.batch.shape)
        ('batch', (2, 3, 4, 4))
    """
    if batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {batch_size}")
    model = build_model(spec, in_channels=in_channels, dims=dims)
    d = dims or 2
    side = input_size or _default_side(spec, model, d)
    if side is None:
        raise CLIError(f"convbn cannot know what input {spec!r} takes: pass --input-size SIDE (and --channels C, "
                       f"--dims D; default 3 channels, 2-D)")
    channels = in_channels or _default_channels(spec, model)
    g = torch.Generator().manual_seed(seed)
    if is_detector(model):
        images = [torch.randn(channels, side, side, generator=g).to(dtype) for _ in range(batch_size)]
        return Workload(model.eval(), (images,), "detection",
                        f"a list of {batch_size} images {channels}x{side}x{side}")
    x = torch.randn(batch_size, channels, *([side] * d), generator=g).to(dtype)
    return Workload(model, (x,), "batch", f"a batch tensor {'x'.join(map(str, x.shape))}")
