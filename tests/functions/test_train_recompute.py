"""Train mode with recomputation vs. plain PyTorch Conv/Linear -> BatchNorm (-> ReLU) in training."""

from __future__ import annotations

import copy
import zlib
from typing import Callable, Optional

import pytest
import torch
from torch import nn

from convbn.bench.memory import saved_tensor_bytes
from convbn.functions.train_recompute import (
    RecomputeConvBNFunction,
    batch_statistics,
    recompute_conv_bn,
    update_running_stats_,
)
from convbn.functions.tune import ConvSpec

# name -> (layer factory(bias), BN class, input shape). Sizes are tiny: the whole file must run fast.
LAYERS = {
    "conv1d_s2p1": (lambda b: nn.Conv1d(4, 6, 3, stride=2, padding=1, bias=b), nn.BatchNorm1d, (3, 4, 9)),
    "conv2d_g2_d2": (lambda b: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=b), nn.BatchNorm2d,
                     (2, 4, 7, 6)),
    "conv2d_asym": (lambda b: nn.Conv2d(4, 6, (3, 1), stride=(2, 1), padding=(1, 0), bias=b), nn.BatchNorm2d,
                    (2, 4, 7, 5)),
    "conv3d": (lambda b: nn.Conv3d(4, 6, 3, padding=1, bias=b), nn.BatchNorm3d, (2, 4, 4, 3, 5)),
    "convT1d_s2_op1": (lambda b: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, bias=b),
                       nn.BatchNorm1d, (3, 4, 6)),
    "convT2d_g2_d2": (lambda b: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, dilation=2,
                                                   groups=2, bias=b), nn.BatchNorm2d, (2, 4, 4, 5)),
    "convT3d_g2": (lambda b: nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2, bias=b), nn.BatchNorm3d, (2, 4, 2, 3, 2)),
    "linear": (lambda b: nn.Linear(5, 6, bias=b), nn.BatchNorm1d, (7, 5)),
}
STATS = {
    "momentum0.1": dict(momentum=0.1, track_running_stats=True),
    "momentumNone": dict(momentum=None, track_running_stats=True),
    "untracked": dict(momentum=0.1, track_running_stats=False),
}


def spec_of(layer: nn.Module) -> Optional[ConvSpec]:
    if isinstance(layer, nn.Linear):
        return None
    return ConvSpec(tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation), bool(layer.transposed),
                    tuple(layer.output_padding), layer.groups)


def randomize_bn_(bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Realistic BN state: |gamma| in [0.5, 3] with random signs, beta ~ N(0, 1), non-default stats."""
    with torch.no_grad():
        if bn.affine:
            sign = torch.randint(0, 2, bn.weight.shape).float() * 2 - 1
            bn.weight.copy_(torch.empty_like(bn.weight).uniform_(0.5, 3.0) * sign)
            bn.bias.normal_()
        if bn.track_running_stats:
            bn.running_mean.normal_(0, 2)
            bn.running_var.uniform_(0.3, 3.0)
            bn.num_batches_tracked.fill_(7)


def make_block(name: str, bias: bool, affine: bool, stats: str, dtype=torch.float32):
    factory, bn_cls, shape = LAYERS[name]
    layer = factory(bias).to(dtype)
    bn = bn_cls(6, affine=affine, **STATS[stats]).to(dtype)
    randomize_bn_(bn)
    return layer.train(), bn.train(), shape


def run_recompute(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, relu: bool) -> torch.Tensor:
    return recompute_conv_bn(x, layer.weight, layer.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                             bn.num_batches_tracked, bn.momentum, bn.eps, spec_of(layer), relu=relu)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, what: str = "") -> None:
    """Relative to the tensor's scale: |a - e| <= rtol * max|e| elementwise."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-12), msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("relu", [False, True], ids=["norelu", "relu"])
@pytest.mark.parametrize("stats", list(STATS))
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_matches_plain_pytorch_over_three_steps(name, bias, affine, stats, relu):
    torch.manual_seed(zlib.crc32(repr((name, bias, affine, stats, relu)).encode()))
    layer, bn, shape = make_block(name, bias, affine, stats)
    ref = nn.Sequential(copy.deepcopy(layer), copy.deepcopy(bn), nn.ReLU() if relu else nn.Identity()).train()
    ref_layer, ref_bn = ref[0], ref[1]
    for step in range(3):
        x = (torch.randn(shape) * 2 + 0.5).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        out, out_ref = run_recompute(layer, bn, x, relu), ref(x_ref)
        assert out.shape == out_ref.shape and out.dtype == out_ref.dtype
        assert_close(out, out_ref, what=f"output step {step}")
        grad = torch.randn_like(out_ref)
        out.backward(grad)
        out_ref.backward(grad)
        assert_close(x.grad, x_ref.grad, what="grad x")
        assert_close(layer.weight.grad, ref_layer.weight.grad, what="grad conv weight")
        if bias:
            # Train-mode BN cancels the conv bias: both gradients are rounding noise around 0, whose
            # size grows with the values summed per channel. A real bug is O(count), far above this.
            count = out.numel() // out.shape[1]
            torch.testing.assert_close(layer.bias.grad, ref_layer.bias.grad, rtol=0, atol=2e-6 * count)
        if affine:
            assert_close(bn.weight.grad, ref_bn.weight.grad, what="grad bn weight")
            assert_close(bn.bias.grad, ref_bn.bias.grad, what="grad bn bias")
        for p in (*layer.parameters(), *bn.parameters(), *ref.parameters()):
            p.grad = None
    if bn.track_running_stats:
        assert_close(bn.running_mean, ref_bn.running_mean, what="running_mean")
        assert_close(bn.running_var, ref_bn.running_var, what="running_var")
        assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 10
    else:
        assert bn.running_mean is None and bn.num_batches_tracked is None


def test_running_stats_changed_and_momentum_none_uses_cumulative_average():
    # Guards the comparison above against a vacuous pass: the stats really move, and for
    # momentum=None the factor is 1 / num_batches_tracked *after* the increment.
    rm, rv, nbt = torch.full((2,), 4.0), torch.full((2,), 8.0), torch.tensor(3)
    update_running_stats_(rm, rv, nbt, torch.tensor([0.0, 8.0]), torch.tensor([1.0, 2.0]), 5, None)
    assert int(nbt) == 4
    torch.testing.assert_close(rm, torch.tensor([3.0, 5.0]))  # 4 * 3/4 + m / 4
    torch.testing.assert_close(rv, torch.tensor([6.0 + 1.25 / 4, 6.0 + 2.5 / 4]))  # unbiased: var * 5/4
    rm, rv = torch.zeros(2), torch.ones(2)
    update_running_stats_(rm, rv, None, torch.ones(2), torch.ones(2), 2, None)  # no counter: factor 0
    torch.testing.assert_close(rm, torch.zeros(2))


def test_statistics_are_safe_when_mean_dwarfs_std():
    torch.manual_seed(0)
    y = torch.randn(16, 3, 32, 32) + torch.tensor([1000.0, -1000.0, 3000.0]).view(1, 3, 1, 1)
    y64 = y.double()
    ref_var = y64.var(dim=(0, 2, 3), unbiased=False)
    mean, var = batch_statistics(y)
    assert mean.dtype == var.dtype == torch.float32
    rel = ((var.double() - ref_var).abs() / ref_var).max().item()
    assert rel <= 1e-5, rel
    torch.testing.assert_close(mean.double(), y64.mean(dim=(0, 2, 3)), rtol=1e-7, atol=0)
    # The same data defeats the naive E[y^2] - E[y]^2 in float32: the check above can fail.
    naive = (y * y).mean(dim=(0, 2, 3)) - y.mean(dim=(0, 2, 3)) ** 2
    assert ((naive.double() - ref_var).abs() / ref_var).max().item() > 1e-3


def test_end_to_end_large_channel_mean_running_var():
    torch.manual_seed(1)
    conv, bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=1.0)  # momentum 1: running_var = batch var
    with torch.no_grad():
        conv.bias.fill_(1000.0)
    x = torch.randn(8, 3, 16, 16)
    out = run_recompute(conv, bn, x, relu=False)
    y64 = torch.nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double())
    ref_var = y64.var(dim=(0, 2, 3), unbiased=True)
    assert ((bn.running_var.double() - ref_var).abs() / ref_var).max().item() <= 1e-5
    ref_out = (y64 - y64.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(
        y64.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + bn.eps)
    assert (out.double() - ref_out).abs().max().item() <= 1e-3  # y itself is only float32-accurate


GRADCHECK_LAYERS = ["conv1d_s2p1", "conv2d_g2_d2", "convT2d_g2_d2", "linear"]


@pytest.mark.parametrize("relu", [False, True], ids=["norelu", "relu"])
@pytest.mark.parametrize("name", GRADCHECK_LAYERS)
def test_gradcheck_float64(name, relu):
    torch.manual_seed(2)
    layer, bn, shape = make_block(name, bias=True, affine=True, stats="untracked", dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    params = [layer.weight, layer.bias, bn.weight, bn.bias]
    spec = spec_of(layer)

    def fn(x, w, b, g, beta):
        return RecomputeConvBNFunction.apply(x, w, b, g, beta, None, None, None, 0.1, 1e-5, spec, relu)

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["conv2d_g2_d2", "linear"])
def test_double_backward_matches_gradgradcheck(name):
    torch.manual_seed(3)
    layer, bn, shape = make_block(name, bias=True, affine=True, stats="untracked", dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    spec = spec_of(layer)

    def fn(x, w, g, beta):
        return RecomputeConvBNFunction.apply(x, w, layer.bias, g, beta, None, None, None, 0.1, 1e-5, spec, True)

    # fast_mode checks random projections of the second derivative: full mode costs ~10 s here.
    assert torch.autograd.gradgradcheck(fn, (x, layer.weight, bn.weight, bn.bias), eps=1e-6, atol=1e-5, rtol=1e-4,
                                        fast_mode=True)


def test_double_backward_under_autocast_cast_raises_clear_error():
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run_recompute(conv, bn, x, relu=True)
    with pytest.raises(RuntimeError, match="double backward .*not supported when the input was cast"):
        torch.autograd.grad((out.float() ** 2).sum(), x, create_graph=True)


def test_autocast_bfloat16_matches_plain_autocast():
    torch.manual_seed(4)
    layer, bn, shape = make_block("conv2d_g2_d2", bias=True, affine=True, stats="momentum0.1")
    ref = nn.Sequential(copy.deepcopy(layer), copy.deepcopy(bn), nn.ReLU()).train()
    x = torch.randn(4, *shape[1:], requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run_recompute(layer, bn, x, relu=True)
        out_ref = ref(x_ref)
    assert out.dtype == out_ref.dtype == torch.bfloat16
    assert bn.running_mean.dtype == torch.float32
    assert_close(out.float(), out_ref.float(), rtol=2e-2, what="bf16 output")
    grad = torch.randn_like(out_ref)
    out.backward(grad)
    out_ref.backward(grad)
    assert x.grad.dtype == layer.weight.grad.dtype == torch.float32
    assert_close(x.grad, x_ref.grad, rtol=3e-2, what="bf16 grad x")
    assert_close(layer.weight.grad, ref[0].weight.grad, rtol=3e-2, what="bf16 grad weight")
    assert_close(bn.weight.grad, ref[1].weight.grad, rtol=3e-2, what="bf16 grad gamma")
    assert_close(bn.running_mean, ref[1].running_mean, rtol=1e-3, what="running_mean")
    assert_close(bn.running_var, ref[1].running_var, rtol=1e-3, what="running_var")


def _stack(blocks: int = 4, channels: int = 8):
    torch.manual_seed(5)
    mods = []
    for _ in range(blocks):
        bn = nn.BatchNorm2d(channels)
        randomize_bn_(bn)
        mods += [nn.Conv2d(channels, channels, 3, padding=1), bn, nn.ReLU()]
    return nn.Sequential(*mods).train()


def _recompute_stack(plain: nn.Sequential) -> Callable[[torch.Tensor], torch.Tensor]:
    model = copy.deepcopy(plain)

    def run(x):
        for i in range(0, len(model), 3):
            x = run_recompute(model[i], model[i + 1], x, relu=True)
        return x

    return run


def test_saved_bytes_of_four_conv_bn_relu_blocks():
    plain = _stack()
    recompute = _recompute_stack(plain)
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    plain_bytes = saved_tensor_bytes(lambda: plain(x))
    rec_bytes = saved_tensor_bytes(lambda: recompute(x))
    ratio = rec_bytes / plain_bytes
    assert ratio <= 0.55, (rec_bytes, plain_bytes, ratio)
    # Exactly: 4 block inputs (x and three ReLU outputs) and all parameters -- nothing per channel:
    # backward reruns PyTorch's fused BN kernel on the recomputed conv output (like checkpoint).
    params = sum(p.numel() * 4 for p in plain.parameters())
    expected = 4 * x.numel() * 4 + params
    assert rec_bytes == expected, (rec_bytes, expected)


def test_does_not_save_conv_output_even_without_relu():
    conv, bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, affine=False)
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    got = saved_tensor_bytes(lambda: run_recompute(conv, bn, x, relu=False))
    assert got == x.numel() * 4 + conv.weight.numel() * 4  # x and the weight, nothing else


# ---- bad input --------------------------------------------------------------------------------


def _args(**over):
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    args = dict(x=torch.randn(2, 3, 5, 5), weight=conv.weight, bias=conv.bias, bn_weight=bn.weight, bn_bias=bn.bias,
                running_mean=bn.running_mean, running_var=bn.running_var, num_batches_tracked=bn.num_batches_tracked,
                momentum=0.1, eps=1e-5, spec=spec_of(conv))
    args.update(over)
    return args


@pytest.mark.parametrize("over, exc, pattern", [
    (dict(spec="conv2d"), TypeError, "ConvSpec or None"),
    (dict(spec=None), ValueError, "2-D input"),
    (dict(x=torch.randn(3, 5, 5)), ValueError, "batch dimension"),
    (dict(x=torch.ones(2, 3, 5, 5, dtype=torch.long)), TypeError, "floating-point"),
    (dict(bn_weight=torch.ones(5)), ValueError, "num_features"),
    (dict(running_var=None), ValueError, "both running_mean and running_var"),
    (dict(momentum="0.1"), TypeError, "momentum"),
    (dict(eps=0.0), ValueError, "eps must be a positive"),
    (dict(x=torch.randn(1, 3, 3, 3)), ValueError, "more than 1 value per channel"),
    (dict(spec=ConvSpec((1, 1), ("same", "same"), (1, 1), False, (0, 0), 1)), ValueError, "pad x"),
])
def test_bad_input_raises_clear_error(over, exc, pattern):
    args = _args(**over)
    rm_before = args["running_mean"].clone() if args["running_mean"] is not None else None
    with pytest.raises(exc, match=pattern):
        recompute_conv_bn(**args)
    if rm_before is not None:  # a rejected call leaves the buffers untouched
        torch.testing.assert_close(args["running_mean"], rm_before)


def test_linear_on_3d_input_is_rejected():
    lin = nn.Linear(5, 6)
    with pytest.raises(ValueError, match="BatchNorm1d on 3-D input"):
        recompute_conv_bn(torch.randn(2, 4, 5), lin.weight, lin.bias, None, None, None, None, None, 0.1, 1e-5, None)


@pytest.mark.parametrize("dtype,param_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                               (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_backward_recomputes_the_forwards_statistics_and_output_bit_for_bit(dtype, param_dtype):
    """Forward runs the train kernel with the running buffers (it updates them), backward without: the
    batch statistics and the output (whose sign is the ReLU mask) must not depend on that."""
    g = torch.Generator().manual_seed(0)
    y = (torch.randn(6, 8, 7, 5, generator=g) * 3 + 5).to(dtype)
    gamma, beta = (torch.randn(8, generator=g).to(param_dtype) for _ in range(2))
    rm, rv = torch.zeros(8, dtype=param_dtype), torch.ones(8, dtype=param_dtype)
    with_buffers = torch.ops.aten.native_batch_norm(y, gamma, beta, rm, rv, True, 0.1, 1e-5)
    without = torch.ops.aten.native_batch_norm(y, gamma, beta, None, None, True, 0.0, 1e-5)
    assert not torch.equal(rm, torch.zeros(8, dtype=param_dtype))  # the buffers were updated
    for a, b in zip(with_buffers, without):
        assert torch.equal(a, b)
