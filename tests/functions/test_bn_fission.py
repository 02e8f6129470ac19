"""bn_relu_train must equal nn.BatchNorm{1,2,3}d (train) + ReLU: outputs, gradients, running stats.

Every comparison runs on both implementations of the convbn::bn_fission_* ops: the C++ kernel (their
CPU implementation, "extension") and their reference in torch ops (what other devices run, "torch").
Eager mode and torch.compile call the same ops.
"""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch

from convbn.functions import bn_fission
from convbn.functions.bn_fission import BNReLUTrainFunction, bn_relu_train, use_extension

BACKENDS = ["extension", "torch"]
HAS_CXX = shutil.which(os.environ.get("CXX", "c++")) is not None


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param != "torch" and not HAS_CXX:
        pytest.skip("no C++ compiler: only the pure-torch path can run here")
    with use_extension(request.param):
        yield request.param


def _bn_class(dim: int):
    return {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[dim]


def _make_bn(shape, affine=True, momentum=0.1, track=True, dtype=torch.float32):
    bn = _bn_class(len(shape))(shape[1], affine=affine, momentum=momentum, track_running_stats=track).to(dtype)
    with torch.no_grad():
        if affine:  # realistic trained parameters, some gammas small
            bn.weight.uniform_(0.05, 1.5)
            bn.bias.normal_(0.0, 0.5)
        if track:
            bn.running_mean.normal_(0.0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    return bn.train()


def _input(shape, layout, dtype=torch.float32):
    """Realistic pre-BN activations: per-channel mean in [-2, 2], std in [0.3, 3]."""
    c = shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    x = torch.randn(shape, dtype=dtype) * torch.empty(c, dtype=dtype).uniform_(0.3, 3).view(view)
    x = x + torch.empty(c, dtype=dtype).uniform_(-2, 2).view(view)
    if layout == "channels_last":  # (N, *spatial, C) in memory, for any rank
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    elif layout == "strided":  # neither layout: a transposed view
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    return x


def _run_fission(bn, x, relu):
    return bn_relu_train(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                         bn.momentum, bn.eps, relu=relu)


def _run_ref(bn, x, relu):
    y = bn(x)
    return torch.relu(y) if relu else y


def _close(a, b, rtol=1e-5, atol=1e-5):
    """Scale-aware: max |a - b| <= rtol * max |b| + atol (as the rest of the suite). float32
    reductions over thousands of values per channel make elementwise atol=1e-5 flaky for entries
    near zero inside tensors whose values reach O(10)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    err = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    bound = rtol * (float(b.double().abs().max()) if b.numel() else 0.0) + atol
    assert err <= bound, f"max abs error {err:.3g} > {bound:.3g}"


@torch.no_grad()
def _away_from_relu_kink(x, bn, band=1e-3):
    """Nudge the few inputs whose BN output lands within ``band`` of 0. There a ReLU's mask is decided
    by float32 round-off, and any two correct implementations may disagree (PyTorch's own fp32 BN+ReLU
    differs from float64 by ~1e-1 in dx on a DenseNet-sized tensor); away from it the comparison is
    well-posed. Moving a handful of values shifts the batch statistics by ~1e-7, far inside the band."""
    dims = [0] + list(range(2, x.dim()))
    x64 = x.double()
    var, mean = torch.var_mean(x64, dim=dims, correction=0, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    gamma = (bn.weight.double() if bn.affine else torch.ones(x.shape[1], dtype=torch.float64)).view(shape)
    beta = (bn.bias.double() if bn.affine else torch.zeros(x.shape[1], dtype=torch.float64)).view(shape)
    z = (x64 - mean) * torch.rsqrt(var + bn.eps) * gamma + beta
    near = z.abs() < band
    step = 4 * band * torch.sqrt(var + bn.eps) / gamma.abs().clamp_min(1e-3)
    direction = torch.where(z >= 0, 1.0, -1.0).double() * torch.sign(gamma)
    x.copy_(torch.where(near, x64 + direction * step, x64).to(x.dtype))
    return x


def _compare_steps(shape, layout, affine, momentum, track, relu, steps=3, dtype=torch.float32, tol=1e-5):
    ref = _make_bn(shape, affine, momentum, track, dtype)
    ours = copy.deepcopy(ref)
    for _ in range(steps):
        x = _input(shape, layout, dtype)
        if relu and dtype != torch.float64:
            _away_from_relu_kink(x, ref)
        dy = torch.randn(shape, dtype=dtype)
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        zr, zo = _run_ref(ref, xr, relu), _run_fission(ours, xo, relu)
        zr.backward(dy)
        zo.backward(dy)
        _close(zo, zr, tol, tol)
        assert zo.stride() == x.stride() or layout == "strided"
        _close(xo.grad, xr.grad, tol, tol)
        if affine:
            # dgamma/dbeta are sums over N*L elements: compare relative to their scale
            scale = max(1.0, ref.weight.grad.abs().max().item())
            _close(ours.weight.grad, ref.weight.grad, tol, tol * scale)
            _close(ours.bias.grad, ref.bias.grad, tol, tol * scale)
            ref.zero_grad()
            ours.zero_grad()
    if track:
        _close(ours.running_mean, ref.running_mean, tol, tol)
        _close(ours.running_var, ref.running_var, tol, tol)
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == steps


SHAPES = [
    (5, 7),  # BatchNorm1d on [N, C]
    (4, 6, 17),  # BatchNorm1d on [N, C, L]
    (3, 5, 7, 9),  # odd sizes: vector tails
    (2, 96, 14, 14),  # DenseNet-121 block 3 norm1
    (2, 4, 3, 5, 6),  # BatchNorm3d
]
STATS = [("momentum", 0.1, True), ("cumulative", None, True), ("untracked", 0.1, False)]


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "bn"])
@pytest.mark.parametrize("stats", STATS, ids=[s[0] for s in STATS])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_batchnorm(backend, shape, layout, affine, stats, relu):
    torch.manual_seed(0)
    _, momentum, track = stats
    _compare_steps(shape, layout, affine, momentum, track, relu)


# DenseNet-121 BN inputs (batch 2): block1 norm2, transition1, block2 last norm1, block3 last, norm5.
DENSENET_SHAPES = [(2, 128, 56, 56), (2, 256, 56, 56), (2, 480, 28, 28), (2, 992, 14, 14), (2, 1024, 7, 7)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", DENSENET_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_densenet121_shapes(backend, shape, layout):
    torch.manual_seed(1)
    _compare_steps(shape, layout, affine=True, momentum=0.1, track=True, relu=True, steps=2)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(64, 3, 32, 32), (16, 64, 16, 16)], ids=["few-channels", "many-channels"])
def test_both_kernel_schedules(backend, shape, threads):
    """The CPU kernel runs an NCL tensor channel by channel (each channel's reduction, then its elementwise
    pass, in one thread) when there are channels to share out (C >= 2 * threads), else as two sweeps over
    the whole tensor: both schedules, forward with and without given statistics, and backward."""
    torch.manual_seed(5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _compare_steps(shape, "contiguous", affine=True, momentum=0.1, track=True, relu=True, steps=2)
        x = _input(shape, "contiguous") + 3
        stats = bn_fission.channel_statistics(x)
        w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
        with_stats = bn_fission.bn_relu_train_forward(x, w, b, 1e-5, True, stats=stats)
        without = bn_fission.bn_relu_train_forward(x, w, b, 1e-5, True)
        torch.testing.assert_close(with_stats[0], without[0], rtol=0, atol=1e-5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(6, 3, 5, 7), (4, 24, 6, 6), (32, 5)], ids=["few-channels", "many-channels", "2d"])
@pytest.mark.parametrize("known", [1, "all-but-one", "all"])
def test_given_statistics_of_the_leading_channels_are_used_and_the_rest_measured(backend, shape, layout, threads,
                                                                                 known):
    """ICF passes the statistics of a concatenation's leading pieces: the op uses exactly those for the first
    K channels (here deliberately *not* the data's, so ignoring them fails), measures the others in its own
    pass, returns all C, and updates the running statistics with them -- in both kernel schedules."""
    torch.manual_seed(7)
    c = shape[1]
    k = {"all-but-one": c - 1, "all": c}.get(known, known)
    x = _input(shape, layout) * 2 + 5
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    dims = [0] + list(range(2, x.dim()))
    true_var, true_mean = torch.var_mean(x.double(), dim=dims, correction=0)  # the float64 truth
    given_mean, given_var = true_mean[:k] + 0.25, true_var[:k] * 1.5  # not x's: must be used as given
    expect_mean, expect_var = torch.cat([given_mean, true_mean[k:]]), torch.cat([given_var, true_var[k:]])
    rm, rv = torch.zeros(c), torch.ones(c)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, mean, var, invstd = bn_fission.ops.forward(x, w, b, given_mean, given_var, rm, rv, 0.1, 1e-5, True)
    finally:
        torch.set_num_threads(before)
    assert out.stride() == x.stride()
    assert mean[:k].equal(given_mean) and var[:k].equal(given_var)  # as given, bit for bit
    torch.testing.assert_close(mean[k:], true_mean[k:], rtol=1e-6, atol=1e-6)  # measured (float32 data)
    torch.testing.assert_close(var[k:], true_var[k:], rtol=1e-5, atol=1e-6)
    view = [1, c] + [1] * (x.dim() - 2)
    ref = torch.relu((x.double() - expect_mean.view(view)) * torch.rsqrt(expect_var + 1e-5).view(view)
                     * w.double().view(view) + b.double().view(view))
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)
    m = x.numel() // c
    torch.testing.assert_close(rm.double(), 0.1 * expect_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv.double(), 0.9 + 0.1 * expect_var * m / (m - 1), rtol=1e-6, atol=1e-7)
    assert given_mean.equal(true_mean[:k] + 0.25)  # the given statistics are read, never written


def test_given_statistics_longer_than_the_channels_are_refused(backend):
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match="K <= 3"):
        bn_fission.ops.forward(x, None, None, torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64),
                               None, None, 0.0, 1e-5, False)
    with pytest.raises(ValueError, match="K <= 3"):
        bn_relu_train(x, None, None, None, None, None, 0.1, 1e-5, stats=(torch.zeros(4), torch.ones(4)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (6, 5), (3, 4, 2, 3, 3)], ids=["4d", "2d", "5d"])
def test_statistics_of_a_channel_slice_are_read_in_place(backend, shape, dtype):
    """ICF sweeps a concatenation's unmeasured piece as ``x.narrow(1, ...)``: the kernel reads the slice with
    its batch stride (no copy) and, with spatial dims, gives exactly what it gives for a contiguous copy."""
    torch.manual_seed(6)
    big = torch.randn(shape[0], shape[1] + 5, *shape[2:], dtype=dtype) * 2 + 10
    piece = big.narrow(1, 3, shape[1])
    assert not piece.is_contiguous() and bn_fission.ops.batch_stride(piece) == big.stride(0)
    mean, var = bn_fission.channel_statistics(piece)
    copy_mean, copy_var = bn_fission.channel_statistics(piece.contiguous())
    if piece.dim() > 2:  # (a contiguous [N, C] copy is summed row by row, as channels-last: another order)
        assert torch.equal(mean, copy_mean) and torch.equal(var, copy_var)
    ref_var, ref_mean = torch.var_mean(piece.double(), dim=[0] + list(range(2, piece.dim())), correction=0)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=0)
    torch.testing.assert_close(var, ref_var, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
    assert bn_fission.ops.batch_stride(big.transpose(0, 1)) is None  # samples not in order: copied first


@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (6, 5)], ids=["4d", "2d"])
def test_non_dense_layout_is_handled(backend, shape):
    torch.manual_seed(2)
    _compare_steps(shape, "strided", affine=True, momentum=0.1, track=True, relu=True, steps=2)


def test_float64_matches_tightly(backend):
    torch.manual_seed(3)
    _compare_steps((3, 8, 5, 5), "channels_last", True, None, True, True, dtype=torch.float64, tol=1e-10)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_variance_accurate_when_mean_much_larger_than_std(backend, layout):
    """Mean 1000, std 1 in float32: the one-sweep variance must be within 1e-5 (relative) of float64."""
    torch.manual_seed(4)
    shape = (8, 16, 32, 32)
    x64 = 1000.0 + torch.randn(shape, dtype=torch.float64) * torch.empty(16, 1, 1, dtype=torch.float64).uniform_(0.5, 2)
    x = x64.float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x_exact = x.double()  # reference on the float32 values actually fed in
    ref_var = x_exact.var(dim=(0, 2, 3), unbiased=True)
    ref_mean = x_exact.mean(dim=(0, 2, 3))
    rm, rv = torch.zeros(16), torch.ones(16)
    z = bn_relu_train(x, None, None, rm, rv, None, 1.0, 1e-5, relu=False)  # momentum 1: buffers = batch stats
    rel_var = ((rv.double() - ref_var).abs() / ref_var).max().item()
    assert rel_var <= 1e-5, rel_var
    assert ((rm.double() - ref_mean).abs() / ref_var.sqrt()).max().item() <= 1e-4
    z_ref = (x_exact - ref_mean.view(1, -1, 1, 1)) / (x_exact.var(dim=(0, 2, 3), unbiased=False) + 1e-5).sqrt().view(
        1, -1, 1, 1)
    assert (z.double() - z_ref).abs().max().item() <= 1e-4
    # The test can fail: E[x^2] - E[x]^2 on the raw float32 data misses the tolerance by orders of magnitude.
    naive = (x * x).mean(dim=(0, 2, 3)) - x.mean(dim=(0, 2, 3)) ** 2
    naive_unbiased = naive.double() * x[:, 0].numel() / (x[:, 0].numel() - 1)
    assert ((naive_unbiased - ref_var).abs() / ref_var).max().item() > 1e-3


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "bn"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_float64(backend, layout, relu):
    torch.manual_seed(5)
    x = _input((3, 4, 3, 5), layout, torch.float64).requires_grad_()
    w = torch.empty(4, dtype=torch.float64).uniform_(0.5, 1.5).requires_grad_()
    b = torch.empty(4, dtype=torch.float64).normal_(0, 0.5).requires_grad_()

    def fn(x, w, b):
        return BNReLUTrainFunction.apply(x, w, b, 1e-5, relu)[0]

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_no_affine(backend):
    torch.manual_seed(6)
    x = _input((4, 3, 6), "contiguous", torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: BNReLUTrainFunction.apply(x, None, None, 1e-5, True)[0], (x,))


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "bn"])
def test_saves_only_input_and_vectors(backend, relu):
    """No mask, no xhat, no output: the one full-size saved tensor is x (the ReLU mask is recomputed
    from x in backward), the rest are per-channel vectors."""
    saved = []
    x = _input((2, 8, 6, 6), "contiguous").requires_grad_()
    bn = _make_bn(x.shape)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _run_fission(bn, x, relu)
    big = [t for t in saved if t.numel() == x.numel()]
    assert all(t.dtype != torch.bool for t in saved)
    assert all(t.numel() in (x.numel(), x.shape[1]) for t in saved)
    assert [t.data_ptr() for t in big] == [x.data_ptr()]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(4, 16, 7, 7), (3, 5, 3, 3), (64, 24)], ids=["7x7", "3x3", "2d"])
def test_recomputed_relu_mask_is_the_forwards(backend, layout, shape):
    """The backward recomputes the ReLU mask from x. It must be exactly the forward output's ``z > 0``:
    BN+ReLU's gradients equal, bit for bit, plain BN's gradients for the incoming gradient masked by
    the returned output (same kernels and summation order). beta = 0 and repeated values put many
    entries near or at the kink."""
    torch.manual_seed(11)
    x = _input(shape, layout)
    flat = x.movedim(1, -1)
    with torch.no_grad():  # a quarter of the entries repeat one value per channel
        flat[..., :] = torch.where(torch.rand(flat.shape) < 0.25, flat.reshape(-1, shape[1])[0], flat)
    x.requires_grad_()
    w = torch.empty(shape[1]).uniform_(0.05, 1.5).requires_grad_()
    b = torch.zeros(shape[1], requires_grad=True)
    dy = torch.randn(shape).contiguous(memory_format=torch.channels_last if layout == "channels_last" and
                                        len(shape) == 4 else torch.contiguous_format)
    z = BNReLUTrainFunction.apply(x, w, b, 1e-5, True)[0]
    got = torch.autograd.grad(z, (x, w, b), dy)
    y = BNReLUTrainFunction.apply(x, w, b, 1e-5, False)[0]
    assert torch.equal(z, y.clamp_min(0)), "relu output differs from the BN output clamped at 0"
    want = torch.autograd.grad(y, (x, w, b), dy * (z > 0))
    assert 0 < int((z == 0).sum()) < z.numel()
    for a, e in zip(got, want):
        assert torch.equal(a, e), float((a - e).abs().max())


def test_bfloat16_via_torch_path(backend):
    torch.manual_seed(7)
    shape = (4, 8, 5, 5)
    ref = _make_bn(shape).to(torch.bfloat16)
    ours = copy.deepcopy(ref)
    x = _input(shape, "contiguous").bfloat16()
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    zr, zo = _run_ref(ref, xr, True), _run_fission(ours, xo, True)
    zr.float().sum().backward()
    zo.float().sum().backward()
    assert zo.dtype == torch.bfloat16
    _close(zo.float(), zr.float(), 2e-2, 2e-2)
    # bf16 rounding may flip the ReLU mask of values next to 0; compare gradients where masks agree
    agree = (zo > 0) == (zr > 0)
    assert agree.float().mean() > 0.99
    _close(xo.grad.float()[agree], xr.grad.float()[agree], 5e-2, 5e-2)
    _close(ours.running_var.float(), ref.running_var.float(), 2e-2, 2e-2)


def test_errors_are_value_errors():
    bn = _make_bn((1, 4, 1, 1))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        _run_fission(bn, torch.randn(1, 4, 1, 1), True)
    with pytest.raises(ValueError, match="weight has 4 elements but x has 3 channels"):
        _run_fission(bn, torch.randn(2, 3, 4, 4), True)


@pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler")
def test_extension_builds_here():
    """With a compiler present the fast path must actually be in use (no silent fallback in CI)."""
    assert bn_fission.extension_available()
    with use_extension("extension"):
        _compare_steps((2, 8, 4, 4), "contiguous", True, 0.1, True, True, steps=1)


def test_degrades_gracefully_when_build_fails(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(bn_fission.ops.LIB, "lib", None)
    monkeypatch.setattr(bn_fission.ops.LIB, "tried", False)
    with pytest.warns(RuntimeWarning, match="pure-torch reference"):
        assert not bn_fission.extension_available()
    torch.manual_seed(8)
    _compare_steps((3, 5, 4, 4), "channels_last", True, None, True, True, steps=2)
    with use_extension("extension"), pytest.raises(RuntimeError, match="required"):
        _run_fission(_make_bn((3, 5, 4, 4)), torch.randn(3, 5, 4, 4), True)


def test_torch_compile_fullgraph(backend):
    """One small compiled case: no graph breaks, same results as eager BatchNorm2d + ReLU."""
    torch.manual_seed(9)
    shape = (4, 6, 5, 5)
    ref = _make_bn(shape, momentum=None)
    ours = copy.deepcopy(ref)
    torch._dynamo.reset()
    fn = torch.compile(lambda x: _run_fission(ours, x, True), fullgraph=True)
    for _ in range(2):
        x = _input(shape, "channels_last")
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        dy = torch.randn(shape)
        zr, zo = _run_ref(ref, xr, True), fn(xo)
        zr.backward(dy)
        zo.backward(dy)
        _close(zo, zr)
        _close(xo.grad, xr.grad)
        _close(ours.weight.grad, ref.weight.grad, 1e-5, 1e-4)
        _close(ours.bias.grad, ref.bias.grad, 1e-5, 1e-4)
        ref.zero_grad()
        ours.zero_grad()
    _close(ours.running_mean, ref.running_mean)
    _close(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked.item() == 2


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_custom_ops_pass_opcheck(backend, layout):
    """Schemas and fake kernels are what torch.compile relies on."""
    ops = bn_fission.ops
    x = _input((2, 3, 4, 5), layout)
    g = torch.randn_like(x)
    mean = torch.randn(3, dtype=torch.float64)
    v = torch.rand(3, dtype=torch.float64) + 0.5
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    cases = [(ops.stats, (x,))]
    for relu in (True, False):
        cases += [
            (ops.forward, (x, w, b, None, None, None, None, 0.0, 1e-5, relu)),
            (ops.forward, (x, None, None, mean, v, torch.zeros(3), torch.ones(3), 0.1, 1e-5, relu)),
            (ops.forward, (x, w, b, mean[:2], v[:2], torch.zeros(3), torch.ones(3), 0.1, 1e-5, relu)),
            (ops.backward, (g, x, w, b, mean, v, relu, True, True, True)),
            (ops.backward, (g, x, None, None, mean, v, relu, True, False, False)),
            (ops.backward, (g, x, w, b, mean, v, relu, False, True, False)),
        ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_eager_calls_skip_argument_binding_and_torch_func_uses_setup_context(backend, monkeypatch):
    """Eager calls take the ``forward(ctx, ...)`` Function, whose ``apply`` does not bind its arguments
    with ``inspect`` (~40 us a layer); inside a ``torch.func`` transform the ``setup_context`` Function is
    used. Both give the same gradients."""
    import inspect

    binds = []
    real_bind = inspect.Signature.bind
    monkeypatch.setattr(inspect.Signature, "bind", lambda self, *a, **k: binds.append(1) or real_bind(self, *a, **k))
    monkeypatch.setattr(bn_fission.native_ops, "op", lambda: None)  # the Python Function, not the C++ node
    torch.manual_seed(3)
    x = _input((4, 6, 5, 5), "contiguous").requires_grad_()
    w = torch.empty(6).uniform_(0.05, 1.5).requires_grad_()
    b = torch.randn(6, requires_grad=True)
    dy = torch.randn(x.shape)

    z = bn_relu_train(x, w, b, torch.zeros(6), torch.ones(6), torch.tensor(0), 0.1, 1e-5)
    assert type(z.grad_fn).__name__ == "BNReLUTrainFunctionEagerBackward"
    eager = torch.autograd.grad(z, (x, w, b), dy)
    assert binds == []
    BNReLUTrainFunction.apply(x, w, b, 1e-5, True)  # (the setup_context Function does bind: the probe works)
    assert binds

    def loss(x, w, b):
        return (bn_relu_train(x, w, b, None, None, None, 0.1, 1e-5) * dy).sum()

    functional = torch.func.grad(loss, argnums=(0, 1, 2))(x.detach(), w.detach(), b.detach())
    for got, want in zip(functional, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
