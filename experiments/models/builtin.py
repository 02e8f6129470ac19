"""A small ResNet-style CNN in 1-D, 2-D or 3-D: Conv(bias=False)-BN-ReLU blocks with residual adds."""

from __future__ import annotations

from typing import Sequence, Type

import torch
from torch import nn

__all__ = ["BasicBlock", "SmallResNet", "small_resnet"]

_CONV: dict = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN: dict = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL: dict = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


def _check_dims(dims: int) -> int:
    if dims not in _CONV:
        raise ValueError(f"dims must be 1, 2 or 3 (Conv1d/2d/3d), got {dims!r}.")
    return dims


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut is a strided
    1x1 Conv-BN when the shape changes, the identity otherwise."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dims: int = 2) -> None:
        super().__init__()
        conv: Type[nn.Module] = _CONV[_check_dims(dims)]
        bn: Type[nn.Module] = _BN[dims]
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn(out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = bn(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                conv(in_channels, out_channels, 1, stride=stride, bias=False), bn(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem Conv-BN-ReLU, one :class:`BasicBlock` per stage (stride 2 from the second stage on),
    global average pooling and a linear head. See :func:`small_resnet`."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dims: int = 2,
                 widths: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        _check_dims(dims)
        if num_classes < 1 or in_channels < 1 or not widths or min(widths) < 1:
            raise ValueError(
                f"num_classes, in_channels and every width must be >= 1 (and widths non-empty); got "
                f"num_classes={num_classes}, in_channels={in_channels}, widths={tuple(widths)}.")
        self.stem = nn.Sequential(
            _CONV[dims](in_channels, widths[0], 3, padding=1, bias=False),
            _BN[dims](widths[0]),
            nn.ReLU(inplace=True),
        )
        blocks = []
        prev = widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(prev, width, stride=1 if i == 0 else 2, dims=dims))
            prev = width
        self.layers = nn.Sequential(*blocks)
        self.pool = _POOL[dims](1)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def small_resnet(num_classes: int = 10, in_channels: int = 3, dims: int = 2,
                 widths: Sequence[int] = (16, 32, 64)) -> SmallResNet:
    """A small ResNet-style classifier: 9 Conv->BN pairs (stem, 3 blocks x 2, 2 projection
    shortcuts), all convs ``bias=False``, residual adds, ReLU.

    Args:
        num_classes: outputs of the linear head.
        in_channels: input channels.
        dims: spatial dimensions, 1, 2 or 3 (``Conv1d``/``Conv2d``/``Conv3d`` with matching BN).
        widths: channels of each stage; stages after the first halve the resolution.

    Returns:
        A freshly initialised :class:`SmallResNet` in training mode.

    Example:
        >>> model = small_resnet(num_classes=10, in_channels=1, dims=1)
        >>> model(torch.randn(2, 1, 32)).shape
        torch.Size([2, 10])
    """
    return SmallResNet(num_classes=num_classes, in_channels=in_channels, dims=dims, widths=widths)
