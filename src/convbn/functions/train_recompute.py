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
  is incremented first, then the factor is ``momentum`` or, for ``momentum=None``, ``1 /
  num_batches_tracked``; the running variance gets the *unbiased* batch variance. With
  ``track_running_stats=False`` pass ``None`` for all three buffers.

Numerics. The batch statistics come from ``torch.var_mean`` (a Welford-style, cancellation-free
reduction) in float32 -- float64 stays float64 -- never from ``E[y^2] - E[y]^2``. The output is
``(y - mean) * (gamma * invstd) + beta``, which stays accurate when ``|mean| >> std``.

Autocast (e.g. CPU bfloat16): like plain PyTorch, the convolution runs in the autocast dtype and
its output ``y`` (and so the block output) has that dtype; the statistics, ``invstd``, the
normalisation arithmetic and the running-stat update are float32, as in PyTorch's mixed-type
batch norm kernels. The input saved for backward is ``x`` cast to the autocast dtype, which is
what autocast's own convolution saves.

Backward: one recomputed layer forward, ``aten.threshold_backward`` for the ReLU (mask ``z > 0``
from the recomputed output), ``aten.native_batch_norm_backward`` in training mode with the saved
mean/invstd (the kernel plain PyTorch uses), and one ``aten.convolution_backward`` with an
``output_mask``.

Double backward (``create_graph=True``) is supported: in that case backward re-runs the block with
ordinary differentiable ops (batch statistics, no running-stat update) and differentiates it, like
``torch.utils.checkpoint``; this costs a second forward but gives exact higher-order gradients. It
is refused with a ``RuntimeError`` when ``x`` was cast to another dtype, e.g. by autocast: the cast
copy saved for backward has no graph back to ``x``.

Not covered: ``SyncBatchNorm`` (its statistics and gradient sums need cross-process reductions).
"""

from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .tune import ConvSpec, autocast_dtype

__all__ = [
    "RecomputeConvBNFunction",
    "recompute_conv_bn",
    "recompute_forward",
    "recompute_backward",
    "batch_statistics",
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


def _channel_shape(y: Tensor) -> Tuple[int, ...]:
    return (1, -1) + (1,) * (y.dim() - 2)


def _layer(x: Tensor, weight: Tensor, bias: Optional[Tensor], spec: Optional[ConvSpec]) -> Tensor:
    if spec is None:
        return torch.nn.functional.linear(x, weight, bias)
    return torch.convolution(
        x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.transposed, spec.output_padding, spec.groups
    )


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
    with torch.no_grad():
        factor = 0.0 if momentum is None else float(momentum)
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if momentum is None:
                factor = 1.0 / float(num_batches_tracked)
        unbiased = var * (count / (count - 1))
        running_mean.mul_(1.0 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
        running_var.mul_(1.0 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)


def _normalize(
    y_stat: Tensor, mean: Tensor, invstd: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor], out_dtype: torch.dtype,
    var: Optional[Tensor] = None, eps: float = 0.0,
) -> Tensor:
    """``(y - mean) * (gamma * invstd) + beta``. When ``y`` already has the statistics' dtype and
    ``var`` is given, one fused pass of PyTorch's own inference kernel with the *batch* statistics
    (``y`` is untouched); otherwise in place on ``y_stat`` (a stat-dtype copy we own)."""
    if var is not None and y_stat.dtype == mean.dtype and (gamma is None or gamma.dtype == mean.dtype):
        return torch.nn.functional.batch_norm(y_stat, mean, var, gamma, beta, False, 0.0, eps).to(out_dtype)
    shape = _channel_shape(y_stat)
    scale = invstd if gamma is None else gamma.to(invstd.dtype) * invstd
    z = y_stat.sub_(mean.reshape(shape)).mul_(scale.reshape(shape))
    if beta is not None:
        z = z.add_(beta.to(z.dtype).reshape(shape))
    return z.to(out_dtype)


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
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
    """``relu?(bn_train(layer(x)))`` without touching running statistics.

    Returns ``(out, x_used, mean, var, invstd, count)``: ``x_used`` is ``x`` cast to
    ``compute_dtype`` (usually ``x`` itself), ``mean``/``var`` (biased)/``invstd`` are float32 (or
    float64) ``[C_out]`` vectors and ``count`` is the number of values per channel.
    """
    x_used = x.to(compute_dtype)
    y = _layer(x_used, weight.to(compute_dtype), _cast(bias, compute_dtype), spec)
    count = y.numel() // y.shape[1]
    if count == 1:  # as F.batch_norm: a variance from one value is meaningless (and /0 when unbiased)
        raise ValueError(f"recompute_conv_bn: expected more than 1 value per channel when training, got a layer "
                         f"output of size {tuple(y.shape)} from input {tuple(x.shape)}. Use a batch size > 1.")
    if _fused_kernel_applies(y, gamma):
        out, mean, invstd, var = _train_kernel(y, gamma, beta, eps)
    else:  # mixed dtypes (autocast): float32 statistics, then the affine map
        mean, var = batch_statistics(y)
        invstd = torch.rsqrt(var + eps)
        out = _normalize(y.to(mean.dtype), mean, invstd, gamma, beta, y.dtype, var, eps)
    if relu:
        out = out.relu_()
    return out, x_used, mean, var, invstd, count


def _fused_kernel_dtype(dtype: torch.dtype, gamma: Optional[Tensor]) -> bool:
    return dtype in (torch.float32, torch.float64) and (gamma is None or gamma.dtype == dtype)


def _fused_kernel_applies(y: Tensor, gamma: Optional[Tensor]) -> bool:
    return _fused_kernel_dtype(y.dtype, gamma)


def _train_kernel(y: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor], eps: float):
    """PyTorch's own fused train-mode BN kernel (statistics + normalize in one call, exactly what
    ``nn.BatchNorm`` computes), without running buffers. Returns ``(out, mean, invstd, biased var)``."""
    out, mean, invstd = torch.ops.aten.native_batch_norm(y, gamma, beta, None, None, True, 0.0, eps)
    var = (1.0 / (invstd.double() ** 2) - eps).to(invstd.dtype)  # for the running-variance update
    return out, mean, invstd, var


def recompute_backward(
    grad_out: Tensor,
    x_used: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    gamma: Optional[Tensor],
    beta: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    eps: float,
    spec: Optional[ConvSpec],
    relu: bool,
    compute_dtype: torch.dtype,
    needs: Sequence[bool],
    var: Optional[Tensor] = None,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients ``(x, weight, bias, gamma, beta)`` of :func:`recompute_forward`; ``needs`` masks them.
    ``var``: the forward's biased batch variance, so the ReLU mask is recomputed bit for bit.

    Recomputes the layer output ``y`` from ``x_used``; never differentiates through the statistics
    by autograd (the training-mode BN backward formula accounts for them).
    """
    need_x, need_w, need_b, need_gamma, need_beta = needs
    need_y = need_x or need_w or need_b
    w = weight.to(compute_dtype)
    y = _layer(x_used, w, _cast(bias, compute_dtype), spec)
    g = grad_out.to(y.dtype)
    if mean is None:
        # Nothing but x was saved (like torch.utils.checkpoint): the same kernel on the bit-identical
        # recomputed y gives back the forward's statistics and output exactly.
        z, mean, invstd, _ = _train_kernel(y, gamma, beta, eps)
        if relu:
            g = torch.ops.aten.threshold_backward(g, z, 0)
        del z
    elif relu:
        # The forward output, recomputed bit for bit; relu's own backward masks with ``out > 0``.
        if _fused_kernel_applies(y, gamma):
            z = _train_kernel(y, gamma, beta, eps)[0]
        else:
            z = _normalize(y.to(mean.dtype, copy=True), mean, invstd, gamma, beta, y.dtype, var, eps)
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


class RecomputeConvBNFunction(torch.autograd.Function):
    """Conv/ConvTranspose/Linear -> BatchNorm (batch statistics) -> optional ReLU, recomputing ``y``.

    Saves ``x`` (cast to the compute dtype) and the parameters -- plus the batch ``mean``/``invstd``/``var`` only under mixed dtypes (autocast);
    never the conv output, the BN output nor a ReLU mask. Updates the running statistics in place.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, gamma, beta, running_mean, running_var, num_batches_tracked,  # type: ignore[override]
                momentum, eps, spec, relu):
        device = x.device.type
        act = autocast_dtype(device)
        compute_dtype = act if act is not None else weight.dtype
        with torch.autocast(device, enabled=False):
            out, x_used, mean, var, invstd, count = recompute_forward(
                x, weight, bias, gamma, beta, eps, spec, relu, compute_dtype)
            if running_mean is not None:
                update_running_stats_(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)
        if _fused_kernel_dtype(compute_dtype, gamma):  # the forward used it (y has the compute dtype)
            mean = invstd = var = None  # backward reruns the fused kernel: save nothing per channel
        ctx.save_for_backward(x_used, weight, bias, gamma, beta, mean, invstd, var)
        ctx.eps, ctx.spec, ctx.relu, ctx.compute_dtype = eps, spec, relu, compute_dtype
        ctx.x_was_cast = x_used is not x and x_used.dtype != x.dtype
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype,
                      None if gamma is None else gamma.dtype, None if beta is None else beta.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x_used, weight, bias, gamma, beta, mean, invstd, var = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():  # create_graph=True: differentiate a plain re-run of the block
            grads = _double_differentiable_grads(ctx, grad_out, (x_used, weight, bias, gamma, beta), needs)
        else:
            with torch.autocast(grad_out.device.type, enabled=False):
                grads = recompute_backward(grad_out, x_used, weight, bias, gamma, beta, mean, invstd, ctx.eps,
                                           ctx.spec, ctx.relu, ctx.compute_dtype, needs, var)
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
    with torch.enable_grad(), torch.autocast(grad_out.device.type, enabled=False):
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
    if not x.is_floating_point():
        raise TypeError(f"recompute_conv_bn: x must be a floating-point tensor, got dtype {x.dtype}; "
                        "convert it with x.float().")
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
    out = RecomputeConvBNFunction.apply(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                        num_batches_tracked, None if momentum is None else float(momentum),
                                        float(eps), spec, bool(relu))
    return out
