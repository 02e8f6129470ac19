"""Shared plumbing of the experiments: mode variants, models and inputs, losses, errors, output files."""

from __future__ import annotations

import copy
import inspect
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import convbn
from convbn.errors import ConvBNError
from convbn.models.registry import available_models, build_model, default_input_shape

__all__ = [
    "ModeVariant", "mode_variants", "convert_variant", "default_model_spec", "resolve_model",
    "make_input", "input_shape", "parse_dtype", "max_rel_err", "tensors_of", "FixedProjectionLoss",
    "environment", "write_json", "mib", "Progress", "ExperimentError",
]


class ExperimentError(ValueError):
    """A bad experiment setting (what, why, how to fix); the CLI prints it without a traceback."""


# ----------------------------------------------------------------------------------------- modes
@dataclass(frozen=True)
class ModeVariant:
    """One column of a comparison: a ``convbn.convert`` mode plus keyword options.

    Attributes:
        name: label in tables, e.g. ``"train+recompute"``.
        mode: the ``convbn.convert`` mode.
        options: extra keyword arguments for ``convbn.convert`` (e.g. ``{"recompute": True}``).
    """

    name: str
    mode: str
    options: Dict[str, Any] = field(default_factory=dict)

    @property
    def is_train(self) -> bool:
        return self.mode == "train"


# Train variants added to convbn.convert by keyword: (label, keyword).
_TRAIN_OPTIONS = (("train+recompute", "recompute"), ("train+fission", "fission"))


def mode_variants(modes: Optional[Sequence[str]] = None) -> Tuple[List[ModeVariant], List[str]]:
    """The variants to compare and notes about the ones left out.

    Args:
        modes: names among ``train``, ``train+recompute``, ``train+fission``, ``eval``, ``tune``,
            ``deploy``. ``None``: all of them that this ``convbn.convert`` supports.

    Returns:
        ``(variants, notes)``. A train variant whose keyword ``convbn.convert`` does not accept is
        left out with a note when ``modes`` is ``None`` and raises when asked for explicitly.

    Example:
        >>> [v.name for v in mode_variants(["eval", "tune"])[0]]
        ['eval', 'tune']
    """
    params = inspect.signature(convbn.convert).parameters
    every = [ModeVariant("train", "train")]
    notes = []
    unsupported = {}
    for label, kw in _TRAIN_OPTIONS:
        if kw in params:
            every.append(ModeVariant(label, "train", {kw: True}))
        else:
            unsupported[label] = kw
            notes.append(f"{label} skipped: this convbn.convert has no `{kw}=` option yet")
    every += [ModeVariant(m, m) for m in ("eval", "tune", "deploy")]
    if modes is None:
        return every, notes
    by_name = {v.name: v for v in every}
    chosen = []
    for name in modes:
        name = name.strip().lower()
        if name in unsupported:
            raise ExperimentError(f"mode {name!r} needs convbn.convert(..., {unsupported[name]}=True), which this "
                                  f"version of convbn does not have; drop it from --modes or update convbn")
        if name not in by_name:
            raise ExperimentError(f"unknown mode {name!r}; choose from {', '.join(by_name)}")
        if by_name[name] not in chosen:
            chosen.append(by_name[name])
    if not chosen:
        raise ExperimentError("no modes selected; pass e.g. --modes eval,tune")
    return chosen, []


def convert_variant(model: nn.Module, variant: ModeVariant, example_inputs: Any = None) -> nn.Module:
    """``convbn.convert(model, variant.mode, **variant.options)``; retried with ``example_inputs``
    when ``torch.fx`` cannot trace the model."""
    try:
        return convbn.convert(model, variant.mode, **variant.options)
    except ConvBNError:
        if example_inputs is None:
            raise
        return convbn.convert(model, variant.mode, example_inputs=example_inputs, **variant.options)


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
    """Build a model from a spec (see ``convbn.models.registry``), with CLI-friendly errors.

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


def make_input(shape: Sequence[int], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A standard-normal input batch from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
           "fp64": torch.float64, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ExperimentError(f"unknown dtype {name!r}; choose float32, float64, bfloat16 or float16") from None


def memory_format_for(x: torch.Tensor, channels_last: bool) -> torch.memory_format:
    if not channels_last:
        return torch.contiguous_format
    if x.dim() == 4:
        return torch.channels_last
    if x.dim() == 5:
        return torch.channels_last_3d
    raise ExperimentError(f"--channels-last needs 2-D or 3-D images (4-D/5-D input), got a {x.dim()}-D input")


# ---------------------------------------------------------------------------------------- numbers
def tensors_of(out: Any) -> List[torch.Tensor]:
    """The floating-point tensors in a model output (tensor, tuple, list or dict)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in tensors_of(o)]
    return []


class FixedProjectionLoss:
    """``sum(out_i * g_i)`` with fixed random ``g_i`` (drawn once from ``seed``): a loss whose gradient
    with respect to the output does not depend on the output, so every mode backpropagates the same
    signal."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._g: Optional[List[torch.Tensor]] = None

    def __call__(self, out: Any) -> torch.Tensor:
        ts = tensors_of(out)
        if not ts:
            raise ExperimentError("the model returned no floating-point tensor; convbn's experiments need a "
                                  "tensor (or a tuple/dict of tensors) as output")
        if self._g is None:
            gen = torch.Generator().manual_seed(self.seed)
            self._g = [torch.randn(t.shape, generator=gen) / max(t.numel(), 1) ** 0.5 for t in ts]
        return sum((t.float() * g).sum() for t, g in zip(ts, self._g))


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|a - e| / max|e|``: a scale-aware error."""
    a, e = actual.detach().double(), expected.detach().double()
    denom = e.abs().max().clamp_min(1e-30)
    return float((a - e).abs().max() / denom)


def mib(nbytes: float) -> float:
    return nbytes / 2 ** 20


# ---------------------------------------------------------------------------------------- output
def environment() -> Dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "convbn": convbn.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_json(path: str, payload: Dict[str, Any]) -> str:
    """Write ``payload`` (plus ``environment``) as indented JSON; create parent directories."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    payload = {"environment": environment(), **payload}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=_jsonable)
        f.write("\n")
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    if hasattr(obj, "__dict__"):
        return vars(obj)
    return str(obj)


class Progress:
    """A dependency-free progress bar on stderr: redrawn in place on a terminal, one line per
    ``every`` steps otherwise (logs stay readable); silent when ``enabled`` is False."""

    def __init__(self, total: int, label: str = "", enabled: bool = True, width: int = 28):
        self.total, self.label, self.enabled, self.width = max(int(total), 1), label, enabled, width
        self.done = 0
        self.start = time.perf_counter()
        self.tty = enabled and sys.stderr.isatty()

    def update(self, what: str = "", n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        line = f"{self.label} [{bar}] {self.done}/{self.total} {elapsed:5.0f}s (eta {eta:4.0f}s) {what}"
        if self.tty:
            sys.stderr.write("\r" + line[:150].ljust(150))
            if self.done >= self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def fresh_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def model_choices_hint() -> str:
    return (f"built-in/MONAI: {', '.join(available_models())}; also torchvision:NAME / timm:NAME when "
            f"installed, or package.module:factory for your own model")
