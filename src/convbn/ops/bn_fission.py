"""BN fission's ops (seed paper 002, Sec. 3.2): one-sweep statistics, one normalize(+ReLU) sweep, split backward.

* ``convbn::bn_fission_stats(x) -> (mean, var)``: per-channel batch mean and biased variance, one sweep.
* ``convbn::bn_fission_forward(x, weight, bias, mean, var, running_mean!, running_var!, factor, eps, relu)
  -> (out, mean, var, invstd)``: the statistics of every channel not given (``mean``/``var`` may hold the
  first ``K <= C`` channels': ICF, a concatenation whose leading pieces were measured earlier),
  ``z = relu?((x - mean) * invstd * gamma + beta)`` and, if the buffers are given, their update
  ``r = (1 - factor) * r + factor * batch`` (the variance unbiased), in place.
* ``convbn::bn_fission_backward(grad, x, weight, bias, mean, invstd, relu, need_x, need_w, need_b)
  -> (dx, dgamma, dbeta)``: one reduction sweep for ``sum(g)``/``sum(g * (x - mean))`` (``g`` = grad masked by
  the ReLU, the mask recomputed from ``x`` with the forward's own arithmetic), then one elementwise sweep
  ``dx = a * g + b * (x - mean) + e``; outputs not needed are empty.

Per-channel vectors are in :func:`convbn.functions._conv.channel_dtype` (float64 on the CPU, float32
elsewhere unless ``x`` is float64). The CPU kernel (``csrc/bn_fission.cpp``) takes float32/float64 ``x`` in
contiguous (``N, C, L``) or channels-last (``N, L, C``) layout with contiguous float32/float64 parameters
and buffers (the statistics op also a channel slice ``t.narrow(1, ...)`` of a contiguous tensor, read in
place with its batch stride); anything else runs the reference. An ``N, C, L`` tensor with channels to share
among the threads is processed channel by channel -- a channel's reduction, then its elementwise pass, in
one thread -- so the second pass reads that channel from L1/L2 rather than the whole tensor from memory
(in DenseNet121 training: the ops' in-model time 155 -> 115 ms per step).
The variance: the kernel sums shifted data in short
float blocks flushed to float64, the reference is ``torch.var_mean`` (Welford); ``x - mean`` is computed
with the mean split into two floats (exact when ``mean >> std``) by both.
"""

from __future__ import annotations

import ctypes
import os
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from ..functions._conv import channel_dtype, channel_view, threads
from ._build import CSRC, NativeLibrary
from ._library import define_op

__all__ = ["stats", "forward", "backward", "stats_reference", "forward_reference", "backward_reference",
           "geometry", "batch_stride", "update_running_stats", "LIB"]


def _argtypes() -> dict:
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    dims = [i64, i64, i64, i32, i32]
    types = {}
    for sfx in ("f32", "f64"):
        types[f"stats_{sfx}"] = [p, i64, i64, i64, i32, i64, i32, p, p]  # N, C, L, nlc, batch stride, threads
        types[f"fused_forward_{sfx}"] = [p, p, *dims, p, p, i64, p, p, p, p, i32, f64, i32, p, p, p, i32, f64]
        types[f"fused_backward_{sfx}"] = [p, p, p, *dims, p, p, p, p, i32, i32, p, p]
    return types


LIB = NativeLibrary("bn_fission", os.path.join(CSRC, "bn_fission.cpp"), _argtypes(), "bn_fission")
_FLOATS = (torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------
def geometry(x: Tensor) -> Tuple[int, int, int, Optional[int]]:
    """``(N, C, L, nlc)``: nlc = 1 for (N, L, C) memory, 0 for (N, C, L), None for anything else."""
    n, c = x.shape[0], x.shape[1]
    length = x.numel() // max(n * c, 1)
    if length == 1 and x.movedim(1, -1).is_contiguous():
        return n, c, length, 1
    if x.is_contiguous():
        return n, c, length, 0
    if x.movedim(1, -1).is_contiguous():
        return n, c, length, 1
    return n, c, length, None


def batch_stride(x: Tensor) -> Optional[int]:
    """The stride of dim 0 when ``x`` is a channel slice of a contiguous tensor (every ``x[n]`` contiguous,
    the samples apart and in order: e.g. ``t.narrow(1, offset, channels)``), which the statistics kernel
    reads in place; ``None`` otherwise."""
    if x.dim() < 2 or x.shape[0] == 0:
        return None
    plane = x.numel() // x.shape[0]
    if plane == 0 or not x[0].is_contiguous() or x.stride(0) < plane:
        return None
    return x.stride(0)


def _reduce_dims(x: Tensor) -> List[int]:
    return [0] + list(range(2, x.dim()))


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _channel_dtype(x: Tensor) -> torch.dtype:
    return channel_dtype(x.device, x.dtype)


def _centered(x: Tensor, mean: Tensor) -> Tensor:
    # x - mean with a float64 mean split into hi + lo, as the kernel does (exact when mean >> std); a
    # float32 mean (off the CPU) has lo == 0.
    dt = _compute_dtype(x)
    hi = mean.to(dt)
    lo = (mean - hi.to(mean.dtype)).to(dt)
    return (x.to(dt) - channel_view(hi, x)).sub_(channel_view(lo, x))


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` with ``ref``'s dtype and memory layout (the kernels read both with one set of strides)."""
    if t.dtype == ref.dtype and t.stride() == ref.stride():
        return t
    return torch.empty_like(ref).copy_(t)


def _scale_shift(weight: Optional[Tensor], bias: Optional[Tensor], invstd: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel ``(gamma * invstd, beta)`` in ``invstd``'s dtype."""
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = torch.zeros_like(invstd) if bias is None else bias.to(invstd.dtype)
    return scale, shift


def _affine(x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``(x - mean) * scale + shift`` in the compute dtype (the backward recomputes the ReLU mask with these
    very ops, so it matches the forward's bit for bit)."""
    dt = _compute_dtype(x)
    return _centered(x, mean).mul_(channel_view(scale.to(dt), x)).add_(channel_view(shift.to(dt), x))


def _masked(grad: Tensor, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, relu: bool) -> Tensor:
    """``grad`` where the forward's pre-ReLU value was > 0 (recomputed from ``x``), else 0."""
    g = grad.to(_compute_dtype(grad))
    return torch.where(_affine(x, mean, scale, shift) > 0, g, torch.zeros((), dtype=g.dtype)) if relu else g


def update_running_stats(rm: Optional[Tensor], rv: Optional[Tensor], mean: Tensor, var: Tensor, m: int,
                         factor: Union[float, Tensor]) -> None:
    """``r = (1 - factor) * r + factor * batch`` in place (the variance unbiased by ``m / (m - 1)``);
    ``factor`` may be a 0-d tensor (no host sync)."""
    with torch.no_grad():
        if rm is not None:
            _update_running(rm, mean, factor)
        if rv is not None:
            _update_running(rv, var * (m / (m - 1)), factor)


def _update_running(buf: Tensor, batch: Tensor, factor: Union[float, Tensor]) -> None:
    batch = batch.to(buf.dtype)
    if isinstance(factor, Tensor):
        factor = factor.to(buf.dtype)
    buf.mul_(1 - factor).add_(batch * factor)


def _kernel(x: Tensor, *groups, strided: bool = False) -> Optional[Tuple[ctypes.CDLL, str, int, int, int, int,
                                                                          List[int]]]:
    """``(lib, sfx, N, C, L, nlc, f64 flags)`` when the CPU kernel applies to ``x`` and each group of
    per-channel tensors (contiguous float32/float64 of one dtype per group), else ``None``. ``strided``:
    the kernel also reads a channel slice (:func:`batch_stride`) as NCL."""
    if x.dtype not in _FLOATS or x.numel() == 0 or _channel_dtype(x) != torch.float64:
        return None
    n, c, length, nlc = geometry(x)
    if nlc is None and strided and batch_stride(x) is not None:
        nlc = 0
    if nlc is None:
        return None
    flags = []
    for group in groups:  # (a plain loop: this runs twice per layer and step)
        dtype = None
        for t in group:
            if t is None:
                continue
            if dtype is None:
                dtype = t.dtype
            if t.dtype is not dtype or dtype not in _FLOATS or t.device.type != "cpu" or not t.is_contiguous():
                return None
        flags.append(int(dtype is torch.float64))
    lib = LIB.get()
    if lib is None:
        return None
    return lib, ("f32" if x.dtype == torch.float32 else "f64"), n, c, length, nlc, flags


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


# --------------------------------------------------------------------------------------------
# bn_fission_stats
# --------------------------------------------------------------------------------------------
def stats_reference(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel ``(mean, biased var)`` by ``torch.var_mean`` (Welford), in the per-channel dtype."""
    var, mean = torch.var_mean(x.to(_compute_dtype(x)), dim=_reduce_dims(x), correction=0)
    return mean.to(_channel_dtype(x)), var.to(_channel_dtype(x))


def _stats_cpu(x: Tensor) -> Tuple[Tensor, Tensor]:
    k = _kernel(x, strided=True)
    if k is None:
        return stats_reference(x)
    lib, sfx, n, c, length, nlc, _ = k
    mean, var = torch.empty(c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
    s_n = 0 if nlc else (c * length if x.is_contiguous() else batch_stride(x))
    getattr(lib, f"stats_{sfx}")(x.data_ptr(), n, c, length, nlc, s_n, threads(x.numel()), mean.data_ptr(),
                                 var.data_ptr())
    return mean, var


def _stats_fake(x: Tensor) -> Tuple[Tensor, Tensor]:
    c = x.shape[1]
    return x.new_empty(c, dtype=_channel_dtype(x)), x.new_empty(c, dtype=_channel_dtype(x))


stats = define_op("bn_fission_stats(Tensor x) -> (Tensor, Tensor)", stats_reference, _stats_cpu, _stats_fake)


# --------------------------------------------------------------------------------------------
# bn_fission_forward
# --------------------------------------------------------------------------------------------
def forward_reference(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Optional[Tensor],
                      var: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      factor: float, eps: float, relu: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sub-BN1 (statistics of the channels not given) then sub-BN2 (normalize + affine + ReLU) in torch
    ops; updates the running buffers (if given) in place."""
    cd = _channel_dtype(x)
    known = _known(x, mean, var)
    if known == 0:
        mean, var = stats_reference(x)
    elif known == x.shape[1]:
        mean, var = mean.to(cd, copy=True), var.to(cd, copy=True)
    else:
        rest = stats_reference(x.narrow(1, known, x.shape[1] - known))
        mean, var = (torch.cat([given.to(cd), r]) for given, r in zip((mean, var), rest))
    invstd = torch.rsqrt(var + eps)
    scale, shift = _scale_shift(weight, bias, invstd)
    out = _affine(x, mean, scale, shift)
    if relu:
        out = out.relu_()
    if running_mean is not None or running_var is not None:
        update_running_stats(running_mean, running_var, mean, var, x.numel() // x.shape[1], factor)
    return out.to(x.dtype), mean, var, invstd


def _known(x: Tensor, mean: Optional[Tensor], var: Optional[Tensor]) -> int:
    """How many leading channels' statistics are given (``mean``/``var`` of that length, or ``None``)."""
    if mean is None or var is None:
        return 0
    if mean.dim() != 1 or mean.shape != var.shape or mean.shape[0] > x.shape[1]:
        raise ValueError(f"bn_fission_forward: given statistics must be two [K] tensors with K <= {x.shape[1]} "
                         f"channels (the first K channels'), got {tuple(mean.shape)} and {tuple(var.shape)}")
    return mean.shape[0]


def _forward_cpu(x, weight, bias, mean, var, running_mean, running_var, factor, eps, relu):
    k = _kernel(x, (weight, bias), (running_mean, running_var))
    if k is None:
        return forward_reference(x, weight, bias, mean, var, running_mean, running_var, factor, eps, relu)
    lib, sfx, n, c, length, nlc, (pf64, bf64) = k
    known = _known(x, mean, var)
    if known:  # read by the kernel, which copies them into the outputs
        mean, var = (s.to(torch.float64).contiguous() for s in (mean, var))
    m_out, v_out, invstd = (torch.empty(c, dtype=torch.float64) for _ in range(3))
    out = torch.empty_like(x)
    getattr(lib, f"fused_forward_{sfx}")(
        x.data_ptr(), out.data_ptr(), n, c, length, nlc, threads(x.numel()), m_out.data_ptr(), v_out.data_ptr(),
        known, _ptr(mean) if known else None, _ptr(var) if known else None, _ptr(weight), _ptr(bias), pf64,
        float(eps), int(relu), invstd.data_ptr(), _ptr(running_mean), _ptr(running_var), bf64, float(factor))
    return out, m_out, v_out, invstd


def _forward_fake(x, weight, bias, mean, var, running_mean, running_var, factor, eps, relu):
    c, cd = x.shape[1], _channel_dtype(x)
    return torch.empty_like(x), x.new_empty(c, dtype=cd), x.new_empty(c, dtype=cd), x.new_empty(c, dtype=cd)


forward = define_op(
    "bn_fission_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? mean, Tensor? var, "
    "Tensor(a!)? running_mean, Tensor(b!)? running_var, float factor, float eps, bool relu) "
    "-> (Tensor, Tensor, Tensor, Tensor)", forward_reference, _forward_cpu, _forward_fake)


# --------------------------------------------------------------------------------------------
# bn_fission_backward
# --------------------------------------------------------------------------------------------
def backward_reference(grad: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                       invstd: Tensor, relu: bool, need_x: bool, need_w: bool,
                       need_b: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """One reduction sweep, then (if needed) one elementwise sweep, in torch ops; unneeded outputs empty."""
    grad = _like(grad, x)
    scale, shift = _scale_shift(weight, bias, invstd)
    g = _masked(grad, x, mean, scale, shift, relu)
    dims = _reduce_dims(x)
    sum_g = g.sum(dims, dtype=mean.dtype)
    sum_gxhat = (g * _centered(x, mean)).sum(dims, dtype=mean.dtype) * invstd  # dgamma; sum_g is dbeta
    grad_x, grad_w, grad_b = (x.new_empty(0) for _ in range(3))  # (outputs never alias)
    if need_x:
        dt = _compute_dtype(x)
        m = x.numel() // x.shape[1]
        b = -scale * invstd * sum_gxhat / m
        e = -scale * sum_g / m
        dx = _centered(x, mean).mul_(channel_view(b.to(dt), x))
        grad_x = dx.add_(g * channel_view(scale.to(dt), x)).add_(channel_view(e.to(dt), x)).to(x.dtype)
    if need_w and weight is not None:
        grad_w = sum_gxhat.to(weight.dtype)
    if need_b and bias is not None:
        grad_b = sum_g.to(bias.dtype)
    return grad_x, grad_w, grad_b


def _backward_cpu(grad, x, weight, bias, mean, invstd, relu, need_x, need_w, need_b):
    k = _kernel(x, (weight, bias))
    if k is None or mean.dtype != torch.float64 or invstd.dtype != torch.float64:
        return backward_reference(grad, x, weight, bias, mean, invstd, relu, need_x, need_w, need_b)
    lib, sfx, n, c, length, nlc, (pf64,) = k
    g = _like(grad, x)
    gx = torch.empty_like(x) if need_x else None
    gw = torch.empty_like(weight) if need_w and weight is not None else None
    gb = torch.empty_like(bias) if need_b and bias is not None else None
    mean, invstd = mean.contiguous(), invstd.contiguous()
    getattr(lib, f"fused_backward_{sfx}")(
        g.data_ptr(), x.data_ptr(), _ptr(gx), n, c, length, nlc, threads(x.numel()), mean.data_ptr(),
        invstd.data_ptr(), _ptr(weight), _ptr(bias), pf64, int(relu), _ptr(gw), _ptr(gb))
    return tuple(x.new_empty(0) if t is None else t for t in (gx, gw, gb))


def _backward_fake(grad, x, weight, bias, mean, invstd, relu, need_x, need_w, need_b):
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(weight) if need_w and weight is not None else x.new_empty(0),
            torch.empty_like(bias) if need_b and bias is not None else x.new_empty(0))


backward = define_op(
    "bn_fission_backward(Tensor grad, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
    "bool relu, bool need_x, bool need_w, bool need_b) -> (Tensor, Tensor, Tensor)",
    backward_reference, _backward_cpu, _backward_fake)
