"""convbn::bn_relu_train_native: BN fission's forward and backward with the autograd in C++ -- the same
kernels as the ctypes path, bit for bit, and the same function as plain PyTorch train-mode BN(+ReLU)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from convbn.functions import bn_fission
from convbn.functions.bn_fission import bn_relu_train
from convbn.ops import native

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None and not
                                os.path.exists(native.LIB.so_path()), reason="no C++ compiler and no build")


def _layer(shape, layout, dtype, affine, seed=0):
    torch.manual_seed(seed)
    c = shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    x = torch.randn(shape, dtype=dtype) * torch.empty(c, dtype=dtype).uniform_(0.3, 3).view(view)
    x = x + torch.empty(c, dtype=dtype).uniform_(-2, 2).view(view)
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    w = torch.empty(c, dtype=dtype).uniform_(0.05, 1.5) if affine else None
    b = torch.randn(c, dtype=dtype) * 0.5 if affine else None
    rm, rv = torch.randn(c, dtype=dtype) * 0.3, torch.empty(c, dtype=dtype).uniform_(0.5, 2)
    return x, w, b, rm, rv


def _step(x, w, b, rm, rv, relu, stats, need_x=True, native_on=True, monkeypatch=None):
    x = x.detach().clone().requires_grad_(need_x)
    w = None if w is None else w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    rm, rv, nbt = rm.clone(), rv.clone(), torch.tensor(0)
    if not native_on:
        monkeypatch.setattr(native, "op", lambda: None)
    out = bn_relu_train(x, w, b, rm, rv, nbt, 0.1, 1e-5, relu=relu, stats=stats)
    name = out.grad_fn.name()
    if not native_on:
        monkeypatch.undo()
    dy = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, inputs, dy)
    return name, [out, rm, rv, *grads]


@pytest.mark.parametrize("known", [None, "half"])
@pytest.mark.parametrize("need_x, affine", [(True, True), (False, True), (True, False)],
                         ids=["dx-affine", "affine-only", "dx-noaffine"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "bn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(4, 16, 5, 7), (8, 3, 4, 4), (32, 6)], ids=["4d", "few-channels", "2d"])
def test_native_equals_the_ctypes_path_bit_for_bit(monkeypatch, shape, layout, dtype, relu, affine, need_x, known):
    x, w, b, rm, rv = _layer(shape, layout, dtype, affine)
    stats = None
    if known:
        mean, var = bn_fission.ops.stats_reference(x)
        stats = (mean[: shape[1] // 2], var[: shape[1] // 2])
    name, native_results = _step(x, w, b, rm, rv, relu, stats, need_x)
    assert "BNReLUTrainNative" in name, name  # the C++ autograd node ran
    ref_name, ref_results = _step(x, w, b, rm, rv, relu, stats, need_x, native_on=False, monkeypatch=monkeypatch)
    assert ref_name == "BNReLUTrainFunctionEagerBackward"
    assert len(native_results) == len(ref_results)
    for i, (a, r) in enumerate(zip(native_results, ref_results)):
        assert a.dtype == r.dtype and a.shape == r.shape and a.stride() == r.stride(), i
        assert torch.equal(a, r), (i, (a - r).abs().max())


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "bn"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_native_matches_plain_pytorch_in_float64(layout, relu):
    x, w, b, rm, rv = _layer((4, 8, 6, 6), layout, torch.float64, True)
    bn = torch.nn.BatchNorm2d(8, dtype=torch.float64).train()
    with torch.no_grad():
        bn.weight.copy_(w)
        bn.bias.copy_(b)
        bn.running_mean.copy_(rm)
        bn.running_var.copy_(rv)
    xr = x.clone().requires_grad_()
    ref = bn(xr)
    ref = torch.relu(ref) if relu else ref
    name, (out, rm2, rv2, gx, gw, gb) = _step(x, w, b, rm, rv, relu, None)
    assert "BNReLUTrainNative" in name
    dy = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(1))
    rgx, rgw, rgb = torch.autograd.grad(ref, (xr, bn.weight, bn.bias), dy)
    for a, r in ((out, ref), (rm2, bn.running_mean), (rv2, bn.running_var), (gx, rgx), (gw, rgw), (gb, rgb)):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_native_create_graph_is_plain_pytorchs_double_backward():
    """A gradient penalty through the native node: its backward under create_graph runs PyTorch's own
    twice-differentiable BN backward ops."""
    x, w, b, rm, rv = _layer((4, 5, 3, 3), "contiguous", torch.float64, True)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ws = [w.clone().requires_grad_() for _ in range(2)]
    bs = [b.clone().requires_grad_() for _ in range(2)]
    out = bn_relu_train(xs[0], ws[0], bs[0], rm.clone(), rv.clone(), None, 0.1, 1e-5)
    assert "BNReLUTrainNative" in out.grad_fn.name()
    ref = torch.relu(torch.nn.functional.batch_norm(xs[1], rm.clone(), rv.clone(), ws[1], bs[1], True, 0.1, 1e-5))
    penalties = []
    for o, xi, wi in ((out, xs[0], ws[0]), (ref, xs[1], ws[1])):
        (gx,) = torch.autograd.grad((o * o.detach().cos()).sum(), xi, create_graph=True)
        penalties.append(torch.autograd.grad(gx.pow(2).sum(), (xi, wi)))
    for a, r in zip(*penalties):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)


def test_native_runs_without_grad_and_in_inference_mode():
    x, w, b, rm, rv = _layer((4, 6, 5, 5), "contiguous", torch.float32, True)
    expect = torch.relu(torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5))
    for ctx in (torch.no_grad, torch.inference_mode):
        rm2, rv2 = rm.clone(), rv.clone()
        with ctx():
            out = bn_relu_train(x, w, b, rm2, rv2, None, 0.1, 1e-5)
        assert out.grad_fn is None
        torch.testing.assert_close(out, expect, rtol=0, atol=2e-5)


def test_native_saved_tensors_go_through_saved_tensor_hooks():
    """convert(..., low_memory=True) and activation offloading rely on torch's saved-tensor hooks seeing
    what the C++ node saves: the input and the per-channel vectors, never the output."""
    x, w, b, rm, rv = _layer((4, 6, 5, 5), "contiguous", torch.float32, True)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        out = bn_relu_train(x, w, b, rm, rv, None, 0.1, 1e-5)
    assert "BNReLUTrainNative" in out.grad_fn.name()
    assert any(t is x for t in packed) and not any(t.data_ptr() == out.data_ptr() for t in packed)
    assert sorted(t.numel() for t in packed) == sorted([x.numel(), 6, 6, 6, 6])
    out.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_off_the_kernels_reach_the_python_function():
    """What the kernels do not take runs the convbn::bn_fission_* ops through the Python Function (a
    bfloat16 input, parameters of two dtypes), with the same results as plain PyTorch; a strided input is
    made contiguous first, so it takes the native op."""
    x, w, b, rm, rv = _layer((4, 6, 5, 5), "contiguous", torch.float32, True)
    x.requires_grad_()
    out = bn_relu_train(x.transpose(2, 3), w, b, rm.clone(), rv.clone(), torch.tensor(3), None, 1e-5)
    assert "BNReLUTrainNative" in out.grad_fn.name()
    for xi, wi, bi, atol in ((x.bfloat16(), w.bfloat16(), b.bfloat16(), 0.05), (x, w, b.double(), 2e-5)):
        out = bn_relu_train(xi, wi, bi, rm.clone().to(xi.dtype), rv.clone().to(xi.dtype), None, 0.1, 1e-5)
        assert out.grad_fn.name() == "BNReLUTrainFunctionEagerBackward", (xi.dtype, bi.dtype)
        ref = torch.relu(torch.nn.functional.batch_norm(xi.float(), None, None, wi.float(), bi.float(), True))
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=atol)
