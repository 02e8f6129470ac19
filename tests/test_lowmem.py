"""convert(model, "train", fission=True, low_memory=True): no BN output or concatenation stored for backward,
gradients bitwise those of fission (which equal plain train's), autograd's in-place checks kept."""

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import convbn
from conftest import assert_close_rel, assert_same_step, randomize_all_bn
from convbn.bench.memory import saved_tensor_bytes
from convbn.bench.peak import peak_live_tensor_bytes, retained_bytes
from convbn.icf import root_hooks
from test_icf import ListDense, TinyDense


class Bottleneck(nn.Module):
    """A DenseNet-BC layer list (BN-ReLU-conv1x1-BN-ReLU-conv3x3), torchvision's list-of-pieces layout, with a
    transition (BN-ReLU-conv-pool) and a functional ReLU at the end, as torchvision's DenseNet."""

    def __init__(self, c0=6, growth=3, layers=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, c0, 3, padding=1, bias=False), nn.BatchNorm2d(c0), nn.ReLU(True),
                                  nn.MaxPool2d(2))
        self.layers = nn.ModuleList(nn.Sequential(
            nn.BatchNorm2d(c0 + i * growth), nn.ReLU(inplace=True), nn.Conv2d(c0 + i * growth, 4 * growth, 1),
            nn.BatchNorm2d(4 * growth), nn.ReLU(inplace=True), nn.Conv2d(4 * growth, growth, 3, padding=1))
            for i in range(layers))
        c = c0 + layers * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(True), nn.Conv2d(c, c // 2, 1), nn.AvgPool2d(2))
        self.norm = nn.BatchNorm2d(c // 2)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.nn.functional.relu(self.norm(self.transition(torch.cat(features, 1))))


MODELS = {"monai-style": (TinyDense, (4, 8, 6, 6)), "torchvision-style": (ListDense, (4, 8, 6, 6)),
          "bottleneck": (Bottleneck, (3, 2, 12, 12))}


def _step(model, x, g):
    out = model(x)
    grads = torch.autograd.grad(out, list(model.parameters()), g)
    return out.detach(), grads, [b.clone() for b in model.buffers()]


def _converted(model, **kw):
    return convbn.convert(copy.deepcopy(model), "train", fission=True, **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_are_bitwise_fissions_and_match_plain_train(name, dtype):
    cls, shape = MODELS[name]
    torch.manual_seed(0)
    base = randomize_all_bn(cls()).to(dtype)
    x = torch.randn(*shape, dtype=dtype) * 3 + 1
    fission, low = _converted(base), _converted(base, low_memory=True)
    g = torch.randn_like(copy.deepcopy(base)(x))
    ref = _step(copy.deepcopy(base), x, g)
    got_f, got_l = _step(fission, x, g), _step(low, x, g)
    assert root_hooks(low).cache.recipes.recipes_packed > 0
    for a, b in zip([got_l[0], *got_l[1], *got_l[2]], [got_f[0], *got_f[1], *got_f[2]]):
        assert torch.equal(a, b)  # the rebuilt tensors are the forward's, bit for bit
    names = [n for n, _ in base.named_parameters()]
    if dtype == torch.float64:  # floor: a conv bias before a train BN has a zero gradient in exact arithmetic
        assert_same_step((got_l[0], dict(zip(names, got_l[1]))), (ref[0], dict(zip(names, ref[1]))), 1e-10, 1e-9)
        return
    # float32: against a float64 truth, no worse than plain PyTorch's own float32 step -- the output per element,
    # the gradients by global L2 (a ReLU input within rounding of 0 flips its mask in one float32 implementation
    # and not the other: a few entries of a gradient differ by O(1) relative, in plain PyTorch too)
    truth = _step(copy.deepcopy(base).double(), x.double(), g.double())
    out_err, out_plain = (float((v.double() - truth[0]).abs().max()) for v in (got_l[0], ref[0]))
    assert out_err <= 2 * out_plain + 1e-6 * float(truth[0].abs().max()), (out_err, out_plain)
    norm = torch.cat([t.flatten() for t in truth[1]]).norm()
    err, plain = (float(torch.cat([(v.double() - t).flatten() for v, t in zip(vs, truth[1])]).norm() / norm)
                  for vs in (got_l[1], ref[1]))
    assert err <= 2 * plain + 1e-6, (err, plain)


@pytest.mark.parametrize("name", list(MODELS))
def test_no_concatenation_or_bn_output_is_stored(name):
    cls, shape = MODELS[name]
    base = randomize_all_bn(cls())
    x = torch.randn(*shape)
    saved = {}
    for variant, kw in (("plain", None), ("fission", {}), ("low", {"low_memory": True})):
        model = copy.deepcopy(base) if kw is None else _converted(base, **kw)
        saved[variant] = (saved_tensor_bytes(lambda: model(x)), retained_bytes(lambda: model(x)))
    params = sum(p.numel() * p.element_size() for p in base.parameters())
    plain_act, low_act = saved["plain"][0] - params, saved["low"][0] - params
    assert low_act < 0.75 * plain_act, saved
    assert saved["low"][1] < 0.8 * min(saved["fission"][1], saved["plain"][1]), saved  # what the graph keeps alive
    if name != "bottleneck":  # every conv input is a BN output and every BN input a cat (or the model input)
        # what is left: the pieces (the input, each layer's new channels) and per-channel vectors; TinyDense's
        # first cat also holds the model input (not produced in this forward, so its memory may change
        # untracked, e.g. through NumPy): that cat is stored as itself
        n, c0, h, w = shape
        growth, layers = 4, 4
        channels = c0 + layers * growth + (c0 + growth if name == "monai-style" else 0)
        assert low_act <= n * channels * h * w * 4 + 4096, (low_act, channels)


def test_peak_memory_of_a_step_is_lower():
    base = randomize_all_bn(ListDense(c0=16, growth=8, layers=6))
    x = torch.randn(8, 16, 16, 16)
    peaks = {}
    for variant, kw in (("fission", {}), ("low", {"low_memory": True})):
        model = _converted(base, **kw)
        _, peaks[variant] = peak_live_tensor_bytes(lambda: model(x).sum().backward())
    assert peaks["low"] < 0.8 * peaks["fission"], peaks


def test_backward_twice_with_retain_graph_and_create_graph():
    base = randomize_all_bn(TinyDense()).double()
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    results = {}
    for variant, kw in (("fission", {}), ("low", {"low_memory": True})):
        model = _converted(base, **kw)
        out = model(x).square().sum()
        first = torch.autograd.grad(out, [x, *model.parameters()], retain_graph=True)
        second = torch.autograd.grad(out, [x, *model.parameters()], retain_graph=True)
        gx, = torch.autograd.grad(out, x, create_graph=True)
        gg, = torch.autograd.grad(gx.square().sum(), x)
        results[variant] = (*first, *second, gg)
    for a, b in zip(results["low"], results["fission"]):
        assert_close_rel(a, b, 1e-12)


def test_in_place_changes_after_the_forward_raise_like_autograd():
    base = randomize_all_bn(TinyDense())
    x = torch.randn(2, 8, 5, 5)
    for target in ("weight", "piece"):
        model = _converted(base, low_memory=True)
        pieces = []
        if target == "piece":
            model.layers[1][2].register_forward_hook(lambda m, i, o: pieces.append(o))  # a conv output = a piece
        out = model(x)
        with torch.no_grad():
            (pieces[0] if pieces else model.layers[2][0].weight).add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
        # plain PyTorch raises for the weight too (BN saves it); a piece it copied into the next cat
        plain = copy.deepcopy(base)
        pieces.clear()
        if target == "piece":
            plain.layers[1][2].register_forward_hook(lambda m, i, o: pieces.append(o))
        out = plain(x)
        with torch.no_grad():
            (pieces[0] if pieces else plain.layers[2][0].weight).add_(1)
        if target == "weight":
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                out.sum().backward()


def test_the_callers_saved_tensor_hooks_stay_in_charge_with_one_warning():
    base = randomize_all_bn(TinyDense())
    model = _converted(base, low_memory=True)
    ref = _converted(base)
    x = torch.randn(2, 8, 5, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with torch.autograd.graph.save_on_cpu():
                out = model(x)
            got = torch.autograd.grad(out.sum(), list(model.parameters()))
    messages = [str(w.message) for w in caught if "low_memory" in str(w.message)]
    assert len(messages) == 1 and "saved-tensor hooks of the caller" in messages[0]
    assert caught[0].filename == __file__  # points at the user's call
    assert root_hooks(model).cache.recipes.recipes_packed == 0
    expected = torch.autograd.grad(ref(x).sum(), list(ref.parameters()))
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    # torch.utils.checkpoint around the whole model: its hooks, the same gradients
    ck = _converted(base, low_memory=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = torch.utils.checkpoint.checkpoint(ck, x, use_reentrant=False)
    for a, b in zip(torch.autograd.grad(out.sum(), list(ck.parameters())), expected):
        assert torch.equal(a, b)


def test_no_grad_and_torch_func_store_nothing_and_still_match():
    base = randomize_all_bn(TinyDense()).double()
    model, ref = _converted(base, low_memory=True), _converted(base)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert root_hooks(model).cache.recipes.recipes_packed == 0
    params = {k: v.detach() for k, v in model.named_parameters()}

    def grad(m):
        buffers = {k: v.clone() for k, v in m.named_buffers()}
        return torch.func.grad(lambda p, b: torch.func.functional_call(m, (p, b), (x,)).square().sum())(params, buffers)

    g, g_ref = grad(model), grad(ref)
    for k in g:
        assert torch.equal(g[k], g_ref[k]), k


def test_option_is_validated_reported_and_survives_deepcopy_and_pickle():
    base = randomize_all_bn(TinyDense())
    with pytest.raises(convbn.ConvBNError, match="fission=True, low_memory=True"):
        convbn.convert(copy.deepcopy(base), "train", low_memory=True)
    with pytest.raises(TypeError, match="low_memory must be True or False"):
        convbn.convert(copy.deepcopy(base), "train", fission=True, low_memory="yes")
    model = _converted(base, low_memory=True)
    assert any(n.startswith("low_memory") for n in convbn.report(model).notes)
    assert "low_memory" not in str(convbn.report(_converted(base)))
    x = torch.randn(2, 8, 5, 5)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone(x).sum().backward()
        assert root_hooks(clone).cache.recipes.recipes_packed > 0
    # converting again without the option turns it off
    convbn.convert(model, "train", fission=True)
    model(x).sum().backward()
    assert root_hooks(model).cache.recipes is None


def test_meta_device_forward_and_backward():
    model = _converted(randomize_all_bn(Bottleneck()), low_memory=True).to("meta")
    out = model(torch.randn(3, 2, 12, 12, device="meta"))
    out.sum().backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())
