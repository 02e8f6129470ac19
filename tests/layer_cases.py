"""Layer factories shared by the fold / tune / convert tests."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from conftest import randomize_bn

KINDS = ["Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear"]
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def block_params():
    """(kind, bias, affine, groups) for every layer kind; Linear has no groups. The full product, for the
    fold math and the Functions (tests/test_fold.py, tests/functions/), where bias and affine change the math."""
    return [(k, b, a, g) for k in KINDS for b in (True, False) for a in (True, False) for g in (1, 2)
            if not (k == "Linear" and g == 2)]


def convert_params():
    """One (kind, bias, affine, groups) per layer kind and groups, bias and affine cycling through all four
    combinations: for the tests of convert's wiring (analysis, plan, install), where the layer kind and its
    geometry decide the path and bias/affine only reach the math that block_params() already covers."""
    pairs = [(k, g) for k in KINDS for g in (1, 2) if not (k == "Linear" and g == 2)]
    return [(k, i % 2 == 0, (i // 2) % 2 == 0, g) for i, (k, g) in enumerate(pairs)]


def dims_of(kind: str) -> int:
    return 0 if kind == "Linear" else int(kind[-2])


def make_block(kind: str, bias: bool, affine: bool, groups: int, seed: int = 0,
               c_in: int = 4, c_out: int = 6) -> Tuple[nn.Module, nn.Module, torch.Tensor]:
    """A (layer, bn, input) triple with non-trivial geometry and realistic BN statistics."""
    torch.manual_seed(seed)
    if kind == "Linear":
        layer = nn.Linear(c_in * 3, c_out, bias=bias)
        bn = nn.BatchNorm1d(c_out, affine=affine)
        x = torch.randn(8, c_in * 3)
    else:
        n = dims_of(kind)
        cls = getattr(nn, kind)
        kw = dict(kernel_size=3, stride=2, padding=1, dilation=1, groups=groups, bias=bias)
        if kind.startswith("ConvTranspose"):
            kw.update(output_padding=1)
        else:
            kw.update(dilation=2 if n < 3 else 1)
        layer = cls(c_in, c_out, **kw)
        bn = _BN[n](c_out, affine=affine)
        size = {1: (9,), 2: (7, 6), 3: (5, 4, 5)}[n]
        x = torch.randn(3, c_in, *size)
    with torch.no_grad():
        layer.weight.mul_(2.0)
        if bias:
            layer.bias.normal_(0, 1)
    randomize_bn(bn, torch.Generator().manual_seed(seed + 7))
    return layer, bn, x


class MixedBlocksNet(nn.Module):
    """Residual, grouped, strided, transposed and Linear->BN1d blocks: every path tune takes.
    ``conv2_bias``/``up_channels`` vary the grouped conv's bias and the transposed conv's width."""

    def __init__(self, conv2_bias: bool = True, up_channels: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 32, 3, 1, 1, groups=4, bias=conv2_bias), nn.BatchNorm2d(32)
        self.down = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
        self.up = nn.ConvTranspose2d(32, up_channels, 3, 2, 1, output_padding=1)
        self.bn_up = nn.BatchNorm2d(up_channels)
        self.fc, self.bn_fc = nn.Linear(up_channels, 10), nn.BatchNorm1d(10)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + self.down(x))
        y = torch.relu(self.bn_up(self.up(y)))
        return self.bn_fc(self.fc(y.mean((2, 3))))
