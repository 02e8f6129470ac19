"""Train mode with recomputation: BatchNorm on batch statistics, bytes saved as if BN were not there.

Plain PyTorch runs ``relu(bn_train(conv(x)))`` as three autograd nodes that save ``x`` (conv), the
conv output ``y`` (BN) and the block output (ReLU; usually shared with the next conv's input). This
Function computes the same thing in one node and saves only ``x``, the parameters (alive anyway)
and two ``[C_out]`` vectors (batch mean and ``invstd``). Backward recomputes ``y = conv(x, w, b)``
-- one extra convolution -- and, for the ReLU mask, the block output from ``y`` and the saved
statistics. This is the technique of the PyTorch tutorial "Fusing Convolution and Batch Norm using
Custom Function", generalised to every layer kind and to the full ``nn.BatchNorm`` semantics:

* Conv1d/2d/3d, ConvTranspose1d/2d/3d (any stride, padding, dilation, output_padding, groups) and
  Linear on 2-D input (BN1d over features), described by a :class:`~convbn.functions.tune.ConvSpec`
  (``None`` for Linear);
* conv bias optional, ``affine=False`` (``bn_weight``/``bn_bias`` ``None``), eps inside the sqrt;
* running statistics updated in place exactly like ``_BatchNorm.forward``: ``num_batches_tracked``
  is incremented first (also when the call is then rejected for one value per channel, as in
  PyTorch), then the factor is ``momentum`` or, for ``momentum=None``, ``1 /
  num_batches_tracked``; the running variance gets the *unbiased* batch variance. With
  ``track_running_stats=False`` pass ``None`` for all three buffers. An empty batch returns an empty
  output and leaves the running statistics untouched, as PyTorch does.

Numerics. The statistics, the normalisation and the running-statistics update are PyTorch's own
train-mode kernel (``aten.native_batch_norm`` with the running buffers and the factor above), so
they are plain PyTorch's bit for bit -- in every dtype (bf16/fp16 models too) and under autocast,
where, like plain PyTorch, the convolution runs in the autocast dtype and the kernel takes the
mixed-dtype path (float32 statistics and buffers). The input saved for backward is ``x`` cast to the
compute dtype, which is what autocast's own convolution saves.

Backward: one recomputed layer forward, the same train-mode kernel on the bit-identical recomputed
``y`` for the batch statistics and the ReLU mask, ``aten.threshold_backward`` for the ReLU,
``aten.native_batch_norm_backward`` (the kernel plain PyTorch uses), and one
``aten.convolution_backward`` with an ``output_mask``.

Double backward (``create_graph=True``) is supported: in that case backward re-runs the block with
ordinary differentiable ops (batch statistics, no running-stat update) and differentiates it, like
``torch.utils.checkpoint``; this costs a second forward but gives exact higher-order gradients. It
is refused with a ``RuntimeError`` when ``x`` was cast to another dtype, e.g. by autocast: the cast
copy saved for backward has no graph back to ``x``.

``torch.func``: ``grad``/``jacrev`` work (``forward`` + ``setup_context``) and equal plain PyTorch's,
running statistics included, when the buffers are an input of the transformed function; a
transform that captured them refuses their in-place update -- plain PyTorch's BatchNorm fails the
same way -- and convbn raises a ``ConvBNError`` (also a ``RuntimeError``) saying so. ``vmap`` over a
block with running statistics is refused with a ``ConvBNError`` (per-sample statistics cannot be
written into one buffer).

Not covered: ``SyncBatchNorm`` (its statistics and gradient sums need cross-process reductions).
"""

from __future__ import annotations

import contextlib
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..errors import ConvBNError
from ._conv import (ConvSpec, apply_function, autocast_dtype, check_input_dtype, cumulative_factor, eager_twin,
                    is_batched, is_functorch_wrapped, running_stats_update, signature_cached)
from ._conv import layer as _layer

__all__ = [
    "RecomputeConvBNFunction",
    "recompute_conv_bn",
    "recompute_forward",
    "recompute_backward",
    "batch_statistics",
    "update_factor_",
    "update_running_stats_",
]


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(torch.float32, dtype)


def _out_channels(weight: Tensor, spec: Optional[ConvSpec]) -> int:
    if spec is not None and spec.transposed:
        return weight.shape[1] * spec.groups
    return weight.shape[0]


def _reduce_dims(y: Tensor) -> List[int]:
    return [0] + list(range(2, y.dim()))


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def batch_statistics(y: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel batch ``(mean, biased variance)`` of ``y`` (``[N, C, *spatial]`` or ``[N, C]``).

    Computed with ``torch.var_mean`` in float32 (float64 stays float64), so a channel whose mean is
    large relative to its standard deviation loses nothing to cancellation.

    Example:
        >>> y = 1000 + torch.randn(64, 2, 8, 8)
        >>> mean, var = batch_statistics(y)
        >>> torch.allclose(var, y.double().var(dim=(0, 2, 3), unbiased=False).float(), rtol=1e-5)
        True
    """
    y_stat = y.to(_stat_dtype(y.dtype))
    var, mean = torch.var_mean(y_stat, dim=_reduce_dims(y_stat), correction=0)
    return mean, var


def update_factor_(num_batches_tracked: Optional[Tensor], momentum: Optional[float]) -> Union[float, Tensor]:
    """``_BatchNorm.forward``'s running-average factor: increments ``num_batches_tracked`` (if given)
    first, then returns ``momentum`` or, when ``momentum is None``, ``1 / num_batches_tracked`` (``0``
    without a counter, as in PyTorch) -- a float, or a 0-d tensor when reading the counter would be a
    host sync (off the CPU; see :func:`convbn.functions._conv.cumulative_factor`).

    Example:
        >>> nbt = torch.tensor(3)
        >>> update_factor_(nbt, None), int(nbt), update_factor_(None, 0.1)
        (0.25, 4, 0.1)
    """
    factor = 0.0 if momentum is None else float(momentum)
    if num_batches_tracked is not None:
        with torch.no_grad():
            num_batches_tracked.add_(1)
        if momentum is None:
            factor = cumulative_factor(num_batches_tracked)
    return factor


def update_running_stats_(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: Optional[float],
) -> None:
    """Update BatchNorm running statistics in place, exactly as ``_BatchNorm.forward`` in training.

    ``num_batches_tracked`` is incremented first; the factor is then ``momentum`` or, when
    ``momentum is None``, ``1 / num_batches_tracked`` (``0`` if there is no counter, as in PyTorch).
    ``running_var`` receives the unbiased variance ``var * count / (count - 1)``.

    Example:
        >>> rm, rv, nbt = torch.zeros(2), torch.ones(2), torch.tensor(0)
        >>> update_running_stats_(rm, rv, nbt, torch.tensor([1., 2.]), torch.tensor([2., 2.]), 3, None)
        >>> rm, rv, nbt
        (tensor([1., 2.]), tensor([3., 3.]), tensor(1))
    """
    factor = update_factor_(num_batches_tracked, momentum)
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        if isinstance(factor, Tensor):
            running_mean.lerp_(mean.to(running_mean.dtype), factor.to(running_mean.dtype))
            running_var.lerp_(unbiased.to(running_var.dtype), factor.to(running_var.dtype))
        else:
            running_mean.mul_(1.0 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
            running_var.mul_(1.0 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)


def one_value_per_channel_error(y: Tensor) -> ValueError:
    """The error ``F.batch_norm`` raises in training for one value per channel (same type, same text)."""
    return ValueError(f"Expected more than 1 value per channel when training, got input size {y.size()}")


def recompute_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    gamma: Optional[Tensor],
    beta: Optional[Tensor],
    eps: float,
    spec: Optional[ConvSpec],
    relu: bool,
    compute_dtype: torch.dtype,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    num_batches_tracked: Optional[Tensor] = None,
    momentum: Optional[float] = None,
) -> Tensor:
    """``relu?(bn_train(layer(x)))``, updating the running statistics (if given) exactly as
    ``nn.BatchNorm`` does: ``num_batches_tracked`` first (also when the call is then rejected for one
    value per channel, as in PyTorch), then PyTorch's own train-mode kernel ``native_batch_norm``
    with the factor ``_BatchNorm.forward`` computes -- the running variance is the kernel's unbiased
    batch variance, never rebuilt from ``invstd``. An empty batch leaves the running statistics
    untouched and returns an empty output, as PyTorch does.
    """
    x_used = x if x.dtype == compute_dtype else x.to(compute_dtype)
    y = _layer(x_used, weight.to(compute_dtype), _cast(bias, compute_dtype), spec)
    factor = update_factor_(num_batches_tracked, momentum)
    if y.numel() == y.shape[1]:  # as F.batch_norm: one value per channel (after the counter, as PyTorch)
        raise one_value_per_channel_error(y)
    if y.numel() == 0:
        return torch.empty_like(y)
    if isinstance(factor, Tensor) and running_mean is not None:
        out = _batch_norm_with_tensor_factor(y, gamma, beta, running_mean, running_var, factor, eps)
    else:
        out = torch.ops.aten.native_batch_norm(y, gamma, beta, running_mean, running_var, True, factor, eps)[0]
    return out.relu_() if relu else out


def _batch_norm_with_tensor_factor(y: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor], running_mean: Tensor,
                                   running_var: Tensor, factor: Tensor, eps: float) -> Tensor:
    """``native_batch_norm`` in training with a factor only known on the device (``momentum=None`` off the
    CPU): the kernel writes its own batch mean and unbiased variance into zeroed buffers (momentum 1),
    which are then averaged in with the factor as a tensor -- no host sync."""
    batch_mean, batch_var = torch.zeros_like(running_mean), torch.zeros_like(running_var)
    out = torch.ops.aten.native_batch_norm(y, gamma, beta, batch_mean, batch_var, True, 1.0, eps)[0]
    with torch.no_grad():
        running_mean.lerp_(batch_mean, factor.to(running_mean.dtype))
        running_var.lerp_(batch_var, factor.to(running_var.dtype))
    return out


def recompute_backward(
    grad_out: Tensor,
    x_used: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    gamma: Optional[Tensor],
    beta: Optional[Tensor],
    eps: float,
    spec: Optional[ConvSpec],
    relu: bool,
    compute_dtype: torch.dtype,
    needs: Sequence[bool],
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients ``(x, weight, bias, gamma, beta)`` of :func:`recompute_forward`; ``needs`` masks them.

    Recomputes the layer output ``y`` from ``x_used`` and, with the same kernel on the bit-identical
    ``y``, the forward's batch statistics and (for the ReLU mask) its output; never differentiates
    through the statistics by autograd (the training-mode BN backward formula accounts for them).
    """
    need_x, need_w, need_b, need_gamma, need_beta = needs
    need_y = need_x or need_w or need_b
    w = weight.to(compute_dtype)
    y = _layer(x_used, w, _cast(bias, compute_dtype), spec)
    if y.numel() == 0:  # an empty batch: every gradient is zero, as in plain PyTorch
        return tuple(None if not need or t is None else torch.zeros_like(t)
                     for need, t in zip(needs, (x_used, weight, bias, gamma, beta)))
    g = grad_out.to(y.dtype)
    z, mean, invstd = torch.ops.aten.native_batch_norm(y, gamma, beta, None, None, True, 0.0, eps)
    if relu:  # the forward output, recomputed bit for bit; relu's own backward masks with ``out > 0``
        g = torch.ops.aten.threshold_backward(g, z, 0)
    del z
    gy, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
        g, y, gamma, None, None, mean, invstd, True, eps,
        [need_y, need_gamma and gamma is not None, need_beta and beta is not None],
    )
    del y, g
    gx = gw = gb = None
    if need_y:
        if spec is None:
            gx = gy @ w if need_x else None
            gw = gy.t() @ x_used if need_w else None
            gb = gy.sum(0) if need_b else None
        else:
            gx, gw, gb = torch.ops.aten.convolution_backward(
                gy, x_used, w, [_out_channels(weight, spec)], spec.stride, spec.padding, spec.dilation,
                spec.transposed, spec.output_padding, spec.groups, [need_x, need_w, need_b and bias is not None],
            )
    return gx, gw, gb, grad_gamma, grad_beta


def _differentiable_block(
    x_used: Tensor, weight: Tensor, bias: Optional[Tensor], gamma: Optional[Tensor], beta: Optional[Tensor],
    eps: float, spec: Optional[ConvSpec], relu: bool, compute_dtype: torch.dtype,
) -> Tensor:
    """The block in ordinary autograd ops (used only for double backward)."""
    y = _layer(x_used, weight.to(compute_dtype), _cast(bias, compute_dtype), spec)
    z = torch.nn.functional.batch_norm(y, None, None, gamma, beta, training=True, eps=eps)
    return torch.relu(z) if relu else z


def _autocast_off(device: str, act: Optional[torch.dtype]):
    return torch.autocast(device, enabled=False) if act is not None else contextlib.nullcontext()


def _refuse_vmap_with_running_stats(who: str, tensors: Sequence[Optional[Tensor]], running: Optional[Tensor]) -> None:
    if running is not None and any(is_batched(t) for t in tensors):
        raise ConvBNError(
            f"{who}: torch.func.vmap over a train-mode block that updates running statistics in place: the "
            "per-sample statistics cannot be written into the one unbatched buffer (plain PyTorch refuses this "
            "too). Use mode 'eval'/'tune' (running statistics), or plain 'train' with "
            "torch.func.replace_all_batch_norm_modules_, or BatchNorm(track_running_stats=False)")


@eager_twin
class RecomputeConvBNFunction(torch.autograd.Function):
    """Conv/ConvTranspose/Linear -> BatchNorm (batch statistics) -> optional ReLU, recomputing ``y``.

    Saves ``x`` (cast to the compute dtype) and the parameters; never the conv output, the BN output,
    a ReLU mask nor per-channel statistics (backward recomputes them bit for bit). Updates the
    running statistics in place. ``forward`` + ``setup_context``, so ``torch.func.grad``/``jacrev``
    work; ``vmap`` works without running statistics and is refused (``ConvBNError``) with them.
    """

    generate_vmap_rule = True

    @staticmethod
    @signature_cached
    def forward(x, weight, bias, gamma, beta, running_mean, running_var, num_batches_tracked,  # type: ignore[override]
                momentum, eps, spec, relu):
        device = x.device.type
        act = autocast_dtype(device)
        check_input_dtype("recompute", x, weight, act)
        _refuse_vmap_with_running_stats("recompute", (x, weight, bias, gamma, beta), running_mean)
        compute_dtype = act if act is not None else weight.dtype
        with _autocast_off(device, act), running_stats_update("recompute"):
            return recompute_forward(x, weight, bias, gamma, beta, eps, spec, relu, compute_dtype,
                                     running_mean, running_var, num_batches_tracked, momentum)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, gamma, beta, _, _, _, _, eps, spec, relu = inputs
        act = autocast_dtype(x.device.type)
        compute_dtype = act if act is not None else weight.dtype
        x_used = x if x.dtype == compute_dtype else x.to(compute_dtype)  # autocast's cast copy, as its conv saves
        ctx.save_for_backward(x_used, weight, bias, gamma, beta)
        ctx.eps, ctx.spec, ctx.relu, ctx.compute_dtype = eps, spec, relu, compute_dtype
        ctx.x_was_cast = x_used is not x
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype,
                      None if gamma is None else gamma.dtype, None if beta is None else beta.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x_used, weight, bias, gamma, beta = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        wrapped = is_functorch_wrapped(grad_out) or is_functorch_wrapped(x_used)
        if torch.is_grad_enabled() and not wrapped:  # create_graph=True: differentiate a plain re-run of the block
            grads = _double_differentiable_grads(ctx, grad_out, (x_used, weight, bias, gamma, beta), needs)
        else:  # (under torch.func, its transforms differentiate these aten ops themselves)
            with _autocast_off(grad_out.device.type, autocast_dtype(grad_out.device.type)):
                grads = recompute_backward(grad_out, x_used, weight, bias, gamma, beta, ctx.eps,
                                           ctx.spec, ctx.relu, ctx.compute_dtype, needs)
        grads = tuple(None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes))
        return grads + (None,) * 7


def _double_differentiable_grads(ctx, grad_out: Tensor, inputs: Tuple[Optional[Tensor], ...], needs: Sequence[bool]):
    if ctx.x_was_cast and needs[0]:
        raise RuntimeError(
            "recompute_conv_bn: double backward (create_graph=True) is not supported when the input was cast "
            f"(x was {ctx.dtypes[0]}, computed in {ctx.compute_dtype}, e.g. by autocast): the saved cast copy has "
            "no graph back to x. Run this block in plain 'train' mode, or run the forward outside autocast."
        )
    wanted = [t for t, need in zip(inputs, needs) if need]
    with torch.enable_grad(), _autocast_off(grad_out.device.type, autocast_dtype(grad_out.device.type)):
        z = _differentiable_block(*inputs, ctx.eps, ctx.spec, ctx.relu, ctx.compute_dtype)
        found = torch.autograd.grad(z, wanted, grad_out, create_graph=True, allow_unused=True)
    it = iter(found)
    return tuple(next(it) if need else None for need in needs)


def _check_vector(name: str, t: Optional[Tensor], c_out: int) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"recompute_conv_bn: {name} must be a Tensor or None, got {type(t).__name__}.")
    if t.dim() != 1 or t.shape[0] != c_out:
        raise ValueError(
            f"recompute_conv_bn: {name} has shape {tuple(t.shape)} but the layer has {c_out} output channels; "
            "the BatchNorm's num_features must equal the conv/linear output channels."
        )


def _validate(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
              momentum, eps, spec) -> None:
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("recompute_conv_bn: x and weight must be Tensors, "
                        f"got {type(x).__name__} and {type(weight).__name__}.")
    check_input_dtype("recompute_conv_bn", x, weight, autocast_dtype(x.device.type))
    if spec is None:
        if x.dim() != 2 or weight.dim() != 2:
            raise ValueError(
                f"recompute_conv_bn: spec=None means Linear -> BatchNorm1d on 2-D input [N, features], but x has "
                f"shape {tuple(x.shape)} and weight {tuple(weight.shape)}. BatchNorm1d on 3-D input normalises "
                "dim 1, which after a Linear is not the feature axis; keep such blocks in plain mode."
            )
    elif not isinstance(spec, ConvSpec):
        raise TypeError(f"recompute_conv_bn: spec must be a convbn.functions.tune.ConvSpec or None (Linear), "
                        f"got {type(spec).__name__}.")
    else:
        if x.dim() != weight.dim():
            raise ValueError(
                f"recompute_conv_bn: x has shape {tuple(x.shape)} but the weight {tuple(weight.shape)} expects a "
                f"batched {weight.dim()}-D input [N, C, *spatial]; BatchNorm in training needs a batch dimension "
                "(add one with x.unsqueeze(0))."
            )
        if not all(isinstance(p, int) for p in spec.padding):
            raise ValueError(f"recompute_conv_bn: spec.padding must be integers, got {spec.padding!r}; pad x "
                             "yourself for padding='same' or padding_mode != 'zeros' and pass the remaining padding.")
    c_out = _out_channels(weight, spec)
    for name, t in (("bias", bias), ("bn_weight", bn_weight), ("bn_bias", bn_bias),
                    ("running_mean", running_mean), ("running_var", running_var)):
        _check_vector(name, t, c_out)
    if (running_mean is None) != (running_var is None):
        raise ValueError("recompute_conv_bn: pass both running_mean and running_var (track_running_stats=True) "
                         "or neither (track_running_stats=False).")
    if num_batches_tracked is not None and not isinstance(num_batches_tracked, Tensor):
        raise TypeError("recompute_conv_bn: num_batches_tracked must be a Tensor (the BN buffer) or None, "
                        f"got {type(num_batches_tracked).__name__}.")
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, numbers.Real)):
        raise TypeError(f"recompute_conv_bn: momentum must be a float or None (cumulative average), "
                        f"got {momentum!r}.")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"recompute_conv_bn: eps must be a positive number in training, got {eps!r}.")


def recompute_conv_bn(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
    spec: Optional[ConvSpec],
    *,
    relu: bool = False,
) -> Tensor:
    """Functional train mode with recomputation: ``relu?(batch_norm(layer(x), training=True))``.

    Same output, gradients and running-statistics update as ``nn.ConvNd``/``nn.ConvTransposeNd``/
    ``nn.Linear`` followed by ``nn.BatchNormNd`` (and ``nn.ReLU``) in training mode, but only ``x``
    and per-channel vectors are saved for backward; the conv output is recomputed there.

    Args:
        x: input, ``[N, C_in, *spatial]``; ``[N, in_features]`` when ``spec is None`` (Linear).
        weight, bias: the conv/linear parameters; ``bias`` may be ``None``.
        bn_weight, bn_bias: the BN's ``gamma``/``beta``; ``None`` when ``affine=False``.
        running_mean, running_var, num_batches_tracked: the BN's buffers, updated in place; all
            ``None`` when ``track_running_stats=False``.
        momentum: the BN's momentum; ``None`` means a cumulative moving average.
        eps: the BN's epsilon (inside the square root); must be positive.
        spec: the conv geometry (integer padding -- pad ``x`` yourself for ``padding_mode !=
            "zeros"`` or ``padding="same"``), or ``None`` for a Linear layer.
        relu: apply a ReLU after the BatchNorm (its mask is recomputed, never saved).

    Returns:
        The block output, ``[N, C_out, *spatial_out]``, in the compute dtype (the autocast dtype
        under autocast, else ``weight.dtype``). Gradients flow to ``x``, ``weight``, ``bias``,
        ``bn_weight`` and ``bn_bias``; double backward is supported.

    Raises:
        TypeError, ValueError: for malformed arguments (the message says which and how to fix it),
            including a batch with one value per channel, as ``nn.BatchNorm`` does.

    Example:
        >>> from convbn.functions.tune import ConvSpec
        >>> conv, bn = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        >>> spec = ConvSpec(conv.stride, conv.padding, conv.dilation, False, (0, 0), conv.groups)
        >>> x = torch.randn(2, 3, 5, 5)
        >>> rm, rv, nbt = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
        >>> z = recompute_conv_bn(x, conv.weight, conv.bias, bn.weight, bn.bias, rm, rv, nbt,
        ...                       bn.momentum, bn.eps, spec, relu=True)
        >>> ref = torch.relu(bn(conv(x)))
        >>> torch.allclose(z, ref, atol=1e-5), torch.allclose(rv, bn.running_var), int(nbt)
        (True, True, 1)
        >>> z.sum().backward()
    """
    _validate(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
              momentum, eps, spec)
    out = apply_function(RecomputeConvBNFunction, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                        num_batches_tracked, None if momentum is None else float(momentum),
                                        float(eps), spec, bool(relu))
    return out
