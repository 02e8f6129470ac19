"""Norm layers as a first-class concept: every built-in type in every mode, against plain PyTorch (float64)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convbn
from convbn import ConvBNError
from convbn.norms import is_norm_layer, norm_type

from conftest import assert_close_rel, assert_same_step, frozen_reference

DT = torch.float64


# ------------------------------------------------------------------ import-free stand-ins (same code as upstream)
class FrozenBatchNorm2d(nn.Module):
    """detectron2's FrozenBatchNorm2d, recognised by module path and class name without importing detectron2."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        for name, init in (("weight", torch.ones), ("bias", torch.zeros), ("running_mean", torch.zeros),
                           ("running_var", torch.ones)):
            self.register_buffer(name, init(num_features))

    def forward(self, x):
        if x.requires_grad:
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            bias = self.bias - self.running_mean * scale
            return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + bias.reshape(1, -1, 1, 1).to(x.dtype)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                            eps=self.eps)


FrozenBatchNorm2d.__module__ = "detectron2.layers.batch_norm"


def _timm():
    return pytest.importorskip("timm.layers.norm_act", reason="timm is installed in the primary (torch 2.14.1) env")


def _torchvision_frozen():
    misc = pytest.importorskip("torchvision.ops.misc", reason="torchvision is installed in the primary env")
    return misc.FrozenBatchNorm2d


def randomize_norm(norm: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial statistics: gamma/sqrt(var+eps) log-uniform in [0.05, 20], signed, non-zero means/beta."""
    g = torch.Generator().manual_seed(seed)
    c = norm.running_mean.numel()
    with torch.no_grad():
        var = torch.exp(torch.empty(c, dtype=DT).uniform_(math.log(1e-2), math.log(4.0), generator=g))
        norm.running_var.copy_(var)
        norm.running_mean.copy_(torch.randn(c, generator=g, dtype=DT) * 2)
        if getattr(norm, "weight", None) is not None:
            scale = torch.exp(torch.empty(c, dtype=DT).uniform_(math.log(0.05), math.log(20.0), generator=g))
            sign = torch.where(torch.rand(c, generator=g) < 0.2, -1.0, 1.0).to(DT)
            norm.weight.copy_(sign * scale * torch.sqrt(var + getattr(norm, "eps", 1e-5)))
            norm.bias.copy_(torch.randn(c, generator=g, dtype=DT))
    return norm


def make_norm(kind: str, c: int, act: str = "relu") -> nn.Module:
    acts = {"relu": nn.ReLU, "silu": nn.SiLU, "hardswish": nn.Hardswish, "gelu": nn.GELU, "identity": nn.Identity}
    if kind == "bn":
        return nn.BatchNorm2d(c)
    if kind == "detectron2-frozen":
        return FrozenBatchNorm2d(c)
    if kind == "torchvision-frozen":
        return _torchvision_frozen()(c)
    timm = _timm()
    if kind == "timm-bnact":
        return timm.BatchNormAct2d(c, act_layer=acts[act])
    if kind == "timm-bnact-drop":
        return timm.BatchNormAct2d(c, act_layer=acts[act], drop_layer=lambda: nn.Dropout(0.3))
    if kind == "timm-frozen-bnact":
        return timm.FrozenBatchNormAct2d(c, act_layer=acts[act])
    raise AssertionError(kind)


FROZEN = ("detectron2-frozen", "torchvision-frozen", "timm-frozen-bnact")
KINDS = ("bn", "timm-bnact", "timm-bnact-drop") + FROZEN


class Net(nn.Module):
    """conv -> norm -> conv -> norm (+ an outer ReLU), so gradients flow through two folded blocks."""

    def __init__(self, kind: str, act: str = "relu", bias: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1, bias=bias)
        self.n1 = make_norm(kind, 5, act)
        self.conv2 = nn.Conv2d(5, 4, 3, stride=2, bias=not bias)
        self.n2 = make_norm(kind, 4, act)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.n2(self.conv2(self.n1(self.conv1(x)))))


def build(kind: str, act: str = "relu", bias: bool = True, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net(kind, act, bias).to(DT)
    for i, m in enumerate((net.n1, net.n2)):
        randomize_norm(m, seed + i)
    return net


def step(model: nn.Module, x: torch.Tensor, seed: int = 7):
    torch.manual_seed(seed)
    out = model(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, params + [x], g, allow_unused=True)
    return out, dict(zip([n for n, p in model.named_parameters() if p.requires_grad] + ["input"], grads))


def buffers_of(model: nn.Module):
    return {k: v.clone() for k, v in model.named_buffers()}


@pytest.mark.parametrize("kind", KINDS)
def test_every_norm_type_is_recognised_and_listed(kind):
    model = build(kind)
    assert norm_type(model.n1) is not None
    report = convbn.report(model)
    assert [r.bn for r in report] == ["n1", "n2"]
    assert [r.conv for r in report] == ["conv1", "conv2"]
    assert all(r.status == "converted" for r in report), str(report)
    assert report.rows[0].kind == f"Conv2d->{type(model.n1).__name__}"


@pytest.mark.parametrize("mode", ["eval", "tune"])
@pytest.mark.parametrize("kind,act", [(k, "relu") for k in KINDS] + [("timm-bnact", a) for a in
                                                                     ("silu", "hardswish", "gelu", "identity")])
def test_eval_and_tune_compute_the_frozen_function_in_train(kind, act, mode):
    model = build(kind, act)
    x = torch.randn(3, 3, 7, 7, dtype=DT, requires_grad=True)
    ref = frozen_reference(model, training=True, norm=is_norm_layer)  # registered user norms too
    expected = step(ref, x)
    convbn.convert(model, mode)
    model.train()
    before = buffers_of(model)
    assert_same_step(step(model, x), expected)
    after = buffers_of(model)
    assert all(torch.equal(after[k], v) for k, v in before.items()), "running statistics must stay frozen"


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_affine_gets_no_gradient_and_bn_affine_does(kind):
    model = build(kind)
    convbn.convert(model, "tune")
    names = {n for n, p in model.named_parameters()}
    if kind in FROZEN:
        assert not any(n.startswith("n1.") for n in names), "frozen norms keep weight/bias as buffers"
    else:
        assert {"n1.weight", "n1.bias"} <= names


@pytest.mark.parametrize("kind,act", [(k, "relu") for k in KINDS] + [("timm-bnact", "silu")])
def test_deploy_equals_eval_and_keeps_the_activation(kind, act):
    model = build(kind, act).eval()
    x = torch.randn(2, 3, 7, 7, dtype=DT)
    expected = model(x)
    shipped = convbn.deploy(model)
    assert not any(norm_type(m) is not None for m in shipped.modules()), "every norm folded away"
    assert_close_rel(shipped(x), expected, 1e-12, "deploy output")
    if kind.startswith("timm") and act != "identity":
        assert any(isinstance(m, (nn.ReLU, nn.SiLU)) for m in shipped.modules()), "the activation survives deploy"
        keys = set(shipped.state_dict())
        assert "n1.weight" not in keys and "conv1.weight" in keys


@pytest.mark.parametrize("variant", [{"recompute": True}, {"fission": True}])
@pytest.mark.parametrize("kind,act", [(k, "relu") for k in KINDS] + [("timm-bnact", "silu"),
                                                                     ("timm-bnact", "hardswish")])
def test_train_variants_equal_plain_train(kind, act, variant):
    model = build(kind, act)
    x = torch.randn(4, 3, 7, 7, dtype=DT, requires_grad=True)
    ref = copy.deepcopy(model).train()
    expected = step(ref, x)
    convbn.convert(model, "train", **variant)
    model.train()
    assert_same_step(step(model, x), expected, rel=1e-9)
    for (k, v), (_, r) in zip(model.named_buffers(), ref.named_buffers()):
        assert_close_rel(v.to(DT), r.to(DT), 1e-12, k)
    report = convbn.report(model)
    if kind in ("timm-bnact",) and act == "relu":
        assert all("ReLU fused" in r.reason for r in report), str(report)
    if act != "relu":
        assert not any("fused" in r.reason for r in report), "only an nn.ReLU is fused; other activations run after"


def test_timm_activation_hooks_fire_in_tune():
    model = build("timm-bnact", "silu")
    seen = []
    model.n1.act.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    convbn.convert(model, "tune")
    model(torch.randn(2, 3, 7, 7, dtype=DT))
    assert seen == [torch.Size([2, 5, 7, 7])]


def test_revert_is_bitwise_and_leaves_no_forward():
    for kind in ("bn", "detectron2-frozen"):
        model = build(kind)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        convbn.revert(convbn.convert(model, "tune"))
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert not any("forward" in m.__dict__ for m in model.modules())


def test_group_and_layer_norms_are_listed_with_a_reason():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),
                          nn.Flatten(), nn.LazyLinear(3) if False else nn.Linear(4 * 36, 3), nn.LayerNorm(3))
    report = convbn.report(model)
    rows = {r.bn: r for r in report}
    assert set(rows) == {"1", "3", "6"}
    assert rows["1"].status == "skipped" and "per-sample statistics" in rows["1"].reason
    assert rows["3"].status == "converted"
    assert "3 norm layers" in report.summary()


def test_bn_subclass_with_own_forward_is_listed_with_a_reason():
    class Custom(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Custom(4))
    (row,) = convbn.report(model).rows
    assert row.status == "skipped" and "overrides forward" in row.reason and "register_norm" in row.reason


class ScaledFrozen(nn.Module):
    """A user's frozen norm with its own buffer names and an activation after it."""

    def __init__(self, c):
        super().__init__()
        for name in ("g", "b", "mu", "var"):
            self.register_buffer(name, torch.rand(c, dtype=DT) + 0.5)
        self.act = nn.Hardswish()

    def forward(self, x):
        s = self.g / (self.var + 1e-3).sqrt()
        return self.act((x - self.mu[:, None, None]) * s[:, None, None] + self.b[:, None, None])


def test_register_norm_for_a_users_frozen_type_in_every_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), ScaledFrozen(4)).to(DT)
    assert len(convbn.report(model)) == 0, "an unregistered module without a norm-like name is no norm layer"
    convbn.register_norm(ScaledFrozen, frozen=True, read=lambda m: convbn.NormParams(m.mu, m.var, 1e-3, m.g, m.b),
                         after=lambda m: (m.act,))
    try:
        x = torch.randn(2, 3, 6, 6, dtype=DT, requires_grad=True)
        expected = step(copy.deepcopy(model), x)
        for mode in ("eval", "tune"):
            convbn.convert(model, mode)
            assert convbn.report(model).rows[0].status == "converted"
            assert_same_step(step(model, x), expected)
        convbn.revert(model)
        assert_close_rel(convbn.deploy(model)(x), expected[0], 1e-12)
    finally:
        convbn.unregister_norm(ScaledFrozen)
    assert len(convbn.report(model)) == 0


def test_register_norm_rejects_bad_registrations():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        convbn.register_norm(int, frozen=True)
    with pytest.raises(TypeError, match="not a _BatchNorm subclass"):
        convbn.register_norm(ScaledFrozen, frozen=False)
    convbn.register_norm(ScaledFrozen, frozen=True, read=lambda m: 42)
    try:
        model = nn.Sequential(nn.Conv2d(3, 4, 3), ScaledFrozen(4))
        with pytest.raises(ConvBNError, match="returned int, not convbn.NormParams"):
            convbn.convert(model, "tune")
        assert not any("forward" in m.__dict__ for m in model.modules()), "failed convert leaves the model unchanged"
    finally:
        convbn.unregister_norm(ScaledFrozen)


def test_frozen_norm_in_train_mode_stays_what_the_user_built():
    model = build("detectron2-frozen")
    x = torch.randn(2, 3, 7, 7, dtype=DT, requires_grad=True)
    expected = step(copy.deepcopy(model).train(), x)
    convbn.convert(model, "train")
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert_same_step(step(model.train(), x), expected, rel=0)


@pytest.mark.parametrize("kind", ["torchvision-frozen", "timm-bnact"])
def test_converted_model_with_a_builtin_norm_pickles(tmp_path, kind):
    model = convbn.convert(build(kind), "tune")
    path = tmp_path / "m.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    x = torch.randn(2, 3, 7, 7, dtype=DT)
    assert_close_rel(loaded(x), model(x), 0)


class DETRFrozenBatchNorm2d(nn.Module):
    """DETR's copy of detectron2's FrozenBatchNorm2d: its own name and module, eps hard-coded, no eps attribute."""

    def __init__(self, n):
        super().__init__()
        for name, init in (("weight", torch.ones), ("bias", torch.zeros), ("running_mean", torch.zeros),
                           ("running_var", torch.ones)):
            self.register_buffer(name, init(n))

    def forward(self, x):
        w, b = self.weight.reshape(1, -1, 1, 1), self.bias.reshape(1, -1, 1, 1)
        rv, rm = self.running_var.reshape(1, -1, 1, 1), self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + 1e-5).rsqrt()
        return x * scale + (b - rm * scale)


class WrongEpsFrozenBN(DETRFrozenBatchNorm2d):
    eps = 1e-3  # claims 1e-3, computes 1e-5: the probe must refuse it

    def forward(self, x):
        return super().forward(x)


def test_a_frozen_bn_copy_is_recognised_only_when_its_forward_is_verified():
    for cls, recognised in ((DETRFrozenBatchNorm2d, True), (WrongEpsFrozenBN, False)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), cls(4)).to(DT)
        randomize_norm(model[1])
        (row,) = convbn.report(model).rows
        assert (row.status == "converted") is recognised, row
        if not recognised:
            assert "probed" in row.reason
            continue
        x = torch.randn(2, 3, 7, 7, dtype=DT, requires_grad=True)
        expected = step(copy.deepcopy(model), x)
        convbn.convert(model, "tune")
        assert_same_step(step(model, x), expected)
        assert_close_rel(convbn.deploy(convbn.revert(model))(x), expected[0], 1e-12)


@pytest.mark.parametrize("kind", ["detectron2-frozen", "timm-bnact", "timm-frozen-bnact"])
def test_saved_bytes_eval_never_above_plain_and_tune_within_1_percent_of_deploy(kind):
    from convbn.bench.memory import saved_tensor_bytes

    model = build(kind, "silu")
    model.train()
    x = torch.randn(4, 3, 16, 16, dtype=DT)
    plain = saved_tensor_bytes(lambda: model(x))
    eval_ = saved_tensor_bytes(lambda: convbn.convert(copy.deepcopy(model), "eval").train()(x))
    tune = saved_tensor_bytes(lambda: convbn.convert(copy.deepcopy(model), "tune").train()(x))
    deploy = saved_tensor_bytes(lambda: convbn.convert(copy.deepcopy(model).eval(), "deploy").train()(x))
    if kind in FROZEN:
        assert eval_ <= plain, "a frozen norm's own forward (x * scale + shift) saves no activation"
    assert tune <= 1.01 * deploy, (tune, deploy)
    assert tune < eval_ or kind in FROZEN
