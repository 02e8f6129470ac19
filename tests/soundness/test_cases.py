"""One small deterministic test per numbered item of issue 13 (1, 2, 3, 5, 9, 11, 12) and per crash of
its list that concerns convert/runtime (full backward hooks on converted modules, ``torch.jit.script``,
running statistics set to None after conversion, deploy of a conv whose weight a pre-hook computes).

Each asserts the contract exactly: the converted model equals plain PyTorch step by step (outputs,
stashed tensors, gradients, buffers, hook records), or convbn raises a ``ConvBNError`` naming a module.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize, prune

import convbn

from .generators import NoisyWeight, Recorder, randomize_bn
from .oracle import (
    MODES,
    SEMANTICS,
    Mismatch,
    _check_untouched,
    _convert_args,
    _records,
    buffers_of,
    compare,
    names_a_module,
    step,
)

TRAIN_VARIANTS = ("train+recompute", "train+fission")
RUN_MODES = ("train+recompute", "train+fission", "eval", "tune")  # modes that install forwards


def _prepare(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
    model.double()
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            randomize_bn(m, g)
    if not hasattr(model, "recorders"):
        model.recorders = []
    return model


def _inputs(schedule=(True, False, True), shape=(3, 4, 5, 5), seed=0,
            signs=None) -> List[Tuple[torch.Tensor, bool, bool]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, training in enumerate(schedule):
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        if signs is not None:
            x = x.abs() * signs[k]
        out.append((x, False, training))
    return out


def judge(model: nn.Module, mode: str, inputs, *, example_inputs=None, convert_in_train: bool = True,
          modify: Optional[Callable[[nn.Module], None]] = None) -> str:
    """``"equal"`` or ``"error"`` (a ConvBNError naming a module); anything else fails the test.
    ``modify`` is applied to the reference before it runs and to convbn's model after converting."""
    sem = SEMANTICS[mode]
    deploy = mode == "deploy"
    if deploy:
        inputs = [(x, f, False) for x, f, _ in inputs]
    ref = copy.deepcopy(model)
    if modify is not None:
        modify(ref)
    try:
        refs = [step(ref, None, k, x, f, t, sem, reference=True, sgd=not deploy) for k, (x, f, t) in enumerate(inputs)]
    except Exception as e:  # a bug of this test, not of convbn
        raise AssertionError(f"plain PyTorch itself rejects this test model: {type(e).__name__}: {e}") from e
    m = copy.deepcopy(model)
    m.train(convert_in_train)
    base, flags = _convert_args(mode)
    before, rng = buffers_of(m), torch.get_rng_state()
    side: List[Mismatch] = []  # side effects of convert: reported, undone, and the steps still judged
    try:
        convbn.convert(m, base, example_inputs=example_inputs, **flags)
        side = _check_untouched(m, before, rng, "convert()", deploy=deploy)
        if modify is not None:
            modify(m)
        _records(m)
        for k, (x, f, t) in enumerate(inputs):
            got = step(m, None, k, x, f, t, sem, reference=False, sgd=not deploy)
            compare(got, refs[k], k, deploy)
    except convbn.ConvBNError as e:
        assert names_a_module(str(e), m), f"ConvBNError names no module: {e}"
        assert not side, f"{mode}: {'; '.join(map(str, side))}"
        return "error"
    except Mismatch as e:
        raise AssertionError(f"{mode}: convbn differs from plain PyTorch: {e}"
                             + "".join(f"; and {s}" for s in side)) from None
    assert not side, f"{mode}: steps equal, but {'; '.join(map(str, side))}"
    return "equal"


class Chain(nn.Module):
    """conv1 -> bn1 -> relu1 -> conv2 -> bn2 -> relu2 (nn.ReLU modules: fusable in the train variants)."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()

    def forward(self, x):
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))


def test_chain_converts_and_is_equal_in_every_mode():
    """The harness itself: a plain chain is converted (not refused) and equal in every mode."""
    for mode in MODES:
        m = _prepare(Chain())
        assert judge(m, mode, _inputs()) == "equal", mode


# ------------------------------------------------------------------------------------ item 1
class AuxHeadBN(nn.Module):
    """GoogLeNet/Inception aux_logits: an aux head with its own conv -> BN that runs only in train()."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.aux_conv, self.aux_bn = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(h))
        if self.training:
            return out, self.aux_bn(self.aux_conv(h)).mean((2, 3))
        return out


class DeepSupervision(nn.Module):
    """conv1's output gets a second consumer (an auxiliary loss) only when self.training."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.conv1(x)
        out = self.bn2(self.conv2(F.relu(self.bn1(y))))
        if self.training:
            return out, torch.tanh(y).mean((1, 2, 3))
        return out


@pytest.mark.parametrize("mode", ("train+recompute", "train+fission", "eval", "tune"))
@pytest.mark.parametrize("example", (False, True))
def test_item01_aux_head_bn_converted_in_eval_then_trained(mode, example):
    m = _prepare(AuxHeadBN())
    ex = (_inputs()[0][0],) if example else None
    outcome = judge(m, mode, _inputs(), example_inputs=ex, convert_in_train=False)
    if outcome == "equal":
        base, flags = _convert_args(mode)
        c = convbn.convert(copy.deepcopy(m).eval(), base, example_inputs=ex, **flags)
        listed = {r.bn for r in convbn.report(c)}
        assert listed == {"bn1", "bn2", "aux_bn"}, f"the report must account for every BN, lists {sorted(listed)}"


@pytest.mark.parametrize("mode", ("train+recompute", "train+fission", "eval", "tune"))
@pytest.mark.parametrize("convert_in_train", (False, True))
def test_item01_second_consumer_only_in_train(mode, convert_in_train):
    m = _prepare(DeepSupervision())
    judge(m, mode, _inputs(), convert_in_train=convert_in_train)


# ------------------------------------------------------------------------------------ item 2
class ReturnsConv(nn.Module):
    """Returns the conv output next to bn(y). ``untraceable``: data-dependent control flow elsewhere
    makes torch.fx fail, so only the dynamic trace on example_inputs can see the data flow."""

    def __init__(self, c: int = 4, untraceable: bool = False):
        super().__init__()
        self.untraceable = untraceable
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        if self.untraceable and x.sum() < -1e9:
            x = -x
        y = self.conv(x)
        return self.bn(y), y


class StashesConv(nn.Module):
    """A distillation / feature loss reads ``model.feat`` (the conv output) after forward."""

    def __init__(self, c: int = 4, what: str = "conv", untraceable: bool = False):
        super().__init__()
        self.what, self.untraceable = what, untraceable
        self.conv, self.bn, self.relu = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()

    def forward(self, x):
        if self.untraceable and x.sum() < -1e9:
            x = -x
        y = self.conv(x)
        z = self.bn(y)
        self.feat = y if self.what == "conv" else z
        return self.relu(z)

    def features(self):
        return {"feat": self.feat}


class BranchSkips(nn.Module):
    """For inputs with a positive sum the BN (or the ReLU after it) is skipped."""

    def __init__(self, c: int = 4, skip: str = "bn"):
        super().__init__()
        self.skip = skip
        self.conv, self.bn, self.relu = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        if x.sum() > 0:
            return self.relu(y) if self.skip == "bn" else self.bn(y)
        return self.relu(self.bn(y))


TRACES = ("fx", "fx+example", "example only")  # example only: fx cannot trace the model


def _trace_args(trace: str):
    return dict(untraceable=trace == "example only"), ((_inputs()[0][0],) if "example" in trace else None)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("trace", TRACES)
def test_item02_conv_output_returned(mode, trace):
    kw, ex = _trace_args(trace)
    judge(_prepare(ReturnsConv(**kw)), mode, _inputs(), example_inputs=ex)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("what", ("conv", "bn"))
@pytest.mark.parametrize("trace", TRACES)
def test_item02_output_stashed_on_self(mode, what, trace):
    kw, ex = _trace_args(trace)
    judge(_prepare(StashesConv(what=what, **kw)), mode, _inputs(), example_inputs=ex)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("skip", ("bn", "relu"))
def test_item02_branch_taken_for_some_inputs_only(mode, skip):
    m = _prepare(BranchSkips(skip=skip))
    example = (-_inputs()[0][0].abs(),)  # the traced input takes the conv -> BN -> ReLU path
    judge(m, mode, _inputs(signs=(1, -1, 1)), example_inputs=example)


# ------------------------------------------------------------------------------------ item 3
HOOKS_3 = [("conv1", "fwd_inplace"), ("conv1", "fwd_record"), ("bn1", "pre_inplace"), ("bn1", "pre_record"),
           ("bn1", "fwd_inplace"), ("bn1", "fwd_record"), ("relu1", "pre_inplace"), ("relu1", "pre_record"),
           ("relu1", "fwd_record"), ("conv2", "pre_record")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target,kind", HOOKS_3)
def test_item03_hooks_in_place_and_read_only(mode, target, kind):
    m = _prepare(Chain())
    rec = Recorder(kind)
    m.recorders.append(rec)
    module = m.get_submodule(target)
    (module.register_forward_hook if kind.startswith("fwd") else module.register_forward_pre_hook)(rec)
    judge(m, mode, _inputs())


# ------------------------------------------------------------------------------------ item 5
class CountingScale(nn.Module):
    """A deterministic parametrization that counts how often the weight is computed."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, w):
        self.calls += 1
        return 0.9 * w


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ("random", "spectral_norm", "counting"))
def test_item05_parametrized_weight_evaluated_as_often_as_plain(mode, kind):
    m = _prepare(Chain())
    if kind == "random":
        parametrize.register_parametrization(m.conv1, "weight", NoisyWeight())
    elif kind == "spectral_norm":
        torch.nn.utils.parametrizations.spectral_norm(m.conv1)
    else:
        parametrize.register_parametrization(m.conv1, "weight", CountingScale())
    outcome = judge(m, mode, _inputs())
    if kind == "counting" and outcome == "equal":
        counts = []
        for convert in (False, True):
            c = copy.deepcopy(m).train()
            if convert:
                convbn.convert(c, _convert_args(mode)[0], **_convert_args(mode)[1])
            counter = c.conv1.parametrizations.weight[0]
            counter.calls = 0
            c(_inputs()[0][0].requires_grad_()).sum().backward()
            counts.append(counter.calls)
        assert counts[1] == counts[0], f"{mode}: the weight was computed {counts[1]} times per step, plain {counts[0]}"


# ------------------------------------------------------------------------------------ item 9
class BufferNet(nn.Module):
    def __init__(self, c: int = 4, pattern: str = "reassign"):
        super().__init__()
        self.pattern = pattern
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros(c, dtype=torch.float64))

    def forward(self, x):
        if self.pattern == "reassign":
            self.steps = self.steps + 1
        else:
            self.count += 1.0
        return F.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("pattern", ("reassign", "inplace"))
@pytest.mark.parametrize("example", (False, True))
@pytest.mark.parametrize("api", ("report", "convert"))
def test_item09_dry_run_and_convert_change_no_buffer(pattern, example, api):
    m = _prepare(BufferNet(pattern=pattern)).train()
    before, rng = buffers_of(m), torch.get_rng_state()
    ex = (_inputs()[0][0],) if example else None
    try:
        if api == "report":
            convbn.report(m, "tune", example_inputs=ex)
        else:
            convbn.convert(m, "tune", example_inputs=ex)
    except convbn.ConvBNError as e:
        assert names_a_module(str(e), m), str(e)
        return
    side = _check_untouched(m, before, rng, f"{api}()")
    assert not side, [str(s) for s in side]
    assert m.steps is m._buffers["steps"]


@pytest.mark.parametrize("mode", MODES)
def test_item09_buffers_after_steps(mode):
    judge(_prepare(BufferNet(pattern="reassign")), mode, _inputs(), example_inputs=(_inputs()[0][0],))


# ------------------------------------------------------------------------------------ item 11
class Parent(nn.Module):
    def __init__(self, c: int = 4):
        super().__init__()
        self.sub = Chain(c)
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn(self.conv(self.sub(x))))


def _bn_eval_ref(model: nn.Module, prefix: str = "") -> nn.Module:
    ref = copy.deepcopy(model).train()
    for name, mod in ref.named_modules():
        if isinstance(mod, _BatchNorm) and name.startswith(prefix):
            mod.eval()
    return ref


def _assert_same_forward(model, ref, x):
    a, b = model(x.clone()), ref(x.clone())
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), float((a - b).abs().max())


def test_item11_submodule_then_parent_report_describes_what_runs():
    m = _prepare(Parent()).train()
    x = _inputs()[0][0]
    convbn.convert(m.sub, "tune")
    convbn.convert(m, "eval")
    _assert_same_forward(m, _bn_eval_ref(m), x)
    for r in convbn.report(m.sub):  # the sub's blocks now run eval, as the parent's conversion installed
        assert r.mode == "eval", f"report(model.sub) says `{r.bn}` runs {r.mode}, but the parent installed eval: {r}"


def test_item11_revert_part_report_describes_what_runs():
    m = _prepare(Parent()).train()
    x = _inputs()[0][0]
    convbn.convert(m, "tune")
    try:
        convbn.revert(m.sub)
    except convbn.ConvBNError as e:
        assert names_a_module(str(e), m) or "parent" in str(e), str(e)
        return
    _assert_same_forward(m, _bn_eval_ref(m, prefix="bn"), x)  # sub plain (batch statistics), parent's bn frozen
    for r in convbn.report(m):
        if r.bn.startswith("sub."):
            assert r.mode == "train" or r.status == "skipped", f"report(model) still says `{r.bn}` runs {r.mode}: {r}"


def test_item11_revert_parent_over_a_deployed_submodule_refuses():
    m = _prepare(Parent()).eval()
    convbn.convert(m.sub, "deploy")
    convbn.convert(m, "tune")
    with pytest.raises(convbn.ConvBNError, match="deploy"):
        convbn.revert(m)


# ------------------------------------------------------------------------------------ item 12 + crash list
@pytest.mark.parametrize("how", ("prune", "weight_norm", "spectral_norm"))
@pytest.mark.parametrize("api", ("convert", "deploy"))
def test_item12_deploy_of_a_weight_computed_by_a_pre_hook(how, api):
    m = _prepare(Chain()).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how == "prune":
            prune.l1_unstructured(m.conv1, "weight", amount=0.3)
        elif how == "weight_norm":
            torch.nn.utils.weight_norm(m.conv1)
        else:
            torch.nn.utils.spectral_norm(m.conv1)
    x = _inputs()[0][0]
    with torch.no_grad():
        expected = copy.deepcopy(m)(x)
    try:
        d = convbn.deploy(m) if api == "deploy" else convbn.convert(m, "deploy")
    except convbn.ConvBNError as e:
        assert names_a_module(str(e), m), str(e)
        return
    with torch.no_grad():
        got = d(x)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12), float((got - expected).abs().max())
    if api == "convert":  # the model is usable: a second forward, and a state_dict round trip
        d.load_state_dict(d.state_dict())
        with torch.no_grad():
            assert torch.allclose(d(x), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target", ("conv1", "bn1", "relu1"))
@pytest.mark.parametrize("kind", ("bwd_record", "bwd_modify"))
def test_crash_full_backward_hook_on_converted_module(mode, target, kind):
    if mode == "deploy" and target == "conv1" and kind == "bwd_record":
        pytest.skip("documented: a hook registered after deploy on a folded conv observes the folded conv (its output "
                    "is the block output), not the original conv; hooks present at deploy time make it fall back")
    m = _prepare(Chain())

    def modify(model):
        rec = Recorder(kind)
        model.recorders.append(rec)
        model.get_submodule(target).register_full_backward_hook(rec)

    judge(m, mode, _inputs(), modify=modify)


@pytest.mark.parametrize("mode", MODES)
def test_crash_torch_jit_script_of_converted_model(mode):
    m = _prepare(Chain())
    del m.recorders  # a plain attribute TorchScript cannot type
    torch.jit.script(copy.deepcopy(m))  # the plain model scripts (else this test would be void)
    ref = copy.deepcopy(m)
    c = copy.deepcopy(m).train()
    base, flags = _convert_args(mode)
    convbn.convert(c, base, **flags)
    try:
        scripted = torch.jit.script(c)
    except convbn.ConvBNError as e:
        assert names_a_module(str(e), c) or "script" in str(e), str(e)
        return
    x = _inputs()[0][0]
    for training in ((False,) if mode == "deploy" else (True, False)):
        ref.train(training)
        if SEMANTICS[mode] == "frozen":
            for mod in ref.modules():
                if isinstance(mod, _BatchNorm):
                    mod.eval()
        scripted.train(training)
        with torch.no_grad():
            a, b = scripted(x), ref(x)
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), (mode, training, float((a - b).abs().max()))


@pytest.mark.parametrize("mode", RUN_MODES + ("train",))
def test_crash_running_stats_set_to_none_after_conversion(mode):
    """TENT: after conversion, BNs drop their running statistics and always use batch statistics."""

    def tent(model):
        for mod in model.modules():
            if isinstance(mod, _BatchNorm):
                mod.track_running_stats = False
                mod.running_mean, mod.running_var = None, None

    judge(_prepare(Chain()), mode, _inputs(), modify=tent)
