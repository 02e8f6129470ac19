"""convbn composes with what training pipelines already use: torch.compile, autocast and low-precision
parameters, channels_last, activation checkpointing, and state_dict / optimizer checkpoints."""

import contextlib
import copy
import inspect
import io
import statistics

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import convbn
from conftest import assert_close_rel, calibrate_bn, frozen_reference, randomize_all_bn
from layer_cases import MixedBlocksNet

HAS_TRAIN_VARIANTS = "recompute" in inspect.signature(convbn.convert).parameters
needs_train_variants = pytest.mark.skipif(
    not HAS_TRAIN_VARIANTS, reason="convbn.convert(model, 'train', recompute=/fission=) not available yet")


def net(seed=0):
    torch.manual_seed(seed)
    return randomize_all_bn(MixedBlocksNet(), seed)


def out_and_grads(model, x, g=None):
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    out = model(x)
    g = torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype) if g is None else g.to(out.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [x] + params, g)
    return [out] + list(grads)


def assert_all_close(got, expected, rel, what):
    for i, (a, b) in enumerate(zip(got, expected)):
        part = "output" if i == 0 else "input grad" if i == 1 else f"param grad {i - 2}"
        assert_close_rel(a, b, rel, f"{what} [{part}]")


# --------------------------------------------------------------------------- torch.compile
@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_tune_compiles_fullgraph_with_eager_outputs_and_gradients():
    model = convbn.convert(net(), "tune").train()
    x = torch.randn(4, 3, 16, 16)
    eager = out_and_grads(model, x)
    compiled = out_and_grads(torch.compile(model, fullgraph=True), x)
    assert_all_close(compiled, eager, 2e-5, "compiled tune vs eager tune")
    assert_all_close(compiled, out_and_grads(frozen_reference(model), x), 2e-5, "compiled tune vs eval")


@pytest.mark.slow
def test_compiled_model_follows_mode_switches():
    """Mode is read at trace time; dynamo must guard on it and recompile when convert() switches."""
    model = convbn.convert(net(), "tune").train()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 16, 16)
    for mode in ("tune", "train", "eval", "tune"):
        convbn.convert(model, mode)
        expected = (frozen_reference(model) if mode != "train" else copy.deepcopy(model))(x)
        assert_close_rel(compiled(x), expected, 2e-5, f"compiled after switching to {mode}")


@pytest.mark.slow
def test_compiled_tune_still_refuses_a_hook_that_replaces_the_conv_output():
    # Eager tune raises ConvBNError here (test_api); compiled tune must not silently return
    # 2 * bn(conv(x)) instead of bn(2 * conv(x)).
    model = convbn.convert(net(), "tune")
    model.conv1.register_forward_hook(lambda m, i, o: o * 2)
    ref = frozen_reference(model)
    x = torch.randn(2, 3, 16, 16)
    try:
        out = torch.compile(model)(x)
    except Exception as e:  # dynamo wraps user errors; any clear refusal is fine
        assert "not the output of `conv1`" in str(e)
        return
    assert_close_rel(out, ref(x), 2e-5, "compiled tune with an output-replacing hook")


@pytest.mark.slow
@needs_train_variants
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-3), (torch.float64, 1e-9)], ids=["float32", "float64"])
@pytest.mark.parametrize("variant", [{"recompute": True}, {"fission": True}], ids=["recompute", "fission"])
def test_train_variants_compile_with_eager_outputs_gradients_and_statistics(variant, dtype, rel):
    """float32 tolerance 1e-3: batch-statistics BN backward amplifies round-off of the (differently
    ordered) compiled reductions (~1e-4 measured); float64 shows there is no real difference."""
    model = convbn.convert(net().to(dtype), "train", **variant).train()
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 16, 16, dtype=dtype)
    eager = out_and_grads(model, x)
    compiled = out_and_grads(torch.compile(twin), x)
    # A conv bias followed by a batch-statistics BN has a zero gradient in exact arithmetic (the BN
    # subtracts the mean); both runs return round-off there, so compare those against the gradient scale.
    scale = max(float(g.abs().max()) for g in eager[2:])
    for i, (a, b) in enumerate(zip(compiled, eager)):
        if i >= 2 and float(b.abs().max()) < 1e-4 * scale:
            assert float(a.abs().max()) < 1e-4 * scale, f"param grad {i - 2} should be ~0"
            continue
        assert_close_rel(a, b, rel, f"compiled train {variant} vs eager [{i}]")
    for (name, a), b in zip(twin.named_buffers(), model.buffers()):
        assert_close_rel(a.double(), b.double(), rel, f"running statistic {name}")


# --------------------------------------------------------------------------- autocast / low precision
def rms_rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def _amp_errors(mode, seed):
    torch.manual_seed(seed)
    base, x = MixedBlocksNet(), torch.randn(8, 3, 16, 16)
    calibrate_bn(base, x, seed)
    truth = out_and_grads(frozen_reference(base).double(), x.double())
    g = torch.linspace(-1, 1, truth[0].numel()).view_as(truth[0])
    ev, other = convbn.convert(copy.deepcopy(base), "eval"), convbn.convert(copy.deepcopy(base), mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e, o = out_and_grads(ev, x, g), out_and_grads(other, x, g)
    assert e[0].dtype == o[0].dtype == torch.bfloat16
    return ([rms_rel(a, t) for a, t in zip(e, truth)], [rms_rel(a, t) for a, t in zip(o, truth)],
            [rms_rel(a, b) for a, b in zip(o, e)])


@pytest.mark.parametrize("route", ["auto", "weight", "activation"])
def test_bf16_autocast_tune_error_is_no_worse_than_eval_under_the_same_autocast(route):
    """Error measure: RMS relative error against float64 eval. bf16 has 8 mantissa bits, so eval under
    autocast is off by ~4e-3 (output) / ~3e-2 (gradients); tune must be within 1.25x of that, and
    tune-vs-eval (two independent roundings) within 2x of eval's own error."""
    if route != "auto" and _tune_routes() is contextlib.nullcontext:
        pytest.skip("this convbn has a single tune route")
    with _tune_routes()(route) if route != "auto" else contextlib.nullcontext():
        e_err, t_err, tv_err = zip(*[_amp_errors("tune", s) for s in range(3)])
    for k, what in ((0, "output"), (slice(1, None), "gradients")):
        e = statistics.mean(statistics.median(v[k]) if isinstance(k, slice) else v[k] for v in e_err)
        t = statistics.mean(statistics.median(v[k]) if isinstance(k, slice) else v[k] for v in t_err)
        tv = statistics.mean(statistics.median(v[k]) if isinstance(k, slice) else v[k] for v in tv_err)
        assert t <= 1.25 * e, f"bf16 {what}: tune error {t:.2e} vs eval's {e:.2e}"
        assert tv <= 2.0 * e, f"bf16 {what}: tune-vs-eval {tv:.2e} vs eval's own error {e:.2e}"


def _tune_routes():
    try:
        from convbn.functions.tune import tune_route
    except ImportError:  # a single route
        return contextlib.nullcontext
    return tune_route


def test_bf16_autocast_fold_is_computed_in_float32():
    """Under autocast tune's weight route must equal the deploy fold (float32 math, cast once to
    bf16), not a fold done in bf16 (which would round scale and weight before multiplying)."""
    model = net()
    x = torch.randn(4, 3, 16, 16)
    deployed = convbn.deploy(model, example_inputs=x)  # example_inputs: also fold Linear->BN1d
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deployed.modules())
    tuned = convbn.convert(model, "tune").eval()
    route = _tune_routes()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad(), route("weight"):
        assert_close_rel(tuned(x).float(), deployed(x).float(), 1e-6, "tune vs float32 fold under autocast")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["tune", "deploy"])
def test_low_precision_parameters_fold_in_float32(dtype, mode):
    """bf16/fp16 parameters: RMS relative error vs float64 eval, averaged over 3 seeds (a single
    seed is dominated by which ReLU masks flip), within 1.25x of plain eval in the same dtype."""
    errs = {"eval": [], mode: []}
    for seed in range(3):
        torch.manual_seed(seed)
        base, x = MixedBlocksNet(), torch.randn(8, 3, 16, 16)
        calibrate_bn(base, x, seed)
        truth = out_and_grads(frozen_reference(base).double(), x.double())
        other = convbn.deploy(copy.deepcopy(base).to(dtype), example_inputs=x.to(dtype)) if mode == "deploy" \
            else convbn.convert(copy.deepcopy(base).to(dtype), "tune")
        assert all(p.dtype == dtype for p in other.parameters())
        for name, m in (("eval", frozen_reference(base).to(dtype)), (mode, other)):
            res = out_and_grads(m, x.to(dtype))
            assert res[0].dtype == dtype
            n = 2 if mode == "deploy" else len(res)  # deploy's parameters are the folded ones
            errs[name].append([rms_rel(a, t) for a, t in zip(res[:n], truth[:n])])
    for k, what in ((0, "output"), (1, "input gradient"), (slice(2, None), "parameter gradients")):
        if mode == "deploy" and k not in (0, 1):
            continue
        e, o = (statistics.mean(statistics.median(v[k]) if isinstance(k, slice) else v[k] for v in errs[name])
                for name in ("eval", mode))
        assert o <= 1.25 * e, f"{dtype} {mode} {what}: error {o:.2e} vs eval's {e:.2e}"


# --------------------------------------------------------------------------- channels_last
class Net3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv3d(3, 8, 3, padding=1, groups=1), nn.BatchNorm3d(8)
        self.up, self.bn_up = nn.ConvTranspose3d(8, 4, 2, stride=2, groups=2), nn.BatchNorm3d(4)

    def forward(self, x):
        return self.bn_up(self.up(torch.relu(self.bn(self.conv(x)))))


@pytest.mark.parametrize("mode", ["tune", "eval", "deploy"])
@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_inputs_and_weights(mode, dims):
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    model = net() if dims == 2 else randomize_all_bn(Net3d())
    x = torch.randn(4, 3, *([12] * dims)).contiguous(memory_format=fmt)
    model = model.to(memory_format=fmt)
    ref = frozen_reference(model)
    converted = convbn.deploy(model).train() if mode == "deploy" else convbn.convert(model, mode).train()
    got, expected = out_and_grads(converted, x), out_and_grads(ref, x)
    if mode == "deploy":  # folded parameters: only the output and the input gradient are comparable
        got, expected = got[:2], expected[:2]
    assert_all_close(got, expected, 3e-5, f"channels_last {mode}")
    if dims == 3:  # the model output is a conv block output: its layout follows the input's
        assert got[0].is_contiguous(memory_format=fmt) == expected[0].is_contiguous(memory_format=fmt)
    assert got[1].is_contiguous(memory_format=fmt) == expected[1].is_contiguous(memory_format=fmt), "input grad layout"


# --------------------------------------------------------------------------- activation checkpointing
@pytest.mark.parametrize("mode", ["tune", "eval"])
def test_activation_checkpointing_recomputes_converted_blocks(mode):
    model = convbn.convert(net(), mode).train()
    ref = frozen_reference(model)

    def run(m):
        def f(x):
            x = checkpoint(m.stem, x, use_reentrant=False)
            y = checkpoint(lambda t: torch.relu(m.bn1(m.conv1(t))), x, use_reentrant=False)
            return (y.sum((2, 3)) ** 2).sum()
        return f

    x = torch.randn(2, 3, 16, 16)
    got = torch.autograd.grad(run(model)(x), list(model.parameters()), allow_unused=True)
    expected = torch.autograd.grad(run(ref)(x), list(ref.parameters()), allow_unused=True)
    for a, b in zip(got, expected):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close_rel(a, b, 2e-5, "checkpointed gradient")


# --------------------------------------------------------------------------- checkpoints
def _modes():
    modes = [("train", {}), ("eval", {}), ("tune", {})]
    if HAS_TRAIN_VARIANTS:
        modes += [("train", {"recompute": True}), ("train", {"fission": True})]
    return modes


@pytest.mark.parametrize("mode,kw", _modes(), ids=lambda v: str(v))
def test_state_dict_round_trips_between_every_mode_and_the_plain_model(mode, kw):
    plain_keys = list(net().state_dict())
    converted = convbn.convert(net(1), mode, **kw)
    buf = io.BytesIO()
    torch.save(converted.state_dict(), buf)
    buf.seek(0)
    plain = net(2)
    result = plain.load_state_dict(torch.load(buf, weights_only=True))
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), converted.state_dict().values()))
    # and the other way: a plain checkpoint into a converted model, which keeps its mode
    result = converted.load_state_dict(net(3).state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert list(converted.state_dict()) == plain_keys
    assert convbn.report(converted).requested_mode.startswith(mode)
    x = torch.randn(2, 3, 16, 16)
    if mode in ("eval", "tune"):
        assert_close_rel(converted.train()(x), frozen_reference(net(3))(x), 2e-5, "after loading a plain checkpoint")


def test_optimizer_state_survives_mode_switches():
    """Parameters are the same objects in every mode: an optimizer keeps its state (and a saved
    optimizer state_dict loads) across tune -> eval -> tune, and the trajectory equals eval's."""
    model = convbn.convert(net(), "tune").train()
    ref = frozen_reference(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for step, mode in enumerate(("tune", "eval", "tune")):
        convbn.convert(model, mode)
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
        assert all(opt.state[p]["step"] == step + 1 for p in model.parameters())
    saved = copy.deepcopy(opt.state_dict())
    fresh = torch.optim.AdamW(net().parameters(), lr=1e-2)
    fresh.load_state_dict(saved)  # a plain model's optimizer accepts it
    assert len(fresh.state) == len(list(model.parameters()))
    for (name, p), rp in zip(model.named_parameters(), ref.parameters()):
        assert_close_rel(p, rp, 1e-5, name)
