"""Train mode with BN Fission-n-Fusion: one-sweep statistics, one normalize(+ReLU) pass, split backward."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ..functions.bn_fission import bn_relu_train, channel_statistics
from ..norms import uses_batch_stats
from .base import Block, is_compiling, momentum_of


class FissionBlock(Block):
    """Only the norm (and a fused ``nn.ReLU``) get instance forwards; the conv stays stock."""

    mode = "train+fission"
    roles = ("bn",)

    def __init__(self, cand, fuse_relu: bool = False, stats_cache=None):
        super().__init__(cand, fuse_relu)
        self.stats_cache = stats_cache  # the model's ICF statistics cache (convbn.icf.StatsCache)

    def bn_forward(self, input: Tensor) -> Tensor:
        # ICF's ConcatRecorder (a TorchFunctionMode) is active during the model's forward; our own
        # ~100 tensor calls per layer (shape, data_ptr, ...) need not round-trip through it.
        if self.norm.frozen:  # no batch statistics to fission: the norm's own forward, as the user built it
            self._relu_now = False
            out = self.eval_forward(input)
            if self.relu is not None:
                self.hand_over(out, fused=False, stage=self.bn_name)
            return out
        direct = self.stats_cache is not None and type(input) is Tensor and not is_compiling()
        self._relu_now = self.relu_fusable() and (self.functional_relu is None or (
            self.stats_cache is not None and self.stats_cache.recording and not is_compiling()))
        with torch._C.DisableTorchFunction() if direct else contextlib.nullcontext():
            out = self.after(self.fission(input))
        if self.relu is not None:
            self.hand_over(out, fused=self._relu_now, stage=self.bn_name)
        elif self.functional_relu is not None and self._relu_now:
            self.hand_over(out, fused=True, stage=self.bn_name)
            self.stats_cache.await_relu(out, self)  # the recorder passes it through the user's relu call
        return out

    def fission(self, input: Tensor) -> Tensor:
        bn, relu = self.bn, self._relu_now
        if not uses_batch_stats(bn, self.norm):
            out = self.eval_norm(input)
            return out.relu_() if relu else out
        bn._check_input_dim(input)
        p = self.params()
        track = bn.training and bn.track_running_stats
        stats, icf = None, (self.stats_cache is not None and self.stats_cache.recording and not is_compiling()
                            and input.dim() > 2)
        if icf:  # ICF: the statistics of a concatenation's pieces measured earlier (a leading run of channels)
            stats = self.stats_cache.stats_for(input, channel_statistics)
        out, mean, var = bn_relu_train(input, p.weight, p.bias, p.running_mean if track else None,
                                       p.running_var if track else None, bn.num_batches_tracked if track else None,
                                       momentum_of(bn), p.eps, relu=relu, stats=stats, return_stats=True)
        if icf and mean is not None:
            self.stats_cache.measured(input, mean, var, 0 if stats is None else stats[0].shape[0])
        if mean is not None and self.stats_cache is not None and self.stats_cache.storing_recipes \
                and not is_compiling():  # low_memory: backward normalizes again instead of storing ``out``
            self.stats_cache.recipes.record_norm(out, input, mean, var, p.weight, p.bias, p.eps, relu)
        return out

