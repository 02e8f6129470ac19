"""A user's own model for the CLI tests, named by the spec ``cli_nets:tiny_net`` (tests/cli is on sys.path)."""

from typing import Optional

import torch
from torch import nn


class TinyNet(nn.Module):
    """Conv-BN-ReLU twice, then a linear head: two blocks convbn converts."""

    def __init__(self, in_channels: int = 3, dims: Optional[int] = None) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


def tiny_net(in_channels: int = 3) -> TinyNet:
    return TinyNet(in_channels)
