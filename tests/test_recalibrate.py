"""convbn.recalibrate: exact population statistics (checked by hand), update_bn's statistics (average="per_batch"),
in every convbn mode, with parameters, flags, momenta and installed modes left as they were."""

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

import convbn
from conftest import assert_close_rel, randomize_all_bn
from convbn.runtime import installed_block

DT = torch.float64


def _batches(shape, sizes=(5, 3, 7), seed=0, shift=1.5):
    g = torch.Generator().manual_seed(seed)
    # batches from different distributions, so the batch means differ (population != per-batch average)
    return [torch.randn((n,) + tuple(shape), generator=g, dtype=DT) * (1 + i) + shift * i for i, n in enumerate(sizes)]


def _channel_view(y):  # (C, everything else)
    return y.transpose(0, 1).reshape(y.shape[1], -1)


def _population(ys):
    v = torch.cat([_channel_view(y) for y in ys], dim=1)
    return v.mean(1), v.var(1, unbiased=True), v.shape[1]


def _per_batch(ys):
    means = torch.stack([_channel_view(y).mean(1) for y in ys])
    vars_ = torch.stack([_channel_view(y).var(1, unbiased=True) for y in ys])
    return means.mean(0), vars_.mean(0)


# (layer, norm, per-sample input shape): every BatchNorm type convbn folds
SINGLE = {
    "Conv2d->BatchNorm2d": (lambda: nn.Conv2d(3, 6, 3, padding=1), lambda: nn.BatchNorm2d(6), (3, 6, 5)),
    "Conv1d->BatchNorm1d": (lambda: nn.Conv1d(3, 6, 3), lambda: nn.BatchNorm1d(6), (3, 9)),
    "Linear->BatchNorm1d": (lambda: nn.Linear(4, 6), lambda: nn.BatchNorm1d(6), (4,)),
    "Conv3d->BatchNorm3d": (lambda: nn.Conv3d(2, 4, 3), lambda: nn.BatchNorm3d(4), (2, 4, 4, 5)),
    "ConvTranspose2d->SyncBatchNorm": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, groups=1),
                                       lambda: nn.SyncBatchNorm(4), (3, 4, 3)),
}
MODES = [("eval", {}), ("tune", {}), ("train", {}), ("train", {"recompute": True}), ("train", {"fission": True})]
MODE_IDS = ["eval", "tune", "train", "train+recompute", "train+fission"]


def _single(kind, mode, kw):
    layer, norm, shape = SINGLE[kind]
    torch.manual_seed(0)
    model = randomize_all_bn(nn.Sequential(layer(), norm(), nn.ReLU())).to(DT).train()
    if mode is not None:
        convbn.convert(model, mode, **kw)
    return model, shape


@pytest.mark.parametrize("mode,kw", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("kind", list(SINGLE))
def test_population_statistics_equal_a_hand_computation(kind, mode, kw):
    model, shape = _single(kind, mode, kw)
    batches = _batches(shape)
    with torch.no_grad():
        ys = [type(model[0]).forward(model[0], x) for x in batches]
    mean, var, count = _population(ys)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = convbn.recalibrate(model, batches, progress=False)
    assert_close_rel(model[1].running_mean, mean, 1e-13, "running_mean")
    assert_close_rel(model[1].running_var, var, 1e-13, "running_var")
    assert int(model[1].num_batches_tracked) == len(batches)
    row = report["1"]
    assert row.status == "recalibrated" and row.count == count and row.mean_change > 0 and row.var_change > 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"parameter {n} changed"
    if mode == "tune":  # the mode still runs, fused, with the new statistics: eval's function
        block = installed_block(model[1])
        assert block is not None and block.mode == "tune"
        x = batches[0]
        ref = copy.deepcopy(model)
        convbn.revert(ref).eval()
        assert_close_rel(model(x), ref(x), 1e-13, "tune after recalibrate")


@pytest.mark.parametrize("kind", list(SINGLE))
def test_per_batch_statistics_equal_a_hand_computation(kind):
    model, shape = _single(kind, "tune", {})
    batches = _batches(shape)
    with torch.no_grad():
        ys = [type(model[0]).forward(model[0], x) for x in batches]
    mean, var = _per_batch(ys)
    convbn.recalibrate(model, batches, progress=False, average="per_batch")
    assert_close_rel(model[1].running_mean, mean, 1e-13, "running_mean")
    assert_close_rel(model[1].running_var, var, 1e-13, "running_var")
    pop_mean, pop_var, _ = _population(ys)  # the two definitions do differ on these batches
    assert (model[1].running_var - pop_var).abs().max() > 1e-3


class Deep(nn.Module):
    """BNs that see the output of earlier BNs, a branch, a Linear->BN1d head, a frozen-stat-free ReLU."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                               nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.down = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.fc = nn.Linear(12, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.a(x))
        return self.bn(self.fc(self.down(x).mean((2, 3))))


def _deep():
    torch.manual_seed(0)
    return randomize_all_bn(Deep(), seed=3).to(DT).train()


def _bn_state(model):
    return {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("mode,kw", MODES, ids=MODE_IDS)
def test_per_batch_equals_update_bn_on_a_plain_copy(mode, kw):
    model = _deep()
    plain = copy.deepcopy(model)
    convbn.convert(model, mode, **kw)
    batches = _batches((3, 8, 8), sizes=(4, 6, 5, 4))
    update_bn([(x, 0) for x in batches], plain)  # update_bn's (input, target) convention
    convbn.recalibrate(model, [(x, 0) for x in batches], progress=False, average="per_batch")
    ours, theirs = _bn_state(model), _bn_state(plain)
    assert ours.keys() == theirs.keys()
    for n in theirs:
        assert torch.equal(ours[n], theirs[n]), f"{n}: {float((ours[n] - theirs[n]).abs().max()):.3g}"


@pytest.mark.parametrize("mode,kw", MODES[:2], ids=MODE_IDS[:2])
def test_population_equals_update_bn_for_a_single_batch_and_differs_for_many(mode, kw):
    model, plain = _deep(), _deep()
    convbn.convert(model, mode, **kw)
    one = _batches((3, 8, 8), sizes=(9,))
    update_bn(one, plain)
    convbn.recalibrate(model, one, progress=False)
    for n, b in _bn_state(plain).items():
        assert_close_rel(_bn_state(model)[n], b, 1e-12, n)
    many = _batches((3, 8, 8), sizes=(4, 4, 4))  # equal sizes: the means agree, the variances do not
    update_bn(many, plain)
    convbn.recalibrate(model, many, progress=False)
    assert_close_rel(model.stem[1].running_mean, plain.stem[1].running_mean, 1e-12, "mean")
    # B equal batches of n: population var = ((n - 1) sum_b var_b + n sum_b (m_b - m)^2) / (nB - 1);
    # update_bn keeps mean_b var_b, without the spread of the batch means
    assert (model.stem[1].running_var - plain.stem[1].running_var).abs().max() > 1e-2


def test_deploy_of_the_recalibrated_model_equals_its_eval():
    model = convbn.convert(_deep(), "tune")
    convbn.recalibrate(model, _batches((3, 8, 8)), progress=False)
    x = _batches((3, 8, 8), sizes=(4,), seed=5)[0]
    shipped = convbn.deploy(model)
    ref = convbn.revert(copy.deepcopy(model)).eval()
    with torch.no_grad():
        assert_close_rel(shipped(x), ref(x), 1e-12, "deploy vs eval")
        assert_close_rel(model.eval()(x), ref(x), 1e-12, "tune vs eval")


def test_update_bn_on_a_converted_model_leaves_the_reset_statistics():
    # the pitfall recalibrate exists for: eval/tune freeze the statistics even under model.train()
    model = convbn.convert(_deep(), "tune")
    update_bn(_batches((3, 8, 8)), model)
    assert torch.equal(model.stem[1].running_mean, torch.zeros(8, dtype=DT))
    assert torch.equal(model.stem[1].running_var, torch.ones(8, dtype=DT))


def test_flags_momenta_forwards_and_parameters_are_restored():
    model = convbn.convert(_deep(), "tune")
    model.a.eval()
    model.stem[1].momentum = 0.3
    model.bn.momentum = None
    flags = {n: m.training for n, m in model.named_modules()}
    forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    params = {n: (p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    convbn.recalibrate(model, _batches((3, 8, 8)), progress=False)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == forwards
    assert model.stem[1].momentum == 0.3 and model.bn.momentum is None and model.a[1].momentum == 0.1
    for n, p in model.named_parameters():
        obj, value, grad = params[n]
        assert p is obj and torch.equal(p, value) and p.requires_grad == grad and p.grad is None
    assert list(model.state_dict()) == keys
    assert convbn.report(model).requested_mode == "tune"


class Boom(Exception):
    pass


def test_a_failing_forward_restores_everything_including_the_statistics():
    model = convbn.convert(_deep(), "eval")
    before = _bn_state(model)
    flags = {n: m.training for n, m in model.named_modules()}
    forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}

    def batches():
        yield _batches((3, 8, 8), sizes=(4,))[0]
        raise Boom

    with pytest.raises(Boom):
        convbn.recalibrate(model, batches(), progress=False)
    after = _bn_state(model)
    assert all(torch.equal(after[n], b) for n, b in before.items())
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == forwards
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_dropout_is_off_and_other_modules_keep_their_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.BatchNorm2d(4)).to(DT).train()
    convbn.convert(model, "tune")
    batches = _batches((3, 6, 6))
    with torch.no_grad():
        mean, var, _ = _population([model[0](x) for x in batches])  # conv0 is not fused with a Dropout after it
    convbn.recalibrate(model, batches, progress=False)
    assert_close_rel(model[2].running_mean, mean, 1e-13, "mean with dropout off")
    assert_close_rel(model[2].running_var, var, 1e-13, "var with dropout off")
    assert model[1].training


def test_num_batches_caps_and_a_norm_never_called_is_skipped_unchanged():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.spare = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x))

    model = randomize_all_bn(Unused()).to(DT)
    spare = _bn_state(model.spare)
    batches = _batches((3, 6, 6), sizes=(4, 4, 4, 4))
    report = convbn.recalibrate(model, iter(batches), num_batches=2, progress=False)
    assert report.num_batches == 2 and int(model.bn.num_batches_tracked) == 2
    with torch.no_grad():
        mean, _, _ = _population([model.conv(x) for x in batches[:2]])
    assert_close_rel(model.bn.running_mean, mean, 1e-13, "first two batches only")
    assert report["spare"].status == "skipped" and "not called" in report["spare"].reason
    assert all(torch.equal(b, spare[n]) for n, b in _bn_state(model.spare).items())
    assert "spare" in str(report) and "recalibrated" in repr(report)


class FrozenBatchNorm2d(nn.Module):
    """detectron2's FrozenBatchNorm2d as copied into many repositories (recognised by convbn's probe)."""

    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.eps = eps
        for name, value in (("weight", torch.ones(n)), ("bias", torch.zeros(n)), ("running_mean", torch.zeros(n)),
                            ("running_var", torch.ones(n))):
            self.register_buffer(name, value)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale[None, :, None, None] + (self.bias - self.running_mean * scale)[None, :, None, None]


def test_frozen_norms_are_skipped_with_the_reason():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).to(DT)
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
    convbn.convert(model, "tune")
    report = convbn.recalibrate(model, _batches((3, 6, 6)), progress=False)
    assert report["1"].status == "skipped" and "frozen norm" in report["1"].reason
    assert report["3"].status == "recalibrated"
    assert torch.equal(model[1].running_mean, torch.full((4,), 0.5, dtype=DT))


def test_a_norm_whose_tracking_was_switched_off_is_recalibrated_and_keeps_its_flag():
    # Lightning's BaseFinetuning.freeze(train_bn=False) sets track_running_stats=False on built BNs
    model, shape = _single("Conv2d->BatchNorm2d", "tune", {})
    model[1].track_running_stats = False
    batches = _batches(shape)
    with torch.no_grad():
        ys = [type(model[0]).forward(model[0], x) for x in batches]
    for average, (mean, var) in (("population", _population(ys)[:2]), ("per_batch", _per_batch(ys))):
        convbn.recalibrate(model, batches, progress=False, average=average)
        assert_close_rel(model[1].running_mean, mean, 1e-13, average)
        assert_close_rel(model[1].running_var, var, 1e-13, average)
        assert model[1].track_running_stats is False


def test_errors_say_what_to_do():
    model = convbn.convert(_deep(), "tune")
    with pytest.raises(convbn.ConvBNError, match="no batches"):
        convbn.recalibrate(model, [], progress=False)
    with pytest.raises(TypeError, match="forward_fn"):
        convbn.recalibrate(model, [{"image": torch.zeros(2, 3, 8, 8, dtype=DT)}], progress=False)
    with pytest.raises(TypeError, match="wrap a single batch"):
        convbn.recalibrate(model, torch.zeros(2, 3, 8, 8, dtype=DT), progress=False)
    with pytest.raises(ValueError, match="num_batches"):
        convbn.recalibrate(model, [torch.zeros(2, 3, 8, 8)], num_batches=0, progress=False)
    with pytest.raises(ValueError, match="average"):
        convbn.recalibrate(model, [torch.zeros(2, 3, 8, 8)], average="ema", progress=False)
    deployed = convbn.convert(_deep(), "deploy")
    with pytest.raises(convbn.ConvBNError, match="before deploying"):
        convbn.recalibrate(deployed, _batches((3, 8, 8)), progress=False)
    with pytest.raises(convbn.ConvBNError, match="no norm layer"):
        convbn.recalibrate(nn.Sequential(nn.Conv2d(3, 3, 1), nn.GroupNorm(1, 3)), [torch.zeros(2, 3, 4, 4)],
                           progress=False)


def test_dict_batches_with_forward_fn_and_progress_line(capsys):
    model = convbn.convert(_deep(), "tune")
    batches = [{"image": x, "label": 0} for x in _batches((3, 8, 8))]
    report = convbn.recalibrate(model, batches, forward_fn=lambda m, b: m(b["image"]))
    assert report.num_batches == 3 and len(report.recalibrated) == 5
    assert "convbn.recalibrate: batch 3" in capsys.readouterr().err


def test_timm_batchnormact2d_is_recalibrated_from_its_input():
    norm_act = pytest.importorskip("timm.layers.norm_act", reason="timm is not installed")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), norm_act.BatchNormAct2d(6, act_layer=nn.ReLU)).to(DT).train()
    randomize_all_bn(model)
    convbn.convert(model, "tune")
    assert convbn.report(model).rows[0].status == "converted"
    batches = _batches((3, 7, 7))
    with torch.no_grad():
        mean, var, _ = _population([type(model[0]).forward(model[0], x) for x in batches])
    convbn.recalibrate(model, batches, progress=False)
    assert_close_rel(model[1].running_mean, mean, 1e-13, "mean")
    assert_close_rel(model[1].running_var, var, 1e-13, "var")


def test_torchvision_frozen_batchnorm_is_skipped():
    misc = pytest.importorskip("torchvision.ops.misc", reason="torchvision is not installed")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), misc.FrozenBatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    convbn.convert(model, "tune")
    report = convbn.recalibrate(model, [torch.randn(2, 3, 6, 6)], progress=False)
    assert [r.status for r in report] == ["skipped", "recalibrated"], str(report)
    assert "frozen norm" in report["1"].reason
