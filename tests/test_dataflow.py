"""The data-flow proof: both training states, per-submodule tracing, stashes, returns, state restored."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import convbn
from convbn import ConvBNError
from conftest import assert_close_rel, frozen_reference, randomize_all_bn


class DeepSupervision(nn.Module):
    """The conv output gets a second consumer only in train() (an auxiliary loss head)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.aux = nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        out = self.head(self.bn(y))
        if self.training:
            return out, self.aux(y)
        return out


@pytest.mark.parametrize("convert_in", ["eval", "train"])
@pytest.mark.parametrize("mode", ["tune", "eval"])
def test_a_consumer_that_exists_only_in_train_is_seen_whatever_the_state_at_conversion(convert_in, mode):
    model = randomize_all_bn(DeepSupervision())
    getattr(model, convert_in)()
    convbn.convert(model, mode)
    rows = {r.bn: r for r in convbn.report(model)}
    assert set(rows) == {"bn", "aux.1"}, "every norm is listed, the aux head's too"
    if mode == "tune":
        assert rows["bn"].status == "fallback" and "in train() or eval()" in rows["bn"].reason
        assert rows["aux.1"].status == "converted"
    x = torch.randn(2, 3, 8, 8)
    ref = frozen_reference(model, training=True)
    for a, e in zip(model.train()(x), ref(x)):
        assert_close_rel(a, e, 1e-6)


class AuxOnlyInTrain(nn.Module):
    """An auxiliary head whose BN runs only in train() (torchvision GoogLeNet / Inception-v3 style)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.aux = nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))

    def forward(self, x):
        y = self.bn(self.conv(x))
        return (y, self.aux(y)) if self.training else y


def test_aux_head_norms_are_planned_when_converted_in_eval_and_frozen_in_train():
    model = randomize_all_bn(AuxOnlyInTrain()).eval()
    convbn.convert(model, "tune")
    assert [r.status for r in convbn.report(model)] == ["converted", "converted"]
    before = {k: v.clone() for k, v in model.named_buffers()}
    x = torch.randn(2, 3, 8, 8)
    for a, e in zip(model.train()(x), frozen_reference(model, training=True)(x)):
        assert_close_rel(a, e, 1e-6)
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers()), "aux BN statistics stay frozen"


class Stash(nn.Module):
    def __init__(self, what: str):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()
        self.what = what
        self.feats = []

    def forward(self, x):
        y = self.conv(x)
        if self.what == "attr":
            self.feat = y  # a distillation / feature loss reads it later
        elif self.what == "list":
            self.feats.append(y)
        z = self.bn(y)
        if self.what == "pre-relu":
            self.pre = z
        return self.relu(z)


@pytest.mark.parametrize("example", [False, True])
@pytest.mark.parametrize("what", ["attr", "list"])
def test_a_stashed_conv_output_is_not_folded(what, example):
    model = randomize_all_bn(Stash(what))
    x = torch.randn(2, 3, 8, 8)
    convbn.convert(model, "tune", example_inputs=(x,) if example else None)
    (row,) = convbn.report(model).rows
    assert row.status == "fallback" and "attribute" in row.reason, row
    assert not hasattr(model, "feat") and model.feats == [], "the trace's stash is undone"
    ref = frozen_reference(model, training=True)
    model(x)
    ref(x)
    got = model.feat if what == "attr" else model.feats[-1]
    want = ref.feat if what == "attr" else ref.feats[-1]
    assert_close_rel(got, want, 1e-6)


@pytest.mark.parametrize("variant", [{"recompute": True}, {"fission": True}])
def test_a_stashed_pre_relu_norm_output_is_not_fused_with_the_relu(variant):
    model = randomize_all_bn(Stash("pre-relu"))
    x = torch.randn(4, 3, 8, 8)
    ref = copy.deepcopy(model)
    convbn.convert(model, "train", **variant)
    (row,) = convbn.report(model).rows
    assert "fused" not in row.reason
    assert_close_rel(model(x), ref(x), 1e-5)
    assert_close_rel(model.pre, ref.pre, 1e-5)


class ReturnsConvOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        if x.sum() > -1e9:  # data-dependent control flow: only the dynamic trace sees this model
            return self.bn(y), y
        return self.bn(y)


def test_a_returned_conv_output_is_seen_by_the_dynamic_trace():
    model = randomize_all_bn(ReturnsConvOutput())
    x = torch.randn(2, 3, 8, 8)
    convbn.convert(model, "tune", example_inputs=(x,))
    (row,) = convbn.report(model).rows
    assert row.status == "fallback" and "return value" in row.reason
    for a, e in zip(model(x), frozen_reference(model, training=True)(x)):
        assert_close_rel(a, e, 1e-6)


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("seen", torch.zeros(()))
        self.calls = 0

    def forward(self, x):
        self.steps = self.steps + 1  # reassigns the buffer
        self.seen += 1  # updates it in place
        self.calls += 1
        return self.bn(self.conv(x))


@pytest.mark.parametrize("example", [False, True])
def test_report_and_convert_change_no_buffer_or_attribute_the_forward_updates(example):
    model = Counter()
    steps, seen = model.steps, model.seen
    x = torch.randn(2, 3, 8, 8)
    kw = {"example_inputs": (x,)} if example else {}
    convbn.report(model, "tune", **kw)
    convbn.convert(model, "tune", **kw)
    assert model.steps is steps and int(steps) == 0 and float(seen) == 0 and model.calls == 0
    assert convbn.report(model).rows[0].status == "converted"


class Detector(nn.Module):
    """Takes a list of images, like torchvision detection models; the list cannot be fx-traced."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, images, targets=None):
        return [self.head(self.backbone(img[None])) for img in images]


def test_an_untraceable_model_is_traced_per_submodule_and_takes_a_list_of_images():
    model = randomize_all_bn(Detector())
    report = convbn.report(model)
    assert report.rows[0].status == "converted" and any("separately" in n for n in report.notes)
    images = [torch.randn(3, 8, 8), torch.randn(3, 10, 6)]
    convbn.convert(model, "tune", example_inputs=images)  # the list is the one argument
    assert convbn.report(model).method == "torch.fx + dynamic trace"
    for a, e in zip(model(images), frozen_reference(model, training=True)(images)):
        assert_close_rel(a, e, 1e-6)


def test_a_norm_in_an_untraceable_part_without_example_inputs_says_what_to_do():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.sub = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

        def forward(self, x):
            y = self.bn(self.conv(x))
            return self.sub(y) if y.sum() > 0 else y

    rows = {r.bn: r for r in convbn.report(randomize_all_bn(Untraceable()))}
    assert rows["sub.1"].status == "converted"
    assert rows["bn"].status == "fallback" and "pass example_inputs" in rows["bn"].reason


def test_a_converted_report_refuses_another_mode():
    model = convbn.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "tune")
    assert convbn.report(model, "tune").requested_mode == "tune"
    with pytest.raises(ConvBNError, match="converted to 'tune'"):
        convbn.report(model, "deploy")
