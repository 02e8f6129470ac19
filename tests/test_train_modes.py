"""convert(model, "train", recompute=True | fission=True) against plain PyTorch train mode."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convbn
from convbn import ConvBNError
from convbn.bench.memory import saved_tensor_bytes
from conftest import assert_close_rel, randomize_all_bn
from layer_cases import convert_params, make_block

VARIANTS = [{"recompute": True}, {"fission": True}]
IDS = ["recompute", "fission"]


def _step(model, x, g):
    out = model(x)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [p for _, p in named], g)
    return [("output", out)] + [(n, gr) for (n, _), gr in zip(named, grads)]


def _compare_training(model, ref, xs, rel=2e-5, zero_grad=("0.bias",)):
    """Several train steps: outputs, every gradient, then every buffer (running stats, counters).

    ``zero_grad``: parameters whose exact gradient is 0 (a conv bias before a batch-statistics BN is
    cancelled by the mean subtraction); both sides are round-off there, so both must be ~0 instead."""
    for i, x in enumerate(xs):
        with torch.no_grad():
            g = torch.randn_like(ref(x.clone()))  # shape only; the buffer update is undone below
        ref.load_state_dict(model.state_dict())
        got, want = _step(model, x, g), _step(ref, x, g)
        scale = max(float(w.detach().abs().max()) for _, w in want[1:])
        for (name, a), (_, b) in zip(got, want):
            if name in zero_grad:
                assert float(a.abs().max()) <= 1e-4 * scale and float(b.abs().max()) <= 1e-4 * scale, name
            else:
                assert_close_rel(a, b, rel, f"step {i} {name}")
        for (name, a), b in zip(model.named_buffers(), ref.buffers()):
            if a.is_floating_point():
                assert_close_rel(a, b, 1e-6, f"step {i} {name}")
            else:
                assert torch.equal(a, b), f"step {i} {name}"


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("kind,bias,affine,groups", convert_params())
def test_every_layer_kind_with_relu_matches_plain_train(variant, kind, bias, affine, groups):
    layer, bn, x = make_block(kind, bias, affine, groups)
    model = nn.Sequential(layer, bn, nn.ReLU())
    ref = copy.deepcopy(model)
    convbn.convert(model, "train", **variant)
    row = convbn.report(model).rows[0]
    assert row.status == "converted" and row.reason == "ReLU `2` fused"
    _compare_training(model.train(), ref.train(), [x, x * 2 + 1, x - 0.5])


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("momentum,track", [(None, True), (0.3, True), (0.1, False)])
def test_momentum_none_and_no_running_stats(variant, momentum, track):
    layer, bn, x = make_block("Conv2d", True, True, 1)
    bn = nn.BatchNorm2d(6, momentum=momentum, track_running_stats=track)
    randomize_all_bn(bn)
    model = nn.Sequential(layer, bn, nn.ReLU(inplace=True))
    ref = copy.deepcopy(model)
    convbn.convert(model, "train", **variant)
    _compare_training(model.train(), ref.train(), [x, 3 * x])
    # model.eval(): running statistics when tracked, batch statistics otherwise -- as PyTorch
    assert_close_rel(model.eval()(x), ref.eval()(x), 2e-6)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_small_resnet_several_steps_then_eval(variant):
    from test_api import small_resnet

    model = small_resnet()
    ref = copy.deepcopy(model)
    convbn.convert(model, "train", **variant)
    xs = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    _compare_training(model.train(), ref.train(), xs)
    assert_close_rel(model.eval()(xs[0]), ref.eval()(xs[0]), 2e-6)


def test_relu_fusion_only_where_the_relu_module_is_the_only_user():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1, self.r1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True)
            self.c2, self.b2, self.r2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU()
            self.c3, self.b3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.r1(self.b1(self.c1(x)))
            z = self.b2(self.c2(y))
            y = self.r2(z) + z  # BN output has two users: the ReLU cannot be fused
            return torch.relu(self.b3(self.c3(y)))  # functional relu: runs itself

    model = randomize_all_bn(Net())
    ref = copy.deepcopy(model)
    convbn.convert(model, "train", recompute=True)
    rows = convbn.report(model).rows
    assert [r.reason for r in rows] == ["ReLU `r1` fused", "", ""]
    assert "forward" in model.r1.__dict__ and "forward" not in model.r2.__dict__
    seen = []
    model.r1.register_forward_hook(lambda m, i, o: seen.append(o is i[0]))
    _compare_training(model.train(), ref.train(), [torch.randn(2, 3, 8, 8)],
                      zero_grad=("c1.bias", "c2.bias", "c3.bias"))
    assert seen == [True], "the fused ReLU's hooks fire and see the block output pass through"


def test_unsupported_blocks_fall_back_to_plain_train_with_reasons():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4), nn.ReLU(), nn.BatchNorm2d(4))
    randomize_all_bn(model)
    ref = copy.deepcopy(model)
    convbn.convert(model, "train", recompute=True)
    rows = convbn.report(model).rows
    assert rows[0].status == "fallback" and "SyncBatchNorm" in rows[0].reason
    assert rows[1].status == "fallback" and "no layer output to recompute" in rows[1].reason
    _compare_training(model.train(), ref.train(), [torch.randn(2, 3, 4, 4)])  # "0.bias": zero
    convbn.convert(model, "train", fission=True)
    rows = convbn.report(model).rows
    assert rows[0].status == "fallback" and rows[1].status == "converted"


def test_linear_bn1d_on_nd_input_runs_unfused_in_recompute():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    randomize_all_bn(model)
    ref = copy.deepcopy(model)
    convbn.convert(model, "train", recompute=True)  # no example_inputs: checked at run time
    # BN1d on [N, 4, 4] normalizes axis 1, not the Linear's features: the bias gradient is not zero here
    _compare_training(model.train(), ref.train(), [torch.randn(3, 4, 4)], zero_grad=())
    assert "ran unfused" in model[0].forward.block.fallback_reason
    _compare_training(model.train(), ref.train(), [torch.randn(5, 4)])


@pytest.mark.parametrize("variant", [{"recompute": True}, {"fission": True}])
def test_linear_bn1d_relu_on_nd_input_equals_plain_train(variant):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU())
    randomize_all_bn(model)
    ref = copy.deepcopy(model)
    convbn.convert(model, "train", **variant)  # no example_inputs: the fused ReLU must survive an unfused call
    _compare_training(model.train(), ref.train(), [torch.randn(3, 4, 4)], zero_grad=())
    _compare_training(model.train(), ref.train(), [torch.randn(5, 4)])


def test_mode_switches_and_revert():
    from test_api import small_resnet

    model = small_resnet()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    convbn.convert(model, "train", recompute=True)
    convbn.convert(model, "tune")
    assert convbn.report(model).requested_mode == "tune"
    assert "forward" not in model.stem[2].__dict__, "tune does not touch the ReLU"
    model(x).sum().backward()
    convbn.convert(model, "train", fission=True)
    convbn.revert(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kw,exc,match", [
    ({"mode": "tune", "recompute": True}, ConvBNError, "applies to mode 'train' only"),
    ({"mode": "eval", "fission": True}, ConvBNError, "applies to mode 'train' only"),
    ({"mode": "train", "recompute": True, "fission": True}, ConvBNError, "cannot be combined"),
    ({"mode": "train", "recompute": 1}, TypeError, "must be True or False"),
])
def test_bad_train_variant_arguments(kw, exc, match):
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    mode = kw.pop("mode")
    with pytest.raises(exc, match=match):
        convbn.convert(model, mode, **kw)
    assert "_convbn_state" not in model.__dict__


def test_recompute_saves_at_most_055_of_plain_train_on_a_conv_bn_relu_stack():
    torch.manual_seed(0)
    layers = []
    for c_in, c_out in [(8, 16), (16, 16), (16, 32), (32, 32)]:
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    plain = nn.Sequential(*layers).train()
    recompute = convbn.convert(copy.deepcopy(plain), "train", recompute=True)
    x = torch.randn(8, 8, 32, 32)
    ratio = saved_tensor_bytes(lambda: recompute(x)) / saved_tensor_bytes(lambda: plain(x))
    assert ratio <= 0.55, ratio


def test_fission_saves_no_more_than_plain_train_and_channels_last_works():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()).train()
    fission = convbn.convert(copy.deepcopy(plain), "train", fission=True)
    x = torch.randn(4, 8, 16, 16).to(memory_format=torch.channels_last)
    assert saved_tensor_bytes(lambda: fission(x)) <= saved_tensor_bytes(lambda: plain(x))
    _compare_training(fission, plain, [x])


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("conv", [
    lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect", bias=False),
    lambda: nn.Conv1d(3, 4, 4, padding="same", padding_mode="circular", bias=False),
    lambda: nn.Conv2d(3, 4, (4, 3), padding="same", dilation=(1, 2), bias=False),
    lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
], ids=["reflect", "same-circular", "same-even-kernel", "depthwise"])
def test_padding_modes_and_depthwise_in_train_variants(variant, conv):
    conv = conv()
    n = conv.weight.dim() - 2
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[n](4)
    model = randomize_all_bn(nn.Sequential(conv, bn, nn.ReLU()))
    ref = copy.deepcopy(model)
    convbn.convert(model, "train", **variant)
    _compare_training(model.train(), ref.train(), [torch.randn(3, conv.in_channels, *([7] * n))])


class FunctionalReLUNet(nn.Module):
    """BN followed by a functional ReLU, as hand-written and research models write it."""

    def __init__(self, relu: str):
        super().__init__()
        self.relu = relu
        self.c1, self.b1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4)

    def act(self, z):
        return {"F.relu": lambda t: F.relu(t), "torch.relu": torch.relu, "F.relu_inplace": lambda t: F.relu(t, True),
                ".relu_()": lambda t: t.relu_(), ".relu()": lambda t: t.relu()}[self.relu](z)

    def forward(self, x):
        return self.act(self.b2(self.c2(self.act(self.b1(self.c1(x))))))


@pytest.mark.parametrize("relu", ["F.relu", "torch.relu", "F.relu_inplace", ".relu_()", ".relu()"])
def test_fission_fuses_a_functional_relu_exactly(relu, monkeypatch):
    from convbn import icf
    from convbn.bench.memory import saved_tensor_bytes

    monkeypatch.setattr(icf, "REUSE_ELEMENTS_PER_LOOKUP", 0)  # fused at any size (the policy: tests/test_icf.py)

    model = randomize_all_bn(FunctionalReLUNet(relu))
    ref = copy.deepcopy(model)
    convbn.convert(model, "train", fission=True)
    rows = convbn.report(model).rows
    assert all("after it fused" in r.reason for r in rows), rows
    _compare_training(model.train(), ref.train(), [torch.randn(2, 3, 8, 8), torch.randn(3, 3, 8, 8)],
                      zero_grad=("c1.bias", "c2.bias"))
    # the user's relu call is a pass-through: it saves nothing more than fission with an nn.ReLU module does
    modular = convbn.convert(nn.Sequential(copy.deepcopy(ref.c1), copy.deepcopy(ref.b1), nn.ReLU(),
                                           copy.deepcopy(ref.c2), copy.deepcopy(ref.b2), nn.ReLU()), "train",
                             fission=True)
    x = torch.randn(2, 3, 8, 8)
    assert saved_tensor_bytes(lambda: model.train()(x)) == saved_tensor_bytes(lambda: modular.train()(x))


def test_fission_functional_relu_not_fused_when_the_norm_output_has_another_use():
    class TwoUses(FunctionalReLUNet):
        def forward(self, x):
            z = self.b1(self.c1(x))
            return F.relu(self.b2(self.c2(F.relu(z) + z.mean())))

    model = randomize_all_bn(TwoUses("F.relu"))
    ref = copy.deepcopy(model)
    convbn.convert(model, "train", fission=True)
    rows = convbn.report(model).rows
    assert "fused" not in rows[0].reason and "after it fused" in rows[1].reason
    _compare_training(model.train(), ref.train(), [torch.randn(2, 3, 8, 8)], zero_grad=("c1.bias", "c2.bias"))
