"""Shared fixtures: realistic BatchNorm statistics and reference comparisons."""

from __future__ import annotations

import math
from typing import Iterable, Optional

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




def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (a scale-aware error for tensors whose values span orders of magnitude)."""
    denom = expected.detach().abs().max().clamp_min(1e-30)
    return float((actual.detach().to(expected.dtype) - expected.detach()).abs().max() / denom)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(expected).all(), f"{what}: reference is not finite"
    err = max_rel_err(actual, expected)
    assert err <= rel, f"{what}: max relative error {err:.3g} > {rel:.1g}"


def grads_of(out: torch.Tensor, tensors: Iterable[torch.Tensor], grad_out: torch.Tensor):
    ts = list(tensors)
    return torch.autograd.grad(out, ts, grad_out, allow_unused=True)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)
