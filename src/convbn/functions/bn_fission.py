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

In eager mode one fused C++ call per direction also does the per-channel arithmetic (``invstd``, the running-
statistics update, ``dgamma``/``dbeta``). The four sweeps are a small C++/OpenMP kernel (no torch headers,
built once with the system C++ compiler into ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/convbn``, loaded with
``ctypes``) for float32 and float64 in contiguous (``N, C, L``) or channels-last (``N, L, C``) layout. If the
build fails, or for other dtypes, a pure-torch implementation with the same semantics runs instead (it warns
once). Each sweep is a ``torch.library.custom_op`` with a fake implementation, so ``torch.compile`` traces the
op without graph breaks.

Beyond one training step, as plain PyTorch: ``create_graph=True`` (a gradient penalty) differentiates
PyTorch's own twice-differentiable BN backward ops; an empty batch returns an empty output and leaves
the running statistics untouched; a one-value-per-channel batch is rejected after
``num_batches_tracked`` was incremented; under ``torch.func`` (``grad``/``jacrev``) the running
statistics are updated inside the Function when the buffers are an input of the transformed
function, and a transform that captured them, or ``vmap``, is refused with a ``ConvBNError``.
"""

from __future__ import annotations

import ctypes
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..errors import ConvBNError
from ._conv import (channel_dtype, channel_view, cumulative_factor, is_batched, is_functorch_wrapped, plain_host_tensor,
                    ptr, running_stats_update, threads)
from .native import NativeLibrary, extension_mode, use_extension

__all__ = [
    "BNReLUTrainFunction",
    "bn_relu_train",
    "bn_relu_train_forward",
    "bn_relu_train_backward",
    "extension_available",
    "use_extension",
]

# --------------------------------------------------------------------------------------------
# The C++ kernel. Layout 0 = "NCL" (contiguous: N*C planes of L elements), 1 = "NLC" (channels
# last: N*L rows of C elements). Per-channel inputs/outputs are float64 arrays of length C.
# --------------------------------------------------------------------------------------------
_CPP_SOURCE = r"""
#include <omp.h>
#include <stdint.h>
#include <math.h>
#include <vector>
#include <algorithm>

namespace {
const int64_t RBLK = 128;   // rows per float partial sum (NLC)
const int64_t SEG = 256;         // NCL: segment length of the elementwise float accumulators (reduce2_ncl)
const int64_t LANE_TERMS = 128;  // NCL: segments added into the float accumulators before a flush

// Per-channel float64 sums (S, SX) of two per-element terms over an (N, C, L) tensor: fa(c, j) and
// fb(c, j) of flat element j of channel c (returned by value: addressable temporaries would turn into
// per-lane memory arrays inside `omp simd`). Each channel's rows are cut into segments of at most
// SEG elements that are added elementwise into SEG-long float rows u, v -- no horizontal reduction
// per row (7x7 and 3x3 maps have rows of 49 and 9) and no `omp simd reduction` -- which are flushed
// to double after LANE_TERMS segments, so no float partial sum has more than LANE_TERMS terms.
template <typename T, typename FA, typename FB>
void reduce2_ncl(int64_t N, int64_t C, int64_t L, int nt, FA fa_shared, FB fb_shared, double* S, double* SX) {
#pragma omp parallel num_threads(nt)
  {
    // Thread-local copies: the outlined region would otherwise reload the closures' pointers through
    // shared memory on every element.
    const FA fa = fa_shared;
    const FB fb = fb_shared;
    const int64_t W = std::min(L, SEG);
    T u[SEG], v[SEG];
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c) {
      double s2 = 0, sx2 = 0;
      int64_t terms = 0;
      std::fill(u, u + W, (T)0); std::fill(v, v + W, (T)0);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t o = (n * C + c) * L;
        for (int64_t b0 = 0; b0 < L; b0 += W) {
          const int64_t len = std::min(W, L - b0), j0 = o + b0;
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) { u[i] += fa(c, j0 + i); v[i] += fb(c, j0 + i); }
          if (++terms == LANE_TERMS) {
            for (int64_t i = 0; i < W; ++i) { s2 += u[i]; sx2 += v[i]; u[i] = 0; v[i] = 0; }
            terms = 0;
          }
        }
      }
      for (int64_t i = 0; i < W; ++i) { s2 += u[i]; sx2 += v[i]; }
      S[c] = s2; SX[c] = sx2;
    }
  }
}

template <typename T> void shift_of(const T* x, int64_t N, int64_t C, int64_t L, int nlc, T* K) {
  // K[c] = mean of the channel's first <= 16 elements; x - K is then O(std) in magnitude.
  int64_t k = std::min<int64_t>(nlc ? N * L : L, 16);
  for (int64_t c = 0; c < C; ++c) {
    double s = 0;
    for (int64_t i = 0; i < k; ++i) s += nlc ? (double)x[i * C + c] : (double)x[c * L + i];
    K[c] = (T)(s / (double)k);
  }
}

template <typename T>
void stats(const T* x, int64_t N, int64_t C, int64_t L, int nlc, int nt, double* mean, double* var) {
  const int64_t M = N * L;
  std::vector<T> K(C);
  shift_of(x, N, C, L, nlc, K.data());
  std::vector<double> S(C, 0.0), SS(C, 0.0);
  if (!nlc) {
    const T* Kp = K.data();
    reduce2_ncl<T>(N, C, L, nt, [=](int64_t c, int64_t j) { return x[j] - Kp[c]; },
                   [=](int64_t c, int64_t j) { const T d = x[j] - Kp[c]; return d * d; }, S.data(), SS.data());
  } else {
#pragma omp parallel num_threads(nt)
    {
      const int t = omp_get_thread_num(), T_ = omp_get_num_threads();
      const int64_t r0 = M * t / T_, r1 = M * (t + 1) / T_;
      std::vector<T> s(C), ss(C);
      std::vector<double> s2(C, 0.0), ss2(C, 0.0);
      const T* Kp = K.data();
      for (int64_t b0 = r0; b0 < r1; b0 += RBLK) {
        const int64_t b1 = std::min(r1, b0 + RBLK);
        std::fill(s.begin(), s.end(), (T)0); std::fill(ss.begin(), ss.end(), (T)0);
        T* sp = s.data(); T* ssp = ss.data();
        for (int64_t r = b0; r < b1; ++r) {
          const T* p = x + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) { T d = p[c] - Kp[c]; sp[c] += d; ssp[c] += d * d; }
        }
        for (int64_t c = 0; c < C; ++c) { s2[c] += sp[c]; ss2[c] += ssp[c]; }
      }
#pragma omp critical
      for (int64_t c = 0; c < C; ++c) { S[c] += s2[c]; SS[c] += ss2[c]; }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const double m = S[c] / (double)M;
    mean[c] = (double)K[c] + m;
    var[c] = std::max(SS[c] / (double)M - m * m, 0.0);
  }
}

template <typename T> void split(const double* m, int64_t C, T* hi, T* lo) {
  for (int64_t c = 0; c < C; ++c) { hi[c] = (T)m[c]; lo[c] = (T)(m[c] - (double)hi[c]); }
}
template <typename T> void cast(const double* v, int64_t C, T* out) {
  for (int64_t c = 0; c < C; ++c) out[c] = (T)v[c];
}

// The normalized value before the ReLU. Forward and backward (which recomputes the ReLU mask from x
// instead of storing or re-reading the output) call this one function; -ffp-contract=off keeps any
// FMA from making the two disagree, so the recomputed mask is the forward's bit for bit.
template <typename T> inline T bn_value(T x, T h, T l, T s, T t) { return ((x - h) - l) * s + t; }
// The ReLU backward: g where the forward value was > 0 (NaN: 0, as relu's backward). Taking g by
// value makes its load unconditional, so the select vectorizes as a blend, not a masked load.
template <typename T> inline T relu_grad(T g, T v) { return v > 0 ? g : (T)0; }

// Per-channel constants in the kernel dtype: the float64 mean split into hi + lo, and scale/shift.
template <typename T> struct Coeffs {
  std::vector<T> h, l, s, t;
  Coeffs(const double* mean, const double* scale, const double* shift, int64_t C) : h(C), l(C), s(C), t(C) {
    split(mean, C, h.data(), l.data()); cast(scale, C, s.data()); cast(shift, C, t.data());
  }
};

template <typename T>
void normalize(const T* x, T* y, int64_t N, int64_t C, int64_t L, int nlc, int nt,
               const double* mean, const double* scale, const double* shift, int relu) {
  const Coeffs<T> k(mean, scale, shift, C);
  const T *H = k.h.data(), *Lo = k.l.data(), *A = k.s.data(), *B = k.t.data();
  if (!nlc) {
#pragma omp parallel for collapse(2) num_threads(nt) schedule(static)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        const T* p = x + (n * C + c) * L; T* q = y + (n * C + c) * L;
        const T h = H[c], l = Lo[c], s = A[c], t = B[c];
        if (relu) {
#pragma omp simd
          for (int64_t i = 0; i < L; ++i) { T v = bn_value(p[i], h, l, s, t); q[i] = v < 0 ? (T)0 : v; }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < L; ++i) q[i] = bn_value(p[i], h, l, s, t);
        }
      }
  } else {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < N * L; ++r) {
      const T* p = x + r * C; T* q = y + r * C;
      if (relu) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) { T v = bn_value(p[c], H[c], Lo[c], A[c], B[c]); q[c] = v < 0 ? (T)0 : v; }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) q[c] = bn_value(p[c], H[c], Lo[c], A[c], B[c]);
      }
    }
  }
}

// g = dy masked by the ReLU (mask recomputed from x; relu == 0: g = dy).
// Outputs sum(g) and sum(g * (x - mean)) per channel.
template <typename T>
void grad_sums(const T* dy, const T* x, int64_t N, int64_t C, int64_t L, int nlc, int nt,
               const double* mean, const double* scale, const double* shift, int relu,
               double* sum_g, double* sum_gx) {
  const int64_t M = N * L;
  const Coeffs<T> k(mean, scale, shift, C);
  const T *H = k.h.data(), *Lo = k.l.data(), *A = k.s.data(), *B = k.t.data();
  std::vector<double> S(C, 0.0), SX(C, 0.0);
  if (!nlc) {
    if (relu) {
      reduce2_ncl<T>(N, C, L, nt,
                     [=](int64_t c, int64_t j) { return relu_grad(dy[j], bn_value(x[j], H[c], Lo[c], A[c], B[c])); },
                     [=](int64_t c, int64_t j) {
                       return relu_grad(dy[j], bn_value(x[j], H[c], Lo[c], A[c], B[c])) * ((x[j] - H[c]) - Lo[c]); },
                     S.data(), SX.data());
    } else {
      reduce2_ncl<T>(N, C, L, nt, [=](int64_t, int64_t j) { return dy[j]; },
                     [=](int64_t c, int64_t j) { return dy[j] * ((x[j] - H[c]) - Lo[c]); }, S.data(), SX.data());
    }
  } else {
#pragma omp parallel num_threads(nt)
    {
      const int t = omp_get_thread_num(), T_ = omp_get_num_threads();
      const int64_t r0 = M * t / T_, r1 = M * (t + 1) / T_;
      std::vector<T> s(C), sx(C);
      std::vector<double> s2(C, 0.0), sx2(C, 0.0);
      for (int64_t b0 = r0; b0 < r1; b0 += RBLK) {
        const int64_t b1 = std::min(r1, b0 + RBLK);
        std::fill(s.begin(), s.end(), (T)0); std::fill(sx.begin(), sx.end(), (T)0);
        T* sp = s.data(); T* sxp = sx.data();
        for (int64_t r = b0; r < b1; ++r) {
          const T *g = dy + r * C, *p = x + r * C;
          if (relu) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              const T gi = relu_grad(g[c], bn_value(p[c], H[c], Lo[c], A[c], B[c]));
              sp[c] += gi; sxp[c] += gi * ((p[c] - H[c]) - Lo[c]);
            }
          } else {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) { sp[c] += g[c]; sxp[c] += g[c] * ((p[c] - H[c]) - Lo[c]); }
          }
        }
        for (int64_t c = 0; c < C; ++c) { s2[c] += sp[c]; sx2[c] += sxp[c]; }
      }
#pragma omp critical
      for (int64_t c = 0; c < C; ++c) { S[c] += s2[c]; SX[c] += sx2[c]; }
    }
  }
  for (int64_t c = 0; c < C; ++c) { sum_g[c] = S[c]; sum_gx[c] = SX[c]; }
}

// dx = a * g + b * (x - mean) + e, g as in grad_sums.
template <typename T>
void grad_input(const T* dy, const T* x, T* dx, int64_t N, int64_t C, int64_t L, int nlc, int nt,
                const double* mean, const double* scale, const double* shift, int relu,
                const double* ca, const double* cb, const double* ce) {
  const Coeffs<T> k(mean, scale, shift, C);
  const T *H = k.h.data(), *Lo = k.l.data(), *A = k.s.data(), *B = k.t.data();
  std::vector<T> a(C), b(C), e(C);
  cast(ca, C, a.data()); cast(cb, C, b.data()); cast(ce, C, e.data());
  const T *CA = a.data(), *CB = b.data(), *CE = e.data();
  if (!nlc) {
#pragma omp parallel for collapse(2) num_threads(nt) schedule(static)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t o = (n * C + c) * L;
        const T *g = dy + o, *p = x + o; T* d = dx + o;
        const T h = H[c], l = Lo[c], s = A[c], t = B[c], sa = CA[c], sb = CB[c], se = CE[c];
        if (relu) {
#pragma omp simd
          for (int64_t i = 0; i < L; ++i) {
            d[i] = sa * relu_grad(g[i], bn_value(p[i], h, l, s, t)) + sb * ((p[i] - h) - l) + se; }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < L; ++i) d[i] = sa * g[i] + sb * ((p[i] - h) - l) + se;
        }
      }
  } else {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < N * L; ++r) {
      const T *g = dy + r * C, *p = x + r * C; T* d = dx + r * C;
      if (relu) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          d[c] = CA[c] * relu_grad(g[c], bn_value(p[c], H[c], Lo[c], A[c], B[c]))
                 + CB[c] * ((p[c] - H[c]) - Lo[c]) + CE[c]; }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) d[c] = CA[c] * g[c] + CB[c] * ((p[c] - H[c]) - Lo[c]) + CE[c];
      }
    }
  }
}

// ---- Fused eager entry points: the per-channel arithmetic (invstd, scale, running-statistics update,
// gradient coefficients, dgamma/dbeta) done here in float64 instead of ~40 small torch ops per layer.
// Per-channel parameters/buffers are float32 (f64 == 0) or float64 (f64 == 1); null when absent.
inline double load(const void* p, int f64, int64_t c, double dflt) {
  if (!p) return dflt;
  return f64 ? ((const double*)p)[c] : (double)((const float*)p)[c];
}
inline void store(void* p, int f64, int64_t c, double v) {
  if (f64) ((double*)p)[c] = v; else ((float*)p)[c] = (float)v;
}

// have_stats: mean/var are inputs (ICF), else outputs. Writes invstd; updates the running buffers
// (if given) as torch does: r = (1 - factor) * r + factor * batch, the variance unbiased by m / (m - 1).
template <typename T>
void fused_forward(const T* x, T* y, int64_t N, int64_t C, int64_t L, int nlc, int nt,
                   double* mean, double* var, int have_stats, const void* w, const void* b, int pf64,
                   double eps, int relu, double* invstd, void* rmean, void* rvar, int bf64, double factor) {
  if (!have_stats) stats<T>(x, N, C, L, nlc, nt, mean, var);
  std::vector<double> scale(C), shift(C);
  const double m = (double)(N * L), unbias = m > 1 ? m / (m - 1) : 1.0;
  for (int64_t c = 0; c < C; ++c) {
    invstd[c] = 1.0 / sqrt(var[c] + eps);
    scale[c] = load(w, pf64, c, 1.0) * invstd[c];
    shift[c] = load(b, pf64, c, 0.0);
    if (rmean) store(rmean, bf64, c, (1 - factor) * load(rmean, bf64, c, 0) + factor * mean[c]);
    if (rvar) store(rvar, bf64, c, (1 - factor) * load(rvar, bf64, c, 0) + factor * var[c] * unbias);
  }
  normalize<T>(x, y, N, C, L, nlc, nt, mean, scale.data(), shift.data(), relu);
}

// dx (if non-null), dgamma and dbeta (if non-null, in the parameter dtype) of fused_forward.
template <typename T>
void fused_backward(const T* dy, const T* x, T* dx, int64_t N, int64_t C, int64_t L, int nlc, int nt,
                    const double* mean, const double* invstd, const void* w, const void* b, int pf64, int relu,
                    void* dw, void* db) {
  std::vector<double> scale(C), shift(C), sg(C), sgx(C), ca(C), cb(C), ce(C);
  for (int64_t c = 0; c < C; ++c) {
    scale[c] = load(w, pf64, c, 1.0) * invstd[c];
    shift[c] = load(b, pf64, c, 0.0);
  }
  grad_sums<T>(dy, x, N, C, L, nlc, nt, mean, scale.data(), shift.data(), relu, sg.data(), sgx.data());
  const double m = (double)(N * L);
  for (int64_t c = 0; c < C; ++c) {
    const double dgamma = sgx[c] * invstd[c];
    if (dw) store(dw, pf64, c, dgamma);
    if (db) store(db, pf64, c, sg[c]);
    ca[c] = scale[c];
    cb[c] = -scale[c] * invstd[c] * dgamma / m;
    ce[c] = -scale[c] * sg[c] / m;
  }
  if (dx) grad_input<T>(dy, x, dx, N, C, L, nlc, nt, mean, scale.data(), shift.data(), relu,
                        ca.data(), cb.data(), ce.data());
}
}  // namespace

#define CONVBN_EXPORT(T, SFX)                                                                          \
  extern "C" void stats_##SFX(const T* x, int64_t N, int64_t C, int64_t L, int nlc, int nt, double* m, \
                              double* v) { stats<T>(x, N, C, L, nlc, nt, m, v); }                      \
  extern "C" void normalize_##SFX(const T* x, T* y, int64_t N, int64_t C, int64_t L, int nlc, int nt,  \
                                  const double* m, const double* a, const double* b, int relu) {       \
    normalize<T>(x, y, N, C, L, nlc, nt, m, a, b, relu); }                                            \
  extern "C" void grad_sums_##SFX(const T* dy, const T* x, int64_t N, int64_t C, int64_t L, int nlc,   \
                                  int nt, const double* m, const double* s, const double* t, int relu, \
                                  double* sg, double* sgx) {                                           \
    grad_sums<T>(dy, x, N, C, L, nlc, nt, m, s, t, relu, sg, sgx); }                                  \
  extern "C" void grad_input_##SFX(const T* dy, const T* x, T* dx, int64_t N, int64_t C, int64_t L,    \
                                   int nlc, int nt, const double* m, const double* s, const double* t, \
                                   int relu, const double* a, const double* b, const double* e) {      \
    grad_input<T>(dy, x, dx, N, C, L, nlc, nt, m, s, t, relu, a, b, e); }                             \
  extern "C" void fused_forward_##SFX(const T* x, T* y, int64_t N, int64_t C, int64_t L, int nlc,      \
                                      int nt, double* m, double* v, int have_stats, const void* w,     \
                                      const void* b, int pf64, double eps, int relu, double* invstd,   \
                                      void* rm, void* rv, int bf64, double factor) {                   \
    fused_forward<T>(x, y, N, C, L, nlc, nt, m, v, have_stats, w, b, pf64, eps, relu, invstd, rm, rv,  \
                     bf64, factor); }                                                                  \
  extern "C" void fused_backward_##SFX(const T* dy, const T* x, T* dx, int64_t N, int64_t C, int64_t L,\
                                       int nlc, int nt, const double* m, const double* invstd,         \
                                       const void* w, const void* b, int pf64, int relu, void* dw,     \
                                       void* db) {                                                     \
    fused_backward<T>(dy, x, dx, N, C, L, nlc, nt, m, invstd, w, b, pf64, relu, dw, db); }
CONVBN_EXPORT(float, f32)
CONVBN_EXPORT(double, f64)
"""

def _argtypes() -> dict:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    dims = [i64, i64, i64, i32, i32]
    types = {}
    for sfx in ("f32", "f64"):
        types[f"stats_{sfx}"] = [p, *dims, p, p]
        types[f"normalize_{sfx}"] = [p, p, *dims, p, p, p, i32]
        types[f"grad_sums_{sfx}"] = [p, p, *dims, p, p, p, i32, p, p]
        types[f"grad_input_{sfx}"] = [p, p, p, *dims, p, p, p, i32, p, p, p]
        types[f"fused_forward_{sfx}"] = [p, p, *dims, p, p, i32, p, p, i32, ctypes.c_double, i32,
                                         p, p, p, i32, ctypes.c_double]
        types[f"fused_backward_{sfx}"] = [p, p, p, *dims, p, p, p, p, i32, i32, p, p]
    return types


_LIB = NativeLibrary("bn_fission", _CPP_SOURCE, _argtypes(), "bn_fission")


def _get_lib() -> Optional[ctypes.CDLL]:
    return _LIB.get()


def extension_available() -> bool:
    """Whether the C++ kernel is (or can be) built and loaded; builds it on first call.

    Returns:
        ``True`` if the fast path is in use for float32/float64 CPU tensors.

    Example:
        >>> with use_extension("torch"):  # the pure-torch paths never load the kernel
        ...     extension_available()
        False
        >>> import shutil
        >>> extension_available() == (shutil.which("c++") is not None)  # built where a compiler exists
        True
    """
    return _get_lib() is not None


# --------------------------------------------------------------------------------------------
# Layout helpers and the four sweeps, each a custom op (real kernel + pure-torch fallback + fake).
# --------------------------------------------------------------------------------------------
def _geometry(x: Tensor) -> Tuple[int, int, int, Optional[int]]:
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


def _kernel_args(x: Tensor) -> Optional[Tuple[ctypes.CDLL, str, int, int, int, int]]:
    if not plain_host_tensor(x) or x.dtype not in (torch.float32, torch.float64) or x.numel() == 0 \
            or _channel_dtype(x) != torch.float64:  # (the kernels' per-channel vectors are float64)
        return None
    n, c, length, nlc = _geometry(x)
    if nlc is None:
        return None
    lib = _get_lib()
    if lib is None:
        return None
    return lib, ("f32" if x.dtype == torch.float32 else "f64"), n, c, length, nlc


def _reduce_dims(x: Tensor) -> list:
    return [0] + list(range(2, x.dim()))


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _channel_dtype(x: Tensor) -> torch.dtype:
    """The per-channel dtype: float64 on the CPU (and for float64 data), float32 on other devices."""
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


def _stats_impl(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel ``(mean, biased var)`` in the per-channel dtype (float64 on the CPU), one sweep over ``x``."""
    c = x.shape[1]
    args = _kernel_args(x)
    if args is None:
        var, mean = torch.var_mean(x.to(_compute_dtype(x)), dim=_reduce_dims(x), correction=0)  # Welford
        return mean.to(_channel_dtype(x)), var.to(_channel_dtype(x))
    lib, sfx, n, c, length, nlc = args
    mean = torch.empty(c, dtype=torch.float64)
    var = torch.empty(c, dtype=torch.float64)
    getattr(lib, f"stats_{sfx}")(x.data_ptr(), n, c, length, nlc, threads(x.numel()),
                                 mean.data_ptr(), var.data_ptr())
    return mean, var


_stats_op = torch.library.custom_op("convbn::bn_fission_stats", _stats_impl, mutates_args=())


@_stats_op.register_fake
def _(x: Tensor) -> Tuple[Tensor, Tensor]:
    c = x.shape[1]
    return x.new_empty(c, dtype=_channel_dtype(x)), x.new_empty(c, dtype=_channel_dtype(x))


def _affine(x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``(x - mean) * scale + shift`` in the compute dtype (pure torch; the backward recomputes the
    ReLU mask with these very ops, so it matches the forward's bit for bit)."""
    dt = _compute_dtype(x)
    return _centered(x, mean).mul_(channel_view(scale.to(dt), x)).add_(channel_view(shift.to(dt), x))


def _normalize_impl(x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, relu: bool) -> Tensor:
    """``max((x - mean) * scale + shift, 0)`` (no max without ``relu``); one sweep, one output."""
    args = _kernel_args(x)
    if args is None:
        y = _affine(x, mean, scale, shift)
        if relu:
            y = y.relu_()
        return y.to(x.dtype)
    lib, sfx, n, c, length, nlc = args
    y = torch.empty_like(x)
    getattr(lib, f"normalize_{sfx}")(x.data_ptr(), y.data_ptr(), n, c, length, nlc, threads(x.numel()),
                                     mean.data_ptr(), scale.data_ptr(), shift.data_ptr(), int(relu))
    return y


_normalize_op = torch.library.custom_op("convbn::bn_fission_normalize", _normalize_impl, mutates_args=())


@_normalize_op.register_fake
def _(x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, relu: bool) -> Tensor:
    return torch.empty_like(x)


def _masked(grad: Tensor, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, relu: bool) -> Tensor:
    """``grad`` where the forward's pre-ReLU value was > 0 (recomputed from ``x``), else 0."""
    g = grad.to(_compute_dtype(grad))
    return torch.where(_affine(x, mean, scale, shift) > 0, g, torch.zeros((), dtype=g.dtype)) if relu else g


def _grad_sums_impl(grad: Tensor, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                    relu: bool) -> Tuple[Tensor, Tensor]:
    """``(sum(g), sum(g * (x - mean)))`` per channel in ``mean``'s dtype, ``g`` = ``grad`` masked by the ReLU
    (mask recomputed from ``x``: the output is never read back); one sweep over ``grad`` and ``x``."""
    grad = _like(grad, x)
    args = _kernel_args(x)
    if args is None:
        g = _masked(grad, x, mean, scale, shift, relu)
        dims = _reduce_dims(x)
        return (g.sum(dims, dtype=mean.dtype),
                (g * _centered(x, mean)).sum(dims, dtype=mean.dtype))
    lib, sfx, n, c, length, nlc = args
    sum_g = torch.empty(c, dtype=torch.float64)
    sum_gx = torch.empty(c, dtype=torch.float64)
    getattr(lib, f"grad_sums_{sfx}")(grad.data_ptr(), x.data_ptr(), n, c, length, nlc, threads(x.numel()),
                                     mean.data_ptr(),
                                     scale.data_ptr(), shift.data_ptr(), int(relu), sum_g.data_ptr(),
                                     sum_gx.data_ptr())
    return sum_g, sum_gx


_grad_sums_op = torch.library.custom_op("convbn::bn_fission_grad_sums", _grad_sums_impl, mutates_args=())


@_grad_sums_op.register_fake
def _(grad: Tensor, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, relu: bool) -> Tuple[Tensor, Tensor]:
    c = x.shape[1]
    return x.new_empty(c, dtype=mean.dtype), x.new_empty(c, dtype=mean.dtype)


def _grad_input_impl(grad: Tensor, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, relu: bool,
                     a: Tensor, b: Tensor, e: Tensor) -> Tensor:
    """``dx = a * g + b * (x - mean) + e`` with per-channel ``a, b, e``, ``g`` as in the sums; one sweep."""
    grad = _like(grad, x)
    args = _kernel_args(x)
    if args is None:
        dt = _compute_dtype(x)
        g = _masked(grad, x, mean, scale, shift, relu)
        dx = _centered(x, mean).mul_(channel_view(b.to(dt), x))
        dx.add_(g * channel_view(a.to(dt), x)).add_(channel_view(e.to(dt), x))
        return dx.to(x.dtype)
    lib, sfx, n, c, length, nlc = args
    dx = torch.empty_like(x)
    getattr(lib, f"grad_input_{sfx}")(grad.data_ptr(), x.data_ptr(), dx.data_ptr(), n, c, length, nlc,
                                      threads(x.numel()),
                                      mean.data_ptr(), scale.data_ptr(), shift.data_ptr(), int(relu),
                                      a.data_ptr(), b.data_ptr(), e.data_ptr())
    return dx


_grad_input_op = torch.library.custom_op("convbn::bn_fission_grad_input", _grad_input_impl, mutates_args=())


@_grad_input_op.register_fake
def _(grad: Tensor, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, relu: bool,
      a: Tensor, b: Tensor, e: Tensor) -> Tensor:
    return torch.empty_like(x)


def _sweep(op, impl, x: Tensor, *args):
    # The custom op is what torch.compile sees; eager calls skip the dispatcher, whose first use
    # imports torch._dynamo (seconds) and which costs ~15 us per call.
    if torch.compiler.is_compiling() or type(x) is not Tensor:
        return op(x, *args)
    return impl(x, *args)


def channel_statistics(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel batch ``(mean, biased var)`` of ``x`` (``[N, C, *]``) in one sweep, as float64 (float32
    off the CPU unless ``x`` is float64: see :func:`convbn.functions._conv.channel_dtype`).

    Example:
        >>> x = 1000 + torch.randn(8, 3, 4, 4)
        >>> mean, var = channel_statistics(x)
        >>> torch.allclose(var, x.double().var(dim=(0, 2, 3), unbiased=False))
        True
    """
    if _geometry(x)[3] is None:
        x = x.contiguous()
    return _sweep(_stats_op, _stats_impl, x)


# --------------------------------------------------------------------------------------------
# Pure forward / backward, the autograd Function and the functional wrapper.
# --------------------------------------------------------------------------------------------
def _scale_shift(weight: Optional[Tensor], bias: Optional[Tensor], invstd: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel ``(gamma * invstd, beta)`` of the normalize sweep (and its recomputed ReLU mask), in
    ``invstd``'s dtype."""
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = torch.zeros_like(invstd) if bias is None else bias.to(invstd.dtype)
    return scale, shift


def bn_relu_train_forward(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, relu: bool,
    stats: Optional[Tuple[Tensor, Tensor]] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train-mode BN(+ReLU) without running statistics: sub-BN1 then sub-BN2 (two sweeps).

    ``stats``: the batch ``(mean, biased var)`` of ``x`` if already known (ICF: a concatenation's
    statistics are its pieces'), which skips the statistics sweep.
    Returns ``(out, mean, invstd, var)``; the last three are ``[C]`` in the per-channel dtype (float64 on
    the CPU, float32 elsewhere unless ``x`` is float64; ``var`` biased).
    """
    mean, var = _sweep(_stats_op, _stats_impl, x) if stats is None else (
        stats[0].to(_channel_dtype(x)), stats[1].to(_channel_dtype(x)))
    invstd = torch.rsqrt(var + eps)
    scale, shift = _scale_shift(weight, bias, invstd)
    out = _sweep(_normalize_op, _normalize_impl, x, mean, scale, shift, relu)
    return out, mean, invstd, var


def bn_relu_train_backward(
    grad_out: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor,
    relu: bool, needs: Sequence[bool],
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients ``(x, weight, bias)``: one reduction sweep, then (if needed) one elementwise sweep.

    With ``relu`` the ReLU mask is recomputed from ``x`` exactly as the forward computed the output,
    so neither the output nor a bool mask is kept or read back.
    """
    need_x, need_w, need_b = needs
    # The kernels read grad and x with one set of strides. Under torch.compile the conversion happens
    # inside the ops: a traced copy would be fixed to the tangent layout guessed at trace time.
    g = grad_out if torch.compiler.is_compiling() else _like(grad_out, x)
    scale, shift = _scale_shift(weight, bias, invstd)
    sum_g, sum_gx = _sweep(_grad_sums_op, _grad_sums_impl, g, x, mean, scale, shift, relu)
    sum_gxhat = sum_gx * invstd  # dgamma; sum_g is dbeta
    grad_x = grad_w = grad_b = None
    if need_x:
        m = x.numel() // x.shape[1]
        b = -scale * invstd * sum_gxhat / m
        e = -scale * sum_g / m
        grad_x = _sweep(_grad_input_op, _grad_input_impl, g, x, mean, scale, shift, relu, scale, b, e)
    if need_w:
        grad_w = sum_gxhat
    if need_b:
        grad_b = sum_g
    return grad_x, grad_w, grad_b


_FLOATS = (torch.float32, torch.float64)
_UNKNOWN = object()  # BNReLUTrainFunction's ``fused`` default: not decided by the caller


def _fused_path(x: Tensor, params: Sequence[Optional[Tensor]], buffers: Sequence[Optional[Tensor]]):
    """``(lib, sfx, N, C, L, nlc, params_f64, buffers_f64)`` when the fused eager kernels apply, else None.

    They do in eager mode for float32/float64 ``x`` whose per-channel parameters (and, separately,
    buffers) are contiguous CPU float32/float64 tensors of one dtype; everything else (torch.compile,
    tensor subclasses, other dtypes) takes the per-sweep custom ops.
    """
    if torch.compiler.is_compiling() or extension_mode() == "sweeps" or type(x) is not Tensor \
            or not plain_host_tensor(x):
        return None
    args = _kernel_args(x)
    if args is None:
        return None
    flags = []
    for group in (params, buffers):
        ts = [t for t in group if t is not None]
        if any(not plain_host_tensor(t) or t.dtype not in _FLOATS
               or not t.is_contiguous() or t.dtype != ts[0].dtype for t in ts):
            return None
        flags.append(int(bool(ts) and ts[0].dtype == torch.float64))
    return (*args, *flags)


class BNReLUTrainFunction(torch.autograd.Function):
    """Train-mode BatchNorm (+ReLU) by Fission; returns ``(out, mean, var, invstd)`` (per-channel dtype:
    float64 on the CPU, float32 elsewhere unless ``x`` is float64; ``var`` biased).

    Saves ``x`` and per-channel vectors (plus the affine parameters, alive anyway) -- not the
    output: the ReLU backward recomputes its mask from ``x``. ``running``: ``(running_mean,
    running_var, factor)`` to update in place in forward (inside the fused eager kernel when it
    applies), or ``None``. ``fused``: the caller's :func:`_fused_path` result for these arguments, if
    it has one (else it is computed here).

    Differentiable twice: with ``create_graph=True`` backward is computed by the aten ops plain
    PyTorch's BN backward uses (twice differentiable, see :func:`_differentiable_backward`). ``forward`` +
    ``setup_context``, so ``torch.func.grad``/``jacrev`` work; ``vmap`` with running statistics is
    refused (``ConvBNError``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, eps, relu, stats=None, running=None, fused=_UNKNOWN):  # type: ignore[override]
        rm, rv, factor = running if running is not None else (None, None, 0.0)
        if rm is not None or rv is not None:
            _refuse_vmap(x)
        if fused is _UNKNOWN:
            fused = _fused_path(x, (weight, bias), (rm, rv))
        if fused is not None:
            lib, sfx, n, c, length, nlc, pf64, bf64 = fused
            if stats is not None:
                mean, var = (s.to(torch.float64).contiguous() for s in stats)
            else:
                mean, var = x.new_empty(c, dtype=torch.float64), x.new_empty(c, dtype=torch.float64)
            invstd = x.new_empty(c, dtype=torch.float64)
            out = torch.empty_like(x)
            getattr(lib, f"fused_forward_{sfx}")(
                x.data_ptr(), out.data_ptr(), n, c, length, nlc, threads(x.numel()), mean.data_ptr(), var.data_ptr(),
                int(stats is not None), ptr(weight), ptr(bias), pf64, float(eps), int(relu), invstd.data_ptr(),
                ptr(rm), ptr(rv), bf64, float(factor))
        else:
            if running is not None and torch.compiler.is_compiling():
                raise RuntimeError("BNReLUTrainFunction: under torch.compile the caller updates the running "
                                   "statistics (bn_relu_train does)")
            out, mean, invstd, var = bn_relu_train_forward(x, weight, bias, eps, relu, stats)
            if running is not None:
                _update_running_stats(rm, rv, mean, var, x.numel() // x.shape[1], factor)
        return out, mean, var, invstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, eps, relu, _, running, fused = inputs
        _, mean, var, invstd = output
        if fused is _UNKNOWN:  # the same decision forward made (a pure function of these arguments)
            rm, rv = (running[0], running[1]) if running is not None else (None, None)
            fused = _fused_path(x, (weight, bias), (rm, rv))
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.relu, ctx.fused, ctx.eps = relu, fused, eps
        ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(mean, var, invstd)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var, _grad_invstd):  # type: ignore[override]
        x, weight, bias, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled() or is_functorch_wrapped(grad_out) or is_functorch_wrapped(x):
            # create_graph=True or torch.func: PyTorch's own (twice differentiable) BN backward ops
            gx, gw, gb = _differentiable_backward(ctx, grad_out, x, weight, bias, (need_x, need_w, need_b))
            return gx, gw, gb, None, None, None, None, None
        if ctx.fused is not None and not torch.compiler.is_compiling() and plain_host_tensor(grad_out):
            lib, sfx, n, c, length, nlc, pf64, _ = ctx.fused
            g = _like(grad_out, x)
            gx = torch.empty_like(x) if need_x else None
            gw = torch.empty_like(weight) if need_w else None
            gb = torch.empty_like(bias) if need_b else None
            getattr(lib, f"fused_backward_{sfx}")(
                g.data_ptr(), x.data_ptr(), ptr(gx), n, c, length, nlc, threads(x.numel()), mean.data_ptr(),
                invstd.data_ptr(), ptr(weight), ptr(bias), pf64, int(ctx.relu), ptr(gw), ptr(gb))
            return gx, gw, gb, None, None, None, None, None
        gx, gw, gb = bn_relu_train_backward(grad_out, x, weight, bias, mean, invstd, ctx.relu,
                                            (need_x, need_w, need_b))
        gw = None if gw is None else gw.to(ctx.dtypes[0])
        gb = None if gb is None else gb.to(ctx.dtypes[1])
        return gx, gw, gb, None, None, None, None, None


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


def _update_running_stats(rm: Optional[Tensor], rv: Optional[Tensor], mean: Tensor, var: Tensor, m: int,
                          factor: Union[float, Tensor]) -> None:
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
) -> Tensor:
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
        stats: optional precomputed batch ``(mean, biased var)`` of ``x`` per channel (e.g. the
            concatenated statistics of the pieces of a ``torch.cat``); skips the statistics sweep.

    Returns:
        The output, same shape, dtype and memory layout as ``x``; differentiable w.r.t. ``x``,
        ``weight`` and ``bias``.

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
    with running_stats_update("bn_relu_train (fission)"):
        return _bn_relu_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, relu,
                              stats)


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
        return torch.relu(out) if relu else out
    if _geometry(x)[3] is None:
        x = x.contiguous()

    path = _fused_path(x, (weight, bias), (running_mean, running_var))
    tracked = running_mean is not None or running_var is not None
    # Running statistics are updated inside the Function's forward (in the fused kernel, or by torch
    # ops), so torch.func transforms see no mutation of a captured buffer; compiled graphs update them
    # here, outside the Function.
    running = (running_mean, running_var, factor) if tracked and not compiling else None
    out, mean, var, _ = BNReLUTrainFunction.apply(x, weight, bias, float(eps), bool(relu), stats, running, path)
    if tracked and running is None:
        _update_running_stats(running_mean, running_var, mean, var, x.numel() // c, factor)
    return out
