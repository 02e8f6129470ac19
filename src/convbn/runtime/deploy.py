"""Deploy: fold the norm into the conv permanently (inference). The only mode that mutates parameters."""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..analysis import Candidate
from ..fold import fold_conv_bn_weights

__all__ = ["FoldedNorm", "fold", "apply_fold"]


class FoldedNorm(nn.Module):
    """What is left of a folded norm layer that applied modules after normalizing (timm ``drop``/``act``):
    those modules, under their original names (so their ``state_dict`` keys stay), applied in order."""

    def __init__(self, after: Sequence[Tuple[str, nn.Module]]):
        super().__init__()
        self.order: List[str] = [name for name, _ in after]
        for name, m in after:
            self.add_module(name, m)

    def forward(self, x: Tensor) -> Tensor:
        for name in self.order:
            x = self._modules[name](x)
        return x


def fold(cand: Candidate) -> Tuple[Tensor, Tensor]:
    """The folded ``(weight, bias)`` of a block, computed without touching the model."""
    conv, p = cand.conv, cand.norm.read(cand.bn)
    with torch.no_grad():
        return fold_conv_bn_weights(conv.weight, conv.bias, p.running_mean, p.running_var, p.weight, p.bias, p.eps,
                                    groups=getattr(conv, "groups", 1),
                                    transposed=bool(getattr(conv, "transposed", False)))


def replacement(cand: Candidate) -> nn.Module:
    """``nn.Identity`` for a plain norm, else a :class:`FoldedNorm` of what it applies after normalizing."""
    after = list(cand.norm.after(cand.bn))
    if not after:
        return nn.Identity()
    names = {id(m): n for n, m in cand.bn.named_children()}
    return FoldedNorm([(names[id(m)], m) for m in after])


def apply_fold(model: nn.Module, cand: Candidate, weight: Tensor, bias: Tensor) -> Callable[[], None]:
    """Install a computed fold: new conv Parameters, the norm replaced wherever it is registered.

    Everything that can fail (building the replacement and the Parameters) happens before the first
    change; if a change itself fails (a user ``__setattr__``), the ones made are undone and the error
    propagates. Returns a function that undoes the whole fold (for a later failure in the same convert).
    """
    conv = cand.conv
    trainable = conv.weight.requires_grad
    new = replacement(cand)
    new_weight, new_bias = nn.Parameter(weight, requires_grad=trainable), nn.Parameter(bias, requires_grad=trainable)
    old_weight, old_bias = conv._parameters["weight"], conv._parameters.get("bias")
    slots = [(parent, name) for parent in model.modules() for name, child in parent._modules.items()
             if child is cand.bn]

    def undo() -> None:
        for parent, name in slots:
            parent._modules[name] = cand.bn
        conv.weight = old_weight
        if old_bias is None:
            conv._parameters["bias"] = None
        else:
            conv.bias = old_bias

    try:
        conv.weight = new_weight
        conv.bias = new_bias
        for parent, name in slots:
            parent._modules[name] = new
    except BaseException:
        undo()
        raise
    return undo
