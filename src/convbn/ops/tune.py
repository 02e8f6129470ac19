"""Tune's ops (paper Sec. 3.4, Table 2): the per-channel fold, the weight refold and the backward epilogue.

* ``convbn::tune_fold(weight, bias, running_mean, running_var, gamma, beta, eps, groups, transposed,
  fold_weight) -> (w', invstd, neg_mean, scale, b')``: ``invstd = 1/sqrt(var + eps)``, ``scale = gamma *
  invstd``, ``b' = (b - mean) * scale + beta`` and, if ``fold_weight``, ``w' = w * scale`` (else ``w'`` is
  empty).
* ``convbn::tune_refold(weight, scale, groups, transposed) -> w'``.
* ``convbn::tune_epilogue(grad_w, grad_b, weight, scale, bias, neg_mean, invstd, groups, transposed,
  activation, need_w, need_b, need_gamma, need_beta) -> (dw, db, dgamma, dbeta)``: from the layer's
  gradients against ``w'`` (``activation=False``: ``dL/dw'``, ``dL/db'``) or against ``w`` with the output
  gradient scaled by ``s`` (``activation=True``: ``dL/dw``, ``dL/db``; only valid when no ``s`` is 0),
  ``dgamma = invstd * (sum(dL/dw' * w) + sum_g * (b - mean))``, ``dbeta = sum_g`` and, with
  ``activation=False``, ``dw = s * dL/dw'``, ``db = s * sum_g`` (with ``activation=True`` they are ``grad_w``
  and ``grad_b`` themselves, which the caller already has: ``dw``/``db`` are then empty); outputs not needed
  are empty.

Per-channel vectors are in the fold dtype, float32 (float64 stays float64) on every device. The CPU
kernel (``csrc/tune.cpp``) takes float32/float64 layers that are not transposed, with contiguous
per-channel tensors of the weight's dtype; its ``invstd`` is computed in double and rounded once (the
reference's float ``rsqrt`` may differ by an ulp); ``scale = gamma * invstd`` is one rounded product in both.
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..fold import scale_weight_per_out_channel, sum_per_out_channel
from ..functions._conv import threads
from ._build import CSRC, NativeLibrary
from ._library import define_op

__all__ = ["fold", "refold", "epilogue", "fold_reference", "refold_reference", "epilogue_reference", "LIB",
           "fold_dtype"]


def _argtypes() -> dict:
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    types = {}
    for sfx in ("f32", "f64"):
        types[f"tune_fold_{sfx}"] = [p, p, i64, i64, p, p, p, p, p, f64, p, p, p, p, i32]
        types[f"tune_refold_{sfx}"] = [p, p, i64, i64, p, i32]
        types[f"tune_epilogue_{sfx}"] = [p, p, p, i64, i64, p, i32, i32, p, p, p, p, p, p, p, i32]
    return types


LIB = NativeLibrary("tune", os.path.join(CSRC, "tune.cpp"), _argtypes(), "Tune")


def fold_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, float64 stays float64 (bf16/fp16 layers fold in float32)."""
    return torch.promote_types(torch.float32, dtype)


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _kernel(weight: Tensor, transposed: bool, *vectors: Optional[Tensor]) -> Optional[Tuple[ctypes.CDLL, str]]:
    if transposed or weight.dtype not in (torch.float32, torch.float64) or not weight.is_contiguous() \
            or weight.numel() == 0:
        return None
    for t in vectors:
        if t is not None and (t.device.type != "cpu" or t.dtype != weight.dtype or not t.is_contiguous()):
            return None
    lib = LIB.get()
    return None if lib is None else (lib, "f32" if weight.dtype == torch.float32 else "f64")


# --------------------------------------------------------------------------------------------
# tune_fold
# --------------------------------------------------------------------------------------------
def fold_reference(weight: Tensor, bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor,
                   gamma: Optional[Tensor], beta: Optional[Tensor], eps: float, groups: int, transposed: bool,
                   fold_weight: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    fdt = fold_dtype(weight.dtype)
    invstd = torch.rsqrt(running_var.to(fdt) + eps)
    neg_mean = -running_mean.to(fdt)
    scale = invstd if gamma is None else gamma.to(fdt) * invstd
    folded_bias = (neg_mean if bias is None else bias.to(fdt) + neg_mean) * scale
    if beta is not None:
        folded_bias = folded_bias + beta.to(fdt)
    w = refold_reference(weight, scale, groups, transposed) if fold_weight else weight.new_empty(0, dtype=fdt)
    return w, invstd, neg_mean, invstd.clone() if gamma is None else scale, folded_bias


def _fold_cpu(weight, bias, running_mean, running_var, gamma, beta, eps, groups, transposed, fold_weight):
    k = _kernel(weight, transposed, bias, running_mean, running_var, gamma, beta)
    if k is None:
        return fold_reference(weight, bias, running_mean, running_var, gamma, beta, eps, groups, transposed,
                              fold_weight)
    lib, sfx = k
    c = weight.shape[0]
    invstd, neg_mean, scale, folded_bias = (weight.new_empty(c) for _ in range(4))
    w = torch.empty_like(weight) if fold_weight else weight.new_empty(0)
    getattr(lib, f"tune_fold_{sfx}")(
        weight.data_ptr(), _ptr(w) if fold_weight else None, c, weight.numel() // c, running_mean.data_ptr(),
        running_var.data_ptr(), _ptr(gamma), _ptr(beta), _ptr(bias), float(eps), invstd.data_ptr(),
        neg_mean.data_ptr(), scale.data_ptr(), folded_bias.data_ptr(), threads(weight.numel()) if fold_weight else 1)
    return w, invstd, neg_mean, scale, folded_bias


def _out_channels(weight: Tensor, groups: int, transposed: bool) -> int:
    return weight.shape[1] * groups if transposed else weight.shape[0]


def _fold_fake(weight, bias, running_mean, running_var, gamma, beta, eps, groups, transposed, fold_weight):
    fdt = fold_dtype(weight.dtype)
    c = _out_channels(weight, groups, transposed)
    w = torch.empty_like(weight, dtype=fdt) if fold_weight else weight.new_empty(0, dtype=fdt)
    return (w,) + tuple(weight.new_empty(c, dtype=fdt) for _ in range(4))


fold = define_op(
    "tune_fold(Tensor weight, Tensor? bias, Tensor running_mean, Tensor running_var, Tensor? gamma, Tensor? beta, "
    "float eps, int groups, bool transposed, bool fold_weight) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    fold_reference, _fold_cpu, _fold_fake)


# --------------------------------------------------------------------------------------------
# tune_refold
# --------------------------------------------------------------------------------------------
def refold_reference(weight: Tensor, scale: Tensor, groups: int, transposed: bool) -> Tensor:
    """``w * scale`` per output channel, in ``scale``'s dtype."""
    return scale_weight_per_out_channel(weight.to(scale.dtype), scale, groups=groups, transposed=transposed)


def _refold_cpu(weight, scale, groups, transposed):
    k = _kernel(weight, transposed, scale)
    if k is None:
        return refold_reference(weight, scale, groups, transposed)
    lib, sfx = k
    c = weight.shape[0]
    w = torch.empty_like(weight)
    getattr(lib, f"tune_refold_{sfx}")(weight.data_ptr(), w.data_ptr(), c, weight.numel() // c, scale.data_ptr(),
                                        threads(weight.numel()))
    return w


def _refold_fake(weight, scale, groups, transposed):
    return torch.empty_like(weight, dtype=scale.dtype)


refold = define_op("tune_refold(Tensor weight, Tensor scale, int groups, bool transposed) -> Tensor",
                   refold_reference, _refold_cpu, _refold_fake)


# --------------------------------------------------------------------------------------------
# tune_epilogue
# --------------------------------------------------------------------------------------------
def per_channel_dot(a: Tensor, b: Tensor, groups: int, transposed: bool) -> Tensor:
    """``sum(a * b)`` per output channel of two weight-shaped tensors, without materializing ``a * b``
    where the layout allows (one batched GEMV)."""
    if not transposed:
        c = a.shape[0]
        return torch.bmm(a.reshape(c, 1, -1), b.reshape(c, -1, 1)).reshape(c)
    return sum_per_out_channel(a * b, groups=groups, transposed=True)


def epilogue_reference(grad_w: Optional[Tensor], grad_b: Optional[Tensor], weight: Tensor, scale: Tensor,
                       bias: Optional[Tensor], neg_mean: Tensor, invstd: Tensor, groups: int, transposed: bool,
                       activation: bool, need_w: bool, need_b: bool, need_gamma: bool,
                       need_beta: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    fdt = scale.dtype
    gw = None if grad_w is None else grad_w.to(fdt)
    gb = None if grad_b is None else grad_b.to(fdt)
    dw, db, dgamma, dbeta = (weight.new_empty(0, dtype=fdt) for _ in range(4))  # (outputs never alias)
    sum_g = dot = None
    if activation:  # gw = dL/dw = s * dL/dw', gb = dL/db = s * sum_g (dw, db: the caller's grad_w, grad_b)
        if need_gamma:
            dot = per_channel_dot(gw, weight.to(fdt), groups, transposed) / scale
        if need_gamma or need_beta:
            sum_g = gb / scale
    else:  # gw = dL/dw', gb = dL/db' = sum_g
        sum_g = gb
        if need_gamma:
            dot = per_channel_dot(gw, weight.to(fdt), groups, transposed)
        if need_w:
            dw = scale_weight_per_out_channel(gw, scale, groups=groups, transposed=transposed)
        if need_b:
            db = sum_g * scale
    if need_gamma:
        dgamma = invstd * (dot + sum_g * (neg_mean if bias is None else bias.to(fdt) + neg_mean))
    if need_beta:
        dbeta = sum_g.clone() if sum_g is grad_b else sum_g  # (an op's output never aliases its input)
    return dw, db, dgamma, dbeta


def _epilogue_cpu(grad_w, grad_b, weight, scale, bias, neg_mean, invstd, groups, transposed, activation, need_w,
                  need_b, need_gamma, need_beta):
    if weight.dtype == scale.dtype:  # (under autocast the layer's gradients are in the autocast dtype)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(weight.dtype)
    k = _kernel(weight, transposed, scale, bias, neg_mean, invstd, grad_b, grad_w)
    if k is None:
        return epilogue_reference(grad_w, grad_b, weight, scale, bias, neg_mean, invstd, groups, transposed,
                                  activation, need_w, need_b, need_gamma, need_beta)
    lib, sfx = k
    c = weight.shape[0]
    gw = None if grad_w is None else grad_w.contiguous()
    need_w, need_b = need_w and not activation, need_b and not activation
    dw = torch.empty_like(weight) if need_w else None
    dgamma = weight.new_empty(c) if need_gamma else None
    dbeta = weight.new_empty(c) if need_beta else None
    db = weight.new_empty(c) if need_b else None
    getattr(lib, f"tune_epilogue_{sfx}")(
        _ptr(gw), _ptr(dw), weight.data_ptr(), c, weight.numel() // c, scale.data_ptr(), int(activation),
        int(need_w), _ptr(grad_b), _ptr(bias), neg_mean.data_ptr(), invstd.data_ptr(), _ptr(dgamma), _ptr(dbeta),
        _ptr(db), threads(weight.numel()))
    return tuple(weight.new_empty(0) if t is None else t for t in (dw, db, dgamma, dbeta))


def _epilogue_fake(grad_w, grad_b, weight, scale, bias, neg_mean, invstd, groups, transposed, activation, need_w,
                   need_b, need_gamma, need_beta):
    fdt = scale.dtype
    c = scale.shape[0]
    return (torch.empty_like(weight, dtype=fdt) if need_w and not activation else weight.new_empty(0, dtype=fdt),
            weight.new_empty(c if need_b and not activation else 0, dtype=fdt),
            weight.new_empty(c if need_gamma else 0, dtype=fdt),
            weight.new_empty(c if need_beta else 0, dtype=fdt))


epilogue = define_op(
    "tune_epilogue(Tensor? grad_w, Tensor? grad_b, Tensor weight, Tensor scale, Tensor? bias, Tensor neg_mean, "
    "Tensor invstd, int groups, bool transposed, bool activation, bool need_w, bool need_b, bool need_gamma, "
    "bool need_beta) -> (Tensor, Tensor, Tensor, Tensor)", epilogue_reference, _epilogue_cpu, _epilogue_fake)
