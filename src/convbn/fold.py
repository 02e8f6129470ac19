"""The fold math: pure tensor functions, no modules, no autograd.Function.

A BatchNorm with running statistics is a per-channel affine map ``z = scale * y + shift`` with
``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``. Because a
convolution (or linear layer) is linear in its weight along the output-channel axis, the affine map
can be moved onto the weight (paper Sec. 3.2.2, Table 2):

    w' = w * scale            (broadcast along the *output-channel* axis of w)
    b' = (b - running_mean) * scale + beta

The only subtle part is which axis of ``w`` is the output-channel axis:

* ``ConvNd`` / ``Linear``: weight is ``[C_out, C_in / groups, *k]`` -> axis 0.
* ``ConvTransposeNd``: weight is ``[C_in, C_out / groups, *k]``; output channel
  ``o = g * (C_out / groups) + j`` lives at ``weight[g * (C_in / groups) + i, j]``. So the scale has to
  be laid out per group on axis 1 -- a plain ``scale.view(1, -1, 1, ...)`` is only right for
  ``groups == 1`` (the bug of ``torch.nn.utils.fusion`` for grouped transposed convs).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "bn_scale_shift",
    "scale_weight_per_out_channel",
    "sum_per_out_channel",
    "fold_conv_bn_weights",
]


def bn_scale_shift(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
) -> Tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` of a BatchNorm that normalizes with running statistics.

    Args:
        running_mean, running_var: the BN's running statistics, shape ``[C]``.
        weight, bias: the BN's affine ``gamma`` / ``beta`` (``None`` when ``affine=False``).
        eps: the BN's epsilon (inside the square root, as in ``torch.nn.BatchNorm2d``).

    Returns:
        ``(scale, shift)`` such that ``bn(y) == scale[c] * y + shift[c]`` for channel ``c``.

    Example:
        >>> bn = torch.nn.BatchNorm2d(3).eval()
        >>> scale, shift = bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        >>> y = torch.randn(2, 3, 4, 4)
        >>> torch.allclose(bn(y), y * scale.view(1, 3, 1, 1) + shift.view(1, 3, 1, 1))
        True
    """
    invstd = torch.rsqrt(running_var + eps)
    scale = invstd if weight is None else weight * invstd
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def _out_channel_view(weight: Tensor, groups: int, transposed: bool) -> Tuple[Tensor, Tuple[int, ...]]:
    """View ``weight`` so that the output-channel index is one axis, and the shape a
    ``[C_out]`` vector must take to broadcast against that view."""
    if not transposed:
        c_out = weight.shape[0]
        return weight, (c_out,) + (1,) * (weight.dim() - 1)
    c_in, c_out_per_group = weight.shape[0], weight.shape[1]
    k = tuple(weight.shape[2:])
    grouped = weight.reshape(groups, c_in // groups, c_out_per_group, *k)
    return grouped, (groups, 1, c_out_per_group) + (1,) * len(k)


def scale_weight_per_out_channel(weight: Tensor, scale: Tensor, *, groups: int = 1, transposed: bool = False) -> Tensor:
    """Multiply every output channel of a conv / linear / transposed-conv weight by ``scale[c]``.

    Args:
        weight: ``[C_out, C_in/g, *k]`` (conv, linear) or ``[C_in, C_out/g, *k]`` (transposed conv).
        scale: ``[C_out]``.
        groups: the layer's ``groups`` (only matters for transposed convs).
        transposed: ``True`` for ``ConvTransposeNd`` weights.

    Returns:
        A new tensor shaped like ``weight``.

    Example:
        >>> w = torch.ones(4, 3, 1, 1)   # ConvTranspose2d(4, 6, 1, groups=2): C_out = 6
        >>> scale_weight_per_out_channel(w, torch.arange(6.), groups=2, transposed=True)[:, :, 0, 0]
        tensor([[0., 1., 2.],
                [0., 1., 2.],
                [3., 4., 5.],
                [3., 4., 5.]])
    """
    view, vec_shape = _out_channel_view(weight, groups, transposed)
    return (view * scale.reshape(vec_shape)).reshape(weight.shape)


def sum_per_out_channel(weight_like: Tensor, *, groups: int = 1, transposed: bool = False) -> Tensor:
    """Sum a weight-shaped tensor over everything but the output-channel index: returns ``[C_out]``.

    The adjoint of :func:`scale_weight_per_out_channel` (used for the gradient of ``gamma``).

    Example:
        >>> sum_per_out_channel(torch.ones(6, 2, 3, 3))
        tensor([18., 18., 18., 18., 18., 18.])
    """
    view, _ = _out_channel_view(weight_like, groups, transposed)
    if not transposed:
        return view.reshape(view.shape[0], -1).sum(1)
    # view: [g, C_in/g, C_out/g, *k] -> [g, C_out/g]
    dims = [1] + list(range(3, view.dim()))
    return view.sum(dim=dims).reshape(-1)


def fold_conv_bn_weights(
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    eps: float,
    *,
    groups: int = 1,
    transposed: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Fold a BatchNorm (running statistics) into the conv / linear layer before it.

    Computed in float32 (or float64 if any input is float64) and returned in ``conv_weight``'s dtype,
    so half-precision parameters lose nothing in the fold itself.

    Args:
        conv_weight, conv_bias: the layer's weight and bias (``None`` if ``bias=False``).
        running_mean, running_var, bn_weight, bn_bias, eps: the BatchNorm's state.
        groups: the layer's ``groups``.
        transposed: ``True`` for ``ConvTransposeNd``.

    Returns:
        ``(folded_weight, folded_bias)``; ``layer(x; folded) == bn.eval()(layer(x))``.

    Example:
        >>> conv, bn = torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8).eval()
        >>> bn.running_var.uniform_(0.5, 2.0); bn.running_mean.normal_()  # doctest: +ELLIPSIS
        tensor(...)
        >>> w, b = fold_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
        ...                             bn.weight, bn.bias, bn.eps)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.allclose(torch.nn.functional.conv2d(x, w, b), bn(conv(x)), atol=1e-5)
        True
    """
    compute = torch.promote_types(torch.float32, conv_weight.dtype)
    compute = torch.promote_types(compute, running_var.dtype)

    def up(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.to(compute)

    scale, shift = bn_scale_shift(up(running_mean), up(running_var), up(bn_weight), up(bn_bias), eps)
    w = scale_weight_per_out_channel(up(conv_weight), scale, groups=groups, transposed=transposed)
    b = shift if conv_bias is None else up(conv_bias) * scale + shift
    return w.to(conv_weight.dtype), b.to(conv_weight.dtype)
