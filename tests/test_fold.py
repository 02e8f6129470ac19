import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_rel
from convbn.fold import fold_conv_bn_weights, scale_weight_per_out_channel, sum_per_out_channel
from layer_cases import block_params, dims_of, make_block


def _apply_folded(layer, x, w, b):
    if isinstance(layer, torch.nn.Linear):
        return F.linear(x, w, b)
    n = dims_of(type(layer).__name__)
    if layer.transposed:
        fn = getattr(F, f"conv_transpose{n}d")
        return fn(x, w, b, layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation)
    return getattr(F, f"conv{n}d")(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)


@pytest.mark.parametrize("kind,bias,affine,groups", block_params())
def test_fold_matches_eval(kind, bias, affine, groups):
    layer, bn, x = make_block(kind, bias, affine, groups)
    bn.eval()
    expected = bn(layer(x))
    w, b = fold_conv_bn_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var,
                                bn.weight, bn.bias, bn.eps, groups=groups,
                                transposed=getattr(layer, "transposed", False))
    assert_close_rel(_apply_folded(layer, x, w, b), expected, 2e-6, "folded output")


@pytest.mark.parametrize("kind", ["ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"])
@pytest.mark.parametrize("groups", [2, 3])
def test_grouped_transpose_fold_equals_the_unfolded_module_in_float64(kind, groups):
    """Folding a grouped ConvTranspose + BN (the case torch.nn.utils.fusion gets wrong) gives the
    unfolded modules' output, in float64, with realistic BN statistics and per-group distinct scales."""
    layer, bn, x = make_block(kind, True, True, groups, c_in=2 * groups, c_out=3 * groups)
    layer, bn, x = layer.double(), bn.double().eval(), x.double()
    w, b = fold_conv_bn_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                bn.eps, groups=groups, transposed=True)
    folded = copy.deepcopy(layer)
    with torch.no_grad():
        folded.weight.copy_(w)
        folded.bias.copy_(b)
    assert_close_rel(folded(x), bn(layer(x)), 1e-12, "folded grouped ConvTranspose")


@pytest.mark.parametrize("transposed,groups", [(False, 1), (False, 3), (True, 1), (True, 3)])
def test_sum_per_out_channel_is_adjoint_of_scaling(transposed, groups):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    c_out = 4 * groups if transposed else 6
    s = torch.randn(c_out, generator=g, dtype=torch.float64)
    v = torch.randn_like(w)
    lhs = (scale_weight_per_out_channel(w, s, groups=groups, transposed=transposed) * v).sum()
    rhs = (sum_per_out_channel(w * v, groups=groups, transposed=transposed) * s).sum()
    assert torch.allclose(lhs, rhs)


def test_fold_half_precision_weights_computed_in_float32():
    layer, bn, x = make_block("Conv2d", True, True, 1)
    bn.eval()
    ref_w, ref_b = fold_conv_bn_weights(layer.weight.double(), layer.bias.double(), bn.running_mean.double(),
                                        bn.running_var.double(), bn.weight.double(), bn.bias.double(), bn.eps)
    half = copy.deepcopy(layer).to(torch.bfloat16)
    w, b = fold_conv_bn_weights(half.weight, half.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    assert w.dtype == torch.bfloat16
    # only the bf16 input rounding and one final rounding: within a few bf16 ulps of the exact fold
    assert_close_rel(w.double(), ref_w, 2e-2, "bf16 folded weight")


def test_fold_matches_torch_fusion_for_plain_conv():
    layer, bn, _ = make_block("Conv2d", True, True, 1)
    bn.eval()
    ours = fold_conv_bn_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    theirs = torch.nn.utils.fusion.fuse_conv_bn_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var,
                                                        bn.eps, bn.weight, bn.bias)
    assert_close_rel(ours[0], theirs[0].detach(), 1e-6)
    assert_close_rel(ours[1], theirs[1].detach(), 1e-6)
