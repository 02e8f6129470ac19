"""Eval mode: the norm normalizes with its running statistics even under ``model.train()``."""

from __future__ import annotations

from torch import Tensor

from .base import Block


class EvalBlock(Block):
    """Only the norm gets an instance forward; the conv stays stock."""

    mode = "eval"
    roles = ("bn",)

    def bn_forward(self, input: Tensor) -> Tensor:
        return self.eval_forward(input)
