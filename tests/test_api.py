"""convert / revert / report / deploy on whole models, against deep-copied plain PyTorch references."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.utils.prune
from torch import nn

import convbn
from convbn import ConvBNError
from convbn.bench.memory import saved_tensor_bytes
from conftest import assert_close_rel, frozen_reference, randomize_all_bn
from layer_cases import convert_params, make_block


# --------------------------------------------------------------------------- models
class Block(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.layer1 = Block(16, 32, 2)
        self.layer2 = Block(32, 64, 2)
        self.head = nn.Linear(64, 10)
        self.extra = "user attribute"

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head(x.mean((2, 3)))

    def user_method(self):
        return 42


def small_resnet(seed=0):
    torch.manual_seed(seed)
    return randomize_all_bn(SmallResNet(), seed)


def params_grads(model, x):
    out = model(x)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                [p for p in model.parameters()])
    return out, grads


# --------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("kind,bias,affine,groups", convert_params())
def test_tune_equals_eval_for_every_layer_kind(kind, bias, affine, groups):
    layer, bn, x = make_block(kind, bias, affine, groups)
    model = nn.Sequential(layer, bn, nn.ReLU())
    ref = frozen_reference(model)
    convbn.convert(model, "tune")
    assert convbn.report(model).rows[0].status == "converted"
    model.train()  # tune uses running statistics even under train()
    out, grads = params_grads(model, x)
    ref_out, ref_grads = params_grads(ref, x)
    assert_close_rel(out, ref_out, 2e-6, "output")
    for (name, _), g, rg in zip(model.named_parameters(), grads, ref_grads):
        assert_close_rel(g, rg, 3e-5, f"grad {name}")


@pytest.mark.parametrize("kind,bias,affine,groups", convert_params())
def test_deploy_equals_eval_for_every_layer_kind(kind, bias, affine, groups):
    layer, bn, x = make_block(kind, bias, affine, groups)
    model = nn.Sequential(layer, bn)
    expected = frozen_reference(model)(x)
    convbn.convert(model, "deploy", example_inputs=x)
    assert isinstance(model[1], nn.Identity)
    assert_close_rel(model(x), expected, 2e-6, "deploy output")


def test_eval_mode_is_sticky_under_train_and_freezes_statistics():
    model = small_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    ref = frozen_reference(model)
    convbn.convert(model, "eval").train()
    x = torch.randn(4, 3, 16, 16)
    out, grads = params_grads(model, x)
    ref_out, ref_grads = params_grads(ref, x)
    assert_close_rel(out, ref_out, 1e-6)
    for g, rg in zip(grads, ref_grads):
        assert_close_rel(g, rg, 1e-6)
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_small_resnet_tune_equals_eval_and_one_optimizer_step_matches():
    model = small_resnet()
    ref = frozen_reference(model)
    convbn.convert(model, "tune").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    for _ in range(2):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for (name, p), rp in zip(model.named_parameters(), ref.parameters()):
        assert_close_rel(p, rp, 1e-5, name)


def test_train_mode_is_plain_pytorch_and_switching_keeps_stats_updating_only_in_train():
    model = small_resnet()
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 16, 16)
    convbn.convert(model, "train").train()
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(model(x), ref.train()(x))
    stats = model.stem[1].running_mean.clone()
    convbn.convert(model, "tune")
    model(x).sum().backward()
    assert torch.equal(model.stem[1].running_mean, stats), "tune must not update running statistics"
    convbn.convert(model, "train")
    model(x)
    assert not torch.equal(model.stem[1].running_mean, stats), "train must update running statistics"
    assert model.stem[1].num_batches_tracked.item() == 102  # 100 (fixture) + ref-free: two train forwards


# --------------------------------------------------------------------------- the model stays the user's
def test_model_identity_state_dict_names_and_parameter_objects_are_unchanged():
    model = small_resnet()
    keys = list(model.state_dict().keys())
    params = [(n, id(p)) for n, p in model.named_parameters()]
    buffers = [(n, id(b)) for n, b in model.named_buffers()]
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    for mode in ("eval", "tune", "train", "tune"):
        out = convbn.convert(model, mode)
        assert out is model and type(model) is SmallResNet
        assert model.extra == "user attribute" and model.user_method() == 42
        assert list(model.state_dict().keys()) == keys
        assert [(n, id(p)) for n, p in model.named_parameters()] == params
        assert [(n, id(b)) for n, b in model.named_buffers()] == buffers
    model(torch.randn(2, 3, 16, 16))
    assert convbn.revert(model) is model
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert "_convbn_state" not in model.__dict__
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), f"{k} changed"


@pytest.mark.parametrize("mode", ["tune", "eval"])
def test_forward_hooks_fire_and_see_what_they_see_in_plain_pytorch(mode):
    model = small_resnet()
    seen = {}
    model.stem[0].register_forward_hook(lambda m, i, o: seen.__setitem__("conv", o.clone()))
    model.stem[1].register_forward_hook(lambda m, i, o: seen.__setitem__("bn", (i[0].clone(), o.clone())))
    x = torch.randn(2, 3, 16, 16)
    ref = frozen_reference(model)
    expected_conv = ref.stem[0](x)
    expected_block = ref.stem[1](expected_conv)
    expected = ref(x)
    convbn.convert(model, mode)
    assert_close_rel(model(x), expected, 1e-6)
    # a hook observing the conv output makes that block run unfused while it is registered
    assert_close_rel(seen["conv"], expected_conv, 1e-6)
    assert_close_rel(seen["bn"][0], expected_conv, 1e-6)
    assert_close_rel(seen["bn"][1], expected_block, 1e-6)


@pytest.mark.parametrize("hook", [lambda m, i, o: o * 2, lambda m, i, o: o.mul_(2)], ids=["replace", "in-place"])
def test_a_hook_that_changes_the_conv_output_is_honoured(hook):
    model = small_resnet()
    ref = frozen_reference(model)
    ref.stem[0].register_forward_hook(hook)
    x = torch.randn(2, 3, 16, 16)
    convbn.convert(model, "tune")
    model.stem[0].register_forward_hook(hook)
    assert_close_rel(model(x), ref(x), 1e-6)


def test_a_norm_pre_hook_that_changes_its_input_in_place_is_honoured():
    model = small_resnet()
    ref = frozen_reference(model)
    x = torch.randn(2, 3, 16, 16)
    for m in (ref, model):
        if m is model:
            convbn.convert(model, "tune")
        m.stem[1].register_forward_pre_hook(lambda mod, i: i[0].add_(1.0))
    assert_close_rel(model(x), ref(x), 1e-6)


SWITCHES = {"skip_bn": False, "scale_in_place": False}  # module-level: torch.fx bakes them in, convbn watches none


class SometimesSkips(nn.Module):
    """Branches no trace takes: a global switch (seen by fx at trace time only) skips the BN or scales the conv
    output in place; an instance attribute set after conversion does the same."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.skip_bn = False

    def forward(self, x):
        y = self.conv(x)
        if SWITCHES["scale_in_place"]:
            y.mul_(2)
        if self.skip_bn or SWITCHES["skip_bn"]:
            return y
        return self.bn(y)


def _converted_sometimes_skips():
    model = randomize_all_bn(SometimesSkips())
    convbn.convert(model, "tune")
    assert convbn.report(model).rows[0].status == "converted"
    return model


@pytest.mark.parametrize("switch,match", [("skip_bn", "was not passed to `bn`"),
                                          ("scale_in_place", "modified in place")])
def test_a_branch_no_trace_saw_raises_instead_of_a_wrong_answer(monkeypatch, switch, match):
    model = _converted_sometimes_skips()
    x = torch.randn(2, 3, 8, 8)
    monkeypatch.setitem(SWITCHES, switch, True)
    with pytest.raises(ConvBNError, match=match):
        model(x)
    monkeypatch.setitem(SWITCHES, switch, False)
    assert_close_rel(model(x), frozen_reference(model)(x), 1e-6)  # the failed forward leaves no stale state


def test_an_attribute_switched_after_conversion_runs_the_block_unfused():
    model = _converted_sometimes_skips()
    x = torch.randn(2, 3, 8, 8)
    ref = frozen_reference(model)
    model.skip_bn = ref.skip_bn = True
    assert_close_rel(model(x), ref(x), 1e-6)
    assert "skip_bn" in model.bn.forward.block.fallback_reason
    model.skip_bn = ref.skip_bn = False  # switched back: fused again, still equal
    assert_close_rel(model(x), ref(x), 1e-6)


def test_calling_a_converted_conv_outside_its_owner_is_plain_pytorch():
    model = small_resnet()
    x = torch.randn(2, 3, 16, 16)
    expected = model.stem[0](x)
    convbn.convert(model, "tune")
    assert_close_rel(model.stem[0](x), expected, 1e-6)  # a feature extractor calling the conv directly
    assert_close_rel(model(x), frozen_reference(model)(x), 1e-6)


def test_deepcopy_pickle_save_load_and_to_dtype_work_on_a_converted_model():
    model = small_resnet()
    x = torch.randn(2, 3, 16, 16)
    expected = frozen_reference(model)(x)
    convbn.convert(model, "tune")
    clone = copy.deepcopy(model)
    assert_close_rel(clone(x), expected, 1e-6)
    convbn.convert(clone, "train")  # the copy's blocks are its own
    assert convbn.report(model).requested_mode == "tune"
    assert_close_rel(model(x), expected, 1e-6)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert_close_rel(loaded(x), expected, 1e-6)
    assert_close_rel(pickle.loads(pickle.dumps(model))(x), expected, 1e-6)
    model.to(torch.float64)
    assert model(x.double()).dtype == torch.float64
    assert_close_rel(model(x.double()), frozen_reference(model)(x.double()), 1e-12)


def test_checkpoint_round_trip_between_plain_and_converted_models():
    model, plain = small_resnet(0), small_resnet(1)
    convbn.convert(model, "tune")
    missing, unexpected = plain.load_state_dict(model.state_dict())
    assert not missing and not unexpected
    missing, unexpected = model.load_state_dict(small_resnet(2).state_dict())
    assert not missing and not unexpected


def test_deploy_state_dict_has_folded_conv_and_no_bn_keys_and_revert_raises():
    model = small_resnet()
    x = torch.randn(2, 3, 16, 16)
    expected = frozen_reference(model)(x)
    convbn.convert(model, "deploy")
    keys = set(model.state_dict())
    assert "stem.0.bias" in keys and not any(k.startswith("stem.1.") for k in keys)
    assert model.stem[0].weight.requires_grad and model.stem[0].bias.requires_grad
    assert_close_rel(model(x), expected, 2e-6)
    with pytest.raises(ConvBNError, match="deployed"):
        convbn.revert(model)
    with pytest.raises(RuntimeError, match="Missing key"):  # loud, never a double-applied BN
        small_resnet().load_state_dict(model.state_dict())
    assert convbn.convert(model, "tune").stem[0] is model.stem[0]
    assert {r.mode for r in convbn.report(model)} == {"deploy"}


def test_deploy_returns_a_folded_copy_and_leaves_the_original_untouched():
    model = small_resnet().eval()
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    shipped = convbn.deploy(model)
    assert shipped is not model and isinstance(shipped.stem[1], nn.BatchNorm2d) is False
    assert isinstance(model.stem[1], nn.BatchNorm2d) and "_convbn_state" not in model.__dict__
    assert_close_rel(shipped(x), expected, 2e-6)


# --------------------------------------------------------------------------- filter_fn and errors
def test_filter_fn_restricts_blocks_and_report_says_why():
    model = small_resnet()
    convbn.convert(model, "tune", filter_fn=lambda m, name: name.startswith("layer1."))
    rows = {r.bn: r for r in convbn.report(model)}
    assert rows["layer1.bn1"].status == "converted" and rows["layer1.bn1"].mode == "tune"
    assert rows["stem.1"].status == "skipped" and rows["stem.1"].reason == "not selected by filter_fn"
    assert "forward" not in model.stem[1].__dict__


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {id(m): dict(m.__dict__.get("_forward_hooks", {})) for m in model.modules()},
            [m.__dict__.get("forward") for m in model.modules()])


def _assert_unchanged(model, state):
    sd, hooks, forwards = state
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    assert [m.__dict__.get("forward") for m in model.modules()] == forwards
    assert {id(m): dict(m.__dict__.get("_forward_hooks", {})) for m in model.modules()} == hooks


@pytest.mark.parametrize("bad,exc,match", [
    ({"mode": "tun"}, ConvBNError, "did you mean 'tune'"),
    ({"mode": 3}, ConvBNError, "unknown mode"),
    ({"filter_fn": "backbone"}, TypeError, "filter_fn must be callable"),
    ({"filter_fn": lambda m, n: 1 / 0}, ConvBNError, "filter_fn raised ZeroDivisionError"),
    ({"filter_fn": lambda m, n: "yes"}, TypeError, "must return a bool"),
    ({"example_inputs": torch.randn(2, 5, 16, 16)}, ConvBNError, "running the model on example_inputs failed"),
    ({"example_inputs": "an image"}, TypeError, "example_inputs must be"),
])
def test_bad_arguments_raise_clear_errors_and_leave_the_model_unchanged(bad, exc, match):
    model = small_resnet()
    convbn.convert(model, "eval")
    state = _state(model)
    kw = {"mode": "tune", **bad}
    mode = kw.pop("mode")
    with pytest.raises(exc, match=match):
        convbn.convert(model, mode, **kw)
    _assert_unchanged(model, state)
    assert convbn.report(model).requested_mode == "eval"


def test_not_a_module_is_a_type_error_and_a_torchscript_wrapper_a_convbn_error():
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got list"):
        convbn.convert([nn.Conv2d(1, 1, 1)], "tune")
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)))
    with pytest.raises(ConvBNError, match="TorchScript"):
        convbn.convert(scripted, "tune")


def test_failure_mid_conversion_restores_every_module(monkeypatch):
    import convbn.api as api
    model = small_resnet()
    convbn.convert(model, "eval")
    state = _state(model)
    calls = {"n": 0}
    real = api.install

    def flaky(block):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected failure")
        real(block)

    monkeypatch.setattr(api, "install", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        convbn.convert(model, "tune")
    _assert_unchanged(model, state)
    assert convbn.report(model).requested_mode == "eval"


# --------------------------------------------------------------------------- skip / fallback reasons
class Shared(nn.Module):
    """conv reused twice; a BN applied twice; a conv whose output also feeds an add."""

    def __init__(self):
        super().__init__()
        self.reused = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.shared_bn = nn.BatchNorm2d(4)
        self.conv2, self.conv3 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.tee = nn.Conv2d(4, 4, 1)
        self.bn_tee = nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.bn_a(self.reused(x)) + self.bn_b(self.reused(x))
        b = self.shared_bn(self.conv2(a)) + self.shared_bn(self.conv3(a))
        t = self.tee(b)
        return self.bn_tee(t) + t


class MyConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class StockSubclassConv(nn.Conv2d):
    pass


def test_structural_reasons_fall_back_to_eval_with_the_reason():
    model = randomize_all_bn(Shared())
    ref = frozen_reference(model)
    convbn.convert(model, "tune")
    rows = {r.bn: r for r in convbn.report(model)}
    assert "called 2 times" in rows["bn_a"].reason and rows["bn_a"].status == "fallback"
    assert "`shared_bn` is called 2 times" in rows["shared_bn"].reason
    assert "also used by" in rows["bn_tee"].reason and rows["bn_tee"].mode == "eval"
    x = torch.randn(2, 4, 6, 6)
    assert_close_rel(model.train()(x), ref(x), 1e-6)


def test_custom_forward_subclasses_and_stock_subclasses():
    model = nn.Sequential(MyConv(3, 4, 3), nn.BatchNorm2d(4), StockSubclassConv(4, 4, 1), nn.BatchNorm2d(4))
    randomize_all_bn(model)
    ref = frozen_reference(model)
    convbn.convert(model, "tune")
    rows = convbn.report(model).rows
    assert rows[0].status == "fallback" and "overrides forward()" in rows[0].reason
    assert rows[1].status == "converted" and rows[1].kind == "Conv2d->BatchNorm2d"
    x = torch.randn(2, 3, 8, 8)
    assert_close_rel(model.train()(x), ref(x), 1e-6)


def test_bn_without_running_stats_and_corrupt_running_var_are_skipped():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[3].running_var[1] = float("nan")
        model[5].running_var[2] = -1.0
    convbn.convert(model, "tune")
    rows = convbn.report(model).rows
    assert rows[0].status == "skipped" and "track_running_stats=False" in rows[0].reason
    assert rows[1].status == "skipped" and "non-finite" in rows[1].reason
    assert rows[2].status == "skipped" and "negative running_var" in rows[2].reason
    assert rows[3].status == "converted"
    assert "forward" not in model[1].__dict__  # stays plain PyTorch: batch statistics
    convbn.convert(model, "train")  # train needs no running statistics
    assert all(r.status == "converted" for r in convbn.report(model))


def test_bn_that_follows_no_layer_is_frozen_in_eval_and_tune():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    randomize_all_bn(model)
    ref = frozen_reference(model)
    convbn.convert(model, "tune")
    row = convbn.report(model).rows[0]
    assert row.conv is None and row.mode == "eval" and "not the output of a Conv/Linear" in row.reason
    x = torch.randn(2, 3, 8, 8)
    assert_close_rel(model.train()(x), ref(x), 1e-6)


class LinearHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_linear_bn1d_on_2d_input_is_folded():
    model = randomize_all_bn(LinearHead())
    ref = frozen_reference(model)
    x = torch.randn(7, 6)
    convbn.convert(model, "tune", example_inputs=x)
    assert convbn.report(model).rows[0].status == "converted"
    out, grads = params_grads(model.train(), x)
    ref_out, ref_grads = params_grads(ref, x)
    assert_close_rel(out, ref_out, 1e-6)
    for g, rg in zip(grads, ref_grads):
        assert_close_rel(g, rg, 1e-5)


def test_linear_bn1d_on_3d_input_is_never_folded_wrongly():
    model = LinearHead()
    model.fc, model.bn = nn.Linear(5, 5), nn.BatchNorm1d(4)  # BN1d on [N, 4, 5]: normalizes axis 1
    randomize_all_bn(model)
    x = torch.randn(3, 4, 5)
    ref = frozen_reference(model)
    # with example_inputs: the plan knows the rank and refuses
    convbn.convert(model, "tune", example_inputs=x)
    row = convbn.report(model).rows[0]
    assert row.status in ("fallback", "skipped")
    assert_close_rel(model(x), ref(x), 1e-6)
    # same features on both axes: structurally foldable-looking, must still not fold
    sq = LinearHead()
    sq.fc, sq.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)
    randomize_all_bn(sq)
    x = torch.randn(3, 4, 4)
    ref = frozen_reference(sq)
    convbn.convert(sq, "tune")  # no example_inputs: converted, checked at run time
    assert_close_rel(sq(x), ref(x), 1e-6)
    assert "ran unfused" in sq.bn.forward.block.fallback_reason
    convbn.convert(sq, "deploy")  # deploy cannot check at run time: refuses without example_inputs
    assert "example_inputs" in convbn.report(sq).rows[0].reason


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            y = y * 2
        return self.bn2(self.conv2(torch.nn.functional.dropout(y, 0.5, self.training)))


def test_untraceable_model_converts_with_example_inputs_and_errors_clearly_without():
    model = randomize_all_bn(Untraceable())
    with pytest.raises(ConvBNError, match="example_inputs"):
        convbn.convert(model, "tune")
    x = torch.randn(2, 3, 8, 8)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    convbn.convert(model, "tune", example_inputs=(x,))
    assert torch.equal(torch.get_rng_state(), rng), "the trace must not consume the RNG"
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items()), "nor change buffers"
    report = convbn.report(model)
    # only a run on example_inputs proved the pairs: another input could take a branch no run-time check sees
    assert report.method == "dynamic trace" and [r.status for r in report] == ["fallback", "fallback"]
    assert all("torch.fx cannot trace" in r.reason for r in report)
    ref = frozen_reference(model).eval()
    assert_close_rel(model.eval()(x), ref(x), 1e-6)
    # switching modes later needs the inputs again: convbn keeps no stale analysis of an earlier trace
    with pytest.raises(ConvBNError, match="example_inputs"):
        convbn.convert(model, "eval")
    assert convbn.report(model).requested_mode == "tune", "a failed convert leaves the model as it was"
    convbn.convert(model, "eval", example_inputs=(x,))
    assert convbn.report(model).method == "dynamic trace"


def test_dynamic_trace_sees_other_users_that_fx_would():
    model = randomize_all_bn(Shared())
    x = torch.randn(2, 4, 6, 6)
    dyn = convbn.analysis._dynamic_analysis(model, x)
    reasons = {c.bn_name: c.reason for c in dyn.candidates}
    assert "called 2 times" in reasons["bn_a"] and "also used by" in reasons["bn_tee"]


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(3, 4, 3, padding=2, padding_mode="circular", dilation=2),
    nn.Conv1d(3, 4, 4, padding="same", padding_mode="replicate"),
    nn.Conv2d(3, 4, (4, 3), padding="same", dilation=(1, 2)),
    nn.Conv3d(3, 4, 2, padding="valid"),
    nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),  # depthwise
])
def test_padding_modes_strings_and_depthwise(conv):
    n = conv.weight.dim() - 2
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[n](4)
    model = randomize_all_bn(nn.Sequential(conv, bn))
    ref = frozen_reference(model)
    x = torch.randn(2, conv.in_channels, *([7] * n))
    convbn.convert(model, "tune")
    out, grads = params_grads(model, x)
    ref_out, ref_grads = params_grads(ref, x)
    assert_close_rel(out, ref_out, 2e-6)
    for g, rg in zip(grads, ref_grads):
        assert_close_rel(g, rg, 2e-5)


class WithOutputSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.bn = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.up(x, output_size=[2 * x.shape[2], 2 * x.shape[3]]))


def test_conv_transpose_output_size_argument():
    model = randomize_all_bn(WithOutputSize())
    ref = frozen_reference(model)
    x = torch.randn(2, 4, 5, 5)
    convbn.convert(model, "tune", example_inputs=x)
    assert model(x).shape == (2, 6, 10, 10)
    assert_close_rel(model(x), ref(x), 2e-6)


def test_sync_batchnorm_converts_like_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4))
    randomize_all_bn(model)
    ref = frozen_reference(model)
    convbn.convert(model, "tune")
    assert convbn.report(model).rows[0].kind == "Conv2d->SyncBatchNorm"
    x = torch.randn(2, 3, 8, 8)
    assert_close_rel(model(x), ref(x), 2e-6)


def test_converting_twice_is_idempotent_and_report_is_a_table():
    model = small_resnet()
    convbn.convert(model, "tune")
    first = [r for r in convbn.report(model)]
    convbn.convert(model, "tune")
    assert [r for r in convbn.report(model)] == first
    text = str(convbn.report(model))
    assert "conv" in text.splitlines()[1] and "reason" in text.splitlines()[1]
    assert "7 converted" in text


def test_report_on_a_plain_model_is_a_dry_run():
    model = small_resnet()
    rep = convbn.report(model, "deploy")
    assert not rep.applied and "would do" in rep.summary()
    assert "_convbn_state" not in model.__dict__


def test_report_previews_a_train_variant_and_names_it_as_convert_does():
    model = small_resnet()
    preview = convbn.report(model, "train", recompute=True)
    assert preview.requested_mode == "train+recompute" and not preview.applied
    convbn.convert(model, "train", recompute=True)
    applied = convbn.report(model)
    assert applied.requested_mode == "train+recompute" and [r.mode for r in applied] == [r.mode for r in preview]
    assert convbn.report(model, "train", recompute=True).rows == applied.rows
    for mode, options in (("train", {}), ("train", {"fission": True}), ("tune", {})):
        with pytest.raises(ConvBNError, match="converted to 'train\\+recompute'"):
            convbn.report(model, mode, **options)
    with pytest.raises(ConvBNError, match="cannot be combined"):
        convbn.report(small_resnet(), "train", recompute=True, fission=True)


def test_report_says_when_a_hook_or_an_input_makes_a_converted_block_run_unfused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    convbn.convert(randomize_all_bn(model), "tune")
    assert convbn.report(model).rows[0].status == "converted"
    handle = model[0].register_forward_hook(lambda m, i, o: None)
    (row,) = convbn.report(model).rows
    assert row.status == "fallback" and "a hook on `0`" in row.reason and "without tune's savings" in row.reason
    handle.remove()
    assert convbn.report(model).rows[0].status == "converted"

    lin = convbn.convert(randomize_all_bn(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))), "tune")
    assert convbn.report(lin).rows[0].status == "converted"
    x = torch.randn(4, 5)
    ref = frozen_reference(lin)
    assert_close_rel(lin(x), ref(x), 1e-6)
    assert convbn.report(lin).rows[0].status == "converted"
    x3 = torch.randn(4, 6, 5)  # BatchNorm1d normalizes dim 1 (6 positions), the Linear maps the last dim 5 -> 6
    assert_close_rel(lin(x3), ref(x3), 1e-6)
    row = convbn.report(lin).rows[0]
    assert row.status == "fallback" and "3-D input" in row.reason, row


# --------------------------------------------------------------------------- memory (deterministic)
def test_tune_saves_what_deploy_saves_and_about_half_of_eval():
    model = small_resnet()
    x = torch.randn(16, 3, 32, 32)
    evaluated = convbn.convert(copy.deepcopy(model), "eval")
    deployed = convbn.deploy(model).train()
    tuned = convbn.convert(model, "tune")
    tune_b = saved_tensor_bytes(lambda: tuned(x))
    deploy_b = saved_tensor_bytes(lambda: deployed(x))
    eval_b = saved_tensor_bytes(lambda: evaluated(x))
    assert abs(tune_b / deploy_b - 1) <= 0.005, (tune_b, deploy_b)
    assert tune_b / eval_b <= 0.6, (tune_b, eval_b)


def test_a_conv_whose_weight_a_pre_hook_computes_is_not_folded():
    def pruned(frozen_bn: bool):
        model = small_resnet()
        torch.nn.utils.prune.l1_unstructured(model.stem[0], "weight", amount=0.3)  # (cannot be deep-copied)
        for m in model.modules():
            if frozen_bn and isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return model

    x = torch.randn(2, 3, 16, 16)
    expected = pruned(frozen_bn=True)(x)
    for mode in ("tune", "deploy"):
        m = pruned(frozen_bn=False)
        convbn.convert(m.eval() if mode == "deploy" else m, mode)
        row = next(r for r in convbn.report(m) if r.conv == "stem.0")
        assert row.status == "fallback" and "forward pre-hook" in row.reason
        assert_close_rel(m(x), expected if mode == "tune" else pruned(frozen_bn=True).eval()(x), 1e-5)
