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

The per-channel fold, the weight refold and the backward epilogue are ``convbn::tune_*`` ops
(:mod:`convbn.ops.tune`): eager and ``torch.compile`` call the same ops, whose CPU implementation is a small
C++ kernel (per-channel math and fold in one call per direction; in backward ``dL/dw'`` is read once for
both the ``dgamma`` dot and ``dL/dw = s * dL/dw'``) and whose reference, in torch ops, runs on every other
device. ``torch.func``'s wrapped tensors and ``create_graph=True`` call the references directly (the same
function, differentiable).
"""

from __future__ import annotations

import contextvars
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..ops import tune as ops
from ._conv import (ConvSpec, apply_function, autocast_dtype, channel_view, check_input_dtype, eager_twin,
                    is_functorch_wrapped, signature_cached)
from ._conv import has_values as plain_tensor_values
from ._conv import layer as _layer

__all__ = ["ConvSpec", "TuneConvBNFunction", "tune_conv_bn", "tune_forward", "tune_backward", "tune_route"]


def _scale(gamma: Optional[Tensor], invstd: Tensor) -> Tensor:
    return invstd if gamma is None else gamma.to(invstd.dtype) * invstd


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
# (ResNet-50 layer4 at 112px: 2.4M vs 0.13M). Context-local, like use_extension: a thread's tune_route
# never changes another's; compiled graphs always use "auto".
_ROUTE: contextvars.ContextVar[str] = contextvars.ContextVar("convbn_tune_route", default="auto")
ROUTES = ("auto", "weight", "activation")


class tune_route:
    """Context manager forcing Tune's route (``"auto"``, ``"weight"`` or ``"activation"``) in this thread
    (context) only; for tests and benchmarks -- all routes compute the same function and gradients.

    Example:
        >>> w = torch.empty(8, 8, 3, 3)  # 576 weight elements
        >>> with tune_route("weight"):  # forced, even for a tiny activation
        ...     _activation_route(10, w)
        False
        >>> with tune_route("activation"):
        ...     _activation_route(10**6, w)
        True
        >>> _activation_route(10, w), _activation_route(10**6, w)  # "auto": the smaller side
        (True, False)
        >>> conv, bn = torch.nn.Conv2d(3, 8, 3).double(), torch.nn.BatchNorm2d(8).double().eval()
        >>> x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
        >>> outs = []
        >>> for route in ROUTES:
        ...     with tune_route(route):
        ...         outs.append(tune_conv_bn(x, conv.weight, conv.bias, bn.running_mean, bn.running_var,
        ...                                  bn.weight, bn.bias, bn.eps))
        >>> all(torch.allclose(o, bn(conv(x)), rtol=1e-12, atol=1e-12) for o in outs)
        True
    """

    def __init__(self, route: str):
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        self.route = route

    def __enter__(self) -> "tune_route":
        self._token = _ROUTE.set(self.route)
        return self

    def __exit__(self, *exc) -> None:
        _ROUTE.reset(self._token)


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
    route = "auto" if torch.compiler.is_compiling() else _ROUTE.get()  # (dynamo < 2.14 cannot read a ContextVar)
    return route == "activation" or (route == "auto" and activation_numel < weight_passes * weight.numel())


def _geometry(spec: Optional[ConvSpec]) -> Tuple[int, bool]:
    return (1, False) if spec is None else (spec.groups, spec.transposed)


def _wrapped(*tensors: Optional[Tensor]) -> bool:
    """``torch.func`` wrappers (``vmap``'s batched tensors, nested transforms' tensors): the ops' kernels
    cannot read them, so the references (the same function, in torch ops) are called directly."""
    return any(t is not None and is_functorch_wrapped(t) for t in tensors)


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
    direct: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``bn_eval(layer(x))`` by folding. Returns ``(out, x_used, invstd, neg_mean)``; the last three
    are what backward needs (``x_used`` is ``x`` cast to ``compute_dtype``, usually ``x`` itself;
    ``neg_mean`` is ``-running_mean`` in the fold dtype). ``direct``: call the ops' references."""
    groups, transposed = _geometry(spec)
    activation = _activation_route(_output_numel(x, weight, spec), weight)
    fold = ops.fold_reference if direct else ops.fold
    w, invstd, neg_mean, scale, folded_bias = fold(weight, bias, running_mean, running_var, gamma, beta, float(eps),
                                                   groups, transposed, not activation)
    x_used = x.to(compute_dtype)
    b = folded_bias.to(compute_dtype)
    if activation:
        out = _layer(x_used, weight.to(compute_dtype), None, spec)
        s = channel_view(scale.to(compute_dtype), out)
        out = torch.addcmul(channel_view(b, out), out, s, out=out) if plain_tensor_values(out) else \
            out * s + channel_view(b, out)
    else:
        out = _layer(x_used, w.to(compute_dtype), b, spec)
    return out, x_used, invstd, neg_mean


def _layer_backward(g: Tensor, x: Tensor, w: Tensor, spec: Optional[ConvSpec], mask: Sequence[bool]):
    need_x, need_w, need_b = mask
    if spec is None:
        return (g @ w if need_x else None, g.t() @ x if need_w else None, g.sum(0) if need_b else None)
    c_out = w.shape[1] * spec.groups if spec.transposed else w.shape[0]
    return torch.ops.aten.convolution_backward(
        g, x, w, [c_out], spec.stride, spec.padding, spec.dilation, spec.transposed,
        spec.output_padding, spec.groups, [need_x, need_w, need_b])


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
    direct: bool = False,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients ``(x, weight, bias, gamma, beta)`` of :func:`tune_forward`; ``needs`` masks them.

    Weight route: one ``convolution_backward`` against the refolded ``w'`` gives ``dL/dx``,
    ``dL/dw'`` and ``dL/db'``; then the epilogue gives ``dL/dw = s * dL/dw'`` and the affine gradients.
    Activation route: one ``convolution_backward`` of ``g * s`` against the original ``w`` gives ``dL/dx``,
    ``dL/dw`` and ``dL/db`` directly; for ``dgamma``/``dbeta`` the epilogue recovers ``dL/dw' = dL/dw / s``,
    so with those needed this route is only taken where it is known for free that no ``s`` is 0 (a
    zero-initialized gamma): on the CPU in eager mode. Elsewhere nothing reads a tensor's values on the
    host (no sync on an accelerator; tested on ``meta``).
    """
    need_x, need_w, need_b, need_gamma, need_beta = needs
    scale = _scale(gamma, invstd)
    groups, transposed = _geometry(spec)
    g = grad_out.to(compute_dtype)
    recover = need_gamma or need_beta
    # reading s on the host is free for an eager CPU tensor, and a sync (or a graph break) anywhere else
    free_read = scale.device.type == "cpu" and not direct and not torch.compiler.is_compiling()
    may_recover = free_read and bool((scale.abs() > 1e-30).all())
    # weight route: refold (2W) [+ s * dL/dw' (2W) if need_w]; activation route: g * s (2A)
    activation = (not recover or may_recover) and \
        _activation_route(g.numel(), weight, weight_passes=2 if need_w else 1)
    mask = [need_x, need_w or need_gamma, need_b or recover]
    if activation:
        gx, gw, gb = _layer_backward(g * channel_view(scale.to(compute_dtype), g), x_used, weight.to(compute_dtype),
                                     spec, mask)
    else:
        w = (ops.refold_reference if direct else ops.refold)(weight, scale, groups, transposed).to(compute_dtype)
        gx, gw, gb = _layer_backward(g, x_used, w, spec, mask)
        del w
    epilogue = ops.epilogue_reference if direct else ops.epilogue
    dw, db, dgamma, dbeta = epilogue(gw, gb, weight, scale, bias, neg_mean, invstd, groups, transposed, activation,
                                     need_w, need_b, need_gamma, need_beta)
    if activation:  # dL/dw and dL/db are the layer's own gradients; the epilogue recovered dgamma/dbeta
        dw, db = gw, gb
    return (gx, dw if need_w else None, db if need_b else None, dgamma if need_gamma else None,
            dbeta if need_beta else None)


@eager_twin
class TuneConvBNFunction(torch.autograd.Function):
    """Conv/Linear followed by BN-with-running-statistics, folded on the fly.

    Returns ``(out, invstd, -running_mean)`` (the last two per-channel, non-differentiable: what backward needs,
    from the forward's own fold). Saves ``x``, the layer's weight and bias, ``gamma`` and those two ``[C_out]``
    vectors; never the conv output nor ``w'``.
    Differentiable twice (with ``create_graph=True`` backward runs the ops' references, differentiable torch
    ops), and usable under ``torch.func`` (``grad``, ``jacrev``, ``vmap``: ``forward`` + ``setup_context``, a
    generated vmap rule; ``torch.func``'s wrapped tensors run the references).
    """

    generate_vmap_rule = True

    @staticmethod
    @signature_cached
    def forward(x, weight, bias, gamma, beta, running_mean, running_var, eps, spec):  # type: ignore[override]
        act = autocast_dtype(x.device.type)
        check_input_dtype("tune", x, weight, act)
        compute_dtype = act if act is not None else weight.dtype
        direct = _wrapped(x, weight, bias, gamma, beta, running_mean, running_var)
        if act is not None:
            with torch.autocast(x.device.type, enabled=False):
                out, _, invstd, neg_mean = tune_forward(x, weight, bias, running_mean, running_var, gamma, beta, eps,
                                                        spec, compute_dtype, direct)
        else:
            out, _, invstd, neg_mean = tune_forward(x, weight, bias, running_mean, running_var, gamma, beta, eps, spec,
                                                    compute_dtype, direct)
        return out, invstd, neg_mean

    @staticmethod
    def setup_context(ctx, inputs, output):
        # x_used is x itself unless autocast casts it
        x, weight, bias, gamma, beta, running_mean, running_var, eps, spec = inputs
        _, invstd, neg_mean = output
        ctx.mark_non_differentiable(invstd, neg_mean)
        act = autocast_dtype(x.device.type)
        compute_dtype = act if act is not None else weight.dtype
        x_used = x if x.dtype == compute_dtype else x.to(compute_dtype)
        ctx.save_for_backward(x_used, weight, bias, gamma, invstd, neg_mean)
        ctx.spec, ctx.compute_dtype = spec, compute_dtype
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype,
                      None if gamma is None else gamma.dtype, None if beta is None else beta.dtype)

    @staticmethod
    def backward(ctx, grad_out, _grad_invstd, _grad_neg_mean):  # type: ignore[override]
        x_used, weight, bias, gamma, invstd, neg_mean = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        # create_graph: the references (differentiable torch ops); torch.func wrappers: the references too
        direct = torch.is_grad_enabled() or _wrapped(grad_out, x_used, weight)
        grads = tune_backward(grad_out, x_used, weight, bias, gamma, invstd, neg_mean, ctx.spec, ctx.compute_dtype,
                              needs, direct)
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
    return apply_function(TuneConvBNFunction, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                          float(eps), spec)[0]
