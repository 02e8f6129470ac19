"""Real third-party CNNs from MONAI: tune == eval for forward and every parameter gradient."""

import copy

import pytest
import torch

import convbn
from conftest import assert_close_rel, calibrate_bn, max_rel_err

monai_nets = pytest.importorskip("monai.networks.nets", reason="install the test extra: pip install -e .[dev]")

pytestmark = pytest.mark.slow


def _grads(model, x, g):
    out = model.train()(x)
    params = [p for p in model.parameters() if p.requires_grad]
    return [out] + list(torch.autograd.grad(out, params, g.to(out.dtype)))


def _global_rel_l2(actual, expected):
    num = sum(float(((a.double() - e) ** 2).sum()) for a, e in zip(actual, expected))
    return (num / sum(float((e ** 2).sum()) for e in expected)) ** 0.5


def _check_tune_equals_eval(model, x, min_converted):
    """float64: tune == eval to round-off for the output and every gradient (the fold is exact).

    float32: the output matches to 1e-5. Gradients of a deep ReLU net are discontinuous where an
    activation sits at ~0: fp32 round-off flips a few ReLU masks, in *either* mode, and a flip moves
    single gradient entries by ~1e-2 (measured: eval flips too; between flips tune's backward error
    is ~1e-6 vs eval's ~1e-4). So fp32 gradients are checked by their global relative L2 error
    against the float64 truth, <= 1e-2: a few flips pass, any wrong formula (O(1)) fails."""
    torch.manual_seed(0)
    calibrate_bn(model, x)
    exact = convbn.convert(copy.deepcopy(model).double(), "eval")
    tuned64 = convbn.convert(copy.deepcopy(model).double(), "tune")
    convbn.convert(model, "tune")
    report = convbn.report(model)
    assert len(report.converted) >= min_converted, str(report)
    assert all(r.reason for r in report.skipped), "every block not converted needs a reason"
    names = ["output"] + [n for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        g = torch.randn_like(model(x))
    truth = _grads(exact, x.double(), g)
    for name, a, b in zip(names, _grads(tuned64, x.double(), g), truth):
        assert_close_rel(a, b, 1e-10, f"float64 {name}")
    got = _grads(model, x, g)
    assert_close_rel(got[0], truth[0], 1e-5, "float32 output")
    err = _global_rel_l2(got[1:], truth[1:])
    assert err <= 1e-2, f"float32 gradients: global relative L2 error {err:.2e}"
    return report


def test_monai_resnet50():
    model = monai_nets.resnet50(spatial_dims=2, n_input_channels=3, num_classes=7)
    report = _check_tune_equals_eval(model, torch.randn(4, 3, 64, 64), min_converted=53)
    assert len(report) == 53


def test_monai_densenet121_preactivation_layout_runs_frozen():
    model = monai_nets.DenseNet121(spatial_dims=2, in_channels=3, out_channels=5)
    report = _check_tune_equals_eval(model, torch.randn(2, 3, 64, 64), min_converted=1)
    # BN -> ReLU -> Conv: most BNs read a concatenation, so they run in eval with that reason
    fallback = report.by_status("fallback")
    assert len(fallback) >= 60 and all("not the output of a Conv/Linear" in r.reason for r in fallback)


def test_monai_3d_unet_with_batch_norm_and_transposed_convs():
    model = monai_nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2),
                            num_res_units=1, norm="batch")
    report = _check_tune_equals_eval(model, torch.randn(2, 1, 16, 16, 16), min_converted=4)
    kinds = {r.kind for r in report.converted}
    assert "ConvTranspose3d->BatchNorm3d" in kinds and "Conv3d->BatchNorm3d" in kinds


def _check_train_variant_equals_plain(model, x, variant, min_converted, steps=2):
    """float64, batch statistics: outputs, every gradient and every buffer after each step equal
    plain PyTorch train mode to round-off; float32 output within 1e-4 (the issue's bound)."""
    torch.manual_seed(0)
    calibrate_bn(model, x)
    ref64 = copy.deepcopy(model).double().train()
    ours64 = convbn.convert(copy.deepcopy(model).double(), "train", **variant).train()
    report = convbn.report(ours64)
    assert len(report.converted) >= min_converted, str(report)
    for step in range(steps):
        xs = x.double() * (1 + 0.5 * step)
        a, b = ours64(xs), ref64(xs)
        g = torch.randn_like(b)
        ga = torch.autograd.grad(a, list(ours64.parameters()), g)
        gb = torch.autograd.grad(b, list(ref64.parameters()), g)
        assert_close_rel(a, b, 1e-10, f"step {step} output")
        for (name, p), u, v in zip(ours64.named_parameters(), ga, gb):
            if not name.endswith("bias") or v.abs().max() > 1e-6:  # conv biases before a train BN: exactly 0
                assert_close_rel(u, v, 1e-8, f"step {step} grad {name}")
        for (name, u), v in zip(ours64.named_buffers(), ref64.buffers()):
            assert torch.equal(u, v) if not u.is_floating_point() else max_rel_err(u, v) <= 1e-12, name
    ours32 = convbn.convert(copy.deepcopy(model), "train", **variant).train()
    assert_close_rel(ours32(x), copy.deepcopy(model).train()(x), 1e-4, "float32 output")
    return report


def test_monai_resnet50_train_recompute():
    model = monai_nets.resnet50(spatial_dims=2, n_input_channels=3, num_classes=7)
    report = _check_train_variant_equals_plain(model, torch.randn(4, 3, 32, 32), {"recompute": True}, 53)
    assert sum("fused" in r.reason for r in report.converted) >= 1


def test_monai_densenet121_train_fission():
    model = monai_nets.DenseNet121(spatial_dims=2, in_channels=3, out_channels=5)
    report = _check_train_variant_equals_plain(model, torch.randn(4, 3, 32, 32), {"fission": True}, 121)
    assert sum("fused" in r.reason for r in report.converted) >= 100  # BN -> ReLU pre-activation layers
