"""Per-channel precision off the CPU: float32 accumulation (never float64, slow on consumer GPUs and
absent on MPS), with the exactness bounds of float32/fp16/bf16 models kept.

No accelerator is needed: the dtype choice is a pure function of the device, and the float32 path
is run on the CPU by emptying ``FLOAT64_DEVICES`` with the torch-op path forced.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import convbn
from conftest import randomize_all_bn
from convbn.functions import _conv
from convbn.functions._conv import channel_dtype
from convbn.functions.bn_fission import bn_relu_train, channel_statistics
from convbn.ops import use_extension


@pytest.mark.parametrize("device", ["cuda", "mps", "meta", "xpu", torch.device("cuda", 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_per_channel_math_is_float32_off_the_cpu(device, dtype):
    assert channel_dtype(device, dtype) == torch.float32
    assert channel_dtype(device, torch.float64) == torch.float64  # float64 data stays float64
    assert channel_dtype(torch.device("cpu"), dtype) == torch.float64


@pytest.fixture(params=["cpu-float64", "float32-as-off-cpu"])
def channel_precision(request, monkeypatch):
    if request.param == "float32-as-off-cpu":
        monkeypatch.setattr(_conv, "FLOAT64_DEVICES", ())
    with use_extension("torch"):
        yield request.param


def test_fission_vectors_have_the_per_channel_dtype(channel_precision):
    want = torch.float64 if channel_precision == "cpu-float64" else torch.float32
    x = torch.randn(4, 3, 5, 5)
    assert all(t.dtype == want for t in channel_statistics(x))
    bn = nn.BatchNorm2d(3)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    out = bn_relu_train(x.requires_grad_(), bn.weight, bn.bias, rm, rv, None, 0.1, bn.eps)
    assert out.grad_fn.saved_tensors[3].dtype == want  # the saved batch mean
    assert rm.dtype == torch.float32  # buffers keep theirs


def _block(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    return randomize_all_bn(model).to(dtype)


def _converted(model, variant):
    if variant == "tune":
        return convbn.convert(model.eval(), "tune")
    return convbn.convert(model.train(), "train", **{variant: True})


def _rel_err(v, truth, scale=None):
    return float((v.double() - truth).abs().max() / (truth if scale is None else scale).abs().max())


@pytest.mark.parametrize("variant", ["tune", "recompute", "fission"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_models_are_as_accurate_as_plain_pytorch(variant, dtype, channel_precision):
    """Output, every gradient and the running statistics vs a float64 truth: no worse than plain
    PyTorch's own error in the same dtype (1.5x, plus a floor for values near the dtype's ulp)."""
    base = _block(torch.float32)
    truth = copy.deepcopy(base).double().train(variant != "tune")
    plain = copy.deepcopy(base).to(dtype).train(variant != "tune")
    model = _converted(copy.deepcopy(base).to(dtype), variant)
    x = torch.randn(6, 3, 7, 7) * 2 + 0.5
    g = torch.randn(6, 8, 7, 7)
    results = []
    for m, dt in ((model, dtype), (plain, dtype), (truth, torch.float64)):
        out = m(x.to(dt))
        results.append((out,) + torch.autograd.grad(out, list(m.parameters()), g.to(dt)))
    floor = 1e-6 if dtype == torch.float32 else 2e-3
    for i, (a, b, t) in enumerate(zip(*results)):
        assert a.dtype == b.dtype == dtype
        # the conv bias's gradient under batch statistics is 0 in exact arithmetic: relative to dL/dw's size
        scale = results[2][1] if i == 2 and variant != "tune" else None
        err, err_plain = _rel_err(a, t, scale), _rel_err(b, t, scale)
        assert err <= 1.5 * err_plain + floor, (i, err, err_plain)
    for (name, a), b, t in zip(model.named_buffers(), plain.buffers(), truth.buffers()):
        if name.endswith("num_batches_tracked"):
            assert int(a) == int(b) == int(t)
            continue
        err, err_plain = _rel_err(a, t.double()), _rel_err(b, t.double())
        assert a.dtype == b.dtype and err <= 1.5 * err_plain + floor, (name, err, err_plain)
