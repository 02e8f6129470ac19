// convbn::bn_relu_train_native: BN fission's forward and backward as one dispatcher op whose autograd
// formula is registered in C++ (see convbn/ops/native.py). It calls the very kernels of bn_fission.cpp
// (included below: one source of truth for the arithmetic), so it computes bit for bit what the ctypes
// path computes -- without the Python autograd.Function, the Python op wrappers and ctypes around each
// direction (~50 us per layer and direction at DenseNet sizes, where a layer's kernels take 10-100 us).
//
// Built against the torch headers into its own library (loaded with torch.ops.load_library). The
// Python side calls it only for what the kernels take (CPU, float32/float64, contiguous or
// channels-last x, contiguous float32/float64 parameters and buffers, eager mode outside torch.func);
// everything else keeps the convbn::bn_fission_* ops.
#include <torch/library.h>
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/native_batch_norm.h>
#include <ATen/ops/native_batch_norm_backward.h>
#include <ATen/ops/threshold_backward.h>

#include "bn_fission.cpp"

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

int threads_for(int64_t numel) {  // as convbn.functions._conv.threads
  const int64_t t = std::min<int64_t>(at::get_num_threads(), numel / 65536);
  return (int)std::max<int64_t>(1, t);
}

struct Geometry {
  int64_t N, C, L;
  int nlc;
};

Geometry geometry(const Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / std::max<int64_t>(N * C, 1);
  const bool cl = x.movedim(1, -1).is_contiguous();
  if (L == 1 && cl) return {N, C, L, 1};
  if (x.is_contiguous()) return {N, C, L, 0};
  TORCH_CHECK(cl, "bn_relu_train_native: x must be contiguous or channels-last");
  return {N, C, L, 1};
}

const void* ptr_or_null(const c10::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr() : nullptr;
}
void* mut_ptr_or_null(const c10::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr() : nullptr;
}
int is_f64(const c10::optional<Tensor>& a, const c10::optional<Tensor>& b) {
  const c10::optional<Tensor>& t = (a.has_value() && a->defined()) ? a : b;
  return t.has_value() && t->defined() && t->scalar_type() == at::kDouble;
}

// (out, mean, var, invstd); the first `known` channels' statistics given in kmean/kvar (ICF).
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_impl(
    const Tensor& x, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& kmean, const c10::optional<Tensor>& kvar,
    const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
    double factor, double eps, bool relu) {
  const Geometry g = geometry(x);
  auto f64 = x.options().dtype(at::kDouble);
  Tensor mean = at::empty({g.C}, f64), var = at::empty({g.C}, f64), invstd = at::empty({g.C}, f64);
  Tensor out = at::empty_like(x);
  int64_t known = 0;
  Tensor km, kv;
  if (kmean.has_value() && kmean->defined() && kvar.has_value() && kvar->defined()) {
    km = kmean->to(at::kDouble).contiguous();
    kv = kvar->to(at::kDouble).contiguous();
    known = km.numel();
  }
  const int nt = threads_for(x.numel());
  const int pf64 = is_f64(weight, bias), bf64 = is_f64(running_mean, running_var);
  if (x.scalar_type() == at::kFloat) {
    fused_forward<float>(x.const_data_ptr<float>(), out.data_ptr<float>(), g.N, g.C, g.L, g.nlc, nt,
                         mean.data_ptr<double>(), var.data_ptr<double>(), known,
                         known ? km.const_data_ptr<double>() : nullptr, known ? kv.const_data_ptr<double>() : nullptr,
                         ptr_or_null(weight), ptr_or_null(bias), pf64, eps, relu, invstd.data_ptr<double>(),
                         mut_ptr_or_null(running_mean), mut_ptr_or_null(running_var), bf64, factor);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kDouble, "bn_relu_train_native: x must be float32 or float64");
    fused_forward<double>(x.const_data_ptr<double>(), out.data_ptr<double>(), g.N, g.C, g.L, g.nlc, nt,
                          mean.data_ptr<double>(), var.data_ptr<double>(), known,
                          known ? km.const_data_ptr<double>() : nullptr,
                          known ? kv.const_data_ptr<double>() : nullptr, ptr_or_null(weight), ptr_or_null(bias),
                          pf64, eps, relu, invstd.data_ptr<double>(), mut_ptr_or_null(running_mean),
                          mut_ptr_or_null(running_var), bf64, factor);
  }
  return {out, mean, var, invstd};
}

struct BNReLUTrainNative : public torch::autograd::Function<BNReLUTrainNative> {
  static tensor_list forward(AutogradContext* ctx, const Tensor& x, const c10::optional<Tensor>& weight,
                             const c10::optional<Tensor>& bias, const c10::optional<Tensor>& kmean,
                             const c10::optional<Tensor>& kvar, const c10::optional<Tensor>& running_mean,
                             const c10::optional<Tensor>& running_var, double factor, double eps, bool relu) {
    auto [out, mean, var, invstd] = forward_impl(x, weight, bias, kmean, kvar, running_mean, running_var, factor,
                                                 eps, relu);
    const Tensor w = weight.has_value() ? *weight : Tensor(), b = bias.has_value() ? *bias : Tensor();
    ctx->save_for_backward({x, w, b, mean, invstd});  // not the output: the ReLU mask is recomputed from x
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, var, invstd});
    return {out, mean, var, invstd};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1], &b = saved[2], &mean = saved[3], &invstd = saved[4];
    const bool relu = ctx->saved_data["relu"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool need_x = ctx->needs_input_grad(0), need_w = w.defined() && ctx->needs_input_grad(1),
               need_b = b.defined() && ctx->needs_input_grad(2);
    tensor_list result(10);
    Tensor grad = grads[0];
    if (!grad.defined() || !(need_x || need_w || need_b)) return result;
    if (at::GradMode::is_enabled()) {
      // create_graph=True: PyTorch's own twice-differentiable BN backward ops (as the Python Function)
      auto [z, save_mean, save_invstd] = at::native_batch_norm(x, w, b, Tensor(), Tensor(), true, 0.0, eps);
      Tensor g = grad.to(z.scalar_type());
      if (relu) g = at::threshold_backward(g, z, 0);
      auto r = at::native_batch_norm_backward(g, x, w, Tensor(), Tensor(), save_mean, save_invstd, true, eps,
                                              {need_x, need_w, need_b});
      result[0] = need_x ? std::get<0>(r) : Tensor();
      result[1] = need_w ? std::get<1>(r) : Tensor();
      result[2] = need_b ? std::get<2>(r) : Tensor();
      return result;
    }
    if (grad.scalar_type() != x.scalar_type() || grad.strides() != x.strides())
      grad = at::empty_like(x).copy_(grad);  // the kernel reads both with x's strides
    const Geometry g = geometry(x);
    Tensor gx = need_x ? at::empty_like(x) : Tensor();
    Tensor gw = need_w ? at::empty_like(w) : Tensor();
    Tensor gb = need_b ? at::empty_like(b) : Tensor();
    const int nt = threads_for(x.numel());
    const int pf64 = (w.defined() ? w : b).defined() && (w.defined() ? w : b).scalar_type() == at::kDouble;
    const Tensor m = mean.contiguous(), is = invstd.contiguous();
    if (x.scalar_type() == at::kFloat) {
      fused_backward<float>(grad.const_data_ptr<float>(), x.const_data_ptr<float>(),
                            need_x ? gx.data_ptr<float>() : nullptr, g.N, g.C, g.L, g.nlc, nt,
                            m.const_data_ptr<double>(), is.const_data_ptr<double>(),
                            w.defined() ? w.data_ptr() : nullptr, b.defined() ? b.data_ptr() : nullptr, pf64, relu,
                            need_w ? gw.data_ptr() : nullptr, need_b ? gb.data_ptr() : nullptr);
    } else {
      fused_backward<double>(grad.const_data_ptr<double>(), x.const_data_ptr<double>(),
                             need_x ? gx.data_ptr<double>() : nullptr, g.N, g.C, g.L, g.nlc, nt,
                             m.const_data_ptr<double>(), is.const_data_ptr<double>(),
                             w.defined() ? w.data_ptr() : nullptr, b.defined() ? b.data_ptr() : nullptr, pf64, relu,
                             need_w ? gw.data_ptr() : nullptr, need_b ? gb.data_ptr() : nullptr);
    }
    result[0] = gx;
    result[1] = gw;
    result[2] = gb;
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_relu_train_native_autograd(
    const Tensor& x, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& mean, const c10::optional<Tensor>& var,
    const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
    double factor, double eps, bool relu) {
  auto r = BNReLUTrainNative::apply(x, weight, bias, mean, var, running_mean, running_var, factor, eps, relu);
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(convbn, m) {
  m.def("bn_relu_train_native(Tensor x, Tensor? weight, Tensor? bias, Tensor? mean, Tensor? var, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, float factor, float eps, bool relu) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(convbn, CPU, m) { m.impl("bn_relu_train_native", &forward_impl); }
TORCH_LIBRARY_IMPL(convbn, AutogradCPU, m) { m.impl("bn_relu_train_native", &bn_relu_train_native_autograd); }
