"""Shared fixtures: realistic BatchNorm statistics and reference comparisons."""

from __future__ import annotations

import copy
import math
from typing import Callable, Iterable, Optional

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# Realistic statistics for deep nets (true batch statistics, then perturbed): the library's own meter helper.
from convbn.bench.stats import calibrate_bn  # noqa: F401 (used by test_monai, test_compose, test_export)


def randomize_bn(bn: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Give a BN realistic, non-trivial statistics: gamma/sqrt(var+eps) log-uniform in [0.05, 20],
    var log-uniform in [1e-2, 4], non-zero means, signed gamma, non-zero beta."""
    g = generator or torch.Generator().manual_seed(1234)
    c = bn.num_features
    with torch.no_grad():
        if bn.track_running_stats:
            var = torch.exp(torch.empty(c).uniform_(math.log(1e-2), math.log(4.0), generator=g))
            bn.running_var.copy_(var)
            bn.running_mean.copy_(torch.randn(c, generator=g) * 2.0)
            bn.num_batches_tracked.fill_(100)
        else:
            var = torch.ones(c)
        if bn.affine:
            scale = torch.exp(torch.empty(c).uniform_(math.log(0.05), math.log(20.0), generator=g))
            sign = torch.where(torch.rand(c, generator=g) < 0.2, -1.0, 1.0)
            bn.weight.copy_(sign * scale * torch.sqrt(var + bn.eps))
            bn.bias.copy_(torch.randn(c, generator=g))
    return bn


def randomize_all_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            randomize_bn(m, g)
    return model




# Norm layers by class name, independently of convbn's registry (a test must not ask the library what it tests).
NORM_CLASS_NAMES = frozenset({"FrozenBatchNorm2d", "BatchNormAct2d", "FrozenBatchNormAct2d", "SyncBatchNormAct"})


def is_norm(module: nn.Module) -> bool:
    """A BatchNorm-like layer: torch's BatchNorm*/SyncBatchNorm, torchvision's/timm's by class name."""
    return isinstance(module, _BatchNorm) or any(c.__name__ in NORM_CLASS_NAMES for c in type(module).__mro__)


def frozen_reference(model: nn.Module, training: Optional[bool] = None,
                     norm: Callable[[nn.Module], bool] = is_norm) -> nn.Module:
    """Plain PyTorch computing what eval / tune / deploy compute: a deep copy (reverted if it is converted)
    with every norm layer's own ``training`` flag off -- running statistics -- and every other module in
    its mode (or in ``training``, when given). Only the statistics freeze: what a norm module applies after
    normalizing (timm's drop and act) follows the model's mode, as in convbn's eval."""
    ref = copy.deepcopy(model)
    if "_convbn_state" in ref.__dict__:
        import convbn

        convbn.revert(ref)
    if training is not None:
        ref.train(training)
    for m in ref.modules():
        if norm(m):
            m.training = False
    return ref


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (a scale-aware error for tensors whose values span orders of magnitude)."""
    denom = expected.detach().abs().max().clamp_min(1e-30)
    return float((actual.detach().to(expected.dtype) - expected.detach()).abs().max() / denom)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(expected).all(), f"{what}: reference is not finite"
    err = max_rel_err(actual, expected)
    assert err <= rel, f"{what}: max relative error {err:.3g} > {rel:.1g}"


def assert_same_step(actual, expected, rel: float = 1e-10, floor: float = 1e-9) -> None:
    """``(output, {name: gradient})`` pairs, per tensor, relative; a gradient that is zero in exact arithmetic
    (a conv bias before a train-mode BN) -- its reference below ``floor`` times the step's largest gradient --
    is compared against that noise floor instead."""
    out, grads = actual
    ref_out, ref_grads = expected
    assert_close_rel(out, ref_out, rel, "output")
    assert grads.keys() == ref_grads.keys()
    scale = max(float(r.abs().max()) for r in ref_grads.values() if r is not None)
    for name, g in grads.items():
        r = ref_grads[name]
        if r is None:
            assert g is None or float(g.abs().max()) == 0.0, name
            continue
        err = float((g - r).abs().max())
        if float(r.abs().max()) <= floor * scale:  # analytically zero: both must sit at the noise floor
            assert err <= floor * scale, f"{name}: {err:.3g} above the noise floor {floor * scale:.3g}"
        else:
            assert_close_rel(g, r, rel, name)


def grads_of(out: torch.Tensor, tensors: Iterable[torch.Tensor], grad_out: torch.Tensor):
    ts = list(tensors)
    return torch.autograd.grad(out, ts, grad_out, allow_unused=True)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)
