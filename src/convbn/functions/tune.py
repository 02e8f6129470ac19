"""Tune mode (paper Sec. 3.4, Table 2): Eval's function and gradients, Deploy's memory.

Eval computes ``z = bn_eval(conv(x, w) + b)`` and keeps ``x`` *and* the conv output ``y`` alive for
backward. Tune folds the BN into the weight on the fly -- ``w' = w * scale``,
``b' = (b - mu) * scale + beta`` with ``scale = gamma / sqrt(var + eps)`` -- and convolves once.

Unlike the paper's code, MMEngine's and inductor's ``efficient_conv_bn_eval`` pass (which build
``w'`` with ordinary autograd ops and so keep ``w'`` alive until backward), this Function saves only
``x``, the original parameters (alive anyway) and per-channel vectors, and rebuilds ``w'`` in
backward. Its bytes saved for backward therefore equal Deploy's. The backward issues a single
``aten.convolution_backward`` with an ``output_mask`` and applies the chain rule of Table 2:

    dL/dw     = scale * dL/dw'                       (per output channel)
    dL/db     = scale * dL/db'
    dL/dgamma = invstd * (sum(dL/dw' * w) + dL/db' * (b - mu))
    dL/dbeta  = dL/db'

The fold is computed in float32 (float64 stays float64) and cast once to the compute dtype, which
is the autocast dtype when autocast is active (so bf16 autocast never folds in bf16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..fold import scale_weight_per_out_channel, sum_per_out_channel

__all__ = ["ConvSpec", "TuneConvBNFunction", "tune_conv_bn", "tune_forward", "tune_backward", "tune_route"]


@dataclass(frozen=True)
class ConvSpec:
    """Geometry of the convolution; ``None`` in its place means a ``Linear`` layer."""

    stride: Tuple[int, ...]
    padding: Tuple[int, ...]
    dilation: Tuple[int, ...]
    transposed: bool
    output_padding: Tuple[int, ...]
    groups: int


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device_type``, or ``None`` when autocast is off."""
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


def _fold_dtype(weight: Tensor) -> torch.dtype:
    return torch.promote_types(torch.float32, weight.dtype)


def _scale(gamma: Optional[Tensor], invstd: Tensor) -> Tensor:
    return invstd if gamma is None else gamma.to(invstd.dtype) * invstd


def _folded_weight(weight: Tensor, scale: Tensor, spec: Optional[ConvSpec], dtype: torch.dtype) -> Tensor:
    groups, transposed = (1, False) if spec is None else (spec.groups, spec.transposed)
    return scale_weight_per_out_channel(weight.to(scale.dtype), scale, groups=groups, transposed=transposed).to(dtype)


# Two exact ways to apply the BN's per-channel scale s (paper Sec. 3.2.2: the affine map commutes
# with the layer along output channels):
#   "weight"     -- fold s into the weight (w' = w * s) and convolve once: weight-sized passes;
#   "activation" -- convolve with w, then scale the output (forward) / the incoming gradient
#                   (backward): activation-sized passes.
# Both save the same tensors, so forward and backward choose independently. "auto" picks whichever
# moves fewer elements (A: activation numel, W: weight numel). Forward: fold w' (read W, write W) vs
# scale the output (2A). Backward: refold w' (2W) + in-place s * dL/dw' (2W, when dL/dw is needed) vs
# scale the gradient (2A); the dgamma dot (2W) is common -- so the activation route wins when A < 2W
# (A < W with a frozen conv weight). Late layers of a CNN have far larger weights than activations
# (ResNet-50 layer4 at 112px: 2.4M vs 0.13M).
_ROUTE = "auto"
ROUTES = ("auto", "weight", "activation")


class tune_route:
    """Context manager forcing Tune's route (``"auto"``, ``"weight"`` or ``"activation"``); for tests
    and benchmarks -- all routes compute the same function and gradients.

    Example:
        >>> with tune_route("weight"):
        ...     pass
    """

    def __init__(self, route: str):
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        self.route = route

    def __enter__(self) -> "tune_route":
        global _ROUTE
        self.previous, _ROUTE = _ROUTE, self.route
        return self

    def __exit__(self, *exc) -> None:
        global _ROUTE
        _ROUTE = self.previous


def _output_numel(x: Tensor, weight: Tensor, spec: Optional[ConvSpec]) -> int:
    if spec is None:
        return x.shape[0] * weight.shape[0]
    k = weight.shape[2:]
    n = x.shape[0] * (weight.shape[1] * spec.groups if spec.transposed else weight.shape[0])
    for i, size in enumerate(x.shape[2:]):
        d, st, p = spec.dilation[i], spec.stride[i], spec.padding[i]
        if spec.transposed:
            n *= (size - 1) * st - 2 * p + d * (k[i] - 1) + spec.output_padding[i] + 1
        else:
            n *= (size + 2 * p - d * (k[i] - 1) - 1) // st + 1
    return n


def _activation_route(activation_numel: int, weight: Tensor, weight_passes: int = 1) -> bool:
    """Whether to scale activations rather than fold the weight; ``weight_passes``: how many
    weight-sized read+write passes the weight route costs per activation-sized one (see above)."""
    return _ROUTE == "activation" or (_ROUTE == "auto" and activation_numel < weight_passes * weight.numel())


def _layer(x: Tensor, w: Tensor, b: Optional[Tensor], spec: Optional[ConvSpec]) -> Tensor:
    if spec is None:
        return torch.nn.functional.linear(x, w, b)
    return torch.convolution(x, w, b, spec.stride, spec.padding, spec.dilation, spec.transposed,
                             spec.output_padding, spec.groups)


def _channel_view(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape((1, -1) + (1,) * (like.dim() - 2))


def _per_channel_dot(a: Tensor, b: Tensor, spec: Optional[ConvSpec]) -> Tensor:
    """``sum(a * b)`` per output channel of two weight-shaped tensors, without materializing ``a * b``
    where the layout allows (one batched GEMV)."""
    if spec is None or not spec.transposed:
        c = a.shape[0]
        return torch.bmm(a.reshape(c, 1, -1), b.reshape(c, -1, 1)).reshape(c)
    return sum_per_out_channel(a * b, groups=spec.groups, transposed=True)


def tune_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    gamma: Optional[Tensor],
    beta: Optional[Tensor],
    eps: float,
    spec: Optional[ConvSpec],
    compute_dtype: torch.dtype,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``bn_eval(layer(x))`` by folding. Returns ``(out, x_used, invstd, neg_mean)``; the last three
    are what backward needs (``x_used`` is ``x`` cast to ``compute_dtype``, usually ``x`` itself;
    ``neg_mean`` is a float32 copy of ``-running_mean``)."""
    fdt = _fold_dtype(weight)
    invstd = torch.rsqrt(running_var.to(fdt) + eps)
    scale = _scale(gamma, invstd)
    neg_mean = -running_mean.to(fdt)
    folded_bias = _bias_minus_mean(bias, neg_mean) * scale
    if beta is not None:
        folded_bias = folded_bias + beta.to(fdt)
    x_used = x.to(compute_dtype)
    b = folded_bias.to(compute_dtype)
    if _activation_route(_output_numel(x, weight, spec), weight):
        out = _layer(x_used, weight.to(compute_dtype), None, spec)
        out = torch.addcmul(_channel_view(b, out), out, _channel_view(scale.to(compute_dtype), out), out=out)
    else:
        out = _layer(x_used, _folded_weight(weight, scale, spec, compute_dtype), b, spec)
    return out, x_used, invstd, neg_mean


def _bias_minus_mean(bias: Optional[Tensor], neg_mean: Tensor) -> Tensor:
    return neg_mean if bias is None else bias.to(neg_mean.dtype) + neg_mean


def _layer_backward(g: Tensor, x: Tensor, w: Tensor, spec: Optional[ConvSpec], mask: Sequence[bool]):
    need_x, need_w, need_b = mask
    if spec is None:
        return (g @ w if need_x else None, g.t() @ x if need_w else None, g.sum(0) if need_b else None)
    c_out = w.shape[1] * spec.groups if spec.transposed else w.shape[0]
    return torch.ops.aten.convolution_backward(
        g, x, w, [c_out], spec.stride, spec.padding, spec.dilation, spec.transposed,
        spec.output_padding, spec.groups, [need_x, need_w, need_b])


def _scale_in_place(t: Tensor, scale: Tensor, spec: Optional[ConvSpec]) -> Tensor:
    groups, transposed = (1, False) if spec is None else (spec.groups, spec.transposed)
    if not transposed:
        return t.mul_(scale.reshape((-1,) + (1,) * (t.dim() - 1)))
    return scale_weight_per_out_channel(t, scale, groups=groups, transposed=True)


def tune_backward(
    grad_out: Tensor,
    x_used: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    gamma: Optional[Tensor],
    invstd: Tensor,
    neg_mean: Tensor,
    spec: Optional[ConvSpec],
    compute_dtype: torch.dtype,
    needs: Sequence[bool],
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients ``(x, weight, bias, gamma, beta)`` of :func:`tune_forward`; ``needs`` masks them.

    Weight route: one ``convolution_backward`` against the refolded ``w'`` gives ``dL/dx``,
    ``dL/dw'`` and ``dL/db'``; then ``dL/dw = s * dL/dw'``. Activation route: one
    ``convolution_backward`` of ``g * s`` against the original ``w`` gives ``dL/dx``, ``dL/dw`` and
    ``dL/db`` directly; ``dL/dw'`` is recovered as ``dL/dw / s``, so this route is only taken when
    no channel has ``s == 0`` (a zero-initialized gamma).
    """
    need_x, need_w, need_b, need_gamma, need_beta = needs
    scale = _scale(gamma, invstd)
    fdt = scale.dtype
    groups, transposed = (1, False) if spec is None else (spec.groups, spec.transposed)
    g = grad_out.to(compute_dtype)
    grad_w = grad_b = grad_gamma = grad_beta = dot = sum_g = None
    # The activation route recovers dL/dw' = dL/dw / s and sum(g) = dL/db / s, so it needs s != 0
    # (a zero-initialized gamma breaks it). The check syncs: compiled graphs keep the weight route.
    if need_gamma or need_beta:
        nonzero = not torch.compiler.is_compiling() and bool((scale.abs() > 1e-30).all())
    else:
        nonzero = True
    # weight route: refold (2W) [+ s * dL/dw' (2W) if need_w]; activation route: g * s (2A)
    if nonzero and _activation_route(g.numel(), weight, weight_passes=2 if need_w else 1):
        gs = g * _channel_view(scale.to(compute_dtype), g)
        gx, gw, gb = _layer_backward(gs, x_used, weight.to(compute_dtype), spec,
                                     [need_x, need_w or need_gamma, need_b or need_gamma or need_beta])
        gw = None if gw is None else gw.to(fdt)
        gb = None if gb is None else gb.to(fdt)
        if need_gamma:
            dot = _per_channel_dot(gw, weight.to(fdt), spec) / scale
        if need_gamma or need_beta:
            sum_g = gb / scale
        grad_w = gw if need_w else None
        grad_b = gb if need_b else None
    else:
        w = _folded_weight(weight, scale, spec, compute_dtype)
        gx, gwf, gbf = _layer_backward(g, x_used, w, spec, [need_x, need_w or need_gamma, need_b or need_gamma or need_beta])
        del w
        gwf = None if gwf is None else gwf.to(fdt)
        sum_g = None if gbf is None else gbf.to(fdt)
        if need_gamma:
            dot = _per_channel_dot(gwf, weight.to(fdt), spec)
        if need_w:  # dL/dw = s * dL/dw', in place on the fresh dL/dw' (after the dot above has read it)
            grad_w = _scale_in_place(gwf, scale, spec) if not torch.is_grad_enabled() else \
                scale_weight_per_out_channel(gwf, scale, groups=groups, transposed=transposed)
        if need_b:
            grad_b = sum_g * scale
    if need_gamma:
        grad_gamma = invstd * (dot + sum_g * _bias_minus_mean(bias, neg_mean))
    if need_beta:
        grad_beta = sum_g
    return gx, grad_w, grad_b, grad_gamma, grad_beta


class TuneConvBNFunction(torch.autograd.Function):
    """Conv/Linear followed by BN-with-running-statistics, folded on the fly.

    Saves ``x``, the layer's weight and bias, ``gamma`` and two ``[C_out]`` vectors; never the conv output nor ``w'``.
    Differentiable twice (backward is built from differentiable ops).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, gamma, beta, running_mean, running_var, eps, spec):  # type: ignore[override]
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point input, got {x.dtype}; a conv cannot take integer or bool "
                            f"tensors (plain PyTorch raises too). Convert it first, e.g. x.float()")
        act = autocast_dtype(x.device.type)
        compute_dtype = act if act is not None and x.is_floating_point() else weight.dtype
        if act is not None:
            with torch.autocast(x.device.type, enabled=False):
                out, x_used, invstd, neg_mean = tune_forward(
                    x, weight, bias, running_mean, running_var, gamma, beta, eps, spec, compute_dtype)
        else:
            out, x_used, invstd, neg_mean = tune_forward(
                x, weight, bias, running_mean, running_var, gamma, beta, eps, spec, compute_dtype)
        ctx.save_for_backward(x_used, weight, bias, gamma, invstd, neg_mean)
        ctx.spec, ctx.compute_dtype = spec, compute_dtype
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype,
                      None if gamma is None else gamma.dtype, None if beta is None else beta.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x_used, weight, bias, gamma, invstd, neg_mean = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        grads = tune_backward(grad_out, x_used, weight, bias, gamma, invstd, neg_mean, ctx.spec, ctx.compute_dtype,
                              needs)
        grads = tuple(None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes))
        return grads + (None, None, None, None)


def _tuple(v: Union[int, Sequence[int]], n: int) -> Tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * n


def tune_conv_bn(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    eps: float = 1e-5,
    *,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[int, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
    transposed: bool = False,
    output_padding: Union[int, Sequence[int]] = 0,
    linear: bool = False,
) -> Tensor:
    """Functional Tune: ``batch_norm(conv(x), running stats, training=False)`` computed by folding.

    Args:
        x: input, ``[N, C_in, *spatial]`` (``[N, in_features]`` with ``linear=True``).
        weight, bias: the conv (or linear) parameters; ``bias`` may be ``None``.
        running_mean, running_var, bn_weight, bn_bias, eps: the BatchNorm's state
            (``bn_weight``/``bn_bias`` ``None`` when ``affine=False``).
        stride, padding, dilation, groups, transposed, output_padding: as ``torch.convolution``
            (integer padding only; pad ``x`` yourself for ``padding_mode != "zeros"``).
        linear: ``True`` for a ``Linear`` layer (``x`` must be 2-D).

    Returns:
        The block output, equal to the Eval-mode output; gradients flow to ``x``, ``weight``,
        ``bias``, ``bn_weight`` and ``bn_bias`` (never to the running statistics).

    Example:
        >>> conv, bn = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4).eval()
        >>> x = torch.randn(2, 3, 5, 5)
        >>> z = tune_conv_bn(x, conv.weight, conv.bias, bn.running_mean, bn.running_var,
        ...                  bn.weight, bn.bias, bn.eps, padding=1)
        >>> torch.allclose(z, bn(conv(x)), atol=1e-6)
        True
    """
    if linear:
        spec = None
    else:
        n = weight.dim() - 2
        spec = ConvSpec(_tuple(stride, n), _tuple(padding, n), _tuple(dilation, n), bool(transposed),
                        _tuple(output_padding, n), int(groups))
    return TuneConvBNFunction.apply(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, float(eps), spec)
