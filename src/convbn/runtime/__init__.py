"""What runs: one small class per installed mode, built from the plan's rows.

==================  =====================================  ==========================================
mode                class                                   instance forwards
==================  =====================================  ==========================================
``eval``            :class:`~convbn.runtime.eval.EvalBlock`           norm
``tune``            :class:`~convbn.runtime.tune.TuneBlock`           conv (block output), norm (takes it)
``train+recompute`` :class:`~convbn.runtime.recompute.RecomputeBlock` conv, norm, fused ``nn.ReLU``
``train+fission``   :class:`~convbn.runtime.fission.FissionBlock`     norm, fused ``nn.ReLU``
``deploy``          :mod:`convbn.runtime.deploy` (folds parameters; nothing installed)
==================  =====================================  ==========================================
"""

from __future__ import annotations

from typing import Dict, Type

from ..analysis import Candidate
from .base import Block, InstalledForward, installed_block, uninstall
from .eval import EvalBlock
from .fission import FissionBlock
from .recompute import RecomputeBlock
from .tune import TuneBlock

__all__ = ["BLOCKS", "INSTALLED_MODES", "Block", "make_block", "install", "uninstall", "installed_block"]

BLOCKS: Dict[str, Type[Block]] = {cls.mode: cls for cls in (EvalBlock, TuneBlock, RecomputeBlock, FissionBlock)}
INSTALLED_MODES = tuple(BLOCKS)
TRAIN_VARIANTS = ("train+recompute", "train+fission")


def make_block(cand: Candidate, mode: str, stats_cache=None) -> Block:
    """The block object for one plan row (``mode`` one of :data:`INSTALLED_MODES`)."""
    fuse_relu = mode in TRAIN_VARIANTS and (cand.relu is not None or cand.inner_relu is not None)
    if mode == "train+fission":  # only fission intercepts a functional ReLU (in ICF's TorchFunctionMode)
        return FissionBlock(cand, fuse_relu or cand.functional_relu is not None, stats_cache)
    return BLOCKS[mode](cand, fuse_relu)


def install(block: Block) -> None:
    """Set the instance forwards the block's mode needs (and a fused nn.ReLU's pass-through)."""
    modules = {"conv": block.conv, "bn": block.bn, "relu": block.relu}
    for m in modules.values():
        if m is not None:
            uninstall(m)
    for role in block.roles + (("relu",) if block.relu is not None else ()):
        modules[role].forward = InstalledForward(block, role)
