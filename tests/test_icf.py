"""ICF: statistics of channel-concatenations reused across fission BNs, never stale."""

import copy
import pickle

import pytest
import torch
from torch import nn

import convbn
from conftest import assert_close_rel, randomize_all_bn
from convbn import icf
from convbn.icf import root_hooks


@pytest.fixture(autouse=True)
def reuse_always_pays(monkeypatch):
    """These tests are about what ICF reuses and when (soundness): at their tiny sizes the adaptive
    policy would turn the recorder off after the first forward (tested on its own below)."""
    monkeypatch.setattr(icf, "REUSE_ELEMENTS_PER_LOOKUP", 0)


class TinyDense(nn.Module):
    """A 4-layer dense block in MONAI/torchvision's BN -> ReLU -> Conv layout."""

    def __init__(self, c0=8, growth=4, layers=4):
        super().__init__()
        self.layers = nn.ModuleList()
        c = c0
        for _ in range(layers):
            self.layers.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                             nn.Conv2d(c, growth, 3, padding=1, bias=False)))
            c += growth
        self.norm = nn.BatchNorm2d(c)

    def forward(self, x):
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return self.norm(x)


def _train_compare(model, ref, x):
    out, ref_out = model(x), ref(x)
    assert_close_rel(out, ref_out, 2e-5, "output")
    g = torch.randn_like(out)
    for (name, _), a, b in zip(model.named_parameters(), torch.autograd.grad(out, list(model.parameters()), g),
                               torch.autograd.grad(ref_out, list(ref.parameters()), g)):
        assert_close_rel(a, b, 5e-5, name)
    for (name, a), b in zip(model.named_buffers(), ref.buffers()):
        assert_close_rel(a.double(), b.double(), 1e-6, name)


def test_dense_block_sweeps_each_channel_once_and_matches_plain_train():
    model = randomize_all_bn(TinyDense())
    ref = copy.deepcopy(model)
    convbn.convert(model, "train", fission=True)
    cache = root_hooks(model).cache
    _train_compare(model, ref, torch.randn(4, 8, 6, 6))
    # BN inputs have 8, 12, 16, 20 and 24 channels (80 in all); without ICF every one is swept.
    # With ICF: the model input's 8 (twice: an input is not produced in this forward, so its memory
    # may be shared with NumPy and is never trusted), then only each layer's 4 new channels.
    assert cache.swept_channels == 8 + 8 + 4 * 4
    assert cache.reused_channels == 80 - cache.swept_channels
    with torch.no_grad():  # nothing keeps the earlier concatenations alive here: still reused
        model(torch.randn(4, 8, 6, 6))
    assert cache.swept_channels == 2 * (8 + 8 + 4 * 4)


class ListDense(nn.Module):
    """torchvision's layout: each layer concatenates the list of *all* earlier pieces again."""

    def __init__(self, c0=8, growth=4, layers=4):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(c0 + i * growth), nn.ReLU(inplace=True),
                          nn.Conv2d(c0 + i * growth, growth, 3, padding=1, bias=False)) for i in range(layers))
        self.norm = nn.BatchNorm2d(c0 + layers * growth)

    def forward(self, x):
        features = [x * 1.0]  # produced in this forward: trusted
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return self.norm(torch.cat(features, 1))


def test_list_dense_block_measures_each_piece_once_and_matches_plain_train():
    model = randomize_all_bn(ListDense())
    ref = copy.deepcopy(model)
    convbn.convert(model, "train", fission=True)
    cache = root_hooks(model).cache
    _train_compare(model, ref, torch.randn(4, 8, 6, 6))
    # every cat is a fresh tensor, but its pieces are the same tensors: the first piece's 8 channels and each
    # layer's 4 new ones are swept once (they were swept in every layer before: 8+12+16+20+24)
    assert cache.swept_channels == 8 + 4 * 4
    assert cache.reused_channels == 80 - cache.swept_channels


class ListDenseInPlace(ListDense):
    """A piece changes in place after it was concatenated and measured: later cats must measure it again."""

    changed_after = 1  # layer index after which piece 1 changes (measured in the second layer's cat)

    def forward(self, x):
        features = [x * 1.0]
        for i, layer in enumerate(self.layers):
            features.append(layer(torch.cat(features, 1)))
            if i == self.changed_after:
                features[1].mul_(-2).add_(1)
        return self.norm(torch.cat(features, 1))


class PieceChangedAfterCat(nn.Module):
    """A piece changes in place *between* its cat and the BN of that cat: the cat holds the old data."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.conv_b = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)
        self.bn, self.bn_b = nn.BatchNorm2d(8), nn.BatchNorm2d(4)

    def forward(self, x):
        a, b = self.conv_a(x), self.conv_b(x)
        t = torch.cat([a, b], 1)
        b.mul_(3).add_(1)
        return self.bn(t).sum((2, 3)) + self.bn_b(b).sum((2, 3)).repeat(1, 2)


@torch.no_grad()
@pytest.mark.parametrize("cls", [ListDenseInPlace, PieceChangedAfterCat])
def test_a_piece_changed_after_its_cat_is_measured_again(cls):
    model = randomize_all_bn(cls())
    ref = copy.deepcopy(model)
    convbn.convert(model, "train", fission=True)
    x = torch.randn(4, 8, 6, 6) + 1
    assert_close_rel(model(x), ref(x), 2e-5, "output")
    for (name, a), b in zip(model.named_buffers(), ref.buffers()):
        assert_close_rel(a.double(), b.double(), 1e-6, name)
    if cls is PieceChangedAfterCat:
        return
    # the changed piece is measured once more (in the next cat, under its new version), then reused again
    assert root_hooks(model).cache.swept_channels == 8 + 4 * 4 + 4


class InPlaceTraps(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(4), nn.BatchNorm2d(6), nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = x * 1.0
        y = self.bn1(x)           # x's statistics are measured here...
        x.mul_(3).add_(1)         # ...then x changes in place before it is concatenated
        t = torch.cat([x, self.conv(y)], 1)
        u = self.bn2(t)           # must not reuse x's stale statistics
        t.sub_(2)                 # and the concatenation itself changes in place
        return u + self.bn3(t)    # must not reuse t's stale statistics


@torch.no_grad()  # the traps modify tensors BN saved for backward: forward (train statistics) only
def test_in_place_changes_never_reuse_stale_statistics():
    model = randomize_all_bn(InPlaceTraps())
    ref = copy.deepcopy(model)
    convbn.convert(model, "train", fission=True)
    x = torch.randn(3, 4, 5, 5) + 2
    assert_close_rel(model(x), ref(x), 2e-5)
    for (name, a), b in zip(model.named_buffers(), ref.buffers()):
        assert_close_rel(a.double(), b.double(), 1e-6, name)


class UntrackedWrites(nn.Module):
    """Data that changes without a version bump between its measurement and its concatenation:
    a buffer written through ``.data``, an activation written through ``.data`` and through a NumPy
    alias of its memory, and memory shared with NumPy before the forward began."""

    def __init__(self, shared):  # a numpy.ndarray
        super().__init__()
        self.register_buffer("memory", torch.ones(3, 4, 5, 5))
        self.shared = torch.from_numpy(shared)  # a NumPy array the model also writes through
        self.shared_np = shared
        self.bn = nn.ModuleList(nn.BatchNorm2d(c) for c in (4, 8, 4, 8, 4, 8, 4, 4, 8))
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        outs = []
        # 1. a buffer, measured, then rewritten through .data, then concatenated
        outs.append(self.bn[0](self.memory))
        self.memory.data.mul_(3).add_(1)
        outs.append(self.bn[1](torch.cat([self.memory, x], 1)))
        # 2. an activation produced in this forward, rewritten through .data
        y = self.conv(x)
        outs.append(self.bn[2](y))
        y.data.mul_(-2).add_(5)
        outs.append(self.bn[3](torch.cat([y, x], 1)))
        # 3. an activation rewritten through a NumPy view of its memory
        z = self.conv(x) * 1.0
        outs.append(self.bn[4](z))
        z.detach().numpy()[:] *= 4
        outs.append(self.bn[5](torch.cat([z, x], 1)))
        # 4. memory shared with NumPy before the forward, written through NumPy during it
        outs.append(self.bn[6](self.shared))
        self.shared_np *= -1
        outs.append(self.bn[7](self.shared))
        # 5. the concatenation itself rewritten through .data after the cat was recorded
        t = torch.cat([y, z], 1)
        t.data.add_(7)
        outs.append(self.bn[8](t))
        return sum(o.sum() for o in outs)


@torch.no_grad()
def test_writes_without_a_version_bump_never_reuse_stale_statistics():
    """The version counter misses ``.data`` and NumPy writes: statistics are then measured again."""
    np = pytest.importorskip("numpy", reason="NumPy (not a torch dependency) writes memory without a version bump")
    shared, shared_ref = (np.random.default_rng(0).normal(size=(3, 4, 5, 5)).astype(np.float32) for _ in range(2))
    shared_ref[:] = shared
    model = randomize_all_bn(UntrackedWrites(shared))
    ref = UntrackedWrites(shared_ref)
    x = torch.randn(3, 4, 5, 5) + 2
    convbn.convert(model, "train", fission=True, example_inputs=(x,))  # (not fx-traceable: found by running it)
    ref.load_state_dict(model.state_dict())  # whatever that run changed, the reference starts from the same state
    shared_ref[:] = shared
    assert_close_rel(model(x), ref(x), 2e-5, "output")
    for (name, a), b in zip(model.named_buffers(), ref.buffers()):
        assert_close_rel(a.double(), b.double(), 1e-6, name)
    assert root_hooks(model).cache.reused_channels == 0  # nothing here was safe to reuse


def test_inference_mode_in_train_uses_batch_statistics_and_updates_running_ones_like_plain_pytorch():
    model = randomize_all_bn(TinyDense())
    ref = copy.deepcopy(model)
    convbn.convert(model, "train", fission=True)
    x = torch.randn(4, 8, 6, 6)
    with torch.inference_mode():
        out, ref_out = model(x), ref(x)
    assert out.is_inference()
    assert_close_rel(out, ref_out, 2e-5, "output")
    for (name, a), b in zip(model.named_buffers(), ref.buffers()):
        assert_close_rel(a.double(), b.double(), 1e-6, name)
    _train_compare(model, ref, x)  # and training goes on normally afterwards


class Raises(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.fail = False

    def forward(self, x):
        x = self.bn(torch.cat([x, x], 1))
        if self.fail:
            raise RuntimeError("user error")
        return x


def test_an_exception_in_forward_leaves_no_torch_function_mode_behind():
    model = Raises()
    convbn.convert(model, "train", fission=True)
    model.fail = True
    with pytest.raises(RuntimeError, match="user error"):
        model(torch.randn(2, 2, 3, 3))
    assert not torch._C._is_torch_function_mode_enabled()


def test_root_hooks_survive_deepcopy_and_pickle_and_are_removed_by_revert_and_mode_switch():
    model = randomize_all_bn(TinyDense())
    convbn.convert(model, "train", fission=True)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        hooks = root_hooks(clone)
        assert hooks is not None and hooks is not root_hooks(model)
        assert clone.layers[0][0].forward.block.stats_cache is hooks.cache
        clone(torch.randn(2, 8, 4, 4))
        convbn.revert(clone)
        assert root_hooks(clone) is None and not clone._forward_pre_hooks and not clone._forward_hooks
    convbn.convert(model, "tune")
    assert root_hooks(model) is None


def test_user_hooks_on_the_root_are_untouched():
    model = randomize_all_bn(TinyDense())
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append("user"))
    convbn.convert(model, "train", fission=True)
    model(torch.randn(2, 8, 4, 4))
    convbn.revert(model)
    model(torch.randn(2, 8, 4, 4))
    assert calls == ["user", "user"] and len(model._forward_hooks) == 1


class ListDenseGap(ListDenseInPlace):
    """A piece changes in place after later pieces were measured: the next cat has a gap before known ones."""

    changed_after = 2


@pytest.mark.parametrize("cls, separate", [(TinyDense, 0), (ListDense, 0), (ListDenseInPlace, 0), (ListDenseGap, 1)])
def test_new_pieces_are_measured_in_the_fused_forward_not_by_a_separate_sweep(monkeypatch, cls, separate):
    """Reused statistics cover a concatenation's *leading* pieces; the trailing new ones (a DenseNet layer's
    fresh features) are measured by the BN's own fused forward in its normalize pass -- no extra statistics
    op per layer. Only a gap (a piece changed in place, followed by known ones) is swept on its own."""
    import convbn.runtime.fission as fission_runtime

    calls = []
    sweep = fission_runtime.channel_statistics
    monkeypatch.setattr(fission_runtime, "channel_statistics", lambda t: calls.append(t.shape[1]) or sweep(t))
    model = randomize_all_bn(cls())
    ref = copy.deepcopy(model)
    convbn.convert(model, "train", fission=True)
    with torch.no_grad():
        x = torch.randn(4, 8, 6, 6)
        assert_close_rel(model(x), ref(x), 2e-5, "output")
    # ListDenseInPlace: the changed piece is trailing (with the new one) in the next cat: no gap. ListDenseGap:
    # the changed 4-channel piece sits before measured ones in the last layer's cat: swept alone, once (the
    # final norm's cat then reuses it)
    assert calls == [4] * separate
    cache = root_hooks(model).cache
    assert cache.reused_channels > 0


@pytest.mark.parametrize("threshold, records", [(None, False), (0, True)], ids=["small: off", "pays: on"])
def test_the_recorder_stays_on_for_an_input_shape_only_where_reuse_pays(monkeypatch, threshold, records):
    """ICF's recorder costs Python time on every op; after the first forward of an input signature it is
    kept only if the statistics it let BNs reuse outweigh that (REUSE_ELEMENTS_PER_LOOKUP reused elements
    per BN call and thread). A tiny dense block does not pay: later forwards run without it -- the same
    function, every BN measuring its whole input in its fused pass. Another input shape decides afresh."""
    if threshold is None:
        monkeypatch.undo()  # the real threshold
    model = randomize_all_bn(ListDense())
    ref = copy.deepcopy(model)
    convbn.convert(model, "train", fission=True)
    hooks = root_hooks(model)
    x = torch.randn(4, 8, 6, 6)
    _train_compare(model, ref, x)  # first forward of this signature: recorded, decided
    assert hooks.cache.reused_channels == 80 - (8 + 4 * 4)
    assert list(hooks.decisions.values()) == [records]
    before = hooks.cache.reused_channels
    _train_compare(model, ref, x)
    assert (hooks.cache.reused_channels > before) == records
    _train_compare(model, ref, torch.randn(2, 8, 5, 5))  # a new signature is recorded once, then decided
    assert len(hooks.decisions) == 2


def test_the_recorder_stays_on_where_it_is_needed_for_more_than_speed():
    """low_memory's recipes need the recorder in every forward, whatever the sizes."""
    model = randomize_all_bn(ListDense())
    ref = copy.deepcopy(model)
    convbn.convert(model, "train", fission=True, low_memory=True)
    hooks = root_hooks(model)
    for _ in range(2):
        _train_compare(model, ref, torch.randn(4, 8, 6, 6))
        assert hooks.cache.recipes.recipes_packed > 0
    assert hooks.decisions == {}


class FunctionalRelu(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.nn.functional.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("size, records", [(4, False), (128, True)])
def test_a_fused_functional_relu_counts_as_what_the_recorder_buys(monkeypatch, size, records):
    """A functional ReLU is fused into its BN only while the recorder runs (it passes the user's call
    through); that saves a ReLU pass forward and backward, so it counts towards keeping the recorder --
    here with one BN call: kept from 2 * C*N*H*W >= REUSE_ELEMENTS_PER_LOOKUP * threads."""
    monkeypatch.undo()
    monkeypatch.setattr(icf, "REUSE_ELEMENTS_PER_LOOKUP", 200_000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    model = randomize_all_bn(FunctionalRelu())
    ref = copy.deepcopy(model)
    convbn.convert(model, "train", fission=True)
    x = torch.randn(4, 3, size, size)  # 4*16*128*128 = 1M elements: pays; 4*16*4*4: does not
    _train_compare(model, ref, x)
    assert list(root_hooks(model).decisions.values()) == [records]
    _train_compare(model, ref, x)
    assert root_hooks(model).cache.recording is False
