"""BatchNorm statistics for measurements: realistic running statistics and the gamma/sqrt(var+eps) scale.

A freshly built network has ``running_mean = 0``, ``running_var = 1`` and ``gamma = 1`` in every BN,
so every mode computes nearly the same thing and the scales of paper Fig. 2a are all ~1. The
experiments therefore *calibrate* such untouched BNs (same recipe as the test suite's
``calibrate_bn``); BNs that already hold statistics (pretrained checkpoints) are left alone.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["calibrate_bn", "bn_is_untouched", "needs_calibration", "calibrate_if_untouched", "bn_scales"]


def bn_is_untouched(bn: nn.Module) -> bool:
    """True when a BN still has its initial running statistics (mean 0, var 1): it never saw data."""
    if not isinstance(bn, _BatchNorm) or not bn.track_running_stats or bn.running_var is None:
        return False
    return bool((bn.running_mean == 0).all()) and bool((bn.running_var == 1).all())


def needs_calibration(model: nn.Module) -> bool:
    """True when every BN with running statistics is untouched (a randomly initialised model)."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    return bool(bns) and all(bn_is_untouched(m) for m in bns)


@torch.no_grad()
def calibrate_bn(model: nn.Module, x: torch.Tensor, seed: int = 0) -> nn.Module:
    """Give every BN realistic statistics: the true batch statistics of one forward of ``x``
    (cumulative average), then perturbed -- var x log-uniform[0.5, 2], mean + 0.3 std noise,
    gamma log-uniform in [0.3, 3], beta ~ 0.2 N(0, 1). Keeps activations finite through 50+ layers,
    where fully random statistics would overflow.

    Args:
        model: the network (its train/eval flag is restored afterwards).
        x: a representative input batch.
        seed: seed of the perturbations.

    Returns:
        ``model``, modified in place.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> _ = calibrate_bn(m, torch.randn(4, 3, 8, 8))
        >>> bool((m[1].running_var != 1).all())
        True
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    training = model.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    model(x)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
        c = m.num_features
        std = m.running_var.sqrt()
        m.running_mean.add_(0.3 * std * torch.randn(c, generator=g).to(std))
        m.running_var.mul_(torch.exp(torch.empty(c).uniform_(math.log(0.5), math.log(2.0), generator=g)).to(std))
        if m.affine:
            m.weight.copy_(torch.exp(torch.empty(c).uniform_(math.log(0.3), math.log(3.0), generator=g)))
            m.bias.copy_(0.2 * torch.randn(c, generator=g))
    model.train(training)
    return model


def calibrate_if_untouched(model: nn.Module, x: torch.Tensor, seed: int = 0) -> bool:
    """Calibrate ``model``'s BNs (see :func:`calibrate_bn`) if they all still hold their initial
    statistics. Returns whether it did."""
    if needs_calibration(model):
        calibrate_bn(model, x, seed)
        return True
    return False


@torch.no_grad()
def bn_scales(model: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """Per BN with running statistics: ``(name, gamma / sqrt(running_var + eps))`` (paper Fig. 2a).

    In Deploy mode this is the factor the conv weight is multiplied by, and its inverse the factor
    its gradient is multiplied by (paper Sec. 3.3.2).

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> name, s = bn_scales(m)[0]
        >>> name, tuple(s.shape)
        ('1', (4,))
    """
    out = []
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_var is not None:
            gamma = m.weight.detach().float() if m.affine else torch.ones(m.num_features)
            out.append((name, gamma / torch.sqrt(m.running_var.float() + m.eps)))
    return out
