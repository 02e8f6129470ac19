"""Find Conv/Linear -> BatchNorm pairs, and prove the data flow between them.

Two analyses, each producing the same :class:`Analysis`:

* ``torch.fx`` symbolic tracing (no inputs needed): a pair is a BN ``call_module`` whose input node
  is a conv/linear ``call_module`` and whose conv output has no other user.
* dynamic tracing (needs ``example_inputs``): the model runs once under ``torch.no_grad`` with
  hooks on every conv/linear/BN and a ``TorchFunctionMode`` that sees every op touching a conv
  output. A pair is proven when the BN received the conv's output *object* and nothing else
  consumed it (metadata queries like ``.shape`` aside). Buffers and the RNG state are restored
  afterwards, so running it changes nothing.

Structural reasons that forbid folding (conv called twice, other users, custom forward, ...) are
recorded here; mode-dependent reasons (no running statistics, bad running_var) are the plan's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode

from .errors import ConvBNError

__all__ = ["Candidate", "Analysis", "analyze", "normalize_example_inputs"]

LAYER_TYPES = (_ConvNd, nn.Linear)

# The stock forwards a (sub)class may inherit and still be folded.
_STOCK_LAYER_FORWARDS = {
    nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward,
    nn.ConvTranspose1d.forward, nn.ConvTranspose2d.forward, nn.ConvTranspose3d.forward,
    nn.Linear.forward,
}
_STOCK_BN_FORWARDS = {_BatchNorm.forward, nn.SyncBatchNorm.forward}
_STOCK_LAYER_BASES = (
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
)
_STOCK_BN_BASES = (nn.SyncBatchNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# Tensor attributes / methods that read metadata only: using a conv output this way is no data use.
_METADATA_NAMES = frozenset({
    "size", "dim", "ndimension", "numel", "stride", "is_contiguous", "storage_offset", "element_size",
    "shape", "ndim", "dtype", "device", "layout", "requires_grad", "is_cuda", "is_sparse",
    "is_floating_point", "is_complex", "names", "grad_fn", "is_leaf", "__len__", "nelement",
    "get_device", "data_ptr",
})


def stock_base(module: nn.Module, bases: Tuple[type, ...]) -> Optional[type]:
    """The first torch.nn class in ``bases`` that ``module`` is an instance of."""
    for base in bases:
        if isinstance(module, base):
            return base
    return None


def layer_kind(module: nn.Module) -> str:
    base = stock_base(module, _STOCK_LAYER_BASES)
    return base.__name__ if base is not None else type(module).__name__


def bn_kind(module: nn.Module) -> str:
    base = stock_base(module, _STOCK_BN_BASES)
    return base.__name__ if base is not None else type(module).__name__


@dataclass
class Candidate:
    """One BatchNorm and the Conv/Linear whose output it normalizes (if any)."""

    bn_name: str
    bn: nn.Module
    conv_name: Optional[str] = None
    conv: Optional[nn.Module] = None
    reason: Optional[str] = None  # structural reason this pair cannot be folded, None if it can
    layer_output_dim: Optional[int] = None  # known only from a dynamic trace
    relu_name: Optional[str] = None  # an nn.ReLU module that is the BN output's only user (fusable)
    relu: Optional[nn.Module] = None

    @property
    def kind(self) -> str:
        left = layer_kind(self.conv) if self.conv is not None else "?"
        return f"{left}->{bn_kind(self.bn)}"


@dataclass
class Analysis:
    candidates: List[Candidate]
    method: str  # "torch.fx" or "dynamic trace"
    notes: List[str] = field(default_factory=list)


def normalize_example_inputs(example_inputs: Any) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """``Tensor`` -> ``((t,), {})``; tuple/list -> args; dict -> kwargs."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    raise TypeError(
        f"example_inputs must be a Tensor, a tuple/list of positional arguments or a dict of keyword "
        f"arguments for model.forward; got {type(example_inputs).__name__}. "
        f"Example: convbn.convert(model, 'tune', example_inputs=(torch.randn(1, 3, 224, 224),))"
    )


def _structural_reason(conv: nn.Module, conv_name: str, bn: nn.Module, bn_name: str) -> Optional[str]:
    if type(conv).forward not in _STOCK_LAYER_FORWARDS:
        return (f"{type(conv).__name__} `{conv_name}` overrides forward(), so convbn cannot know what it "
                f"computes; give it the stock forward or exclude it with filter_fn")
    if type(bn).forward not in _STOCK_BN_FORWARDS:
        return (f"{type(bn).__name__} `{bn_name}` overrides forward(), so convbn cannot know what it "
                f"computes; give it the stock forward or exclude it with filter_fn")
    for name, module in ((conv_name, conv), (bn_name, bn)):
        if "forward" in module.__dict__ and not getattr(module.__dict__["forward"], "_convbn_installed", False):
            return (f"`{name}` has a forward patched on the instance (by another library?); convbn will not "
                    f"replace it. Remove that patch or exclude the block with filter_fn")
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters(recurse=False)) or any(
            isinstance(b, nn.parameter.UninitializedBuffer) for b in module.buffers(recurse=False)
        ):
            return f"lazy module `{name}` is not initialized yet; run one forward pass before converting"
    out_features = _out_channels(conv)
    if bn.num_features != out_features:
        return (f"`{bn_name}` has num_features={bn.num_features} but `{conv_name}` produces {out_features} "
                f"channels: the BN does not normalize the layer's output channels")
    return None


def _out_channels(conv: nn.Module) -> int:
    return conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels


class _LeafTracer(torch.fx.Tracer):
    """Keeps every conv/linear/BN (including user subclasses) a leaf, so each call is one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, LAYER_TYPES + (_BatchNorm,)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _fx_analysis(model: nn.Module) -> Analysis:
    with torch.random.fork_rng(devices=[]):  # a forward that draws random numbers must not move the user's RNG
        graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    candidates: List[Candidate] = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BatchNorm):
            continue
        bn_name, bn = node.target, modules[node.target]
        src = node.args[0] if node.args else node.kwargs.get("input")
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module"
                and isinstance(modules.get(src.target), LAYER_TYPES)):
            what = src.name if isinstance(src, torch.fx.Node) else repr(src)
            candidates.append(Candidate(bn_name, bn, reason=(
                f"the input of `{bn_name}` is not the output of a Conv/Linear module (it comes from `{what}`), "
                f"so there is nothing to fold it into")))
            continue
        conv_name, conv = src.target, modules[src.target]
        cand = Candidate(bn_name, bn, conv_name, conv)
        others = [u.name for u in src.users if u is not node]
        if calls[conv_name] > 1:
            cand.reason = (f"`{conv_name}` is called {calls[conv_name]} times in forward; folding a BN into it would "
                           f"change every call. Give each use its own module")
        elif calls[bn_name] > 1:
            cand.reason = (f"`{bn_name}` is called {calls[bn_name]} times in forward; it cannot be folded into one "
                           f"conv. Give each use its own BN module")
        elif others:
            cand.reason = (f"the output of `{conv_name}` is also used by {', '.join('`%s`' % o for o in others)}, "
                           f"which must see the un-normalized values, so the BN cannot be folded into it")
        else:
            cand.reason = _structural_reason(conv, conv_name, bn, bn_name)
        candidates.append(cand)
    for cand, node in zip(candidates, [n for n in graph.nodes if n.op == "call_module"
                                       and isinstance(modules.get(n.target), _BatchNorm)]):
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and calls[users[0].target] == 1:
            _set_relu(cand, users[0].target, modules[users[0].target])
    return Analysis(candidates, "torch.fx")


def _set_relu(cand: Candidate, name: str, module: nn.Module) -> None:
    """Record ``module`` as the block's fusable ReLU if it is a stock, unpatched ``nn.ReLU``."""
    if type(module).forward is nn.ReLU.forward and "forward" not in module.__dict__ and isinstance(module, nn.ReLU):
        cand.relu_name, cand.relu = name, module


class _UseRecorder(TorchFunctionMode):
    """Records every op that consumes a tracked conv output outside the BN that normalizes it."""

    def __init__(self, tracked: Dict[int, torch.Tensor], active_bn: List[str], other_uses: Dict[int, List[str]]):
        super().__init__()
        self.tracked, self.active_bn, self.other_uses = tracked, active_bn, other_uses

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.tracked and not self.active_bn:
            name = getattr(func, "__name__", "")
            if name == "__get__":
                name = getattr(getattr(func, "__self__", None), "__name__", name)
            if name not in _METADATA_NAMES:
                for a in _flatten((args, kwargs)):
                    if isinstance(a, torch.Tensor) and self.tracked.get(id(a)) is a:
                        self.other_uses.setdefault(id(a), []).append(name or str(func))
        return func(*args, **kwargs)


def _flatten(obj: Any):
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _flatten(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _flatten(o)
    else:
        yield obj


def _dynamic_analysis(model: nn.Module, example_inputs: Any) -> Analysis:
    args, kwargs = normalize_example_inputs(example_inputs)
    names: Dict[int, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, LAYER_TYPES + (_BatchNorm, nn.ReLU)):
            names.setdefault(id(m), name)
    outputs: Dict[int, Tuple[str, torch.Tensor]] = {}  # id(conv output) -> (conv name, tensor kept alive)
    tracked: Dict[int, torch.Tensor] = {}  # conv and BN outputs whose every use is recorded
    out_dims: Dict[str, int] = {}
    active_bn: List[str] = []
    other_uses: Dict[int, List[str]] = {}
    calls: Dict[str, int] = {}
    bn_inputs: List[Tuple[str, Any]] = []  # (bn name, conv output id or description)
    handles = []

    def layer_hook(m, inp, out):
        name = names[id(m)]
        calls[name] = calls.get(name, 0) + 1
        if isinstance(out, torch.Tensor):
            outputs[id(out)] = (name, out)
            tracked[id(out)] = out
            out_dims[name] = out.dim()

    def bn_pre_hook(m, inp):
        name = names[id(m)]
        calls[name] = calls.get(name, 0) + 1
        x = inp[0] if inp else None
        src = outputs.get(id(x)) if isinstance(x, torch.Tensor) else None
        bn_inputs.append((name, id(x) if src is not None and src[1] is x else None))
        active_bn.append(name)

    bn_outputs: Dict[int, Tuple[str, torch.Tensor]] = {}
    relu_users: Dict[str, List[str]] = {}  # bn name -> ReLU modules that consumed its output

    def bn_hook(m, inp, out):
        active_bn.pop()
        if isinstance(out, torch.Tensor):
            bn_outputs[id(out)] = (names[id(m)], out)
            tracked[id(out)] = out  # its other uses decide whether a ReLU after it can be fused

    def relu_pre_hook(m, inp):
        name = names[id(m)]
        calls[name] = calls.get(name, 0) + 1
        x = inp[0] if inp else None
        src = bn_outputs.get(id(x)) if isinstance(x, torch.Tensor) else None
        if src is not None and src[1] is x:
            relu_users.setdefault(src[0], []).append(name)
            relu_inputs.append(id(x))
        active_bn.append(name)

    relu_inputs: List[int] = []

    def bn_hook_relu(m, inp, out):
        active_bn.pop()

    for m in model.modules():
        if id(m) not in names:
            continue
        if isinstance(m, _BatchNorm):
            handles.append(m.register_forward_pre_hook(bn_pre_hook, prepend=True))
            handles.append(m.register_forward_hook(bn_hook))
        elif isinstance(m, nn.ReLU):
            handles.append(m.register_forward_pre_hook(relu_pre_hook, prepend=True))
            handles.append(m.register_forward_hook(bn_hook_relu))
        else:
            handles.append(m.register_forward_hook(layer_hook))
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
    # Trace the user's own modules: convbn's installed forwards (an earlier conversion) would pass a
    # BN's input through and look like extra users of the conv output.
    installed = {id(m): (m, m.__dict__.pop("forward")) for m in model.modules()
                 if getattr(m.__dict__.get("forward"), "_convbn_installed", False)}
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), _UseRecorder(tracked, active_bn, other_uses):
            model(*args, **kwargs)
    except Exception as e:
        raise ConvBNError(
            f"running the model on example_inputs failed with {type(e).__name__}: {e}. convbn runs "
            f"model(*example_inputs) once to trace the Conv->BN data flow; pass inputs that model.forward "
            f"accepts (a Tensor, a tuple of positional arguments, or a dict of keyword arguments)"
        ) from e
    finally:
        for m, fwd in installed.values():
            m.__dict__["forward"] = fwd
        for h in handles:
            h.remove()
        with torch.no_grad():
            for buf, saved in saved_buffers:
                buf.copy_(saved)

    modules = {name: m for name, m in model.named_modules()}
    candidates: List[Candidate] = []
    seen_bn = set()
    for bn_name, src_id in bn_inputs:
        if bn_name in seen_bn:
            continue
        seen_bn.add(bn_name)
        bn = modules[bn_name]
        if src_id is None:
            candidates.append(Candidate(bn_name, bn, reason=(
                f"the input of `{bn_name}` is not the output of a Conv/Linear module, so there is nothing to "
                f"fold it into")))
            continue
        conv_name = outputs[src_id][0]
        conv = modules[conv_name]
        cand = Candidate(bn_name, bn, conv_name, conv, layer_output_dim=out_dims.get(conv_name))
        users = [n for n, i in bn_inputs if i == src_id]
        if calls.get(conv_name, 0) > 1:
            cand.reason = (f"`{conv_name}` is called {calls[conv_name]} times in forward; folding a BN into it would "
                           f"change every call. Give each use its own module")
        elif calls.get(bn_name, 0) > 1:
            cand.reason = (f"`{bn_name}` is called {calls[bn_name]} times in forward; it cannot be folded into one "
                           f"conv. Give each use its own BN module")
        elif len(users) > 1 or other_uses.get(src_id):
            others = sorted(set(other_uses.get(src_id, []) + [u for u in users if u != bn_name]))
            cand.reason = (f"the output of `{conv_name}` is also used by {', '.join('`%s`' % o for o in others)}, "
                           f"which must see the un-normalized values, so the BN cannot be folded into it")
        else:
            cand.reason = _structural_reason(conv, conv_name, bn, bn_name)
        candidates.append(cand)
    for cand in candidates:
        relus = relu_users.get(cand.bn_name, [])
        out_ids = [i for i, (n, _) in bn_outputs.items() if n == cand.bn_name]
        others = [u for i in out_ids for u in other_uses.get(i, [])]
        if len(relus) == 1 and not others and calls.get(relus[0], 0) == 1 and calls.get(cand.bn_name, 0) == 1:
            _set_relu(cand, relus[0], modules[relus[0]])
    # BNs that exist but never ran in the example forward
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and name not in seen_bn:
            candidates.append(Candidate(name, m, reason=(
                f"`{name}` was not called when the model ran on example_inputs, so its input is unknown")))
    return Analysis(candidates, "dynamic trace")


def analyze(model: nn.Module, example_inputs: Any = None) -> Analysis:
    """Find every BatchNorm of ``model`` and the Conv/Linear it can be folded into.

    ``torch.fx`` is tried first. With ``example_inputs`` the model also runs once (dynamic trace),
    which checks the inputs work, records tensor ranks (for Linear->BatchNorm1d) and is the sole
    source of pairs when fx cannot trace the model.
    """
    fx_error: Optional[BaseException] = None
    try:
        fx = _fx_analysis(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, NotImplementedError, ...)
        fx, fx_error = None, e
    if example_inputs is None:
        if fx is None:
            raise ConvBNError(
                f"torch.fx could not trace {type(model).__name__} ({type(fx_error).__name__}: {fx_error}). "
                f"Pass example_inputs=(an input batch,) so convbn can find the Conv->BN pairs by running "
                f"the model once instead"
            ) from None
        return fx
    dyn = _dynamic_analysis(model, example_inputs)
    if fx is None:
        dyn.notes.append(f"torch.fx could not trace the model ({type(fx_error).__name__}); used a dynamic trace")
        return dyn
    # fx gives the pairs (it sees every op); the dynamic run adds ranks and any use fx missed.
    by_bn = {c.bn_name: c for c in dyn.candidates}
    for cand in fx.candidates:
        d = by_bn.get(cand.bn_name)
        if d is None:
            continue
        if d.conv_name == cand.conv_name:
            cand.layer_output_dim = d.layer_output_dim
        if cand.reason is None and d.reason is not None and cand.conv is not None:
            cand.reason = d.reason
    fx.method = "torch.fx + dynamic trace"
    return fx
