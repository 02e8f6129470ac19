"""Tune mode: eval's function and gradients, the norm folded into the conv on the fly (paper Sec. 3.4)."""

from __future__ import annotations

from typing import List, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..functions._conv import apply_function
from ..functions.tune import TuneConvBNFunction
from .base import Block, conv_input_and_spec, stock_layer_forward


class TuneBlock(Block):
    """The conv's forward returns the block output (norm folded in); the norm's forward takes it and
    applies what the norm applies after normalizing (timm drop/act)."""

    mode = "tune"
    roles = ("conv", "bn")

    def conv_forward(self, input: Tensor, output_size: Optional[List[int]] = None) -> Tensor:
        unfused = self.unfused(input, output_size)
        if unfused is not None:
            return self.hand_over(unfused, fused=False, stage=self.conv_name)
        return self.hand_over(self.folded(input, output_size), fused=True, stage=self.conv_name)

    def unfused(self, input: Tensor, output_size: Optional[List[int]]) -> Optional[Tensor]:
        """The plain conv output when this call cannot fold (a hook observes the conv output or the norm
        input; a Linear on N-D input), else ``None``."""
        if not self.conv_fusable():
            return stock_layer_forward(self.conv, input, output_size)
        if isinstance(self.conv, nn.Linear) and input.dim() != 2:
            return self.unfused_linear(input)
        return None

    def folded(self, input: Tensor, output_size: Optional[List[int]]) -> Tensor:
        conv, p = self.conv, self.params()
        x, spec = (input, None) if isinstance(conv, nn.Linear) else conv_input_and_spec(conv, input, output_size)
        return apply_function(TuneConvBNFunction, x, conv.weight, conv.bias, p.weight, p.bias, p.running_mean,
                              p.running_var, p.eps, spec)[0]

    def unfused_linear(self, input: Tensor) -> Tensor:
        # BatchNorm1d on 3-D input normalizes axis 1, not the Linear's feature axis: not foldable.
        self.fallback_reason = (f"`{self.conv_name}` got a {input.dim()}-D input; BatchNorm1d's channel "
                                f"axis is then not the Linear's features, so this call ran unfused")
        return F.linear(input, self.conv.weight, self.conv.bias)

    def bn_forward(self, input: Tensor) -> Tensor:
        if self.take(input, self.bn_name):
            return self.after(input)
        return self.eval_forward(input)
