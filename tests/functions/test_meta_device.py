"""Every mode, forward and backward, on the ``meta`` device: no host synchronisation anywhere.

A ``meta`` tensor has a shape and a dtype but no values, so any ``.item()``, ``bool(tensor)``,
``float(tensor)`` or Python branch on a tensor's values raises -- what would be a host sync on an
accelerator (a stall per layer on CUDA) is an error here. ``convert`` checks the running statistics'
values, so each model is converted on the CPU and then moved to ``meta``; the torch-op path is what
runs there (the C++ kernels are CPU-only).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import convbn
from conftest import randomize_all_bn

MODES = {
    "eval": ("eval", {}),
    "tune": ("tune", {}),
    "deploy": ("deploy", {}),
    "train": ("train", {}),
    "train+recompute": ("train", dict(recompute=True)),
    "train+fission": ("train", dict(fission=True)),
}


def _layers(kind: str):
    """(model, input shape) for one layer kind followed by its BatchNorm and a ReLU."""
    if kind == "conv1d":
        return nn.Sequential(nn.Conv1d(3, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU()), (4, 3, 7)
    if kind == "conv2d":
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()), (4, 3, 5, 5)
    if kind == "conv3d":
        return nn.Sequential(nn.Conv3d(3, 6, 3, padding=1), nn.BatchNorm3d(6), nn.ReLU()), (2, 3, 4, 4, 3)
    if kind == "convtranspose2d":
        return nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
                             nn.BatchNorm2d(6), nn.ReLU()), (4, 4, 5, 5)
    if kind == "grouped":
        return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(8),
                             nn.ReLU()), (4, 4, 5, 5)
    if kind == "linear":
        return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU()), (8, 5)
    raise AssertionError(kind)


KINDS = ["conv1d", "conv2d", "conv3d", "convtranspose2d", "grouped", "linear"]


def _converted(model: nn.Module, mode: str) -> nn.Module:
    name, kw = MODES[mode]
    twin = copy.deepcopy(model)
    if mode == "deploy":
        return convbn.deploy(twin.eval())
    twin.train(name == "train")
    return convbn.convert(twin, name, **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_every_mode_runs_forward_and_backward_on_meta(mode, kind, momentum):
    torch.manual_seed(0)
    ref, shape = _layers(kind)
    ref[1].momentum = momentum
    randomize_all_bn(ref)
    model = _converted(ref, mode).to("meta")
    plain = copy.deepcopy(ref).train(MODES[mode][0] == "train").to("meta")
    x = torch.empty(shape, device="meta", requires_grad=True)
    if momentum is None and MODES[mode][0] == "train":
        # plain PyTorch's cumulative average reads the counter on the host (1.0 / float(num_batches_tracked)):
        # "train" is plain PyTorch, so it fails there too; the train variants compute the factor on the device
        with pytest.raises(RuntimeError, match="meta"):
            plain(x)
        if mode == "train":
            with pytest.raises(RuntimeError, match="meta"):
                model(x)
            return
        plain[1].momentum = 0.1  # (only the output's shape is compared)
    out, ref_out = model(x), plain(x)
    assert out.device.type == "meta" and out.shape == ref_out.shape and out.dtype == ref_out.dtype
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.sum(), [x] + params)
    assert all(g.device.type == "meta" for g in grads)
    assert grads[0].shape == x.shape and all(g.shape == p.shape for g, p in zip(grads[1:], params))
    for name, buf in model.named_buffers():
        assert buf.device.type == "meta", name


@pytest.mark.parametrize("mode", ["tune", "train+recompute", "train+fission"])
def test_half_precision_models_run_on_meta(mode):
    ref, shape = _layers("conv2d")
    model = _converted(randomize_all_bn(ref), mode).to(torch.bfloat16).to("meta")
    x = torch.empty(shape, device="meta", dtype=torch.bfloat16, requires_grad=True)
    out = model(x)
    assert out.dtype == torch.bfloat16 and out.device.type == "meta"
    (gx,) = torch.autograd.grad(out.sum(), [x])
    assert gx.dtype == torch.bfloat16 and gx.shape == x.shape


@pytest.mark.parametrize("variant", ["recompute", "fission"])
def test_the_on_device_cumulative_factor_updates_running_stats_like_plain_pytorch(variant, monkeypatch):
    """momentum=None off the CPU: the factor 1 / num_batches_tracked stays a tensor on the device. Forced
    here on the CPU, the running statistics still follow plain PyTorch's over several steps."""
    from convbn.functions import bn_fission, train_recompute
    from convbn.ops import use_extension

    for module in (bn_fission, train_recompute):
        monkeypatch.setattr(module, "cumulative_factor", lambda n: n.to(torch.float64).reciprocal())
    torch.manual_seed(0)
    ref, shape = _layers("conv2d")
    ref = randomize_all_bn(ref).double()
    ref[1].momentum = None
    model = _converted(ref, f"train+{variant}")
    for _ in range(3):
        x = torch.randn(shape, dtype=torch.float64)
        with use_extension("torch"):  # (the C++ kernel would take the factor as a float)
            torch.testing.assert_close(model(x), ref(x), rtol=1e-12, atol=1e-12)
    for a, b in zip(model.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_tune_backward_with_gamma_gradients_needs_no_value_of_the_scale():
    """Tune's activation route divides by the per-channel scale; with a zero gamma it must not, and
    deciding that may not read the scale on the host: here every route runs on meta."""
    from convbn.functions.tune import tune_route

    ref, shape = _layers("conv2d")
    model = _converted(randomize_all_bn(ref), "tune").to("meta")
    x = torch.empty(shape, device="meta", requires_grad=True)
    for route in ("weight", "activation", "auto"):
        with tune_route(route):
            out = model(x)
            grads = torch.autograd.grad(out.sum(), [x] + list(model.parameters()))
        assert [g.shape for g in grads] == [x.shape] + [p.shape for p in model.parameters()]
