"""Build a model from a short spec string, for the CLI and the experiments.

Specs:
    ``small_resnet``, ``mobilenet_v2``, ``mobilenet_v2_pretrained``   built into convbn
    ``monai:resnet50``, ``monai:unet``, ...                          MONAI networks, BatchNorm everywhere
    ``torchvision:resnet18``, ``timm:resnet50``                      when those packages are importable
    ``package.module:factory``                                       your own code; called with your kwargs

The uniform keywords are ``num_classes`` (outputs; ``out_channels`` of segmentation nets),
``in_channels`` and ``dims`` (spatial dimensions); anything else goes to the underlying constructor.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from convbn.cli.spec import load_factory

__all__ = ["ModelEntry", "available_models", "build_model", "default_input_shape"]

_PREFIXES = ("monai", "torchvision", "timm")


@dataclass(frozen=True)
class ModelEntry:
    """One named model of the registry.

    Attributes:
        name: the spec, e.g. ``"monai:unet"``.
        description: one line for ``convbn`` listings.
        build: ``build(num_classes, in_channels, dims, **extra) -> nn.Module``.
        spatial_size: ``dims -> size`` of each spatial side of the default input.
        num_classes: default ``num_classes`` (``None``: the constructor's own default).
        in_channels: default ``in_channels``.
        dims: supported spatial dimensions; the first is the default.
    """

    name: str
    description: str
    build: Callable[..., nn.Module]
    spatial_size: Callable[[int], int]
    num_classes: Optional[int] = 10
    in_channels: int = 3
    dims: Tuple[int, ...] = (2,)


def _small_resnet(num_classes: int, in_channels: int, dims: int, **kw: Any) -> nn.Module:
    from .builtin import small_resnet

    return small_resnet(num_classes=num_classes, in_channels=in_channels, dims=dims, **kw)


def _require_rgb(name: str, in_channels: int) -> None:
    if in_channels != 3:
        raise ValueError(f"{name} takes 3-channel images, got in_channels={in_channels}; replicate the "
                         f"channels instead (e.g. experiments.data.load_digits_dataset(channels=3)).")


def _mobilenet_v2(num_classes: int, in_channels: int, dims: int, **kw: Any) -> nn.Module:
    from .mobilenet_v2 import mobilenet_v2

    _require_rgb("mobilenet_v2", in_channels)
    return mobilenet_v2(num_classes=num_classes, **kw)


def _mobilenet_v2_pretrained(num_classes: Optional[int], in_channels: int, dims: int,
                             **kw: Any) -> nn.Module:
    from .mobilenet_v2 import load_pretrained_mobilenet_v2

    _require_rgb("mobilenet_v2_pretrained", in_channels)
    return load_pretrained_mobilenet_v2(num_classes=num_classes, **kw)


def _monai_nets() -> Any:
    try:
        import monai.networks.nets as nets
    except ImportError:
        raise ImportError("monai:* models need MONAI, which is not installed. Install it with "
                          "`pip install monai` (or `pip install convbn[monai]`).") from None
    return nets


def _monai_resnet(depth: int) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, dims: int, **kw: Any) -> nn.Module:
        factory = getattr(_monai_nets(), f"resnet{depth}")
        return factory(spatial_dims=dims, n_input_channels=in_channels, num_classes=num_classes, **kw)
    return build


def _monai_class(cls_name: str, out_key: str, **defaults: Any) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, dims: int, **kw: Any) -> nn.Module:
        cls = getattr(_monai_nets(), cls_name)
        return cls(spatial_dims=dims, in_channels=in_channels, **{out_key: num_classes}, **{**defaults, **kw})
    return build


def _classifier_size(dims: int) -> int:
    return 224 if dims == 2 else 32


def _segmentation_size(dims: int) -> int:
    return 128 if dims == 2 else 32


_MONAI_SEG = dict(num_classes=2, in_channels=1, dims=(2, 3))
_MONAI_CLS = dict(num_classes=10, in_channels=3, dims=(2, 3))

_REGISTRY: Dict[str, ModelEntry] = {e.name: e for e in [
    ModelEntry("small_resnet", "convbn's small ResNet: 9 Conv-BN pairs, bias-free convs, 1/2/3-D",
               _small_resnet, lambda d: {1: 64, 2: 32, 3: 16}[d], dims=(2, 1, 3)),
    ModelEntry("mobilenet_v2", "MobileNetV2 (torchvision layout), random init, 52 Conv-BN pairs",
               _mobilenet_v2, _classifier_size, num_classes=1000),
    ModelEntry("mobilenet_v2_pretrained",
               "MobileNetV2 with torchvision's ImageNet weights (offline); num_classes replaces the head",
               _mobilenet_v2_pretrained, _classifier_size, num_classes=None),
    ModelEntry("monai:resnet18", "MONAI ResNet-18", _monai_resnet(18), _classifier_size, **_MONAI_CLS),
    ModelEntry("monai:resnet34", "MONAI ResNet-34", _monai_resnet(34), _classifier_size, **_MONAI_CLS),
    ModelEntry("monai:resnet50", "MONAI ResNet-50 (bottleneck blocks)", _monai_resnet(50),
               _classifier_size, **_MONAI_CLS),
    ModelEntry("monai:densenet121", "MONAI DenseNet-121 (BN before conv: pre-activation)",
               _monai_class("DenseNet121", "out_channels"), _classifier_size, **_MONAI_CLS),
    ModelEntry("monai:seresnet50", "MONAI SE-ResNet-50", _monai_class("SEResNet50", "num_classes"),
               _classifier_size, **_MONAI_CLS),
    ModelEntry("monai:efficientnet-b0", "MONAI EfficientNet-B0 (depthwise convs, random init)",
               _monai_class("EfficientNetBN", "num_classes", model_name="efficientnet-b0",
                            pretrained=False), _classifier_size, **_MONAI_CLS),
    ModelEntry("monai:unet", "MONAI UNet, channels (16,32,64,128), strides (2,2,2), 2 res units, BN",
               _monai_class("UNet", "out_channels", channels=(16, 32, 64, 128), strides=(2, 2, 2),
                            num_res_units=2, norm="batch"), _segmentation_size, **_MONAI_SEG),
    ModelEntry("monai:basicunet", "MONAI BasicUNet with BatchNorm (transposed-conv upsampling)",
               _monai_class("BasicUNet", "out_channels", norm="batch"), _segmentation_size,
               **_MONAI_SEG),
    ModelEntry("monai:segresnet", "MONAI SegResNet with BatchNorm (pre-activation blocks)",
               _monai_class("SegResNet", "out_channels", norm="batch"), _segmentation_size,
               **_MONAI_SEG),
]}


def available_models() -> List[str]:
    """Names ``build_model`` accepts directly (plus ``torchvision:``/``timm:``/``module:factory``).

    Returns:
        Sorted registry names.

    Example:
        >>> "monai:unet" in available_models()
        True
    """
    return sorted(_REGISTRY)


def _unknown(spec: str) -> ValueError:
    return ValueError(
        f"unknown model {spec!r}. Available: {', '.join(available_models())}; or "
        f"'torchvision:NAME' / 'timm:NAME' (if installed), or 'package.module:factory' for your own "
        f"model (any MONAI network: 'monai.networks.nets:ClassName')."
    )


def _split(spec: str) -> Tuple[str, str]:
    """``(prefix, name)``: prefix is '' for built-ins, 'monai'/'torchvision'/'timm', or a module path."""
    if not isinstance(spec, str) or not spec.strip():
        raise TypeError(f"model spec must be a non-empty string like 'small_resnet', got {spec!r}.")
    spec = spec.strip()
    if ":" not in spec:
        return "", spec.lower()
    prefix, name = spec.split(":", 1)
    if not prefix or not name:
        raise _unknown(spec)
    return (prefix, name.lower()) if prefix in _PREFIXES else (prefix, name)


def _entry(spec: str) -> Optional[ModelEntry]:
    prefix, name = _split(spec)
    if prefix == "":
        entry = _REGISTRY.get(name)
    elif prefix == "monai":
        entry = _REGISTRY.get(f"monai:{name}")
    else:
        return None
    if entry is None:
        raise _unknown(spec)
    return entry


def _check_dims(entry: ModelEntry, dims: int) -> None:
    if dims not in entry.dims:
        raise ValueError(f"{entry.name} supports dims in {sorted(entry.dims)}, got dims={dims}.")


def _import_optional(module: str, spec: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception as e:  # a broken install (e.g. torchvision built for another torch) raises RuntimeError
        package = module.split(".")[0]
        raise ImportError(f"{spec!r} needs {package}, which is not importable here ({type(e).__name__}: "
                          f"{e}). Install a version matching torch {torch.__version__} with "
                          f"`pip install {package}`, or pick a model from: "
                          f"{', '.join(available_models())}.") from None


def build_model(spec: str, *, num_classes: Optional[int] = None, in_channels: Optional[int] = None,
                dims: Optional[int] = None, **kwargs: Any) -> nn.Module:
    """Build a model from a spec string.

    Args:
        spec: a registry name (see :func:`available_models`), ``torchvision:NAME``, ``timm:NAME``
            or ``package.module:factory``.
        num_classes: outputs (``out_channels`` for segmentation nets). ``None``: the entry's
            default (10 for classifiers, 1000 for ``mobilenet_v2``, the ImageNet head for
            ``mobilenet_v2_pretrained``, 2 for segmentation nets).
        in_channels: input channels; ``None``: 3 (1 for segmentation nets).
        dims: spatial dimensions (1, 2 or 3, where supported); ``None``: 2.
        **kwargs: passed to the underlying constructor / factory.

    Returns:
        The model, freshly built, in training mode. For ``package.module:factory`` only the
        arguments you pass are forwarded.

    Raises:
        ValueError: unknown name (the message lists the available ones) or unsupported ``dims``.
        ImportError: an optional package (MONAI, torchvision, timm, the weights) is missing.

    Example:
        >>> model = build_model("small_resnet", num_classes=4, dims=1)
        >>> model(torch.randn(2, *default_input_shape("small_resnet", dims=1)[1:])).shape
        torch.Size([2, 4])
    """
    entry = _entry(spec)
    if entry is not None:
        d = entry.dims[0] if dims is None else dims
        _check_dims(entry, d)
        return entry.build(entry.num_classes if num_classes is None else num_classes,
                           entry.in_channels if in_channels is None else in_channels, d, **kwargs)

    prefix, name = _split(spec)
    if prefix in ("torchvision", "timm"):
        if dims not in (None, 2):
            raise ValueError(f"{spec!r} is a 2-D model, got dims={dims}.")
        if prefix == "torchvision":
            tv = _import_optional("torchvision.models", spec)
            if in_channels not in (None, 3):
                _require_rgb(spec, in_channels)
            if num_classes is not None:
                kwargs["num_classes"] = num_classes
            try:
                return tv.get_model(name, weights=None, **kwargs)
            except ValueError:
                raise ValueError(f"torchvision has no model {name!r}; see "
                                 f"torchvision.models.list_models().") from None
        timm = _import_optional("timm", spec)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if in_channels is not None:
            kwargs["in_chans"] = in_channels
        if name not in timm.list_models():
            raise ValueError(f"timm has no model {name!r}; see timm.list_models('*pattern*').")
        return timm.create_model(name, pretrained=False, **kwargs)

    factory = load_factory(prefix, name, spec)
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels), ("dims", dims)):
        if value is not None:
            kwargs[key] = value
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec!r} returned a {type(model).__name__}, not an nn.Module; the factory "
                        f"must build and return the model.")
    return model


def default_input_shape(spec: str, *, batch_size: int = 2, in_channels: Optional[int] = None,
                        dims: Optional[int] = None) -> Tuple[int, ...]:
    """A CPU-friendly input shape for a model spec, batch first.

    Classifiers: 224x224 in 2-D (ImageNet-style nets), 32^3 in 3-D; segmentation nets: 128x128 or
    32^3; ``small_resnet``: 64 / 32x32 / 16^3 for 1/2/3-D.

    Args:
        spec: as for :func:`build_model`.
        batch_size: leading dimension (>= 2 so BatchNorm can train on 1x1 feature maps).
        in_channels, dims: as passed to :func:`build_model`.

    Returns:
        ``(batch_size, channels, *spatial)``.

    Raises:
        ValueError: for ``package.module:factory`` specs, whose input is unknown -- pass your
            input shape explicitly.

    Example:
        >>> default_input_shape("monai:unet", dims=3)
        (2, 1, 32, 32, 32)
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
    entry = _entry(spec)
    if entry is None:
        prefix, _ = _split(spec)
        if prefix in ("torchvision", "timm"):
            return (batch_size, 3 if in_channels is None else in_channels, 224, 224)
        raise ValueError(f"no default input shape for user model {spec!r}: convbn cannot know what it "
                         f"takes. Pass the input shape explicitly (e.g. (2, 3, 224, 224)).")
    d = entry.dims[0] if dims is None else dims
    _check_dims(entry, d)
    channels = entry.in_channels if in_channels is None else in_channels
    return (batch_size, channels) + (entry.spatial_size(d),) * d
