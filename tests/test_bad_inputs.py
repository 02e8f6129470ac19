"""The bad-input table of docs/bad_inputs.md, one test per row, and exception safety: a failure
injected anywhere in a conversion leaves modules, state_dict, parameters and hooks unchanged.

Every row is either a clear error (what, why, how to fix; the model unchanged) or a reported
fallback/skip with a reason -- never a silent wrong answer.
"""

import copy
import inspect

import pytest
import torch
from torch import nn

import convbn
import convbn.api as api
from convbn import ConvBNError
from conftest import assert_close_rel, frozen_reference, randomize_all_bn

HAS_TRAIN_VARIANTS = "recompute" in inspect.signature(convbn.convert).parameters


# --------------------------------------------------------------------------- helpers
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16)
        self.fc, self.bn_fc = nn.Linear(16, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.bn1(self.conv1(x)) + x)
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn_fc(self.fc(x.mean((2, 3))))


def net(seed=0):
    torch.manual_seed(seed)
    return randomize_all_bn(Net(), seed)


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def snapshot(model):
    """Everything a failed conversion must leave as it was."""
    return {
        "modules": [(n, type(m), id(m)) for n, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "params": [(n, id(p)) for n, p in model.named_parameters()],
        "forwards": [m.__dict__.get("forward") for m in model.modules()],
        "hooks": [(dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
                  for m in model.modules()],
        "state_attr": model.__dict__.get("_convbn_state"),
    }


def assert_unchanged(model, snap):
    now = snapshot(model)
    assert now["modules"] == snap["modules"], "modules changed"
    assert now["params"] == snap["params"], "parameter objects changed"
    assert list(now["state"]) == list(snap["state"]), "state_dict keys changed"
    for k, v in now["state"].items():
        assert torch.equal(v, snap["state"][k]), f"{k} changed"
    assert now["forwards"] == snap["forwards"], "instance forwards changed"
    assert now["hooks"] == snap["hooks"], "hooks changed"
    assert now["state_attr"] is snap["state_attr"], "convbn state changed"


def rows(model):
    return {r.bn: r for r in convbn.report(model)}


# --------------------------------------------------------------------------- the table (docs/bad_inputs.md)
@pytest.mark.parametrize("mode,match", [("tun", "did you mean 'tune'"), ("Deploy!", "unknown mode"),
                                        (3, "unknown mode"), (None, "unknown mode")])
def test_row01_unknown_mode(mode, match):
    model = net()
    snap = snapshot(model)
    with pytest.raises(ConvBNError, match=match):
        convbn.convert(model, mode)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("fn", [convbn.convert, convbn.revert, convbn.report, convbn.deploy])
def test_row02_not_a_module(fn):
    args = ("tune",) if fn is convbn.convert else ()
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got dict"):
        fn({"conv": nn.Conv2d(1, 1, 1)}, *args)


def test_row03_torchscript_module():
    with pytest.raises(ConvBNError, match="TorchScript"):
        convbn.convert(torch.jit.script(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))), "tune")


@pytest.mark.parametrize("filter_fn,exc,match", [
    (lambda m, name: {}["missing"], ConvBNError, "filter_fn raised KeyError"),
    (lambda m: True, ConvBNError, "filter_fn raised TypeError"),  # wrong signature
    (lambda m, name: None, TypeError, "must return a bool"),
    ("stem", TypeError, "filter_fn must be callable"),
])
def test_row04_bad_filter_fn(filter_fn, exc, match):
    model = convbn.convert(net(), "eval")
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        convbn.convert(model, "tune", filter_fn=filter_fn)
    assert_unchanged(model, snap)


def test_row05_filter_fn_failing_on_a_later_block_changes_nothing():
    model = convbn.convert(net(), "eval")
    snap = snapshot(model)

    def picky(m, name):
        if name == "conv2":
            raise RuntimeError("cannot decide")
        return True

    with pytest.raises(ConvBNError, match="filter_fn raised RuntimeError: cannot decide"):
        convbn.convert(model, "tune", filter_fn=picky)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("what,make", [("NaN", float("nan")), ("inf", float("inf")), ("negative", -0.5)])
def test_row06_corrupt_running_var_is_skipped_with_reason(what, make):
    model = net()
    with torch.no_grad():
        model.bn1.running_var[3] = make
    convbn.convert(model, "tune")
    row = rows(model)["bn1"]
    assert row.status == "skipped" and row.mode == "train"
    assert ("non-finite" if what != "negative" else "negative running_var") in row.reason
    assert "forward" not in model.bn1.__dict__ and "forward" not in model.conv1.__dict__
    assert rows(model)["bn2"].status == "converted"
    shipped = convbn.deploy(model)  # deploy never folds garbage statistics either
    assert isinstance(shipped.bn1, nn.BatchNorm2d) and rows(shipped)["bn1"].status == "skipped"


def test_row07_bn_without_running_stats_is_skipped_with_reason():
    model = net()
    model.bn2 = nn.BatchNorm2d(16, track_running_stats=False)
    for mode in ("eval", "tune", "deploy"):
        m = convbn.convert(copy.deepcopy(model), mode)
        row = rows(m)["bn2"]
        assert row.status == "skipped" and "track_running_stats=False" in row.reason
    assert rows(convbn.convert(copy.deepcopy(model), "train"))["bn2"].status == "converted"


class Reuse(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn_a, self.bn_b = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.c1, self.c2, self.shared_bn = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.bn_a(self.conv(x)) + self.bn_b(self.conv(x * 2))
        return self.shared_bn(self.c1(a)) - self.shared_bn(self.c2(a))


def test_row08_conv_or_bn_called_twice_falls_back_to_eval_with_reason():
    model = randomize_all_bn(Reuse())
    ref = frozen_reference(model)
    convbn.convert(model, "tune")
    r = rows(model)
    assert r["bn_a"].status == r["bn_b"].status == "fallback" and "`conv` is called 2 times" in r["bn_a"].reason
    assert "`shared_bn` is called 2 times" in r["shared_bn"].reason
    x = torch.randn(2, 3, 6, 6)
    assert_close_rel(model.train()(x), ref(x), 1e-6)
    shipped = convbn.deploy(model)
    assert not any(isinstance(m, nn.Identity) for m in shipped.modules())
    assert_close_rel(shipped(x), ref(x), 1e-6)


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y.mean()


@pytest.mark.parametrize("example", [False, True])
def test_row09_conv_output_with_two_users_falls_back_with_reason(example):
    model = randomize_all_bn(TwoUsers())
    ref = frozen_reference(model)
    x = torch.randn(2, 3, 6, 6)
    convbn.convert(model, "tune", example_inputs=x if example else None)
    row = rows(model)["bn"]
    assert row.status == "fallback" and "also used by" in row.reason and row.mode == "eval"
    assert_close_rel(model.train()(x), ref(x), 1e-6)


class LinearBN3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_row10_linear_bn1d_on_3d_input_is_never_folded():
    model = randomize_all_bn(LinearBN3d())
    x = torch.randn(3, 4, 4)  # BatchNorm1d normalizes axis 1 (length 4), not the Linear's features
    ref = frozen_reference(model)
    tuned = convbn.convert(copy.deepcopy(model), "tune", example_inputs=x)
    assert rows(tuned)["bn"].status == "fallback" and "3-D" in rows(tuned)["bn"].reason
    assert_close_rel(tuned(x), ref(x), 1e-6)
    blind = convbn.convert(copy.deepcopy(model), "tune")  # no example: checked at run time, runs unfused
    assert_close_rel(blind(x), ref(x), 1e-6)
    assert "ran unfused" in blind.bn.forward.block.fallback_reason
    shipped = convbn.deploy(model)  # deploy cannot check at run time: refuses without example_inputs
    assert isinstance(shipped.bn, nn.BatchNorm1d) and "example_inputs" in rows(shipped)["bn"].reason
    assert_close_rel(shipped(x), ref(x), 1e-6)


class DoubledConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class ShiftedBN(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) + 1


def test_row11_custom_conv_or_bn_forward_is_not_folded():
    model = randomize_all_bn(nn.Sequential(DoubledConv(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), ShiftedBN(4)))
    ref = frozen_reference(model)
    convbn.convert(model, "tune")
    r = convbn.report(model).rows
    assert r[0].status == "fallback" and "overrides forward()" in r[0].reason
    assert r[1].status == "skipped" and "overrides forward()" in r[1].reason
    x = torch.randn(2, 3, 6, 6)
    assert_close_rel(model.eval()(x), ref.eval()(x), 1e-6)


def test_row12_forward_patched_on_the_instance_by_another_library():
    model = net()
    conv = model.conv2
    model.conv2.forward = lambda x: nn.Conv2d.forward(conv, x)  # e.g. a profiler's monkeypatch
    convbn.convert(model, "tune")
    row = rows(model)["bn2"]
    assert row.status == "fallback" and "patched on the instance" in row.reason
    assert model.conv2.__dict__["forward"] is not None and not hasattr(model.conv2.forward, "block")


def test_row13_lazy_module_not_initialized():
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4))
    convbn.convert(model, "tune")
    row = convbn.report(model).rows[0]
    assert row.status == "fallback" and "lazy module" in row.reason


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y * 2 if y.sum() > 0 else y


def test_row14_untraceable_model_without_example_inputs():
    model = randomize_all_bn(Untraceable())
    snap = snapshot(model)
    with pytest.raises(ConvBNError, match="Pass example_inputs"):
        convbn.convert(model, "tune")
    assert_unchanged(model, snap)


@pytest.mark.parametrize("example,exc,match", [
    (torch.randn(2, 5, 8, 8), ConvBNError, "running the model on example_inputs failed with RuntimeError"),
    ({"y": torch.randn(2, 3, 8, 8)}, ConvBNError, "unexpected keyword argument"),
    ("image.png", TypeError, "example_inputs must be a Tensor"),
    (42, TypeError, "example_inputs must be a Tensor"),
])
def test_row15_example_inputs_the_forward_rejects(example, exc, match):
    model = convbn.convert(net(), "eval")
    snap = snapshot(model)
    rng = torch.get_rng_state()
    with pytest.raises(exc, match=match):
        convbn.convert(model, "tune", example_inputs=example)
    assert_unchanged(model, snap)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("mode", ["train", "eval", "tune", "deploy"])
def test_row16_converting_an_already_converted_model_is_idempotent(mode):
    model = net()
    convbn.convert(model, mode)
    first = list(convbn.report(model))
    expected = copy.deepcopy(model).eval()(X)
    convbn.convert(model, mode)
    assert list(convbn.report(model)) == first
    assert_close_rel(model.eval()(X), expected, 1e-6)


@pytest.mark.parametrize("mode", ["eval", "tune", "deploy"])
def test_row16b_reconverting_with_example_inputs_finds_the_same_blocks(mode):
    """The dynamic trace of an already-converted model must see the same pairs as of the plain one
    (in tune the BN passes its conv's output object through; that is not a second user)."""
    plain = net()
    expected_rows = [(r.bn, r.mode, r.status) for r in convbn.report(convbn.convert(net(), mode, example_inputs=X))]
    model = convbn.convert(plain, "tune")
    convbn.convert(model, mode, example_inputs=X)
    assert [(r.bn, r.mode, r.status) for r in convbn.report(model)] == expected_rows, str(convbn.report(model))


def test_row17_deploy_report_has_one_row_per_batchnorm():
    model = net()
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    shipped = convbn.deploy(model, example_inputs=X)
    assert len(convbn.report(shipped)) == n_bn, str(convbn.report(shipped))
    convbn.convert(shipped, "tune")  # switching a deployed model: folded blocks stay deployed, once each
    assert len(convbn.report(shipped)) == n_bn, str(convbn.report(shipped))
    assert {r.mode for r in convbn.report(shipped)} == {"deploy"}


def test_row18_revert_after_deploy_raises_and_changes_nothing():
    model = convbn.convert(net(), "deploy")
    snap = snapshot(model)
    with pytest.raises(ConvBNError, match="cannot revert.*deployed.*convbn.deploy"):
        convbn.revert(model)
    assert_unchanged(model, snap)


def test_row19_deploy_of_a_train_mode_model_with_a_single_example():
    """A training loop's model is in train(); shipping it with one example image must work (the
    trace must not need batch statistics: a BatchNorm1d head sees one value per channel)."""
    model = net().train()
    x = X[:1]
    shipped = convbn.deploy(model, example_inputs=x)
    assert model.training and not shipped.training
    assert {r.status for r in convbn.report(shipped)} <= {"converted", "fallback"}
    assert_close_rel(shipped(x), frozen_reference(model).eval()(x), 1e-6)


@pytest.mark.parametrize("mode", ["eval", "tune", "deploy"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_row20_integer_input_is_an_error_in_every_mode_like_plain_pytorch(mode, dtype):
    """Plain PyTorch refuses an integer image ("expected scalar type Long but found Float");
    a converted model must not silently cast it and compute something plain PyTorch would not."""
    model = convbn.deploy(net()) if mode == "deploy" else convbn.convert(net(), mode)
    x = (X * 10).to(dtype)
    with pytest.raises((RuntimeError, TypeError, ValueError)):
        net().eval()(x)
    with pytest.raises((RuntimeError, TypeError, ValueError)):
        model.eval()(x)


@pytest.mark.parametrize("mode", ["tune", "train+recompute", "train+fission"])
def test_row21_hooks_that_replace_or_modify_tensors_are_honoured(mode):
    """A hook observing a tensor inside a block makes that block run unfused while it is registered."""
    hooks = [("conv2", "forward", lambda m, i, o: o.clamp(min=0)), ("bn2", "pre", lambda m, i: i[0].mul_(0.5)),
             ("conv2", "forward", lambda m, i, o: o.add_(1.0))]
    for name, kind, hook in hooks:
        model, ref = net().train(), net().train()
        if mode == "tune":
            ref = frozen_reference(ref)  # BNs frozen, the rest in train()
            convbn.convert(model, "tune")
        else:
            convbn.convert(model, "train", **{mode.split("+")[1]: True})
        for m in (model, ref):
            target = getattr(m, name)
            (target.register_forward_hook if kind == "forward" else target.register_forward_pre_hook)(hook)
        torch.manual_seed(0)
        assert_close_rel(model(X), ref(X), 1e-5, f"{name} {kind} hook")


def test_row22_unbatched_input():
    model = convbn.convert(net(), "tune")
    with pytest.raises((ValueError, RuntimeError), match="batch|4D"):
        model(X[0])
    with pytest.raises((ValueError, RuntimeError)):  # plain PyTorch refuses it too (BatchNorm2d wants 4-D)
        net().eval()(X[0])


def test_row23_model_without_batchnorm_is_a_no_op_with_an_empty_report():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    snap = snapshot(model)
    for mode in ("eval", "tune", "deploy"):
        assert convbn.convert(model, mode) is model
        assert len(convbn.report(model)) == 0
    convbn.revert(model)
    assert_unchanged(model, snap)


def test_row24_parametrized_weight_is_not_deployed():
    model = net()
    torch.nn.utils.parametrizations.weight_norm(model.conv1)
    ref = frozen_reference(model)
    shipped = convbn.deploy(model)
    row = rows(shipped)["bn1"]
    assert row.status == "fallback" and "parametrized" in row.reason
    assert_close_rel(shipped(X), ref.eval()(X), 1e-6)


@pytest.mark.skipif(not HAS_TRAIN_VARIANTS,
                    reason="convbn.convert(model, 'train', recompute=/fission=) not available yet")
@pytest.mark.parametrize("kw,match", [({"mode": "tune", "recompute": True}, "recompute"),
                                      ({"mode": "eval", "fission": True}, "fission"),
                                      ({"mode": "train", "recompute": True, "fission": True}, "cannot be combined"),
                                      ({"mode": "train", "recompute": "yes"}, "recompute")])
def test_row25_bad_train_variant_options(kw, match):
    model = convbn.convert(net(), "eval")
    snap = snapshot(model)
    kw = dict(kw)
    with pytest.raises((ConvBNError, TypeError), match=match):
        convbn.convert(model, kw.pop("mode"), **kw)
    assert_unchanged(model, snap)


# --------------------------------------------------------------------------- exception safety
def changed(model, snap) -> bool:
    try:
        assert_unchanged(model, snap)
    except AssertionError:
        return True
    return False


def _inject(monkeypatch, name, fail_on_call=1, exc=RuntimeError("injected failure"), model=None, snap=None):
    """Make the ``fail_on_call``-th call of ``convbn.api.<name>`` (or ``convbn.icf.<name>`` for
    ``"icf.<name>"``) raise ``exc``; records whether ``model`` differed from ``snap`` at that moment."""
    owner, attr = (api.icf, name[4:]) if name.startswith("icf.") else (api, name)
    real = getattr(owner, attr)
    calls = {"n": 0, "mutated": None}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_on_call:
            if model is not None:
                calls["mutated"] = changed(model, snap)
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, flaky)
    return calls


TARGETS = {"train": ("train", {}), "eval": ("eval", {}), "tune": ("tune", {}), "deploy": ("deploy", {}),
           "train+recompute": ("train", {"recompute": True}), "train+fission": ("train", {"fission": True})}
# (function, failing call, target mode). Before anything changes: analysis and planning. After changes
# were made (the previous blocks uninstalled, some or all of the new ones installed, guards and ICF's root
# hooks installed, some folds applied): every other point -- the test checks the model *was* changed then.
BEFORE_CHANGES = [*[("analyze", 1, t) for t in ("train", "eval", "tune", "deploy")],
                  *[("make_plan", 1, t) for t in ("train", "eval", "tune", "deploy")]]
AFTER_CHANGES = [("install", 3, "eval"), ("install", 3, "tune"), ("install", 4, "train+recompute"),
                 ("install", 4, "train+fission"), ("make_block", 3, "tune"), ("install_guards", 1, "tune"),
                 ("install_guards", 1, "train+recompute"), ("icf.install_root_hooks", 1, "train+fission"),
                 ("apply_fold", 2, "deploy"), ("apply_fold", 3, "deploy")]


@pytest.mark.parametrize("start", ["plain", "eval", "tune"])
@pytest.mark.parametrize("where,call,target", BEFORE_CHANGES + AFTER_CHANGES)
def test_injected_failure_mid_conversion_changes_nothing(monkeypatch, start, target, where, call):
    model = net()
    if start != "plain":
        convbn.convert(model, start)
    snap = snapshot(model)
    report_before = list(convbn.report(model)) if start != "plain" else None
    calls = _inject(monkeypatch, where, call, model=model, snap=snap)
    mode, options = TARGETS[target]
    try:
        convbn.convert(model, mode, **options)
    except RuntimeError as e:
        assert "injected" in str(e)
    else:
        pytest.fail(f"convert(..., {target!r}) from {start} called {where} {calls['n']} times, never failed")
    if (where, call, target) in AFTER_CHANGES:
        assert calls["mutated"], f"{where} call {call} failed before convert changed anything: not a mid-change case"
    assert_unchanged(model, snap)
    if report_before is not None:
        assert list(convbn.report(model)) == report_before
    monkeypatch.undo()
    assert_close_rel(model.eval()(X), frozen_reference(net()).eval()(X) if start != "plain" else net().eval()(X), 1e-6)


def test_a_fold_whose_assignment_fails_half_way_is_undone_with_the_others():
    """A user conv that refuses a new ``bias`` after accepting the new ``weight``: the third fold fails inside
    its own assignments; it and the two applied before it are undone, the model is as it was."""
    class ReadOnlyBias(nn.Conv2d):
        armed = False

        def __setattr__(self, name, value):
            if name == "bias" and ReadOnlyBias.armed:
                raise AttributeError("bias is read-only here")
            super().__setattr__(name, value)

    model = net()
    old = model.conv2
    model.conv2 = ReadOnlyBias(8, 16, 3, 2, 1, bias=False)
    model.conv2.load_state_dict(old.state_dict())
    snap = snapshot(model)
    ReadOnlyBias.armed = True
    try:
        with pytest.raises(AttributeError, match="read-only"):
            convbn.convert(model, "deploy")
    finally:
        ReadOnlyBias.armed = False
    assert_unchanged(model, snap)
    assert model.conv2.bias is None and isinstance(model.bn2, nn.BatchNorm2d)


def test_keyboard_interrupt_mid_install_changes_nothing(monkeypatch):
    model = convbn.convert(net(), "eval")
    snap = snapshot(model)
    _inject(monkeypatch, "install", 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        convbn.convert(model, "tune")
    assert_unchanged(model, snap)


def test_failure_inside_the_example_forward_restores_buffers_hooks_and_rng():
    class Exploding(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn_a = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.b, self.bn_b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn_a(self.a(x))  # train mode: updates running stats during the trace
            torch.rand(1)  # consumes the RNG
            if x.shape[0] == 3:
                raise RuntimeError("user code failed")
            return self.bn_b(self.b(y))

    model = randomize_all_bn(Exploding()).train()
    x = torch.randn(3, 3, 4, 4)
    snap = snapshot(model)
    rng = torch.get_rng_state()
    with pytest.raises(ConvBNError, match="user code failed"):
        convbn.convert(model, "tune", example_inputs=x)
    assert_unchanged(model, snap)
    assert torch.equal(torch.get_rng_state(), rng)


def test_failure_while_deploying_a_copy_leaves_the_original_untouched(monkeypatch):
    model = convbn.convert(net(), "tune")
    snap = snapshot(model)
    _inject(monkeypatch, "fold", 2)
    with pytest.raises(RuntimeError, match="injected"):
        convbn.deploy(model)
    assert_unchanged(model, snap)


def test_row26_data_parallel_wrappers_get_a_clear_error_and_are_left_alone():
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    wrapper = nn.DataParallel(model)  # constructible without GPUs; DDP needs a process group (see test_distributed)
    with pytest.raises(convbn.ConvBNError, match="got a DataParallel wrapper.*DataParallel is not supported"):
        convbn.convert(wrapper, "tune")
    assert all("forward" not in m.__dict__ for m in model.modules())
