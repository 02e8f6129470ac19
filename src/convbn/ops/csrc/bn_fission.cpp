// BN fission's CPU kernels (convbn::bn_fission_stats, bn_fission_forward, bn_fission_backward; see
// convbn/ops/bn_fission.py). Plain C++17 + OpenMP, no torch headers: built by convbn.ops._build and called
// through ctypes. Layout 0 = "NCL" (contiguous: N*C planes of L elements), 1 = "NLC" (channels last:
// N*L rows of C elements). Per-channel inputs/outputs are float64 arrays of length C.
#include <omp.h>
#include <stdint.h>
#include <math.h>
#include <vector>
#include <algorithm>

namespace {
const int64_t RBLK = 128;   // rows per float partial sum (NLC)
const int64_t SEG = 256;         // NCL: segment length of the elementwise float accumulators (reduce2_ncl)
const int64_t LANE_TERMS = 128;  // NCL: segments added into the float accumulators before a flush

// Per-channel float64 sums (S, SX) of two per-element terms over an (N, C, L) tensor whose plane (n, c)
// starts at n * sN + c * L (sN = C * L when contiguous; larger for a channel slice of a bigger tensor):
// fa(c, j) and fb(c, j) of flat element j of channel c (returned by value: addressable temporaries would
// turn into per-lane memory arrays inside `omp simd`). Each channel's rows are cut into segments of at
// most SEG elements that are added elementwise into SEG-long float rows u, v -- no horizontal reduction
// per row (7x7 and 3x3 maps have rows of 49 and 9) and no `omp simd reduction` -- which are flushed to
// double after LANE_TERMS segments, so no float partial sum has more than LANE_TERMS terms.
template <typename T, typename FA, typename FB>
inline void reduce2_channel(int64_t c, int64_t N, int64_t L, int64_t sN, const FA& fa, const FB& fb, T* u, T* v,
                            double& S, double& SX) {
  const int64_t W = std::min(L, SEG);
  double s2 = 0, sx2 = 0;
  int64_t terms = 0;
  std::fill(u, u + W, (T)0); std::fill(v, v + W, (T)0);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t o = n * sN + c * L;
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
  S = s2; SX = sx2;
}

template <typename T, typename FA, typename FB>
void reduce2_ncl(int64_t N, int64_t C, int64_t L, int64_t sN, int nt, FA fa_shared, FB fb_shared, double* S,
                 double* SX) {
#pragma omp parallel num_threads(nt)
  {
    // Thread-local copies: the outlined region would otherwise reload the closures' pointers through
    // shared memory on every element.
    const FA fa = fa_shared;
    const FB fb = fb_shared;
    T u[SEG], v[SEG];
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c) reduce2_channel<T>(c, N, L, sN, fa, fb, u, v, S[c], SX[c]);
  }
}

// Channel-local passes (NCL): a channel's reduction and then its elementwise pass, back to back in one
// thread, so the second pass reads the channel's N planes from L1/L2 instead of the whole tensor again
// from memory. Needs channels to share out among the threads.
inline bool channel_local(int64_t C, int nt) { return C >= 2 * (int64_t)nt; }

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
void stats(const T* x, int64_t N, int64_t C, int64_t L, int nlc, int64_t sN, int nt, double* mean, double* var) {
  const int64_t M = N * L;
  std::vector<T> K(C);
  shift_of(x, N, C, L, nlc, K.data());
  std::vector<double> S(C, 0.0), SS(C, 0.0);
  if (!nlc) {
    const T* Kp = K.data();
    reduce2_ncl<T>(N, C, L, sN, nt, [=](int64_t c, int64_t j) { return x[j] - Kp[c]; },
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

// One NCL plane of L elements: the forward's output (normalize) and the input gradient (grad_input); the
// two-sweep and the channel-local schedules both call these.
template <typename T>
inline void normalize_plane(const T* p, T* q, int64_t L, T h, T l, T s, T t, int relu) {
  if (relu) {
#pragma omp simd
    for (int64_t i = 0; i < L; ++i) { T v = bn_value(p[i], h, l, s, t); q[i] = v < 0 ? (T)0 : v; }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < L; ++i) q[i] = bn_value(p[i], h, l, s, t);
  }
}
template <typename T>
inline void grad_input_plane(const T* g, const T* p, T* d, int64_t L, T h, T l, T s, T t, T sa, T sb, T se,
                             int relu) {
  if (relu) {
#pragma omp simd
    for (int64_t i = 0; i < L; ++i)
      d[i] = sa * relu_grad(g[i], bn_value(p[i], h, l, s, t)) + sb * ((p[i] - h) - l) + se;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < L; ++i) d[i] = sa * g[i] + sb * ((p[i] - h) - l) + se;
  }
}

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
        normalize_plane(x + (n * C + c) * L, y + (n * C + c) * L, L, H[c], Lo[c], A[c], B[c], relu);
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
      reduce2_ncl<T>(N, C, L, C * L, nt,
                     [=](int64_t c, int64_t j) { return relu_grad(dy[j], bn_value(x[j], H[c], Lo[c], A[c], B[c])); },
                     [=](int64_t c, int64_t j) {
                       return relu_grad(dy[j], bn_value(x[j], H[c], Lo[c], A[c], B[c])) * ((x[j] - H[c]) - Lo[c]); },
                     S.data(), SX.data());
    } else {
      reduce2_ncl<T>(N, C, L, C * L, nt, [=](int64_t, int64_t j) { return dy[j]; },
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
        grad_input_plane(dy + o, x + o, dx + o, L, H[c], Lo[c], A[c], B[c], CA[c], CB[c], CE[c], relu);
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

// ---- Fused entry points (the only ones exported besides stats): the per-channel arithmetic (invstd, scale, running-statistics update,
// gradient coefficients, dgamma/dbeta) done here in float64 instead of ~40 small torch ops per layer.
// Per-channel parameters/buffers are float32 (f64 == 0) or float64 (f64 == 1); null when absent.
inline double load(const void* p, int f64, int64_t c, double dflt) {
  if (!p) return dflt;
  return f64 ? ((const double*)p)[c] : (double)((const float*)p)[c];
}
inline void store(void* p, int f64, int64_t c, double v) {
  if (f64) ((double*)p)[c] = v; else ((float*)p)[c] = (float)v;
}

// known (0..C): the statistics of the first `known` channels are given (ICF: the pieces of a
// concatenation measured earlier) in kmean/kvar and copied to mean/var; the other channels' are
// measured here. Writes invstd; updates the running buffers (if given) as torch does:
// r = (1 - factor) * r + factor * batch, the variance unbiased by m / (m - 1).
template <typename T>
void fused_forward(const T* x, T* y, int64_t N, int64_t C, int64_t L, int nlc, int nt,
                   double* mean, double* var, int64_t known, const double* kmean, const double* kvar,
                   const void* w, const void* b, int pf64,
                   double eps, int relu, double* invstd, void* rmean, void* rvar, int bf64, double factor) {
  const double m = (double)(N * L), unbias = m > 1 ? m / (m - 1) : 1.0;
  known = std::max<int64_t>(0, std::min(known, C));
  for (int64_t c = 0; c < known; ++c) { mean[c] = kmean[c]; var[c] = kvar[c]; }
  // Per channel: invstd, scale, shift and the running-statistics update (channels are independent).
  auto channel = [&](int64_t c, double& scale, double& shift) {
    invstd[c] = 1.0 / sqrt(var[c] + eps);
    scale = load(w, pf64, c, 1.0) * invstd[c];
    shift = load(b, pf64, c, 0.0);
    if (rmean) store(rmean, bf64, c, (1 - factor) * load(rmean, bf64, c, 0) + factor * mean[c]);
    if (rvar) store(rvar, bf64, c, (1 - factor) * load(rvar, bf64, c, 0) + factor * var[c] * unbias);
  };
  if (!nlc && channel_local(C, nt)) {
    // Statistics (unless given) and normalization channel by channel: x is read from memory once.
#pragma omp parallel num_threads(nt)
    {
      T u[SEG], v[SEG];
#pragma omp for schedule(static)
      for (int64_t c = 0; c < C; ++c) {
        if (c >= known) {
          T K;
          shift_of(x + c * L, N, 1, L, 0, &K);
          double S, SS;
          reduce2_channel<T>(c, N, L, C * L, [=](int64_t, int64_t j) { return x[j] - K; },
                             [=](int64_t, int64_t j) { const T d = x[j] - K; return d * d; }, u, v, S, SS);
          const double mc = S / (double)m;
          mean[c] = (double)K + mc;
          var[c] = std::max(SS / (double)m - mc * mc, 0.0);
        }
        double sc, sh;
        channel(c, sc, sh);
        const T h = (T)mean[c], l = (T)(mean[c] - (double)h), s_ = (T)sc, t = (T)sh;
        for (int64_t n = 0; n < N; ++n)
          normalize_plane(x + (n * C + c) * L, y + (n * C + c) * L, L, h, l, s_, t, relu);
      }
    }
    return;
  }
  if (known < C) {
    if (!nlc) {  // the unknown channels only: a channel slice, read with the full tensor's batch stride
      stats<T>(x + known * L, N, C - known, L, 0, C * L, nt, mean + known, var + known);
    } else {     // interleaved channels: all are swept together; the given ones are kept
      std::vector<double> sm(C), sv(C);
      stats<T>(x, N, C, L, nlc, 0, nt, sm.data(), sv.data());
      for (int64_t c = known; c < C; ++c) { mean[c] = sm[c]; var[c] = sv[c]; }
    }
  }
  std::vector<double> scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) channel(c, scale[c], shift[c]);
  normalize<T>(x, y, N, C, L, nlc, nt, mean, scale.data(), shift.data(), relu);
}

// dx (if non-null), dgamma and dbeta (if non-null, in the parameter dtype) of fused_forward.
template <typename T>
void fused_backward(const T* dy, const T* x, T* dx, int64_t N, int64_t C, int64_t L, int nlc, int nt,
                    const double* mean, const double* invstd, const void* w, const void* b, int pf64, int relu,
                    void* dw, void* db) {
  const double m = (double)(N * L);
  if (!nlc && channel_local(C, nt)) {
    // The reduction and dx channel by channel: dy and x are read from memory once.
#pragma omp parallel num_threads(nt)
    {
      T u[SEG], v[SEG];
#pragma omp for schedule(static)
      for (int64_t c = 0; c < C; ++c) {
        const double scale = load(w, pf64, c, 1.0) * invstd[c], shift = load(b, pf64, c, 0.0);
        const T h = (T)mean[c], l = (T)(mean[c] - (double)h), s_ = (T)scale, t = (T)shift;
        double sg, sgx;
        if (relu) {
          reduce2_channel<T>(c, N, L, C * L,
                             [=](int64_t, int64_t j) { return relu_grad(dy[j], bn_value(x[j], h, l, s_, t)); },
                             [=](int64_t, int64_t j) {
                               return relu_grad(dy[j], bn_value(x[j], h, l, s_, t)) * ((x[j] - h) - l); },
                             u, v, sg, sgx);
        } else {
          reduce2_channel<T>(c, N, L, C * L, [=](int64_t, int64_t j) { return dy[j]; },
                             [=](int64_t, int64_t j) { return dy[j] * ((x[j] - h) - l); }, u, v, sg, sgx);
        }
        const double dgamma = sgx * invstd[c];
        if (dw) store(dw, pf64, c, dgamma);
        if (db) store(db, pf64, c, sg);
        if (!dx) continue;
        const T sa = (T)scale, sb = (T)(-scale * invstd[c] * dgamma / m), se = (T)(-scale * sg / m);
        for (int64_t n = 0; n < N; ++n) {
          const int64_t o = (n * C + c) * L;
          grad_input_plane(dy + o, x + o, dx + o, L, h, l, s_, t, sa, sb, se, relu);
        }
      }
    }
    return;
  }
  std::vector<double> scale(C), shift(C), sg(C), sgx(C), ca(C), cb(C), ce(C);
  for (int64_t c = 0; c < C; ++c) {
    scale[c] = load(w, pf64, c, 1.0) * invstd[c];
    shift[c] = load(b, pf64, c, 0.0);
  }
  grad_sums<T>(dy, x, N, C, L, nlc, nt, mean, scale.data(), shift.data(), relu, sg.data(), sgx.data());
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
  extern "C" void stats_##SFX(const T* x, int64_t N, int64_t C, int64_t L, int nlc, int64_t sN, int nt,  \
                              double* m, double* v) { stats<T>(x, N, C, L, nlc, sN, nt, m, v); }       \
  extern "C" void fused_forward_##SFX(const T* x, T* y, int64_t N, int64_t C, int64_t L, int nlc,      \
                                      int nt, double* m, double* v, int64_t known, const double* km,   \
                                      const double* kv, const void* w,                                 \
                                      const void* b, int pf64, double eps, int relu, double* invstd,   \
                                      void* rm, void* rv, int bf64, double factor) {                   \
    fused_forward<T>(x, y, N, C, L, nlc, nt, m, v, known, km, kv, w, b, pf64, eps, relu, invstd, rm,   \
                     rv, bf64, factor); }                                                              \
  extern "C" void fused_backward_##SFX(const T* dy, const T* x, T* dx, int64_t N, int64_t C, int64_t L,\
                                       int nlc, int nt, const double* m, const double* invstd,         \
                                       const void* w, const void* b, int pf64, int relu, void* dw,     \
                                       void* db) {                                                     \
    fused_backward<T>(dy, x, dx, N, C, L, nlc, nt, m, invstd, w, b, pf64, relu, dw, db); }
CONVBN_EXPORT(float, f32)
CONVBN_EXPORT(double, f64)
