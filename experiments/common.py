"""Shared plumbing of the experiments: models and inputs by spec, errors; the measuring pieces come from convbn."""

from __future__ import annotations

import copy
from typing import Optional, Tuple

from torch import nn

# The measurement plumbing is the library's (convbn.bench.compare, convbn.cli.options); re-exported here
# so the experiments read as before.
from convbn.bench.compare import (FixedProjectionLoss, ModeVariant, convert_variant, max_rel_err,  # noqa: F401
                                  mib, mode_variants, tensors_of)
from convbn.cli.options import (CLIError, Progress, environment, make_input, memory_format_for,  # noqa: F401
                                 parse_dtype, write_json)

from .models.registry import available_models, build_model, default_input_shape

__all__ = [
    "ModeVariant", "mode_variants", "convert_variant", "default_model_spec", "resolve_model",
    "make_input", "input_shape", "parse_dtype", "max_rel_err", "tensors_of", "FixedProjectionLoss",
    "environment", "write_json", "mib", "Progress", "ExperimentError",
]


MODEL_HELP = ("model spec: a built-in (small_resnet, mobilenet_v2, mobilenet_v2_pretrained), a MONAI name "
              "(monai:resnet50, monai:unet, ...), torchvision:NAME / timm:NAME when installed, or "
              "package.module:factory for your own model. `python -m experiments appendix-m --list` shows them all")


class ExperimentError(CLIError):
    """A bad experiment setting (what, why, how to fix); the CLI prints it without a traceback."""


# ---------------------------------------------------------------------------------------- models
def monai_available() -> bool:
    try:
        import monai.networks.nets  # noqa: F401
    except Exception:
        return False
    return True


def default_model_spec() -> str:
    """``monai:resnet50`` when MONAI is importable, else the built-in ``small_resnet``."""
    return "monai:resnet50" if monai_available() else "small_resnet"


_NUM_CLASSES_MODELS = ("mobilenet_v2",)


def resolve_model(spec: str, *, in_channels: Optional[int] = None, dims: Optional[int] = None,
                  num_classes: Optional[int] = None) -> nn.Module:
    """Build a model from a spec (see ``experiments.models.registry``), with CLI-friendly errors.

    ``mobilenet_v2``/``mobilenet_v2_pretrained`` default to 10 classes here (the experiments never
    need ImageNet's 1000).
    """
    if num_classes is None and spec.strip().lower() in ("mobilenet_v2", "mobilenet_v2_pretrained"):
        num_classes = 10
    try:
        return build_model(spec, num_classes=num_classes, in_channels=in_channels, dims=dims)
    except (ValueError, TypeError, ImportError, FileNotFoundError) as e:
        raise ExperimentError(str(e)) from None


def input_shape(spec: str, batch_size: int, *, input_size: Optional[int] = None,
                in_channels: Optional[int] = None, dims: Optional[int] = None) -> Tuple[int, ...]:
    """``(batch, channels, *spatial)``: the registry's default, or ``input_size`` per side."""
    if input_size is None:
        try:
            return default_input_shape(spec, batch_size=batch_size, in_channels=in_channels, dims=dims)
        except ValueError as e:
            raise ExperimentError(f"{e} With the CLI: --input-size SIDE (and --channels C, --dims D).") from None
    try:
        base = default_input_shape(spec, batch_size=batch_size, in_channels=in_channels, dims=dims)
        channels, nd = base[1], len(base) - 2
    except ValueError:  # the user's own model: channels/dims are what the user said (or 3 / 2)
        channels, nd = (3 if in_channels is None else in_channels), (2 if dims is None else dims)
    return (batch_size, channels) + (int(input_size),) * nd


def fresh_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def model_choices_hint() -> str:
    return (f"built-in/MONAI: {', '.join(available_models())}; also torchvision:NAME / timm:NAME when "
            f"installed, or package.module:factory for your own model")
