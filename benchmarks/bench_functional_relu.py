"""Isolated timing: BN(train)->ReLU layer [16,256,28,28] fwd+bwd, eager vs convbn fission, nn.ReLU vs F.relu.

    PYTHONPATH=src python benchmarks/bench_functional_relu.py
"""
import functools

import torch

import convbn
import torch.nn.functional as F
from torch import nn
from convbn.bench.timing import isolated_interleaved_timings


class Mod(nn.Module):
    def __init__(self, functional):
        super().__init__()
        self.bn, self.relu, self.functional = nn.BatchNorm2d(256), nn.ReLU(), functional

    def forward(self, x):
        return F.relu(self.bn(x)) if self.functional else self.relu(self.bn(x))


def build(functional, fission):
    m = Mod(functional)
    if fission:
        convbn.convert(m, "train", fission=True)
    x = torch.randn(16, 256, 28, 28, requires_grad=True)
    return lambda: m(x).sum().backward()


if __name__ == "__main__":
    f = {f"{'F.relu' if fn else 'nn.ReLU'} {'fission' if fi else 'eager'}": functools.partial(build, fn, fi)
         for fn in (True, False) for fi in (False, True)}
    res = isolated_interleaved_timings(f, rounds=14, warmup=3, threads=2)
    print(res)
