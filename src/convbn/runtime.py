"""What runs: per-block state and the forwards convbn installs on the user's own modules.

convbn never swaps a module, a class or a parameter in train/eval/tune. It sets ``forward`` on the
*instance* of the conv and/or BN (``nn.Module.__call__`` looks the instance attribute up first), so
hooks, ``state_dict``, parameter names and objects, ``deepcopy``, pickling and ``.to()`` all keep
working, and ``revert`` just deletes the attribute. The mode is read at call time, so switching
modes mid-training is a field update.

In tune mode the conv's forward returns the *block* output ``bn_eval(conv(x))`` and the BN's forward
passes it through. The BN checks that what it receives is the very tensor its conv just produced;
if a hook or unseen control flow broke that data flow it raises instead of being silently wrong.
"""

from __future__ import annotations

import contextlib
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConvBNError
from .functions.tune import ConvSpec, TuneConvBNFunction

# Run modes a block can be in. "train-recompute" / "train-fission" are train mode (batch statistics,
# PyTorch's exact semantics) computed by convbn's Functions; "fallback" rows may run any of these.
INSTALLED_MODES = ("eval", "tune", "train-recompute", "train-fission")

__all__ = ["Block", "install", "uninstall", "installed_block"]


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - torch < 2.3
        return False


class Block:
    """Runtime state of one converted Conv/Linear -> BN block (shared by its two installed forwards)."""

    def __init__(self, conv: Optional[nn.Module], bn: nn.Module, conv_name: Optional[str], bn_name: str, mode: str,
                 relu: Optional[nn.Module] = None, relu_name: Optional[str] = None):
        if mode in ("tune", "train-recompute") and conv is None:
            raise ValueError(f"{mode} needs the conv/linear the BN follows")
        self.conv, self.bn = conv, bn  # conv is None for a BN that follows no layer
        self.conv_name, self.bn_name = conv_name, bn_name
        self.relu, self.relu_name = relu, relu_name  # an nn.ReLU fused into the block (train modes only)
        self.stats_cache = None  # train-fission: the model's ICF statistics cache (convbn.icf.StatsCache)
        self.mode = mode
        self.fallback_reason: Optional[str] = None  # set when a call had to run unfused (never silent)
        # The tensor the previous stage of the block just produced, until the next stage takes it. A
        # plain reference (not a weakref) so torch.compile traces the identity check too.
        self._pending: Optional[Tensor] = None
        self._pending_fused = False

    # pickling / deepcopy: the last output in flight is transient state, never serialized
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pending"] = None
        return state

    # ---------------------------------------------------------------- conv / linear
    def conv_forward(self, input: Tensor, output_size: Optional[List[int]] = None) -> Tensor:
        conv, bn = self.conv, self.bn
        if self.mode not in ("tune", "train-recompute"):  # the conv is stock
            return _stock_layer_forward(conv, input, output_size)
        if isinstance(conv, nn.Linear):
            if input.dim() != 2:
                # BatchNorm1d on 3-D input normalizes axis 1, not the Linear's feature axis: not foldable.
                self.fallback_reason = (f"`{self.conv_name}` got a {input.dim()}-D input; BatchNorm1d's channel "
                                        f"axis is then not the Linear's features, so this call ran unfused")
                out = F.linear(input, conv.weight, conv.bias)
                self._mark(out, fused=False)
                return out
            spec = None
            x = input
        else:
            x, spec = _conv_input_and_spec(conv, input, output_size)
        affine = bn.affine
        gamma, beta = (bn.weight, bn.bias) if affine else (None, None)
        if self.mode == "train-recompute" and _uses_batch_stats(bn):
            from .functions.train_recompute import RecomputeConvBNFunction

            momentum = _update_factor_momentum(bn)
            track = bn.training and bn.track_running_stats
            out = RecomputeConvBNFunction.apply(
                x, conv.weight, conv.bias, gamma, beta,
                bn.running_mean if track else None, bn.running_var if track else None,
                bn.num_batches_tracked if track else None, momentum, float(bn.eps), spec, self.relu is not None)
        else:  # tune, or a recompute block whose BN is in eval(): running statistics, folded
            out = TuneConvBNFunction.apply(
                x, conv.weight, conv.bias, gamma, beta, bn.running_mean, bn.running_var, float(bn.eps), spec)
            if self.relu is not None:
                out = out.relu_()
        self._mark(out, fused=True)
        return out

    def _mark(self, out: Tensor, fused: bool) -> None:
        self._pending = out
        self._pending_fused = fused

    # ---------------------------------------------------------------- batch norm
    def _check_pending(self, input: Tensor, who: str, keep: bool) -> bool:
        """Is ``input`` the tensor this block's previous stage just produced? Returns whether that
        stage already computed this one's work (fused)."""
        pending = self._pending
        if not keep:
            self._pending = None
        if pending is not input:
            producer = self.conv_name if who == self.bn_name else self.bn_name
            raise ConvBNError(
                f"`{who}` received a tensor that is not the output of `{producer}`. In {self.mode} mode convbn "
                f"computes them as one block, so it must be applied to that output directly; something (a forward "
                f"hook that replaced a tensor, or control flow the trace did not see) changed the data flow. "
                f"Exclude this block with filter_fn, or convbn.revert(model)")
        return self._pending_fused

    def bn_forward(self, input: Tensor) -> Tensor:
        bn = self.bn
        if self.mode in ("tune", "train-recompute"):
            if self._check_pending(input, self.bn_name, keep=self.relu is not None):
                return input
            if self.mode == "train-recompute":  # an unfused call (Linear on N-D input): plain PyTorch BN
                return _stock_bn_forward(bn, input)
        if self.mode == "train-fission":
            # ICF's ConcatRecorder (a TorchFunctionMode) is active during the model's forward; our own
            # ~100 tensor calls per layer (shape, data_ptr, ...) need not round-trip through it.
            direct = self.stats_cache is not None and type(input) is Tensor and not _is_compiling()
            with torch._C.DisableTorchFunction() if direct else contextlib.nullcontext():
                out = self._fission(input)
            if self.relu is not None:
                self._mark(out, fused=True)
            return out
        # eval (or an unfused tune call): BN with running statistics, trainable affine
        bn._check_input_dim(input)
        return F.batch_norm(input, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

    def _fission(self, input: Tensor) -> Tensor:
        bn, relu = self.bn, self.relu is not None
        if not _uses_batch_stats(bn):
            out = F.batch_norm(input, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
            return out.relu_() if relu else out
        from .functions.bn_fission import bn_relu_train, channel_statistics

        bn._check_input_dim(input)
        momentum = _update_factor_momentum(bn)
        track = bn.training and bn.track_running_stats
        stats = None
        if self.stats_cache is not None and not _is_compiling() and input.dim() > 2:
            stats = self.stats_cache.stats_for(input, channel_statistics)  # ICF: reuse a concat's pieces
        return bn_relu_train(input, bn.weight if bn.affine else None, bn.bias if bn.affine else None,
                             bn.running_mean if track else None, bn.running_var if track else None,
                             bn.num_batches_tracked if track else None, momentum, float(bn.eps), relu=relu,
                             stats=stats)

    # ---------------------------------------------------------------- fused ReLU
    def relu_forward(self, input: Tensor) -> Tensor:
        self._check_pending(input, self.relu_name, keep=False)
        return input


def _uses_batch_stats(bn: nn.Module) -> bool:
    """``_BatchNorm.forward``'s rule: batch statistics in training, or when there are no running ones."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _update_factor_momentum(bn: nn.Module) -> Optional[float]:
    """The BN's momentum as the train Functions take it (``None`` = cumulative average)."""
    return None if bn.momentum is None else float(bn.momentum)


def _stock_bn_forward(bn: nn.Module, input: Tensor) -> Tensor:
    return type(bn).forward(bn, input)


def _stock_layer_forward(conv: nn.Module, input: Tensor, output_size: Optional[List[int]]) -> Tensor:
    fwd = type(conv).forward
    if output_size is not None:
        return fwd(conv, input, output_size)
    return fwd(conv, input)


def _conv_input_and_spec(conv: nn.Module, input: Tensor, output_size: Optional[List[int]]) -> Tuple[Tensor, ConvSpec]:
    """The input to convolve (padded here when the conv pads itself) and the integer geometry."""
    n = conv.weight.dim() - 2
    if input.dim() != n + 2:
        raise ValueError(
            f"{type(conv).__name__} followed by BatchNorm expected a batched {n + 2}-D input "
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


class _InstalledForward:
    """Picklable callable set as ``module.forward`` on the instance."""

    _convbn_installed = True

    def __init__(self, block: Block, role: str):
        self.block, self.role = block, role

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        if self.role == "conv":
            return self.block.conv_forward(*args, **kwargs)
        if self.role == "relu":
            return self.block.relu_forward(*args, **kwargs)
        return self.block.bn_forward(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<convbn {self.block.mode} forward of `{getattr(self.block, self.role + '_name')}`>"


def installed_block(module: nn.Module) -> Optional[Block]:
    fwd = module.__dict__.get("forward")
    return fwd.block if isinstance(fwd, _InstalledForward) else None


def install(block: Block) -> None:
    """Set the instance forwards a block's mode needs: eval and train-fission the BN only; tune and
    train-recompute the conv and the BN; a fused ReLU (train modes) its ReLU too."""
    for m in (block.conv, block.bn, block.relu):
        if m is not None:
            uninstall(m)
    if block.mode not in INSTALLED_MODES:
        raise ValueError(f"no forward to install for mode {block.mode!r}")
    block.bn.forward = _InstalledForward(block, "bn")
    if block.mode in ("tune", "train-recompute"):
        block.conv.forward = _InstalledForward(block, "conv")
    if block.relu is not None:
        block.relu.forward = _InstalledForward(block, "relu")


def uninstall(module: nn.Module) -> None:
    if isinstance(module.__dict__.get("forward"), _InstalledForward):
        del module.__dict__["forward"]
