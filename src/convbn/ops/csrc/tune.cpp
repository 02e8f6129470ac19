// Tune's CPU kernels (convbn::tune_fold, tune_refold, tune_epilogue; see convbn/ops/tune.py).
// Plain C++17 + OpenMP, no torch headers: built by convbn.ops._build and called through ctypes.
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

// The backward epilogue. gw: dL/dw' (weight route; scaled to dL/dw into gw_out if need_w) or dL/dw
// (activation route: dL/dw' = dL/dw / s). gsum: dL/db' (weight route) or dL/db (activation route).
// dgamma = invstd * (sum(dL/dw' * w) + sum_g * (bias - mean)), dbeta = sum_g, dbias = s * sum_g.
template <typename T>
void epilogue(const T* gw, T* gw_out, const T* w, int64_t C, int64_t K, const T* scale, int act, int need_w,
              const T* gsum, const T* bias, const T* neg_mean, const T* invstd, T* ggamma, T* gbeta, T* gbias, int nt) {
  const bool scale_w = gw && need_w && !act;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t c = 0; c < C; ++c) {
    const T s = scale[c];
    double dot = 0.0;
    if (gw && ggamma) {
      const T* r = gw + c * K;
      const T* wr = w + c * K;
      if (scale_w) {
        T* o = gw_out + c * K;
#pragma omp simd reduction(+ : dot)
        for (int64_t k = 0; k < K; ++k) { dot += (double)r[k] * (double)wr[k]; o[k] = r[k] * s; }
      } else {
#pragma omp simd reduction(+ : dot)
        for (int64_t k = 0; k < K; ++k) dot += (double)r[k] * (double)wr[k];
      }
    } else if (scale_w) {
      const T* r = gw + c * K;
      T* o = gw_out + c * K;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) o[k] = r[k] * s;
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
  extern "C" void tune_epilogue_##SFX(const T* gw, T* gw_out, const T* w, int64_t C, int64_t K,         \
                                      const T* scale, int act, int need_w, const T* gsum, const T* bias, \
                                      const T* neg_mean, const T* invstd, T* ggamma, T* gbeta, T* gbias, \
                                      int nt) {                                                        \
    epilogue<T>(gw, gw_out, w, C, K, scale, act, need_w, gsum, bias, neg_mean, invstd, ggamma, gbeta,   \
                gbias, nt); }
CONVBN_TUNE_EXPORT(float, f32)
CONVBN_TUNE_EXPORT(double, f64)
