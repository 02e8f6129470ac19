import copy

import pytest
import torch

from conftest import assert_close_rel
from convbn.ops import use_extension
from convbn.functions.tune import ConvSpec, TuneConvBNFunction, tune_conv_bn, tune_route
from convbn.bench.memory import saved_tensor_bytes
from layer_cases import block_params, make_block


def _tune_call(layer, bn, x):
    linear = isinstance(layer, torch.nn.Linear)
    kw = {} if linear else dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                                groups=layer.groups, transposed=layer.transposed,
                                output_padding=layer.output_padding)
    return tune_conv_bn(x, layer.weight, layer.bias, bn.running_mean, bn.running_var,
                        bn.weight if bn.affine else None, bn.bias if bn.affine else None, bn.eps,
                        linear=linear, **kw)


def _params(layer, bn):
    ps = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
    return ps + ([bn.weight, bn.bias] if bn.affine else [])


ROUTES = ["weight", "activation"]
# The two implementations of the convbn::tune_* ops: "extension", the C++ kernels (their CPU implementation:
# float32/float64, not transposed); "torch", their references in torch ops (other devices, other dtypes).
BACKENDS = ["extension", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    with use_extension(request.param):
        yield request.param


@pytest.fixture(params=ROUTES)
def route(request, backend):
    with tune_route(request.param):
        yield request.param


@pytest.mark.parametrize("kind,bias,affine,groups", block_params())
def test_tune_equals_eval_forward_and_all_gradients(kind, bias, affine, groups, route):
    layer, bn, x = make_block(kind, bias, affine, groups)
    bn.eval()
    ref_layer, ref_bn = copy.deepcopy(layer), copy.deepcopy(bn)
    x_ref = x.clone().requires_grad_(True)
    x = x.clone().requires_grad_(True)
    expected = ref_bn(ref_layer(x_ref))
    out = _tune_call(layer, bn, x)
    assert_close_rel(out, expected, 2e-6, "output")
    g = torch.randn_like(expected)
    got = torch.autograd.grad(out, [x] + _params(layer, bn), g)
    want = torch.autograd.grad(expected, [x_ref] + _params(ref_layer, ref_bn), g)
    names = ["x", "weight", "bias", "gamma", "beta"] if bias else ["x", "weight", "gamma", "beta"]
    for name, a, b in zip(names, got, want):
        assert_close_rel(a, b, 2e-5, f"grad {name}")
    # running statistics are buffers: untouched
    assert torch.equal(bn.running_mean, ref_bn.running_mean) and torch.equal(bn.running_var, ref_bn.running_var)


@pytest.mark.parametrize("kind,groups,second_order", [
    ("Conv2d", 1, True), ("Conv1d", 2, False), ("ConvTranspose2d", 2, False), ("ConvTranspose3d", 1, False),
    ("ConvTranspose1d", 2, True), ("Linear", 1, True)])
def test_gradcheck_float64(kind, groups, second_order, route):
    layer, bn, x = make_block(kind, True, True, groups, c_in=2, c_out=4)
    layer, bn = layer.double(), bn.double().eval()
    spatial = (slice(0, {3: 5, 4: 4, 5: 3}[x.dim()]),) * (x.dim() - 2) if x.dim() > 2 else ()
    x = x[:3] if x.dim() == 2 else x[(slice(0, 2), slice(None)) + spatial]
    x = x.double().contiguous().requires_grad_(True)
    inputs = (x, layer.weight, layer.bias, bn.weight, bn.bias)
    spec = None if kind == "Linear" else ConvSpec(tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation),
                                                  layer.transposed, tuple(layer.output_padding), layer.groups)

    def fn(x, w, b, gamma, beta):
        return TuneConvBNFunction.apply(x, w, b, gamma, beta, bn.running_mean, bn.running_var, bn.eps, spec)[0]

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)
    if second_order:  # backward is built from differentiable ops: double backward (e.g. gradient penalty) works
        assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-4)


def test_only_needed_gradients_are_computed(route):
    layer, bn, x = make_block("Conv2d", True, True, 1)
    bn.eval()
    layer.weight.requires_grad_(False)
    bn.weight.requires_grad_(False)
    out = _tune_call(layer, bn, x)  # x does not require grad
    out.sum().backward()
    assert layer.weight.grad is None and bn.weight.grad is None
    assert layer.bias.grad is not None and bn.bias.grad is not None


def test_saves_only_input_and_vectors_like_deploy(backend):
    layer, bn, x = make_block("Conv2d", False, True, 1, c_in=8, c_out=16)
    bn.eval()
    x = torch.randn(4, 8, 32, 32)
    tune_bytes = saved_tensor_bytes(lambda: _tune_call(layer, bn, x))
    eval_bytes = saved_tensor_bytes(lambda: bn(layer(x)))
    deploy = copy.deepcopy(layer)
    deploy_bytes = saved_tensor_bytes(lambda: deploy(x))
    y_bytes = layer(x).numel() * 4  # the conv output eval keeps alive
    assert eval_bytes - tune_bytes >= y_bytes
    # tune saves x + weight (like deploy) + gamma and two [C] vectors
    assert tune_bytes - deploy_bytes <= 3 * 16 * 4


def test_autocast_bf16_folds_in_float32(route):
    layer, bn, x = make_block("Conv2d", True, True, 1)
    bn.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = bn(layer(x))
        out = _tune_call(layer, bn, x)
    exact = copy.deepcopy(bn).double()(copy.deepcopy(layer).double()(x.double()))
    assert out.dtype == torch.bfloat16
    err_eval = (expected.double() - exact).abs().max()
    err_tune = (out.double() - exact).abs().max()
    # the fold adds no error of its own: tune is no worse than eval under the same autocast
    assert err_tune <= 1.5 * err_eval
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()


def test_half_precision_parameters(route):
    layer, bn, x = make_block("Conv2d", True, True, 1)
    bn.eval()
    ref = copy.deepcopy(bn).double()(copy.deepcopy(layer).double()(x.double()))
    layer16, bn16 = copy.deepcopy(layer).to(torch.bfloat16), copy.deepcopy(bn).to(torch.bfloat16)
    out = _tune_call(layer16, bn16, x.to(torch.bfloat16))
    plain = bn16(layer16(x.to(torch.bfloat16)))
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() <= 1.5 * (plain.double() - ref).abs().max()


@pytest.mark.parametrize("route_name", ROUTES)
def test_zero_gamma_channels_are_exact_in_every_route(route_name, backend):
    """A zero-initialized gamma (zero_init_residual) makes s = 0: the activation route would divide
    by it, so backward must take the weight route for that call -- gradients still exact."""
    layer, bn, x = make_block("Conv2d", True, True, 1)
    bn.eval()
    with torch.no_grad():
        bn.weight[[0, 3]] = 0.0
    ref_layer, ref_bn = copy.deepcopy(layer), copy.deepcopy(bn)
    expected = ref_bn(ref_layer(x))
    with tune_route(route_name):
        out = _tune_call(layer, bn, x)
    g = torch.randn_like(expected)
    got = torch.autograd.grad(out, _params(layer, bn), g)
    want = torch.autograd.grad(expected, _params(ref_layer, ref_bn), g)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        assert_close_rel(a, b, 2e-5)


def test_auto_route_picks_the_smaller_side():
    from convbn.functions.tune import _activation_route, _output_numel

    big_weight = torch.empty(512, 512, 3, 3)
    spec = ConvSpec((1, 1), (1, 1), (1, 1), False, (0, 0), 1)
    small_act = torch.empty(16, 512, 4, 4)
    big_act = torch.empty(16, 512, 56, 56)
    assert _output_numel(small_act, big_weight, spec) == 16 * 512 * 4 * 4
    assert _activation_route(_output_numel(small_act, big_weight, spec), big_weight)
    assert not _activation_route(_output_numel(big_act, big_weight, spec), big_weight)


@pytest.mark.parametrize("freeze_weight", [False, True], ids=["trainable", "frozen-weight"])
def test_auto_mixes_routes_when_activation_is_between_one_and_two_weights(freeze_weight, monkeypatch, backend):
    """With W < A < 2W, auto folds the weight in forward (A > W) but scales the gradient in backward
    when dL/dw is needed (refold + rescale cost 4W > 2A); a frozen conv weight keeps the weight route
    (refold 2W < 2A). Either way, float64 outputs and every gradient equal Eval's."""
    import convbn.functions.tune as tune_mod
    from convbn.functions.tune import _activation_route, _output_numel

    decisions = []
    monkeypatch.setattr(tune_mod, "_activation_route",
                        lambda *a, **k: decisions.append(_activation_route(*a, **k)) or decisions[-1])

    torch.manual_seed(3)
    layer = torch.nn.Conv2d(64, 64, 3, padding=1).double()  # W = 36,864
    bn = torch.nn.BatchNorm2d(64).double().eval()
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.copy_(torch.logspace(-2, 2, 64, dtype=torch.float64)[torch.randperm(64)])
        bn.weight.uniform_(0.2, 2.0)
        bn.bias.normal_(0, 0.3)
    x = torch.randn(1, 64, 32, 24, dtype=torch.float64, requires_grad=True)  # A = 49,152
    a, w = _output_numel(x, layer.weight, ConvSpec((1, 1), (1, 1), (1, 1), False, (0, 0), 1)), layer.weight.numel()
    assert w < a < 2 * w
    assert _activation_route(a, layer.weight, weight_passes=2) and not _activation_route(a, layer.weight)
    layer.weight.requires_grad_(not freeze_weight)
    ref_layer, ref_bn = copy.deepcopy(layer), copy.deepcopy(bn)
    expected = ref_bn(ref_layer(x))
    out = _tune_call(layer, bn, x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(expected)
    params = [p for p in _params(layer, bn) if p.requires_grad]
    ref_params = [p for p in _params(ref_layer, ref_bn) if p.requires_grad]
    got = torch.autograd.grad(out, [x] + params, g)
    want = torch.autograd.grad(expected, [x] + ref_params, g)
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)
    assert decisions == [False, not freeze_weight]  # forward folds; backward scales g iff dL/dw is needed


@pytest.fixture
def kernel_calls(monkeypatch):
    """Which of the tune ops' CPU implementations ran the C++ kernel (True) or the reference (False)."""
    from convbn.ops import tune as tune_ops

    calls = []
    real = tune_ops._kernel
    monkeypatch.setattr(tune_ops, "_kernel", lambda *a: calls.append(real(*a)) or calls[-1])
    return calls


def _native_used(calls, fn, first_only=False) -> bool:
    """Run ``fn``; whether every tune op it called (or only the first: the forward's fold) ran the C++ kernel
    (``False`` if none did)."""
    del calls[:]
    fn()
    assert calls, "no tune op ran on the CPU"
    used = {c is not None for c in (calls[:1] if first_only else calls)}
    assert len(used) == 1, "some ops of one call ran the kernel and some the reference"
    return used.pop()


def test_native_path_applies_exactly_where_documented(kernel_calls):
    from convbn.ops import tune as tune_ops

    cases = {}
    for kind in ("Conv2d", "Conv1d", "Conv3d", "Linear", "ConvTranspose2d"):
        layer, bn, x = make_block(kind, True, True, 1)
        cases[kind] = (layer, bn.eval(), x)

    def fwd_bwd(layer, bn, x):
        return lambda: _tune_call(layer, bn, x.requires_grad_(True)).float().sum().backward()

    with use_extension("extension"):
        for kind, (layer, bn, x) in cases.items():
            assert _native_used(kernel_calls, fwd_bwd(layer, bn, x)) == (kind != "ConvTranspose2d"), kind
        layer, bn, x = cases["Conv2d"]
        assert _native_used(kernel_calls, fwd_bwd(copy.deepcopy(layer).double(), copy.deepcopy(bn).double(),
                                                   x.detach().double()))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the fold is float32 under autocast: the kernel's
            assert _native_used(kernel_calls, fwd_bwd(layer, bn, x))
        # other dtypes, mixed parameter dtypes, non-contiguous weights: the reference
        assert not _native_used(kernel_calls, fwd_bwd(copy.deepcopy(layer).to(torch.bfloat16),
                                                      copy.deepcopy(bn).to(torch.bfloat16),
                                                      x.detach().to(torch.bfloat16)))
        # (a float64 BN on a float32 conv: the fold's inputs mix dtypes; backward's refold/epilogue get float32
        # vectors and may run the kernel)
        assert not _native_used(kernel_calls, fwd_bwd(layer, copy.deepcopy(bn).double(), x), first_only=True)
        w = layer.weight.detach().transpose(2, 3)
        assert tune_ops._kernel(w, False) is None
    with use_extension("torch"):
        assert not _native_used(kernel_calls, fwd_bwd(layer, bn, x))


@pytest.mark.parametrize("kind,bias,affine,groups", [("Conv2d", True, True, 1), ("Conv2d", False, False, 1),
                                                     ("Conv1d", True, True, 2), ("Linear", False, True, 1)])
@pytest.mark.parametrize("route_name", ROUTES)
def test_native_path_matches_torch_op_path(kind, bias, affine, groups, route_name):
    """The C++ kernels and the references compute the same function and gradients (float32, to
    rounding of invstd); the kernel's scale is gamma * invstd rounded once, bit for bit."""
    from convbn.functions.tune import _scale

    layer, bn, x = make_block(kind, bias, affine, groups)
    bn.eval()
    results = []
    for mode in ("extension", "torch"):
        xi = x.clone().requires_grad_(True)
        with use_extension(mode), tune_route(route_name):
            out = _tune_call(layer, bn, xi)
            g = torch.randn_like(out, generator=torch.Generator().manual_seed(0))
            results.append((out,) + torch.autograd.grad(out, [xi] + _params(layer, bn), g))
    for a, b in zip(*results):
        assert_close_rel(a, b, 2e-6)
    gamma = bn.weight if affine else None
    with torch.no_grad(), use_extension("extension"):
        _, invstd, _, scale, _ = torch.ops.convbn.tune_fold(layer.weight, layer.bias, bn.running_mean,
                                                            bn.running_var, gamma, bn.bias if affine else None,
                                                            bn.eps, groups, False, False)
    assert torch.equal(scale, _scale(gamma, invstd))
    torch.testing.assert_close(invstd, torch.rsqrt(bn.running_var + bn.eps), rtol=2e-7, atol=0)


def test_native_backward_with_create_graph_stays_differentiable():
    layer, bn, x = make_block("Conv2d", True, True, 1)
    bn.eval()
    ref_layer, ref_bn = copy.deepcopy(layer), copy.deepcopy(bn)
    with use_extension("extension"):
        out = _tune_call(layer, bn, x)
        (gw,) = torch.autograd.grad(out.square().sum(), [layer.weight], create_graph=True)
        gw.square().sum().backward()
    (gw_ref,) = torch.autograd.grad(ref_bn(ref_layer(x)).square().sum(), [ref_layer.weight], create_graph=True)
    gw_ref.square().sum().backward()
    assert_close_rel(gw, gw_ref, 2e-5)
    assert_close_rel(bn.weight.grad, ref_bn.weight.grad, 1e-4)


@pytest.mark.parametrize("transposed", [False, True])
def test_tune_ops_pass_opcheck(backend, transposed):
    """Schemas and fake kernels are what torch.compile relies on (the same ops run eagerly)."""
    kind = "ConvTranspose2d" if transposed else "Conv2d"
    layer, bn, _ = make_block(kind, True, True, 2)
    w, b = layer.weight.detach(), layer.bias.detach()
    rm, rv, gamma, beta = bn.running_mean, bn.running_var, bn.weight.detach(), bn.bias.detach()
    c = rm.shape[0]
    scale, invstd, neg_mean = gamma * torch.rsqrt(rv + bn.eps), torch.rsqrt(rv + bn.eps), -rm
    gw, gb = torch.randn_like(w), torch.randn(c)
    cases = [(torch.ops.convbn.tune_fold.default, (w, b, rm, rv, gamma, beta, bn.eps, 2, transposed, fold))
             for fold in (True, False)]
    cases.append((torch.ops.convbn.tune_fold.default, (w, None, rm, rv, None, None, bn.eps, 2, transposed, True)))
    cases.append((torch.ops.convbn.tune_refold.default, (w, scale, 2, transposed)))
    for activation in (False, True):
        for needs in ((True, True, True, True), (False, False, True, False), (True, False, False, False)):
            cases.append((torch.ops.convbn.tune_epilogue.default,
                          (gw, gb, w, scale, b, neg_mean, invstd, 2, transposed, activation, *needs)))
    for op, args in cases:
        torch.library.opcheck(op, args)
