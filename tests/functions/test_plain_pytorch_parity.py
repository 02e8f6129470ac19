"""The three Functions on data flows beyond one plain training step, each against plain PyTorch:
double backward, batch variance << eps, empty batches, rejected batches, torch.func, bf16 models,
integer or mismatched inputs, the meta device."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import convbn
from conftest import assert_close_rel, randomize_all_bn
from convbn.errors import ConvBNError
from convbn.ops import native
from convbn.functions._conv import ConvSpec, TorchFuncBufferError
from convbn.functions.train_recompute import RecomputeConvBNFunction
from convbn.functions.tune import TuneConvBNFunction

TRAIN = {"recompute": dict(recompute=True), "fission": dict(fission=True)}


def block(dtype=torch.float64, momentum=0.1, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6, momentum=momentum), nn.ReLU())
    return randomize_all_bn(model).to(dtype)


def converted(model: nn.Module, variant: str) -> nn.Module:
    twin = copy.deepcopy(model)
    if variant == "tune":
        return convbn.convert(twin.eval(), "tune")
    return convbn.convert(twin.train(), "train", **TRAIN[variant])


def assert_same_state(model: nn.Module, ref: nn.Module, rel: float) -> None:
    for (name, a), b in zip(model.named_buffers(), ref.buffers()):
        if name.endswith("num_batches_tracked"):
            assert int(a) == int(b), name
        else:
            assert_close_rel(a.double(), b.double(), rel, name)


def assert_grad_close(a: torch.Tensor, b: torch.Tensor, name: str, variant: str, scale: torch.Tensor) -> None:
    """float64 gradients relatively; the conv bias's under batch statistics is zero in exact arithmetic
    (BN removes the mean), so both must be below a noise floor set by ``scale`` (a gradient's size)."""
    if name.endswith("0.bias") and variant != "tune":
        noise = 1e-10 * float(scale.abs().max())
        assert float(a.abs().max()) <= noise and float(b.abs().max()) <= noise, name
    else:
        assert_close_rel(a, b, 1e-10, name)


# ------------------------------------------------------------------ double backward (gradient penalty)
@pytest.mark.parametrize("variant", ["recompute", "fission", "tune"])
def test_gradient_penalty_second_order_gradients_equal_plain_pytorch(variant):
    ref = block().train(variant != "tune")
    model = converted(ref, variant)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    g_out = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    grads = []
    for m in (model, ref):
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        (gx,) = torch.autograd.grad(out, xi, g_out, create_graph=True)
        loss = (out * g_out).sum() + gx.square().sum()  # a gradient penalty
        grads.append(torch.autograd.grad(loss, [xi] + list(m.parameters())))
    for name, a, b in zip(["x"] + [n for n, _ in ref.named_parameters()], *grads):
        assert_grad_close(a, b, name, variant, scale=grads[1][1])
    assert_same_state(model, ref, 1e-12)


# ------------------------------------------------------------------ running variance when var << eps
@pytest.mark.parametrize("variant", ["recompute", "fission"])
def test_running_var_is_as_accurate_as_plain_pytorch_when_batch_variance_is_far_below_eps(variant):
    """momentum=None from a fresh BN: running_var is the unbiased batch variance itself (~1e-9 here,
    eps = 1e-5). Rebuilding it as 1 / invstd^2 - eps loses ~eps/var float32 ulps."""
    torch.manual_seed(1)
    ref = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6, momentum=None), nn.ReLU())
    with torch.no_grad():
        ref[0].weight.mul_(1e-4)
    truth = copy.deepcopy(ref).double()
    model = converted(ref, variant)
    x = torch.randn(8, 3, 6, 6)
    model(x), ref(x), truth(x.double())
    assert float(truth[1].running_var.max()) < 1e-3 * ref[1].eps
    exact = truth[1].running_var

    def err(rv):
        return float(((rv.double() - exact) / exact).abs().max())

    assert err(model[1].running_var) <= 2 * err(ref[1].running_var) + 1e-7, (err(model[1].running_var),
                                                                              err(ref[1].running_var))


# ------------------------------------------------------------------ empty and one-value batches
@pytest.mark.parametrize("variant", ["recompute", "fission"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_matches_plain_pytorch(variant, momentum):
    ref = block(momentum=momentum).train()
    model = converted(ref, variant)
    x = torch.randn(0, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    out, ref_out = model(x), ref(x)
    assert out.shape == ref_out.shape == (0, 6, 5, 5)
    assert_same_state(model, ref, 0.0)  # running statistics untouched, the counter incremented
    grads = [torch.autograd.grad(o.sum(), list(m.parameters()), allow_unused=True)
             for o, m in ((out, model), (ref_out, ref))]
    for a, b in zip(*grads):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


@pytest.mark.parametrize("variant", ["recompute", "fission"])
def test_a_rejected_one_value_batch_counts_like_plain_pytorch(variant):
    """Plain PyTorch increments num_batches_tracked before F.batch_norm rejects the batch: with
    momentum=None the next steps' averages then depend on it."""
    ref = block(momentum=None).train()
    model = converted(ref, variant)
    one = torch.randn(1, 3, 1, 1, dtype=torch.float64)
    for m in (model, ref):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            m(one)
    assert_same_state(model, ref, 0.0)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    assert_close_rel(model(x), ref(x), 1e-12, "next step")
    assert_same_state(model, ref, 1e-12)


# ------------------------------------------------------------------ eager calls: the Functions' twins
@pytest.mark.parametrize("variant", ["tune", "recompute", "fission"])
def test_eager_calls_run_the_twin_without_argument_binding(variant, monkeypatch):
    """An eager step runs each Function's twin (``forward(ctx, ...)``: ``Function.apply`` binds no
    arguments with ``inspect``), equal to plain PyTorch; under ``torch.func`` the ``setup_context``
    Function runs (the next tests)."""
    import inspect

    binds = []
    real_bind = inspect.Signature.bind
    monkeypatch.setattr(inspect.Signature, "bind", lambda self, *a, **k: binds.append(1) or real_bind(self, *a, **k))
    ref = block().train(variant != "tune")
    model = converted(ref, variant)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    out, want = model(x), ref(x)
    names = {out.grad_fn.name()}
    names |= {n.name() for n, _ in out.grad_fn.next_functions if n is not None}
    fn = {"tune": "TuneConvBNFunctionEagerBackward", "recompute": "RecomputeConvBNFunctionEagerBackward",
          "fission": "BNReLUTrainFunctionEagerBackward"}[variant]
    if variant == "fission" and native.op() is not None:  # its C++ autograd node (convbn.ops.native)
        fn = "torch::autograd::CppNode<(anonymous namespace)::BNReLUTrainNative>"
    assert fn in names, names
    dy = torch.randn_like(want)
    got = torch.autograd.grad(out, [x, *model.parameters()], dy)
    expected = torch.autograd.grad(want, [x, *ref.parameters()], dy)
    assert binds == []
    assert_close_rel(out, want, 1e-12, "output")
    for (name, _), a, b in zip([("x", None), *model.named_parameters()], got, expected):
        assert_grad_close(a, b, name, variant, scale=expected[1])


# ------------------------------------------------------------------ torch.func
def _functional_loss(model, x):
    def loss(params, buffers):
        return torch.func.functional_call(model, (params, buffers), (x,)).square().sum()
    return loss


def _state(model):
    return ({k: v.detach() for k, v in model.named_parameters()},
            {k: v.clone() for k, v in model.named_buffers()})


@pytest.mark.parametrize("variant", ["tune", "recompute", "fission"])
def test_torch_func_grad_and_jacrev_equal_plain_pytorch(variant):
    ref = block().train(variant != "tune")
    model = converted(ref, variant)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    results = []
    for m in (model, ref):
        params, buffers = _state(m)
        grads = torch.func.grad(_functional_loss(m, x))(params, buffers)
        jac = torch.func.jacrev(lambda p, b: torch.func.functional_call(m, (p, b), (x,)).sum((0, 2, 3)))(
            params, {k: v.clone() for k, v in buffers.items()})
        results.append((grads, jac, buffers))
    (grads, jac, buffers), (ref_grads, ref_jac, ref_buffers) = results
    for k in ref_grads:
        assert_grad_close(grads[k], ref_grads[k], f"grad {k}", variant, scale=ref_grads["0.weight"])
        assert_grad_close(jac[k], ref_jac[k], f"jacrev {k}", variant, scale=ref_jac["0.weight"])
    for k in ref_buffers:  # the running statistics (buffers passed in) updated as plain PyTorch updates them
        assert_close_rel(buffers[k].double(), ref_buffers[k].double(), 1e-12, k)


@pytest.mark.parametrize("variant", ["recompute", "fission"])
def test_torch_func_with_captured_buffers_is_refused_or_equal_to_plain_pytorch(variant):
    """Plain PyTorch's BatchNorm cannot update buffers a torch.func transform captured (it raises).
    Recompute updates them inside its Function, which torch.func allows, and equals plain PyTorch with
    the buffers passed in; fission increments the counter outside and raises a ConvBNError saying
    what to do (also a RuntimeError, like plain PyTorch's)."""
    ref = block().train()
    model = converted(ref, variant)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    params = {k: v.detach() for k, v in ref.named_parameters()}
    with pytest.raises(RuntimeError, match="captured"):
        torch.func.grad(lambda p: _functional_loss(ref, x)(p, dict(ref.named_buffers())))(params)
    buffers = dict(model.named_buffers())
    if variant == "fission":
        with pytest.raises(TorchFuncBufferError, match="Pass the buffers as an input"):
            torch.func.grad(lambda p: _functional_loss(model, x)(p, buffers))(params)
        return
    grads = torch.func.grad(lambda p: _functional_loss(model, x)(p, buffers))(params)
    ref_buffers = {k: v.clone() for k, v in ref.named_buffers()}
    ref_grads = torch.func.grad(_functional_loss(ref, x))(params, ref_buffers)
    for k in ref_grads:
        assert_grad_close(grads[k], ref_grads[k], k, variant, scale=ref_grads["0.weight"])
    for k in ref_buffers:
        assert_close_rel(buffers[k].double(), ref_buffers[k].double(), 1e-12, k)


def test_torch_func_vmap_tune_equals_plain_and_train_variants_refuse_it():
    ref = block()
    x = torch.randn(5, 2, 3, 4, 4, dtype=torch.float64)  # 5 independent batches of 2
    tune = converted(ref, "tune")
    params, buffers = _state(ref.eval())
    want = torch.func.vmap(lambda xi: torch.func.functional_call(ref, (params, buffers), (xi,)))(x)
    got = torch.func.vmap(lambda xi: torch.func.functional_call(tune, (params, buffers), (xi,)))(x)
    assert_close_rel(got, want, 1e-12, "vmap tune")
    for variant in TRAIN:
        model = converted(ref, variant)
        params, buffers = _state(model)
        with pytest.raises(ConvBNError, match="vmap"):
            torch.func.vmap(lambda xi: torch.func.functional_call(model, (params, buffers), (xi,)))(x)


# ------------------------------------------------------------------ bf16 / fp16 models, integer input
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_recompute_on_a_half_precision_model_is_as_accurate_as_plain_pytorch(dtype):
    base = block(torch.float32).train()
    truth = copy.deepcopy(base).double()
    ref = copy.deepcopy(base).to(dtype)
    model = converted(ref, "recompute")
    x = torch.randn(4, 3, 5, 5)
    g = torch.randn(4, 6, 5, 5)
    outs = []
    for m, dt in ((model, dtype), (ref, dtype), (truth, torch.float64)):
        out = m(x.to(dt))
        outs.append((out,) + torch.autograd.grad(out, list(m.parameters()), g.to(dt)))
    for i, (a, b, t) in enumerate(zip(*outs)):
        assert a.dtype == b.dtype == dtype
        err, err_plain = (float((v.double() - t).abs().max() / t.abs().max()) for v in (a, b))
        assert err <= 1.5 * err_plain + 1e-3, (i, err, err_plain)
    for (name, a), b, t in zip(model.named_buffers(), ref.buffers(), truth.buffers()):
        assert a.dtype == b.dtype
        assert float((a.double() - t.double()).abs().max()) <= 1.5 * float((b.double() - t.double()).abs().max()) \
            + 1e-2 * float(t.double().abs().max()), name


@pytest.mark.parametrize("variant", ["tune", "recompute"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_integer_input_is_refused_by_the_function_like_plain_conv(variant, dtype):
    conv, bn = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)
    x = (torch.randn(2, 3, 5, 5) * 3).to(dtype)
    with pytest.raises(RuntimeError):
        conv(x)
    spec = ConvSpec((1, 1), (0, 0), (1, 1), False, (0, 0), 1)
    with pytest.raises(ConvBNError, match="floating-point input"):
        if variant == "tune":
            TuneConvBNFunction.apply(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                     bn.eps, spec)
        else:
            RecomputeConvBNFunction.apply(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                                          bn.running_var, bn.num_batches_tracked, 0.1, bn.eps, spec, True)
    assert int(bn.num_batches_tracked) == 0


@pytest.mark.parametrize("variant", ["tune", "recompute"])
def test_an_input_of_another_dtype_than_the_weights_is_refused_like_plain_pytorch(variant):
    ref = block(torch.float64).train(variant != "tune")
    model = converted(ref, variant)
    x = torch.randn(2, 3, 5, 5)  # float32 into a float64 model
    with pytest.raises(RuntimeError):
        ref(x)
    with pytest.raises(ConvBNError, match="weight is torch.float64"):
        model(x)


# ------------------------------------------------------------------ meta device
@pytest.mark.parametrize("variant", ["tune", "recompute", "fission"])
def test_meta_device_forward_and_backward_have_plain_pytorch_shapes(variant):
    ref = block(torch.float32).train(variant != "tune")
    model = converted(ref, variant).to("meta")  # (convert checks the running statistics' values: on CPU)
    ref = ref.to("meta")
    x = torch.empty(4, 3, 5, 5, device="meta", requires_grad=True)
    out, ref_out = model(x), ref(x)
    assert out.device.type == "meta" and out.shape == ref_out.shape and out.dtype == ref_out.dtype
    grads = torch.autograd.grad(out.sum(), [x] + list(model.parameters()))
    ref_grads = torch.autograd.grad(ref_out.sum(), [x] + list(ref.parameters()))
    for a, b in zip(grads, ref_grads):
        assert a.device.type == "meta" and a.shape == b.shape and a.dtype == b.dtype


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("mode", ["eval", "tune", "deploy", "train", "recompute", "fission"])
def test_torch_func_grad_and_jacrev_wrt_the_input_equal_plain_pytorch_in_every_mode(mode, backend):
    """Every mode under torch.func, on the C++ and the torch-op paths: d(loss)/dx and the Jacobian of
    the output w.r.t. x equal plain PyTorch's (eval's function for eval/tune/deploy, train's else)."""
    from convbn.ops import use_extension

    training = mode in ("train", "recompute", "fission")
    ref = block().train(training)
    if mode in ("recompute", "fission", "tune"):
        model = converted(ref, mode)
    elif mode == "deploy":
        model = convbn.deploy(copy.deepcopy(ref))
    else:
        model = convbn.convert(copy.deepcopy(ref), mode)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    results = []
    for m in (model, ref):
        params, buffers = _state(m)

        def f(xi, m=m, params=params, buffers=buffers):
            return torch.func.functional_call(m, (params, {k: v.clone() for k, v in buffers.items()}), (xi,))

        with use_extension(backend):
            results.append((torch.func.grad(lambda xi: f(xi).square().sum())(x), torch.func.jacrev(f)(x)))
    for got, want, what in zip(results[0], results[1], ("grad", "jacrev")):
        assert_close_rel(got, want, 1e-10, f"{mode} {what}")
