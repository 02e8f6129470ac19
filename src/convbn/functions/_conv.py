"""Helpers shared by the three autograd Functions (tune, recompute, fission).

The layer geometry (:class:`ConvSpec`), the layer call itself, the autocast query, per-channel views,
the input checks every Function makes before computing anything, and the two helpers of the eager
C++ paths (OpenMP thread count, optional data pointers) and the test of whether a tensor may be
handed to them.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple, Union

import torch
from torch import Tensor

from ..errors import ConvBNError

__all__ = ["ConvSpec", "channel_dtype", "FLOAT64_DEVICES", "autocast_dtype", "layer", "channel_view", "threads", "ptr",
           "plain_host_tensor", "signature_cached", "eager_twin", "apply_function",
           "InputDTypeError", "check_input_dtype", "has_values", "is_functorch_wrapped", "is_batched",
           "TorchFuncBufferError", "running_stats_update", "cumulative_factor"]


def signature_cached(forward):
    """Decorate an ``autograd.Function.forward`` that has a ``setup_context``: ``Function.apply`` binds its
    arguments with ``inspect.signature(forward)`` on every call (~50 us of the ~100 us a small BN layer's
    Function costs here); ``inspect.signature`` returns a precomputed ``__signature__`` instead."""
    forward.__signature__ = inspect.signature(forward)
    return forward


def eager_twin(cls):
    """Class decorator for an ``autograd.Function`` with ``forward`` + ``setup_context``: gives it a twin
    (``cls._eager``) whose combined ``forward(ctx, *args)`` runs the same ``forward`` then the same
    ``setup_context``, and inherits everything else (``backward``, ``vmap`` rule). ``Function.apply`` binds
    a ``setup_context`` Function's arguments with ``inspect`` on every call, ~40 us a layer;
    :func:`apply_function` calls the twin where ``torch.func`` and ``torch.compile`` are not involved
    (they need ``setup_context``)."""
    params = tuple(inspect.signature(cls.forward).parameters.values())
    defaults = tuple(p.default for p in params)
    forward, setup_context = cls.forward, cls.setup_context

    def combined(ctx, *args):
        if len(args) < len(params):  # (callers pass positional arguments only)
            args = args + defaults[len(args):]
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    cls._eager = type(f"{cls.__name__}Eager", (cls,), {
        "__doc__": f"{cls.__name__} without ``setup_context`` (see :func:`convbn.functions._conv.eager_twin`).",
        "__module__": cls.__module__,
        "forward": staticmethod(combined),
        "setup_context": staticmethod(torch.autograd.Function.setup_context)})  # (the combined style)
    return cls


def apply_function(cls, *args):
    """``cls.apply(*args)``, through its :func:`eager_twin` unless compiling or inside a ``torch.func``
    transform on this thread."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return cls.apply(*args)
    return cls._eager.apply(*args)


@dataclass(frozen=True)
class ConvSpec:
    """Geometry of the convolution; ``None`` in its place means a ``Linear`` layer."""

    stride: Tuple[int, ...]
    padding: Tuple[int, ...]
    dilation: Tuple[int, ...]
    transposed: bool
    output_padding: Tuple[int, ...]
    groups: int


# Devices whose per-channel arithmetic (BN statistics, scales, gradient sums) runs in float64: on a CPU
# it costs nothing measurable on [C]-sized vectors; consumer GPUs run float64 at 1/32-1/64 rate and MPS
# has none, so everywhere else it is float32 accumulation. (Tests empty this to run the float32 path on
# the CPU.)
FLOAT64_DEVICES = ("cpu",)


def channel_dtype(device: Union[torch.device, str], dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-channel math for data of ``dtype`` on ``device``: float64 on the CPU or for
    float64 data, float32 everywhere else (never float64 on an accelerator).

    Example:
        >>> channel_dtype(torch.device("cpu"), torch.float32), channel_dtype("cuda", torch.bfloat16)
        (torch.float64, torch.float32)
        >>> channel_dtype("mps", torch.float32), channel_dtype("cuda", torch.float64)
        (torch.float32, torch.float64)
    """
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return torch.float64 if dtype == torch.float64 or device_type in FLOAT64_DEVICES else torch.float32


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device_type``, or ``None`` when autocast is off (or the device
    has no autocast, e.g. ``meta``).

    Example:
        >>> autocast_dtype("cpu") is None
        True
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     autocast_dtype("cpu")
        torch.bfloat16
        >>> autocast_dtype("meta") is None
        True
    """
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return None
    except TypeError:  # torch < 2.4: device-less signatures
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return None
    except RuntimeError:  # a device type autocast does not know ("meta")
        return None


def layer(x: Tensor, w: Tensor, b: Optional[Tensor], spec: Optional[ConvSpec]) -> Tensor:
    """The conv (``spec``) or linear (``spec is None``) layer."""
    if spec is None:
        return torch.nn.functional.linear(x, w, b)
    return torch.convolution(x, w, b, spec.stride, spec.padding, spec.dilation, spec.transposed,
                             spec.output_padding, spec.groups)


def channel_view(v: Tensor, like: Tensor) -> Tensor:
    """A ``[C]`` vector viewed to broadcast along dim 1 of ``like`` (``[N, C, *]``)."""
    return v.reshape((1, -1) + (1,) * (like.dim() - 2))


def threads(numel: int) -> int:
    """OpenMP threads for a kernel pass over ``numel`` elements: waking threads costs more than a
    small tensor's whole pass."""
    return max(1, min(torch.get_num_threads(), numel // 65536))


def ptr(t: Optional[Tensor]) -> Optional[int]:
    """``t.data_ptr()``, or ``None`` (a null pointer for ctypes) for an absent tensor."""
    return None if t is None else t.data_ptr()


def is_functorch_wrapped(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.func`` wrapper (``grad``'s or ``vmap``'s); ``False`` under
    ``torch.compile`` (which sees through no such wrapper, and cannot trace the query)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def is_batched(t: Optional[Tensor]) -> bool:
    """Whether ``t`` is a ``torch.func.vmap`` batched tensor (never under ``torch.compile``)."""
    return t is not None and not torch.compiler.is_compiling() and torch._C._functorch.is_batchedtensor(t)


def plain_host_tensor(t: Tensor) -> bool:
    """Whether ``t`` is an ordinary CPU tensor whose memory a C++ kernel may read through
    ``data_ptr()``: not a subclass, not a ``torch.func`` wrapper (vmap's batched tensors), not an
    inference tensor of another device, not ``meta``."""
    return type(t) in (Tensor, torch.nn.Parameter) and t.device.type == "cpu" and not is_functorch_wrapped(t)


class InputDTypeError(ConvBNError, TypeError):
    """A layer input of a dtype the layer cannot take (a ``ConvBNError`` and, as before, a ``TypeError``)."""


def check_input_dtype(who: str, x: Tensor, weight: Tensor, autocast: Optional[torch.dtype]) -> None:
    """Refuse what plain PyTorch's conv/linear refuses: a non-floating input ("Input type (long int)
    and bias type (float) should be the same") and, outside autocast, an input whose dtype differs
    from the weight's. Never cast silently to compute what plain PyTorch would not."""
    if not x.is_floating_point():
        raise InputDTypeError(
            f"{who}: expected a floating-point input, got {x.dtype}; a conv/linear layer cannot take integer or "
            f"bool tensors (plain PyTorch raises 'Input type ... should be the same'). Convert it first, e.g. "
            f"x.float()")
    if autocast is None and x.dtype != weight.dtype:
        raise InputDTypeError(
            f"{who}: the input is {x.dtype} but the layer's weight is {weight.dtype}; plain PyTorch refuses this "
            f"('Input type and weight type should be the same') outside autocast. Cast the input "
            f"(x.to({weight.dtype})) or the model, or run under torch.autocast")


def has_values(t: Tensor) -> bool:
    """Whether ``t``'s values may be read on the host or written through ``out=``: not ``meta``, not a
    ``torch.func`` wrapper (``vmap`` forbids data-dependent control flow on batched tensors)."""
    return t.device.type != "meta" and not is_functorch_wrapped(t)


class TorchFuncBufferError(ConvBNError, RuntimeError):
    """A ``torch.func`` transform refused the in-place running-statistics update of a train-mode
    block (a ``ConvBNError`` and, like plain PyTorch's error for the same call, a ``RuntimeError``)."""


@contextlib.contextmanager
def running_stats_update(who: str) -> Iterator[None]:
    """Turn ``torch.func``'s refusal to mutate a captured buffer into an error that says what to do.
    Plain PyTorch's BatchNorm fails the same way (``num_batches_tracked.add_(1)``)."""
    try:
        yield
    except RuntimeError as exc:
        if "mutate a captured Tensor" not in str(exc):
            raise
        raise TorchFuncBufferError(
            f"{who}: a torch.func transform (grad/vjp/jacrev) refused the in-place update of this train-mode "
            "block's running statistics, which the transformed function captured (plain PyTorch's BatchNorm "
            "fails the same way). Pass the buffers as an input of the transformed function, e.g. "
            "torch.func.grad(lambda p, b: loss(functional_call(model, (p, b), x)))(params, buffers); or use "
            "mode 'eval'/'tune', BatchNorm(track_running_stats=False) or "
            "torch.func.replace_all_batch_norm_modules_") from None


def cumulative_factor(num_batches_tracked: Tensor) -> Union[float, Tensor]:
    """``1 / num_batches_tracked``, ``_BatchNorm.forward``'s factor for ``momentum=None``: a Python float
    where reading the counter costs nothing (an eager CPU tensor: plain PyTorch's ``1.0 / float(n)``
    bit for bit), else a 0-d tensor on the counter's device -- no host sync on an accelerator, no graph
    break under ``torch.compile`` (float64 on the CPU, float32 elsewhere).

    Example:
        >>> cumulative_factor(torch.tensor(4))
        0.25
        >>> cumulative_factor(torch.tensor(4, device="meta")).shape
        torch.Size([])
    """
    if num_batches_tracked.device.type == "cpu" and not torch.compiler.is_compiling() \
            and not is_functorch_wrapped(num_batches_tracked):
        return 1.0 / float(num_batches_tracked)
    return num_batches_tracked.to(channel_dtype(num_batches_tracked.device, torch.float32)).reciprocal()
