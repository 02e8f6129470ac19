"""What every installed mode shares: the block's state, the instance forwards, the conv helpers.

convbn never swaps a module, a class or a parameter in train/eval/tune. It sets ``forward`` on the
*instance* of the conv, the norm and a fused ReLU (``nn.Module.__call__`` looks the instance
attribute up first), so hooks, ``state_dict``, parameter names and objects, ``deepcopy``, pickling
and ``.to()`` keep working, and ``revert`` deletes the attribute.

When a block computes two modules' work in one call (tune and train+recompute fold the norm into the
conv; a fused ReLU), the first module's forward returns the block output and the next module checks
that what it receives is the very tensor just produced; if a hook or unseen control flow broke that
data flow it raises instead of being silently wrong (:meth:`Block.take`). A block output that no
next stage takes is caught when the block's owner module returns (see :mod:`convbn.runtime.guard`).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..analysis import Candidate
from ..errors import ConvBNError
from ..functions.tune import ConvSpec
from ..norms import NormParams, apply_after

__all__ = ["Block", "InstalledForward", "installed_block", "uninstall", "conv_input_and_spec", "is_compiling"]


def is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - torch < 2.3
        return False


class Block:
    """One Conv/Linear -> norm block as installed in a mode. Subclasses set ``mode`` and ``roles`` (the
    modules that get an instance forward) and override the forwards they install."""

    mode = ""
    roles: Tuple[str, ...] = ("bn",)

    def __init__(self, cand: Candidate, fuse_relu: bool = False):
        self.conv, self.bn = cand.conv, cand.bn  # conv is None for a norm that follows no layer
        self.conv_name, self.bn_name = cand.conv_name, cand.bn_name
        self.norm = cand.norm
        # a fused ReLU: an nn.ReLU module after the norm (gets a pass-through forward), or the norm's own act
        self.relu, self.relu_name = (cand.relu, cand.relu_name) if fuse_relu else (None, None)
        self.inner_relu = cand.inner_relu if fuse_relu else None
        # F.relu / torch.relu / relu_ on the norm output, intercepted by ICF's recorder (train+fission only)
        self.functional_relu = cand.functional_relu if fuse_relu and self.relu is None and self.inner_relu is None \
            else None
        self.fallback_reason: Optional[str] = None  # set when a call had to run unfused (never silent)
        # The tensor the previous stage of the block just produced, until the next stage takes it. A
        # plain reference (not a weakref) so torch.compile traces the identity check too.
        self._pending: Optional[Tensor] = None
        self._pending_fused = False
        self._pending_stage = ""
        self._pending_version = 0
        self._relu_now = False  # whether this call's kernel computed the ReLU (hooks can forbid it per call)
        self._owner_depth = 0  # > 0 while the owner's forward runs (see convbn.runtime.guard)
        self._stale: Optional[str] = None  # an attribute changed since conversion: run unfused

    def live_reason(self) -> Optional[str]:
        """Why this block's calls run unfused now, or ``None``: a hook (the user's, or FSDP's on a module it
        shards) observes the tensor between the conv and the norm, or a call could not fold (``fallback_reason``)."""
        if "conv" in self.roles and self.conv is not None:
            hooked = [name for name, m, kw in ((self.conv_name, self.conv, dict(forward=True, backward=True)),
                                               (self.bn_name, self.bn, dict(pre=True, backward=True)))
                      if _hooked(m, **kw)]
            if hooked:
                return (f"a hook on {' and '.join(f'`{n}`' for n in hooked)} observes the tensor between conv and "
                        f"norm: runs unfused (the same function, without {self.mode}'s savings); remove the hook, "
                        f"or register it on the block's parent")
        return self.fallback_reason

    @property
    def fuses_relu(self) -> bool:
        return self.relu is not None or self.inner_relu is not None or self.functional_relu is not None

    # pickling / deepcopy: the output in flight is transient state, never serialized
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pending"], state["_owner_depth"], state["_stale"] = None, 0, None
        return state

    def params(self) -> NormParams:
        return self.norm.read(self.bn)

    def after(self, x: Tensor) -> Tensor:
        """What the norm's own forward applies after normalizing (timm drop/act), minus a ReLU fused this call."""
        return apply_after(self.bn, self.norm, x, skip=self.inner_relu if self._relu_now else None)

    # ------------------------------------------------------------------ the hand-over between stages
    def hand_over(self, out: Tensor, fused: bool, stage: str) -> Tensor:
        """Record ``out`` as the output of ``stage`` that the next stage takes. ``fused``: ``out`` already holds
        the next stage's result, so nothing else may use it."""
        if self._pending is not None and self._pending_fused:
            self.raise_unconsumed()
        self._pending, self._pending_fused, self._pending_stage = out, fused, stage
        if fused and not is_compiling():
            self._pending_version = _version(out)
        return out

    def take(self, input: Tensor, who: str, keep: bool = False) -> bool:
        """Did this block's previous stage already compute ``who``'s work on ``input``? Raises if a fused
        output went anywhere but here, or was modified in place on the way (a hook, an unseen branch)."""
        pending, fused = self._pending, self._pending_fused
        if not keep:
            self._pending = None
        if pending is not input:
            if pending is not None and fused:
                self._pending = None
                raise ConvBNError(
                    f"`{who}` received a tensor that is not the output of `{self._pending_stage}`. In {self.mode} mode "
                    f"convbn computes them as one block, so that output already holds `{who}`'s result and must be "
                    f"passed to `{who}` directly; something (a hook that replaced the tensor, or control flow the "
                    f"trace did not see) changed the data flow. Exclude this block with filter_fn, or "
                    f"convbn.revert(model)")
            return False  # a plain tensor (unfused call, or the norm used on its own): run the stage as usual
        expected = self.conv_name if who == self.bn_name else self.bn_name
        if fused and self._pending_stage != expected:
            self._pending = None
            raise ConvBNError(
                f"`{who}` received the output of `{self._pending_stage}` directly, skipping `{expected}` (a branch the "
                f"trace did not see). In {self.mode} mode that output already holds `{expected}`'s result, so `{who}` "
                f"would see the wrong values. Exclude this block with filter_fn, or use mode 'eval' / plain 'train'")
        if fused and not is_compiling() and _version(input) != self._pending_version:
            self._pending = None
            raise ConvBNError(
                f"the output of `{self._pending_stage}` was modified in place before `{who}` received it (a forward "
                f"hook, or code between them). In {self.mode} mode that output already holds `{who}`'s result, so the "
                f"change would land after `{who}`, not before. Make the change out of place, or exclude this block "
                f"with filter_fn")
        return fused

    def release(self) -> None:
        """End of the owner's forward (see :mod:`.guard`): a fused output that no stage took is an error."""
        if self._pending is not None:
            if self._pending_fused:
                self.raise_unconsumed()
            self._pending = None

    def raise_unconsumed(self) -> None:
        stage, self._pending = self._pending_stage, None
        nxt = self.relu_name if stage == self.bn_name else self.bn_name
        raise ConvBNError(
            f"the output of `{stage}` was not passed to `{nxt}` (a branch skipped it, or it was returned or kept "
            f"elsewhere). In {self.mode} mode convbn computes them as one block, so that output already holds "
            f"`{nxt}`'s result and anything else using it sees the wrong values. Exclude this block with "
            f"filter_fn=lambda m, name: name != {self.conv_name or self.bn_name!r}, or use mode 'eval' / plain 'train'")

    # ------------------------------------------------------------------ hooks decide, per call, what is fused
    def conv_fusable(self) -> bool:
        """Fold the norm into the conv this call? Not while a hook observes the conv output or the norm input
        (then the conv runs stock and the norm normalizes what it receives: plain PyTorch's data flow), outside
        the owner's forward, or when the running statistics were removed (TENT-style adaptation)."""
        p = self.params()
        return (self._owner_depth > 0 and self._stale is None and p.running_mean is not None
                and p.running_var is not None
                and not (_global_hooks() or _hooked(self.conv, forward=True, backward=True)
                         or _hooked(self.bn, pre=True, backward=True)))

    def relu_fusable(self) -> bool:
        """Compute the ReLU in the norm's kernel this call? Not while a hook observes the pre-ReLU tensor."""
        if not self.fuses_relu or _global_hooks() or _hooked(self.bn, forward=True, backward=True):
            return False
        if (self.relu is not None or self.functional_relu is not None) and (
                self._owner_depth == 0 or self._stale is not None):
            return False
        relu = self.relu if self.relu is not None else self.inner_relu
        return relu is None or not _hooked(relu, pre=True, forward=True, backward=True)

    # ------------------------------------------------------------------ forwards (subclasses override)
    def conv_forward(self, input: Tensor, output_size: Optional[List[int]] = None) -> Tensor:
        return stock_layer_forward(self.conv, input, output_size)

    def bn_forward(self, input: Tensor) -> Tensor:  # pragma: no cover - every mode overrides it
        raise NotImplementedError

    def relu_forward(self, input: Tensor) -> Tensor:
        if self.take(input, self.relu_name):
            return input
        return type(self.relu).forward(self.relu, input)

    def eval_forward(self, input: Tensor) -> Tensor:
        """The norm's whole eval function (then its drop/act). A frozen norm's own forward already is that
        function, and keeps its memory profile (``x * scale + shift`` saves no activation for backward)."""
        if self.norm.frozen:
            return type(self.bn).forward(self.bn, input)
        return self.after(self.eval_norm(input))

    def eval_norm(self, input: Tensor) -> Tensor:
        """The norm in eval: running statistics, trainable affine (before the norm's own drop/act). A norm
        whose running statistics were set to None normalizes as PyTorch then does: with batch statistics."""
        if isinstance(self.bn, nn.modules.batchnorm._BatchNorm):
            self.bn._check_input_dim(input)
        p = self.params()
        if p.running_mean is None or p.running_var is None:
            return F.batch_norm(input, None, None, p.weight, p.bias, True, 0.0, p.eps)
        return F.batch_norm(input, p.running_mean, p.running_var, p.weight, p.bias, False, 0.0, p.eps)


def _version(t: Tensor) -> int:
    """The version counter (inference tensors have none, and cannot be modified in place outside inference mode).
    Read past any TorchFunctionMode (ICF's recorder): two attribute reads need not round-trip through Python."""
    with torch._C.DisableTorchFunction():
        return -1 if t.is_inference() else t._version


def _hooked(m: Optional[nn.Module], pre: bool = False, forward: bool = False, backward: bool = False) -> bool:
    if m is None:
        return False
    return bool((pre and m._forward_pre_hooks) or (forward and m._forward_hooks)
                or (backward and (m._backward_hooks or m._backward_pre_hooks)))


def _global_hooks() -> bool:
    g = nn.modules.module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks)


def stock_layer_forward(conv: nn.Module, input: Tensor, output_size: Optional[List[int]] = None) -> Tensor:
    fwd = type(conv).forward
    if output_size is not None:
        return fwd(conv, input, output_size)
    return fwd(conv, input)


def conv_input_and_spec(conv: nn.Module, input: Tensor, output_size: Optional[List[int]]) -> Tuple[Tensor, ConvSpec]:
    """The input to convolve (padded here when the conv pads itself) and the integer geometry."""
    n = len(conv.kernel_size)  # not conv.weight: a parametrized weight is computed on every access
    if input.dim() != n + 2:
        raise ValueError(
            f"{type(conv).__name__} followed by a norm layer expected a batched {n + 2}-D input "
            f"(got {input.dim()}-D); add a batch dimension with input.unsqueeze(0)")
    transposed = bool(conv.transposed)
    stride, dilation = tuple(conv.stride), tuple(conv.dilation)
    x = input
    if transposed:
        padding = tuple(conv.padding)
        output_padding = tuple(conv._output_padding(
            input, output_size, list(conv.stride), list(conv.padding), list(conv.kernel_size), n,
            list(conv.dilation)))
        return x, ConvSpec(stride, padding, dilation, True, output_padding, conv.groups)
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = (0,) * n
    elif conv.padding == "valid":
        padding = (0,) * n
    elif conv.padding == "same":
        # torch pads (total // 2) left and the rest right; odd totals need one extra on the right
        total = [d * (k - 1) for d, k in zip(dilation, conv.kernel_size)]
        padding = tuple(t // 2 for t in total)
        extra: List[int] = []
        for t in reversed(total):
            extra += [0, t - 2 * (t // 2)]
        if any(extra):
            x = F.pad(x, extra)
    else:
        padding = tuple(conv.padding)
    return x, ConvSpec(stride, padding, dilation, False, (0,) * n, conv.groups)


def momentum_of(bn: nn.Module) -> Optional[float]:
    """The BN's momentum as the train Functions take it (``None`` = cumulative average)."""
    return None if bn.momentum is None else float(bn.momentum)


class ScriptingError(ConvBNError, AttributeError):
    """Also an AttributeError, so ``getattr(fn, "__code__", None)`` probes (torch.fx, inspect) still work."""


class NotScriptable:
    """convbn's callables on a module (instance forwards, guard hooks): torch.jit.script inspects them as
    Python functions; say what to do instead of failing on a missing attribute."""

    def __getattr__(self, name: str) -> Any:
        if name in ("__globals__", "__code__", "__closure__"):
            raise ScriptingError(
                "torch.jit.script cannot compile convbn's installed forwards. Script a folded copy instead "
                "(torch.jit.script(convbn.deploy(model))), or convbn.revert(model) first; torch.compile works on "
                "converted models")
        raise AttributeError(name)


class InstalledForward(NotScriptable):
    """Picklable callable set as ``module.forward`` on the instance; ``role`` is conv, bn or relu."""

    _convbn_installed = True

    def __init__(self, block: Block, role: str):
        self.block, self.role = block, role
        self._fn = getattr(block, f"{role}_forward")

    def __getstate__(self) -> dict:
        return {"block": self.block, "role": self.role}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["block"], state["role"])

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<convbn {self.block.mode} forward of `{getattr(self.block, self.role + '_name')}`>"


def installed_block(module: nn.Module) -> Optional[Block]:
    fwd = module.__dict__.get("forward")
    return fwd.block if isinstance(fwd, InstalledForward) else None


def uninstall(module: nn.Module) -> None:
    if isinstance(module.__dict__.get("forward"), InstalledForward):
        del module.__dict__["forward"]
