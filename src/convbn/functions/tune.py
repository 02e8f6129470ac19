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

In eager mode, for float32/float64 CPU layers (not transposed, no autocast), a small C++ kernel (see
:mod:`convbn.functions.native`) does the per-channel arithmetic and the fold in one call per
direction, and in backward reads ``dL/dw'`` once for both the ``dgamma`` dot and ``dL/dw = s * dL/dw'``
-- the torch-op path costs about twenty small ops and three weight-sized passes more per layer, which
is most of Tune's overhead over Deploy on a CPU. ``torch.compile``, autocast, other dtypes and
``use_extension("torch"|"sweeps")`` take the torch-op path (same function, same saved tensors).
"""

from __future__ import annotations

import contextvars
import ctypes
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..fold import scale_weight_per_out_channel, sum_per_out_channel
from ._conv import ConvSpec, autocast_dtype, channel_view, check_input_dtype, plain_host_tensor, ptr, threads
from ._conv import has_values as plain_tensor_values
from ._conv import layer as _layer
from .native import NativeLibrary, extension_mode

__all__ = ["ConvSpec", "TuneConvBNFunction", "tune_conv_bn", "tune_forward", "tune_backward", "tune_route"]


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
    invstd, neg_mean = _running_vectors(weight, running_mean, running_var, eps)
    fdt = invstd.dtype
    scale = _scale(gamma, invstd)
    folded_bias = _bias_minus_mean(bias, neg_mean) * scale
    if beta is not None:
        folded_bias = folded_bias + beta.to(fdt)
    x_used = x.to(compute_dtype)
    b = folded_bias.to(compute_dtype)
    if _activation_route(_output_numel(x, weight, spec), weight):
        out = _layer(x_used, weight.to(compute_dtype), None, spec)
        s = channel_view(scale.to(compute_dtype), out)
        out = torch.addcmul(channel_view(b, out), out, s, out=out) if plain_tensor_values(out) else \
            out * s + channel_view(b, out)
    else:
        out = _layer(x_used, _folded_weight(weight, scale, spec, compute_dtype), b, spec)
    return out, x_used, invstd, neg_mean


def _running_vectors(weight: Tensor, running_mean: Tensor, running_var: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """``(invstd, -running_mean)`` in the fold dtype (float32, float64 stays float64)."""
    fdt = _fold_dtype(weight)
    return torch.rsqrt(running_var.to(fdt) + eps), -running_mean.to(fdt)


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
    ``dL/db`` directly; taken here only when no ``gamma``/``beta`` gradient is needed (recovering
    ``dL/dw'`` as ``dL/dw / s`` would need to know on the host that no ``s`` is 0). Nothing here reads
    a tensor's values on the host (no sync on an accelerator; tested on ``meta``).
    """
    need_x, need_w, need_b, need_gamma, need_beta = needs
    scale = _scale(gamma, invstd)
    fdt = scale.dtype
    groups, transposed = (1, False) if spec is None else (spec.groups, spec.transposed)
    g = grad_out.to(compute_dtype)
    grad_w = grad_b = grad_gamma = grad_beta = dot = sum_g = None
    # The activation route would recover dL/dw' = dL/dw / s and sum(g) = dL/db / s for dgamma/dbeta,
    # which is exact only where no s is 0 (a zero-initialized gamma). Checking that here would read s on
    # the host -- a sync per layer on an accelerator -- so this path takes the activation route only when
    # nothing is recovered (frozen BN affine); the C++ path counts zero scales on the CPU for free.
    # weight route: refold (2W) [+ s * dL/dw' (2W) if need_w]; activation route: g * s (2A)
    if not (need_gamma or need_beta) and _activation_route(g.numel(), weight, weight_passes=2 if need_w else 1):
        gs = g * channel_view(scale.to(compute_dtype), g)
        gx, gw, gb = _layer_backward(gs, x_used, weight.to(compute_dtype), spec, [need_x, need_w, need_b])
        grad_w = None if gw is None else gw.to(fdt)
        grad_b = None if gb is None else gb.to(fdt)
    else:
        w = _folded_weight(weight, scale, spec, compute_dtype)
        mask = [need_x, need_w or need_gamma, need_b or need_gamma or need_beta]
        gx, gwf, gbf = _layer_backward(g, x_used, w, spec, mask)
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


# --------------------------------------------------------------------------------------------
# Eager fast path: the per-channel math, the fold and the weight-gradient epilogue in C++.
# Weights are [C_out, K] rows (conv, not transposed, or Linear); per-channel vectors share the
# weight's dtype. invstd is computed in double and rounded once (the torch-op path's float rsqrt
# may differ by an ulp); scale = gamma * invstd is one rounded product on both paths.
# --------------------------------------------------------------------------------------------
_CPP_SOURCE = r"""
#include <stdint.h>
#include <math.h>

namespace {
// The folded weight wout = w * scale, row by row.
template <typename T>
void refold(const T* w, T* wout, int64_t C, int64_t K, const T* scale, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t c = 0; c < C; ++c) {
    const T s = scale[c];
    const T* src = w + c * K;
    T* dst = wout + c * K;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) dst[k] = src[k] * s;
  }
}

// Per-channel invstd, -mean, scale = gamma * invstd, folded bias = (bias - mean) * scale + beta; and,
// if wout, the folded weight wout = w * scale. Returns how many channels have |scale| <= 1e-30.
template <typename T>
int fold(const T* w, T* wout, int64_t C, int64_t K, const T* rm, const T* rv, const T* gamma, const T* beta,
         const T* bias, double eps, T* invstd, T* neg_mean, T* scale, T* fbias, int nt) {
  int zeros = 0;
  for (int64_t c = 0; c < C; ++c) {
    T is = (T)(1.0 / sqrt((double)rv[c] + eps));
    T s = gamma ? (T)(gamma[c] * is) : is;
    T nm = -rm[c];
    T fb = (bias ? (T)(bias[c] + nm) : nm) * s;
    invstd[c] = is; neg_mean[c] = nm; scale[c] = s; fbias[c] = beta ? (T)(fb + beta[c]) : fb;
    zeros += fabs((double)s) <= 1e-30;
  }
  if (wout) refold(w, wout, C, K, scale, nt);
  return zeros;
}

// The backward epilogue. gw: dL/dw' (weight route; scaled in place to dL/dw if need_w) or dL/dw
// (activation route: dL/dw' = dL/dw / s). gsum: dL/db' (weight route) or dL/db (activation route).
// dgamma = invstd * (sum(dL/dw' * w) + sum_g * (bias - mean)), dbeta = sum_g, dbias = s * sum_g.
template <typename T>
void epilogue(T* gw, const T* w, int64_t C, int64_t K, const T* scale, int act, int need_w, const T* gsum,
              const T* bias, const T* neg_mean, const T* invstd, T* ggamma, T* gbeta, T* gbias, int nt) {
  const bool scale_w = gw && need_w && !act;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t c = 0; c < C; ++c) {
    const T s = scale[c];
    double dot = 0.0;
    if (gw && ggamma) {
      T* r = gw + c * K;
      const T* wr = w + c * K;
      if (scale_w) {
#pragma omp simd reduction(+ : dot)
        for (int64_t k = 0; k < K; ++k) { dot += (double)r[k] * (double)wr[k]; r[k] = r[k] * s; }
      } else {
#pragma omp simd reduction(+ : dot)
        for (int64_t k = 0; k < K; ++k) dot += (double)r[k] * (double)wr[k];
      }
    } else if (scale_w) {
      T* r = gw + c * K;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) r[k] = r[k] * s;
    }
    if (!gsum) continue;
    const T sg = act ? (T)(gsum[c] / s) : gsum[c];
    if (ggamma) {
      const T d = act ? (T)(dot / (double)s) : (T)dot;
      ggamma[c] = invstd[c] * (T)(d + sg * (bias ? (T)(bias[c] + neg_mean[c]) : neg_mean[c]));
    }
    if (gbeta) gbeta[c] = sg;
    if (gbias) gbias[c] = act ? gsum[c] : (T)(sg * s);
  }
}
}  // namespace

#define CONVBN_TUNE_EXPORT(T, SFX)                                                                     \
  extern "C" int tune_fold_##SFX(const T* w, T* wout, int64_t C, int64_t K, const T* rm, const T* rv,  \
                                 const T* gamma, const T* beta, const T* bias, double eps, T* invstd,  \
                                 T* neg_mean, T* scale, T* fbias, int nt) {                            \
    return fold<T>(w, wout, C, K, rm, rv, gamma, beta, bias, eps, invstd, neg_mean, scale, fbias, nt); }\
  extern "C" void tune_refold_##SFX(const T* w, T* wout, int64_t C, int64_t K, const T* scale, int nt) { \
    refold<T>(w, wout, C, K, scale, nt); }                                                             \
  extern "C" void tune_epilogue_##SFX(T* gw, const T* w, int64_t C, int64_t K, const T* scale, int act, \
                                      int need_w, const T* gsum, const T* bias, const T* neg_mean,     \
                                      const T* invstd, T* ggamma, T* gbeta, T* gbias, int nt) {        \
    epilogue<T>(gw, w, C, K, scale, act, need_w, gsum, bias, neg_mean, invstd, ggamma, gbeta, gbias, nt); }
CONVBN_TUNE_EXPORT(float, f32)
CONVBN_TUNE_EXPORT(double, f64)
"""


def _argtypes() -> dict:
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    types = {}
    for sfx in ("f32", "f64"):
        types[f"tune_fold_{sfx}"] = [p, p, i64, i64, p, p, p, p, p, f64, p, p, p, p, i32]
        types[f"tune_refold_{sfx}"] = [p, p, i64, i64, p, i32]
        types[f"tune_epilogue_{sfx}"] = [p, p, i64, i64, p, i32, i32, p, p, p, p, p, p, p, i32]
    return types


_LIB = NativeLibrary("tune", _CPP_SOURCE, _argtypes(), "Tune")


def _native_path(x: Tensor, weight: Tensor, vectors: Sequence[Optional[Tensor]], spec: Optional[ConvSpec]):
    """``(lib, sfx)`` when the C++ kernels apply (eager, no autocast, a float32/float64 CPU layer that
    is not transposed, contiguous, with per-channel tensors of the weight's dtype; never for ``meta``
    tensors, subclasses or ``torch.func`` wrappers), else ``None``."""
    if torch.compiler.is_compiling() or extension_mode() in ("torch", "sweeps"):
        return None
    if (spec is not None and spec.transposed) or not plain_host_tensor(weight) or not plain_host_tensor(x) \
            or weight.dtype not in (torch.float32, torch.float64) or not weight.is_contiguous() \
            or weight.numel() == 0 or autocast_dtype(x.device.type) is not None:
        return None
    for t in vectors:
        if t is not None and (not plain_host_tensor(t) or t.dtype != weight.dtype or not t.is_contiguous()):
            return None
    lib = _LIB.get()
    return None if lib is None else (lib, "f32" if weight.dtype == torch.float32 else "f64")


def _native_vectors(native, weight: Tensor, bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor,
                    gamma: Optional[Tensor], beta: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor, int]:
    """The kernel's per-channel ``(invstd, neg_mean, zeros)`` without the fold (``C``-sized work): what
    backward needs, bit for bit as :func:`_native_forward` computed them."""
    lib, sfx = native
    c = weight.shape[0]
    invstd, neg_mean, scale, folded_bias = (weight.new_empty(c) for _ in range(4))
    zeros = getattr(lib, f"tune_fold_{sfx}")(
        weight.data_ptr(), None, c, weight.numel() // c, running_mean.data_ptr(), running_var.data_ptr(),
        ptr(gamma), ptr(beta), ptr(bias), float(eps), invstd.data_ptr(), neg_mean.data_ptr(), scale.data_ptr(),
        folded_bias.data_ptr(), 1)
    return invstd, neg_mean, zeros


def _native_forward(native, x: Tensor, weight: Tensor, bias: Optional[Tensor], running_mean: Tensor,
                    running_var: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor], eps: float,
                    spec: Optional[ConvSpec]):
    """:func:`tune_forward` by the C++ kernels; also returns ``scale`` and how many channels have
    ``scale == 0`` (which rules out the activation route in backward). The kernel's ``scale`` is
    ``gamma * invstd`` rounded once, as backward's :func:`_scale` recomputes it, bit for bit."""
    lib, sfx = native
    c = weight.shape[0]
    k = weight.numel() // c
    invstd, neg_mean, scale, folded_bias = (weight.new_empty(c) for _ in range(4))
    x_used = x.to(weight.dtype)
    activation = _activation_route(_output_numel(x, weight, spec), weight)
    w = None if activation else torch.empty_like(weight)
    zeros = getattr(lib, f"tune_fold_{sfx}")(
        weight.data_ptr(), ptr(w), c, k, running_mean.data_ptr(), running_var.data_ptr(), ptr(gamma),
        ptr(beta), ptr(bias), float(eps), invstd.data_ptr(), neg_mean.data_ptr(), scale.data_ptr(),
        folded_bias.data_ptr(), threads(weight.numel()))
    if activation:
        out = _layer(x_used, weight, None, spec)
        out = torch.addcmul(channel_view(folded_bias, out), out, channel_view(scale, out), out=out)
    else:
        out = _layer(x_used, w, folded_bias, spec)
    return out, x_used, invstd, neg_mean, scale, zeros


def _native_backward(native, grad_out: Tensor, x_used: Tensor, weight: Tensor, bias: Optional[Tensor],
                     invstd: Tensor, neg_mean: Tensor, scale: Tensor, zeros: int, spec: Optional[ConvSpec],
                     needs: Sequence[bool]):
    """:func:`tune_backward` by the C++ kernels (not differentiable: only without ``create_graph``)."""
    lib, sfx = native
    need_x, need_w, need_b, need_gamma, need_beta = needs
    c = weight.shape[0]
    k = weight.numel() // c
    g = grad_out.to(weight.dtype)
    mask = [need_x, need_w or need_gamma, need_b or need_gamma or need_beta]
    activation = (zeros == 0 or not (need_gamma or need_beta)) and \
        _activation_route(g.numel(), weight, weight_passes=2 if need_w else 1)
    if activation:
        gx, gw, gb = _layer_backward(g * channel_view(scale, g), x_used, weight, spec, mask)
    else:
        w = torch.empty_like(weight)
        getattr(lib, f"tune_refold_{sfx}")(weight.data_ptr(), w.data_ptr(), c, k, scale.data_ptr(),
                                            threads(weight.numel()))
        gx, gw, gb = _layer_backward(g, x_used, w, spec, mask)
        del w
    gw = None if gw is None else gw.contiguous()
    ggamma = weight.new_empty(c) if need_gamma else None
    gbeta = weight.new_empty(c) if need_beta else None
    gbias = weight.new_empty(c) if need_b else None
    getattr(lib, f"tune_epilogue_{sfx}")(
        ptr(gw), weight.data_ptr(), c, k, scale.data_ptr(), int(activation), int(need_w), ptr(gb), ptr(bias),
        neg_mean.data_ptr(), invstd.data_ptr(), ptr(ggamma), ptr(gbeta), ptr(gbias),
        threads(weight.numel()))
    return gx, gw if need_w else None, gbias, ggamma, gbeta


class TuneConvBNFunction(torch.autograd.Function):
    """Conv/Linear followed by BN-with-running-statistics, folded on the fly.

    Saves ``x``, the layer's weight and bias, ``gamma`` and two ``[C_out]`` vectors; never the conv output nor ``w'``.
    Differentiable twice (backward is built from differentiable ops), and usable under ``torch.func``
    (``grad``, ``jacrev``, ``vmap``: ``forward`` + ``setup_context``, a generated vmap rule; the C++
    kernels are skipped for ``torch.func``'s wrapped tensors).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, gamma, beta, running_mean, running_var, eps, spec):  # type: ignore[override]
        act = autocast_dtype(x.device.type)
        check_input_dtype("tune", x, weight, act)
        native = _native_path(x, weight, (bias, gamma, beta, running_mean, running_var), spec)
        if native is not None:
            return _native_forward(native, x, weight, bias, running_mean, running_var, gamma, beta, eps, spec)[0]
        compute_dtype = act if act is not None else weight.dtype
        if act is not None:
            with torch.autocast(x.device.type, enabled=False):
                return tune_forward(x, weight, bias, running_mean, running_var, gamma, beta, eps, spec,
                                    compute_dtype)[0]
        return tune_forward(x, weight, bias, running_mean, running_var, gamma, beta, eps, spec, compute_dtype)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        # What backward needs besides the inputs is per-channel (C-sized) work, recomputed here
        # exactly as forward computed it; x_used is x itself unless autocast casts it.
        x, weight, bias, gamma, beta, running_mean, running_var, eps, spec = inputs
        act = autocast_dtype(x.device.type)
        native = _native_path(x, weight, (bias, gamma, beta, running_mean, running_var), spec)
        with torch.no_grad():
            if native is not None:
                invstd, neg_mean, zeros = _native_vectors(native, weight, bias, running_mean, running_var, gamma,
                                                          beta, eps)
                compute_dtype = weight.dtype
            else:
                invstd, neg_mean = _running_vectors(weight, running_mean, running_var, eps)
                zeros = None
                compute_dtype = act if act is not None else weight.dtype
        x_used = x if x.dtype == compute_dtype else x.to(compute_dtype)
        ctx.save_for_backward(x_used, weight, bias, gamma, invstd, neg_mean)
        ctx.native, ctx.zeros, ctx.spec, ctx.compute_dtype = native, zeros, spec, compute_dtype
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype,
                      None if gamma is None else gamma.dtype, None if beta is None else beta.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x_used, weight, bias, gamma, invstd, neg_mean = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        if ctx.native is not None and not torch.is_grad_enabled() and plain_host_tensor(grad_out):
            grads = _native_backward(ctx.native, grad_out, x_used, weight, bias, invstd, neg_mean,
                                     _scale(gamma, invstd), ctx.zeros, ctx.spec, needs)
        else:  # create_graph (differentiable ops), torch.func wrappers, or the torch-op path
            grads = tune_backward(grad_out, x_used, weight, bias, gamma, invstd, neg_mean, ctx.spec,
                                  ctx.compute_dtype, needs)
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
