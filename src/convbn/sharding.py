"""Sharded models (FSDP2 ``fully_shard``, FSDP1, DTensor parameters): convbn converts *before* sharding.

Why: ``convert`` traces the model (torch.fx, and a run on ``example_inputs``). On a model that
``fully_shard`` already wrapped, the tracer calls submodules outside FSDP's root-first forward order
(FSDP2 then refuses every later forward: "FSDP state has already been lazily initialized"), and the
parameters are DTensor shards, so a fold computed outside a forward would see one process's slice.
Converted first, every mode that keeps the parameters (train, eval, tune, ``recompute=``, ``fission=``)
runs under ``fully_shard``: FSDP gathers the full parameters before the block's forward, so tune folds the
unsharded weight (tested in ``tests/test_fsdp.py``). Deploy replaces the conv's Parameters, so it is done
on the unsharded model (``convbn.deploy`` before sharding, or on a model loaded from a full state dict).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

__all__ = ["sharding_of", "check_not_sharded"]


def sharding_of(model: nn.Module) -> Optional[str]:
    """What shards ``model`` (``"fully_shard"``, ``"FullyShardedDataParallel"``, ``"DTensor parameters"``), or None.

    Example:
        >>> import torch
        >>> from convbn.sharding import sharding_of
        >>> sharding_of(torch.nn.Conv2d(3, 4, 3)) is None
        True
    """
    for m in model.modules():
        names = {cls.__name__ for cls in type(m).__mro__}
        if "FSDPModule" in names:
            return "fully_shard"
        if "FullyShardedDataParallel" in names:
            return "FullyShardedDataParallel"
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return "DTensor parameters"
    return None


def check_not_sharded(model: nn.Module, fn: str) -> None:
    """Raise :class:`~convbn.ConvBNError` (before any work) if ``model`` is already sharded.

    Example:
        >>> import torch
        >>> from convbn.sharding import check_not_sharded
        >>> check_not_sharded(torch.nn.Linear(2, 2), "convert")  # a plain model passes
    """
    from .errors import ConvBNError

    how = sharding_of(model)
    if how is None:
        return
    raise ConvBNError(
        f"convbn.{fn} got a model that is already sharded ({how}). convbn traces the model to prove each block's "
        f"data flow, which FSDP's hooks and sharded parameters do not allow. Convert first, then shard: "
        f"convbn.convert(model, mode); fully_shard(block) for each block; fully_shard(model). To change the mode "
        f"later, load a full state dict (get_model_state_dict(..., options=StateDictOptions(full_state_dict=True))) "
        f"into an unsharded model, convert it and shard it again"
        + ("; for deploy, fold the unsharded model: shipped = convbn.deploy(model)" if fn == "deploy" else ""))
