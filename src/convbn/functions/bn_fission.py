"""Train-mode BatchNorm(+ReLU) by Fission (seed paper 002, Sec. 3.2, Fig. 5).

The forward pass is split into two sub-layers and each is a single memory sweep:

* **sub-BN1 (statistics, MVF).** Per channel, the mean and the biased variance come from *one* read
  of ``x``. The paper's ``V(X) = E(X^2) - E(X)^2`` loses every digit when ``mean >> std``, so we
  accumulate sums of the *shifted* data ``d = x - K`` (``K`` = mean of the channel's first few
  elements, so ``|mean(d)|`` is of order ``std``) in short float blocks flushed to float64:
  ``var = E(d^2) - E(d)^2`` then has no cancellation worth speaking of.
* **sub-BN2 (normalize + affine + ReLU).** One pass reading ``x`` and writing one tensor,
  ``z = max(((x - mean) * invstd) * gamma + beta, 0)``, computed as ``((x - m_hi) - m_lo) * a + beta``
  with the float64 mean split into two floats so ``x - mean`` stays exact when ``mean >> std``.

The backward pass is split the same way (Fig. 5b): one reduction sweep over ``(dy, x)`` for
``sum(g)`` and ``sum(g * (x - mean))`` (``g = dy * (z > 0)``, the ReLU mask *recomputed from x* with the
forward's own arithmetic -- never a stored bool tensor, never a re-read of the output), giving
``dbeta`` and ``dgamma``; then one elementwise sweep writing ``dx = a * g + b * (x - mean) + e`` with
per-channel ``a, b, e``. Saved for backward: ``x`` and float64 per-channel vectors (plus the affine
parameters).

Each direction is one ``convbn::bn_fission_*`` op (:mod:`convbn.ops.bn_fission`), called alike in eager
mode and under ``torch.compile``: on the CPU one fused C++/OpenMP call per direction (both sweeps and the
per-channel arithmetic: ``invstd``, the running-statistics update, ``dgamma``/``dbeta``) for float32 and
float64 in contiguous (``N, C, L``) or channels-last (``N, L, C``) layout; on every other device, for other
dtypes, or without a compiler (one warning), the op's reference in torch ops -- the same function.

Beyond one training step, as plain PyTorch: ``create_graph=True`` (a gradient penalty) differentiates
PyTorch's own twice-differentiable BN backward ops; an empty batch returns an empty output and leaves
the running statistics untouched; a one-value-per-channel batch is rejected after
``num_batches_tracked`` was incremented; under ``torch.func`` (``grad``/``jacrev``) the running
statistics are updated inside the Function when the buffers are an input of the transformed
function, and a transform that captured them, or ``vmap``, is refused with a ``ConvBNError``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..errors import ConvBNError
from ..ops import bn_fission as ops
from ..ops import native as native_ops
from ..ops._build import use_extension
from ._conv import (apply_function, cumulative_factor, eager_twin, is_batched, is_functorch_wrapped,
                    running_stats_update, signature_cached)

__all__ = [
    "BNReLUTrainFunction",
    "bn_relu_train",
    "bn_relu_train_forward",
    "bn_relu_train_backward",
    "channel_statistics",
    "extension_available",
    "use_extension",
]


def extension_available() -> bool:
    """Whether the C++ kernel is (or can be) built and loaded; builds it on first call.

    Returns:
        ``True`` if the ops' CPU implementation uses it for float32/float64 tensors.

    Example:
        >>> with use_extension("torch"):  # the torch references never load the kernel
        ...     extension_available()
        False
        >>> import os, shutil
        >>> extension_available() == (shutil.which(os.environ.get("CXX", "c++")) is not None or
        ...                           os.path.exists(ops.LIB.so_path()))  # built where a compiler (or a build) is
        True
    """
    return ops.LIB.get() is not None


def _wrapped(*tensors: Optional[Tensor]) -> bool:
    """``torch.func`` wrappers: the ops' kernels cannot read them, so the references are called directly."""
    return any(t is not None and is_functorch_wrapped(t) for t in tensors)


def channel_statistics(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel batch ``(mean, biased var)`` of ``x`` (``[N, C, *]``) in one sweep, as float64 (float32
    off the CPU unless ``x`` is float64: see :func:`convbn.functions._conv.channel_dtype`).

    Example:
        >>> x = 1000 + torch.randn(8, 3, 4, 4)
        >>> mean, var = channel_statistics(x)
        >>> torch.allclose(var, x.double().var(dim=(0, 2, 3), unbiased=False))
        True
    """
    if ops.geometry(x)[3] is None and ops.batch_stride(x) is None:  # (a channel slice is read in place)
        x = x.contiguous()
    return ops.stats_reference(x) if _wrapped(x) else ops.stats(x)


def bn_relu_train_forward(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, relu: bool,
    stats: Optional[Tuple[Tensor, Tensor]] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train-mode BN(+ReLU) without running statistics: sub-BN1 then sub-BN2 (the ``bn_fission_forward`` op).

    ``stats``: the batch ``(mean, biased var)`` of ``x``'s first ``K <= C`` channels if already known
    (ICF: a concatenation's statistics are its pieces'); only the other channels are measured.
    Returns ``(out, mean, invstd, var)``; the last three are ``[C]`` in the per-channel dtype (float64 on
    the CPU, float32 elsewhere unless ``x`` is float64; ``var`` biased).
    """
    mean, var = stats if stats is not None else (None, None)
    fwd = ops.forward_reference if _wrapped(x, weight, bias) else ops.forward
    out, mean, var, invstd = fwd(x, weight, bias, mean, var, None, None, 0.0, float(eps), bool(relu))
    return out, mean, invstd, var


def bn_relu_train_backward(
    grad_out: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor,
    relu: bool, needs: Sequence[bool],
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients ``(x, weight, bias)`` (the ``bn_fission_backward`` op): one reduction sweep, then (if
    needed) one elementwise sweep. With ``relu`` the ReLU mask is recomputed from ``x`` exactly as the
    forward computed the output, so neither the output nor a bool mask is kept or read back."""
    need_x, need_w, need_b = (bool(n) for n in needs)
    bwd = ops.backward_reference if _wrapped(grad_out, x, weight, bias) else ops.backward
    gx, gw, gb = bwd(grad_out, x, weight, bias, mean, invstd, bool(relu), need_x, need_w, need_b)
    return (gx if need_x else None, gw if need_w and weight is not None else None,
            gb if need_b and bias is not None else None)


def _fission_forward(x, weight, bias, eps, relu, stats, running, wrapped: bool):
    """The Functions' forward: the op (or, for ``torch.func`` wrappers, its reference) and the
    running-statistics update; ``(out, mean, var, invstd)``."""
    rm, rv, factor = running if running is not None else (None, None, 0.0)
    later = isinstance(factor, Tensor)  # a factor on the device: the update after the op, in torch ops
    mean, var = stats if stats is not None else (None, None)
    fwd = ops.forward_reference if wrapped else ops.forward
    out, mean, var, invstd = fwd(x, weight, bias, mean, var, None if later else rm, None if later else rv,
                                 0.0 if later else float(factor), float(eps), bool(relu))
    if later:
        ops.update_running_stats(rm, rv, mean, var, x.numel() // x.shape[1], factor)
    return out, mean, var, invstd


@eager_twin
class BNReLUTrainFunction(torch.autograd.Function):
    """Train-mode BatchNorm (+ReLU) by Fission; returns ``(out, mean, var, invstd)`` (per-channel dtype:
    float64 on the CPU, float32 elsewhere unless ``x`` is float64; ``var`` biased).

    Saves ``x`` and per-channel vectors (plus the affine parameters, alive anyway) -- not the
    output: the ReLU backward recomputes its mask from ``x``. ``running``: ``(running_mean,
    running_var, factor)`` to update in place in forward (inside the op, or after it when ``factor`` is a
    tensor), or ``None``.

    Differentiable twice: with ``create_graph=True`` backward is computed by the aten ops plain
    PyTorch's BN backward uses (twice differentiable, see :func:`_differentiable_backward`). ``forward`` +
    ``setup_context``, so ``torch.func.grad``/``jacrev`` work; ``vmap`` with running statistics is
    refused (``ConvBNError``). :func:`bn_relu_train` calls it through
    :func:`~convbn.functions._conv.apply_function` (eager calls skip ``inspect``'s argument binding).
    """

    generate_vmap_rule = True

    @staticmethod
    @signature_cached
    def forward(x, weight, bias, eps, relu, stats=None, running=None):  # type: ignore[override]
        if running is not None and (running[0] is not None or running[1] is not None):
            _refuse_vmap(x)
        if running is not None and torch.compiler.is_compiling():
            raise RuntimeError("BNReLUTrainFunction: under torch.compile the caller updates the running "
                               "statistics (bn_relu_train does)")
        rm, rv = running[:2] if running is not None else (None, None)
        return _fission_forward(x, weight, bias, eps, relu, stats, running, _wrapped(x, weight, bias, rm, rv))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, eps, relu, _, _ = inputs
        _, mean, var, invstd = output
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.relu, ctx.eps = relu, eps
        ctx.mark_non_differentiable(mean, var, invstd)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var, _grad_invstd):  # type: ignore[override]
        x, weight, bias, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled() or _wrapped(grad_out, x):
            # create_graph=True or torch.func: PyTorch's own (twice differentiable) BN backward ops
            gx, gw, gb = _differentiable_backward(ctx, grad_out, x, weight, bias, (need_x, need_w, need_b))
        else:
            gx, gw, gb = bn_relu_train_backward(grad_out, x, weight, bias, mean, invstd, ctx.relu,
                                                (need_x, need_w, need_b))
        return gx, gw, gb, None, None, None, None


def _differentiable_backward(ctx, grad_out: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                             needs: Sequence[bool]):
    """Gradients by the aten ops plain PyTorch's BN backward uses (``native_batch_norm_backward``, whose
    own derivative accounts for the batch statistics' dependence on ``x``), so they are differentiable
    again: for ``create_graph=True`` (the saved float64 statistics carry no graph) and ``torch.func``.
    The statistics and the ReLU mask are recomputed by PyTorch's train kernel (equal to the forward's
    to rounding)."""
    need_x, need_w, need_b = needs
    z, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, None, None, True, 0.0, ctx.eps)
    g = torch.ops.aten.threshold_backward(grad_out.to(z.dtype), z, 0) if ctx.relu else grad_out.to(z.dtype)
    del z
    return torch.ops.aten.native_batch_norm_backward(
        g, x, weight, None, None, mean, invstd, True, ctx.eps,
        [need_x, need_w and weight is not None, need_b and bias is not None])


def _refuse_vmap(x: Tensor) -> None:
    if is_batched(x):
        raise ConvBNError(
            "bn_relu_train (fission): torch.func.vmap over a train-mode BatchNorm that updates running statistics "
            "in place: the per-sample statistics cannot be written into the one unbatched buffer (plain PyTorch "
            "refuses this too). Use mode 'eval'/'tune' (running statistics), or plain 'train' with "
            "torch.func.replace_all_batch_norm_modules_, or BatchNorm(track_running_stats=False)")


def bn_relu_train(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
    *,
    relu: bool = True,
    stats: Optional[Tuple[Tensor, Tensor]] = None,
    return_stats: bool = False,
) -> Union[Tensor, Tuple[Tensor, Optional[Tensor], Optional[Tensor]]]:
    """``relu(batch_norm(x, training=True))`` by Fission; updates the running statistics in place.

    Equals ``torch.nn.BatchNorm{1,2,3}d`` in train mode followed by ``torch.relu``: normalisation by the
    biased batch variance (``eps`` inside the square root), running statistics updated with the
    unbiased variance. As in ``_BatchNorm.forward``, ``num_batches_tracked`` (if given) is incremented
    first, and ``momentum=None`` means the cumulative average ``1 / num_batches_tracked``.

    Args:
        x: ``[N, C, *]`` input (any number of spatial dims, including none), contiguous or channels-last.
        weight, bias: the BN affine parameters ``[C]``, or ``None`` (``affine=False``).
        running_mean, running_var: ``[C]`` buffers updated in place, or ``None``
            (``track_running_stats=False``).
        num_batches_tracked: the BN's counter (incremented in place), or ``None``.
        momentum: the BN's momentum, or ``None`` for a cumulative moving average.
        eps: added to the variance inside the square root.
        relu: fuse a ReLU into the output (and its backward).
        stats: optional precomputed batch ``(mean, biased var)`` of ``x``'s first ``K <= C`` channels
            (e.g. the statistics of the leading pieces of a ``torch.cat``, measured earlier); only the
            other channels are measured (``K = C``: no statistics sweep).
        return_stats: also return the batch ``(mean, biased var)`` the output was normalized with
            (per-channel dtype; ``None`` for an empty batch).

    Returns:
        The output, same shape, dtype and memory layout as ``x``; differentiable w.r.t. ``x``,
        ``weight`` and ``bias``. With ``return_stats``: ``(output, mean, var)``.

    Example:
        >>> bn = torch.nn.BatchNorm2d(4)
        >>> x = torch.randn(2, 4, 5, 5) * 3 + 1
        >>> z = bn_relu_train(x, bn.weight, bn.bias, bn.running_mean.clone(), bn.running_var.clone(),
        ...                   bn.num_batches_tracked.clone(), bn.momentum, bn.eps)
        >>> torch.allclose(z, torch.relu(bn(x)), atol=1e-5)
        True
    """
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"bn_relu_train: x must be a Tensor of shape [N, C, *], got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    c = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and t.numel() != c:
            raise ValueError(f"bn_relu_train: {name} has {t.numel()} elements but x has {c} channels "
                             f"(shape {tuple(x.shape)}); pass the BatchNorm that matches this input.")
    if stats is not None and (len(stats) != 2 or any(not isinstance(s, Tensor) or s.dim() != 1 for s in stats)
                              or stats[0].shape != stats[1].shape or stats[0].shape[0] > c):
        raise ValueError(f"bn_relu_train: stats must be (mean, var), two [K] tensors with K <= {c} (the statistics "
                         f"of x's first K channels), got {[tuple(getattr(s, 'shape', ())) for s in stats]}")
    with running_stats_update("bn_relu_train (fission)"):
        out, mean, var = _bn_relu_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                                        eps, relu, stats)
    return (out, mean, var) if return_stats else out


def _native(x, weight, bias, running_mean, running_var, factor, compiling: bool):
    """``convbn::bn_relu_train_native`` where it applies (eager, outside ``torch.func``, what the CPU
    kernels take, a float momentum), else ``None``."""
    if compiling or isinstance(factor, Tensor) or torch._C._functorch.peek_interpreter_stack() is not None:
        return None
    if ops._kernel(x, (weight, bias), (running_mean, running_var)) is None:
        return None
    return native_ops.op()


def _bn_relu_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, relu, stats):
    c = x.shape[1]
    factor: Union[float, Tensor] = 0.0 if momentum is None else float(momentum)
    compiling = torch.compiler.is_compiling()
    # As _BatchNorm.forward: the counter first -- also for a call F.batch_norm then rejects
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:  # a tensor off the CPU and when compiled: no host sync, no graph break
            factor = cumulative_factor(num_batches_tracked)
    if x.numel() == c:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    if x.numel() == 0:  # an empty batch: PyTorch's empty output, running statistics untouched
        out = torch.nn.functional.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
        return (torch.relu(out) if relu else out), None, None
    if ops.geometry(x)[3] is None:
        x = x.contiguous()

    tracked = running_mean is not None or running_var is not None
    # Running statistics are updated inside the Function's forward (in the op, or by torch ops after it
    # for a factor on the device), so torch.func transforms see no mutation of a captured buffer;
    # compiled graphs update them here, outside the Function.
    running = (running_mean, running_var, factor) if tracked and not compiling else None
    native = _native(x, weight, bias, running_mean, running_var, factor, compiling)
    if native is not None:  # the same kernels, with the autograd around them in C++ (convbn.ops.native)
        mean, var = stats if stats is not None else (None, None)
        out, mean, var, _ = native(x, weight, bias, mean, var, running_mean, running_var, float(factor), float(eps),
                                   bool(relu))
        return out, mean, var
    out, mean, var, _ = apply_function(BNReLUTrainFunction, x, weight, bias, float(eps), bool(relu), stats, running)
    if tracked and running is None:
        ops.update_running_stats(running_mean, running_var, mean, var, x.numel() // c, factor)
    return out, mean, var
