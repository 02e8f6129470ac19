"""Train mode with the conv output recomputed in backward (PyTorch's exact train semantics)."""

from __future__ import annotations

from typing import List, Optional

from torch import Tensor, nn

from ..functions._conv import apply_function
from ..functions.train_recompute import RecomputeConvBNFunction
from ..norms import uses_batch_stats
from .base import conv_input_and_spec, momentum_of
from .tune import TuneBlock


class RecomputeBlock(TuneBlock):
    """Like tune, the conv computes the block (and a fused ReLU); with batch statistics it is
    :class:`RecomputeConvBNFunction`, with running ones (norm in eval(), frozen norms) tune's Function."""

    mode = "train+recompute"
    roles = ("conv", "bn")

    def conv_forward(self, input: Tensor, output_size: Optional[List[int]] = None) -> Tensor:
        conv, bn = self.conv, self.bn
        unfused = self.unfused(input, output_size)
        if unfused is not None:
            self._relu_now = False
            return self.hand_over(unfused, fused=False, stage=self.conv_name)
        self._relu_now = self.relu_fusable()
        if not uses_batch_stats(bn, self.norm):
            out = self.folded(input, output_size)
            return self.hand_over(out.relu_() if self._relu_now else out, fused=True, stage=self.conv_name)
        x, spec = (input, None) if isinstance(conv, nn.Linear) else conv_input_and_spec(conv, input, output_size)
        p = self.params()
        track = bn.training and bn.track_running_stats
        out = apply_function(
            RecomputeConvBNFunction,
            x, conv.weight, conv.bias, p.weight, p.bias,
            p.running_mean if track else None, p.running_var if track else None,
            bn.num_batches_tracked if track else None, momentum_of(bn), p.eps, spec, self._relu_now)
        return self.hand_over(out, fused=True, stage=self.conv_name)

    def bn_forward(self, input: Tensor) -> Tensor:
        fused = self.take(input, self.bn_name)
        if not fused:  # an unfused call: the plain PyTorch norm (its own drop/act included)
            self._relu_now = False
            out = type(self.bn).forward(self.bn, input)
        else:
            out = self.after(input)
        if self.relu is not None:
            self.hand_over(out, fused=self._relu_now, stage=self.bn_name)
        return out
