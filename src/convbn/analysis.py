"""Find every norm layer, the Conv/Linear each normalizes, and prove the data flow between them.

Two analyses, each producing the same :class:`Analysis`, with one :class:`Candidate` per norm layer
of the model (whatever becomes of it):

* ``torch.fx`` symbolic tracing (no inputs needed), in **both** ``train()`` and ``eval()`` (a branch
  that runs only in training, e.g. an auxiliary head, is seen), of the whole model or -- where the
  whole model does not trace -- of every largest submodule that does (a detector's backbone traces
  even when the detector does not). A pair is a norm ``call_module`` whose input node is a
  conv/linear ``call_module`` whose output has no other user, in every trace, and that no module
  attribute holds (``self.feat = y`` during the trace is seen and undone).
* dynamic tracing (needs ``example_inputs``): the model runs once under ``torch.no_grad`` (and
  once more in the other ``training`` state where that runs) with hooks on every conv/linear/norm
  and a ``TorchFunctionMode`` that sees every op touching a conv output. A pair is proven when the
  norm received the conv's output *object* and nothing else consumed or kept it (metadata queries
  like ``.shape`` aside). Buffers, attributes and the RNG state are restored afterwards.

What no trace sees (a branch not taken, a different input) is guarded at run time: see
:mod:`convbn.runtime`. Structural reasons that forbid folding are recorded here; mode-dependent
reasons (no running statistics, bad running_var) are the plan's.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode

from .errors import ConvBNError
from .norms import NormType, fusable_relu, is_norm_layer, norm_kind, norm_type, num_features, unsupported_reason

__all__ = ["Candidate", "Analysis", "analyze", "normalize_example_inputs", "LAYER_TYPES", "layer_kind"]

LAYER_TYPES = (_ConvNd, nn.Linear)

# The stock forwards a (sub)class may inherit and still be folded.
_STOCK_LAYER_FORWARDS = {
    nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward,
    nn.ConvTranspose1d.forward, nn.ConvTranspose2d.forward, nn.ConvTranspose3d.forward,
    nn.Linear.forward,
}
_STOCK_LAYER_BASES = (
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
)

# Tensor attributes / methods that read metadata only: using a conv output this way is no data use.
_METADATA_NAMES = frozenset({
    "size", "dim", "ndimension", "numel", "stride", "is_contiguous", "storage_offset", "element_size",
    "shape", "ndim", "dtype", "device", "layout", "requires_grad", "is_cuda", "is_sparse",
    "is_floating_point", "is_complex", "names", "grad_fn", "is_leaf", "__len__", "nelement",
    "get_device", "data_ptr",
})


def layer_kind(module: nn.Module) -> str:
    for base in _STOCK_LAYER_BASES:
        if isinstance(module, base):
            return base.__name__
    return type(module).__name__


@dataclass
class Candidate:
    """One norm layer and the Conv/Linear whose output it normalizes (if any).

    ``norm`` is the registry entry (``None`` for a norm layer convbn does not know: then ``reason``
    says why it is left alone). ``reason`` is ``None`` when the pair can be folded.
    """

    bn_name: str
    bn: nn.Module
    norm: Optional[NormType] = None
    conv_name: Optional[str] = None
    conv: Optional[nn.Module] = None
    reason: Optional[str] = None
    layer_output_dim: Optional[int] = None  # known only from a dynamic trace
    relu_name: Optional[str] = None  # an nn.ReLU module that is the norm output's only user (fusable)
    relu: Optional[nn.Module] = None
    inner_relu: Optional[nn.Module] = None  # the norm's own activation (timm act), if a fusable nn.ReLU
    functional_relu: Optional[str] = None  # F.relu / torch.relu / relu_ applied to the norm output (its only user)
    dynamic_relu_ok: bool = True  # a dynamic trace saw nothing but one ReLU use the norm output
    proven_by: str = "torch.fx"  # or "dynamic trace": only a run on example_inputs saw this block

    @property
    def kind(self) -> str:
        left = layer_kind(self.conv) if self.conv is not None else "?"
        return f"{left}->{norm_kind(self.bn)}"


@dataclass
class Analysis:
    candidates: List[Candidate]
    method: str  # "torch.fx", "dynamic trace", ...
    notes: List[str] = field(default_factory=list)
    # module attributes a forward itself changes (counters, caches): not switches of the data flow
    volatile: Set[str] = field(default_factory=set)


def normalize_example_inputs(example_inputs: Any,
                             model: Optional[nn.Module] = None) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """``Tensor`` -> ``((t,), {})``; tuple -> positional args; dict -> kwargs; list -> the list as the one
    argument when ``model.forward`` has exactly one required positional parameter (a detector's list
    of images), else positional args."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, list) and model is not None and _one_required_positional(model):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    raise TypeError(
        f"example_inputs must be a Tensor, a tuple of positional arguments, a list (one list argument, e.g. a "
        f"detector's images) or a dict of keyword arguments for model.forward; got {type(example_inputs).__name__}. "
        f"Example: convbn.convert(model, 'tune', example_inputs=(torch.randn(1, 3, 224, 224),))"
    )


def _one_required_positional(model: nn.Module) -> bool:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    return len(required) == 1 and not any(p.kind == p.VAR_POSITIONAL for p in params)


def _structural_reason(conv: nn.Module, conv_name: str, bn: nn.Module, bn_name: str, norm: NormType) -> Optional[str]:
    if type(conv).forward not in _STOCK_LAYER_FORWARDS:
        return (f"{type(conv).__name__} `{conv_name}` overrides forward(), so convbn cannot know what it "
                f"computes; give it the stock forward or exclude it with filter_fn")
    for name, module in ((conv_name, conv), (bn_name, bn)):
        if "forward" in module.__dict__ and not getattr(module.__dict__["forward"], "_convbn_installed", False):
            return (f"`{name}` has a forward patched on the instance (by another library?); convbn will not "
                    f"replace it. Remove that patch or exclude the block with filter_fn")
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters(recurse=False)) or any(
            isinstance(b, nn.parameter.UninitializedBuffer) for b in module.buffers(recurse=False)
        ):
            return f"lazy module `{name}` is not initialized yet; run one forward pass before converting"
    if getattr(conv, "_forward_pre_hooks", None) and _prehook_sets_weight(conv):
        return (f"`{conv_name}` computes its weight in a forward pre-hook (torch.nn.utils.prune or the old "
                f"weight_norm), "
                f"so its `weight` attribute changes every call; call torch.nn.utils.prune.remove / remove_weight_norm "
                f"first, or use torch.nn.utils.parametrize")
    out_features = conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels
    features = num_features(bn, norm, bn_name)
    if features != out_features:
        return (f"`{bn_name}` normalizes {features} channels but `{conv_name}` produces {out_features}: the norm "
                f"does not normalize the layer's output channels")
    return None


def _prehook_sets_weight(conv: nn.Module) -> bool:
    """prune / old weight_norm keep ``weight_orig`` or ``weight_g``/``weight_v`` and rebuild ``weight``."""
    names = set(conv._parameters)
    return "weight" not in names and bool(names & {"weight_orig", "weight_g", "weight_v"})


# ---------------------------------------------------------------------------------------------- helpers


def _norm_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    seen: Set[int] = set()
    out = []
    for name, m in model.named_modules():
        if id(m) not in seen and is_norm_layer(m):
            seen.add(id(m))
            out.append((name, m))
    return out


def _norm_candidate(name: str, m: nn.Module) -> Candidate:
    entry = norm_type(m)
    cand = Candidate(name, m, entry)
    if entry is None:
        cand.reason = unsupported_reason(m, name)
    return cand


class _State:
    """Everything a forward may change on the modules (buffers, attributes, training flags), to restore."""

    def __init__(self, model: nn.Module):
        self.modules = list(model.modules())
        self.training = [m.training for m in self.modules]
        self.buffers = [dict(m._buffers) for m in self.modules]
        self.values = [{k: (b.detach().clone() if b is not None else None) for k, b in m._buffers.items()}
                       for m in self.modules]
        self.attrs = [{k: (v, _shallow(v)) for k, v in m.__dict__.items() if not k.startswith("_")}
                      for m in self.modules]

    def restore(self) -> None:
        for m, tr, bufs, vals, attrs in zip(self.modules, self.training, self.buffers, self.values, self.attrs):
            m.training = tr
            m._buffers.clear()
            m._buffers.update(bufs)
            with torch.no_grad():
                for k, b in bufs.items():
                    if b is not None and vals[k] is not None:
                        b.copy_(vals[k])
            for k in [k for k in m.__dict__ if not k.startswith("_") and k not in attrs]:
                del m.__dict__[k]
            for k, (v, contents) in attrs.items():
                m.__dict__[k] = v
                _restore_contents(v, contents)

    def stashed(self) -> Iterator[Tuple[str, Any]]:
        """(attribute path, value) of every value a forward put on a module (new or changed attribute)."""
        names = {id(m): n for n, m in zip(_names(self.modules), self.modules)}
        for m, attrs in zip(self.modules, self.attrs):
            for k, v in m.__dict__.items():
                if k.startswith("_"):
                    continue
                old = attrs.get(k)
                if old is None or old[0] is not v or _shallow(v) != old[1]:
                    path = f"{names[id(m)]}.{k}".lstrip(".")
                    for item in _flat_values(v):
                        yield path, item


def _names(modules: List[nn.Module]) -> List[str]:
    root = modules[0]
    by_id = {id(m): n for n, m in root.named_modules(remove_duplicate=False)}
    return [by_id.get(id(m), "?") for m in modules]


def _shallow(v: Any) -> Any:
    if isinstance(v, list):
        return ("list", [id(x) for x in v])
    if isinstance(v, dict):
        return ("dict", [(k, id(x)) for k, x in v.items()])
    return None


def _restore_contents(v: Any, contents: Any) -> None:
    # a list/dict attribute a forward appended to is emptied of what the trace added
    if isinstance(v, list) and contents is not None:
        keep = set(contents[1])
        v[:] = [x for x in v if id(x) in keep]
    elif isinstance(v, dict) and contents is not None:
        keep = {k for k, _ in contents[1]}
        for k in [k for k in v if k not in keep]:
            del v[k]


def _flat_values(obj: Any) -> Iterator[Any]:
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _flat_values(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _flat_values(o)
    else:
        yield obj


# ---------------------------------------------------------------------------------------------- torch.fx


class _LeafTracer(torch.fx.Tracer):
    """Keeps every conv/linear/norm layer (including user subclasses) a leaf, so each call is one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, LAYER_TYPES) or is_norm_layer(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


@dataclass
class _Trace:
    """The facts one fx graph proves about the module calls it contains (names relative to the model root)."""

    calls: Dict[str, int]
    norm_input: Dict[str, List[Optional[str]]]  # norm name -> per call: the conv/linear feeding it, or None
    norm_input_desc: Dict[str, str]
    other_users: Dict[str, List[str]]  # conv name -> users other than its norm
    relu_of: Dict[str, Optional[str]]  # norm name -> the nn.ReLU module that is its only user, or None
    volatile: Set[str] = field(default_factory=set)
    functional_relu_of: Dict[str, str] = field(default_factory=dict)  # norm -> "F.relu"-like call, its only user


def _trace_module(root: nn.Module, prefix: str, modules: Dict[str, nn.Module], training: bool) -> _Trace:
    state = _State(root)
    try:
        root.train(training)
        with torch.random.fork_rng(devices=[]):  # a forward that draws random numbers must not move the user's RNG
            graph = _LeafTracer().trace(root)
        changed = list(state.stashed())
        stashed = [(p, v) for p, v in changed if isinstance(v, torch.fx.Proxy)]
    finally:
        state.restore()
    full = {}
    for node in graph.nodes:
        if node.op == "call_module":
            full[node] = f"{prefix}.{node.target}" if prefix else node.target
    calls: Dict[str, int] = {}
    for name in full.values():
        calls[name] = calls.get(name, 0) + 1
    stash_users: Dict[torch.fx.Node, List[str]] = {}
    for path, proxy in stashed:
        stash_users.setdefault(proxy.node, []).append(f"attribute `{path}`")
    t = _Trace(calls, {}, {}, {}, {}, {p for p, _ in changed})
    for node, name in full.items():
        m = modules.get(name)
        if m is None or not is_norm_layer(m):
            continue
        src = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        if isinstance(src, torch.fx.Node) and src in full and isinstance(modules.get(full[src]), LAYER_TYPES):
            conv_name = full[src]
            t.norm_input.setdefault(name, []).append(conv_name)
            others = [u.name for u in src.users if u is not node] + stash_users.get(src, [])
            t.other_users.setdefault(conv_name, []).extend(others)
        else:
            t.norm_input.setdefault(name, []).append(None)
            t.norm_input_desc[name] = src.name if isinstance(src, torch.fx.Node) else repr(src)
        users = list(node.users)
        relu = None
        if len(users) == 1 and not stash_users.get(node) and users[0] in full:
            relu = full[users[0]]
        elif len(users) == 1 and not stash_users.get(node) and _is_functional_relu(users[0], node):
            t.functional_relu_of[name] = _describe_relu(users[0])
        t.relu_of[name] = relu
    return t


_RELU_FUNCTIONS = (torch.nn.functional.relu, torch.relu, torch.relu_, torch.nn.functional.relu_)


def _is_functional_relu(user: torch.fx.Node, node: torch.fx.Node) -> bool:
    """``F.relu(bn_out)`` / ``torch.relu`` / ``relu_`` / ``bn_out.relu()`` with the norm output as its only tensor."""
    if user.op == "call_function" and user.target in _RELU_FUNCTIONS:
        return user.args[:1] == (node,) and all(not isinstance(a, torch.fx.Node) for a in user.args[1:]) \
            and all(not isinstance(v, torch.fx.Node) for v in user.kwargs.values())
    return user.op == "call_method" and user.target in ("relu", "relu_") and user.args == (node,)


def _describe_relu(user: torch.fx.Node) -> str:
    if user.op == "call_method":
        return f".{user.target}()"
    return {torch.nn.functional.relu: "F.relu", torch.relu: "torch.relu", torch.relu_: "torch.relu_",
            torch.nn.functional.relu_: "F.relu_"}[user.target]


def _fx_traces(model: nn.Module, modules: Dict[str, nn.Module]) -> Tuple[List[_Trace], List[str], List[str]]:
    """Traces (both training states) of the model, or of its largest traceable submodules.
    Returns (traces, names of the traced roots, notes)."""
    traces: List[_Trace] = []
    roots: List[str] = []
    notes: List[str] = []

    def visit(name: str, m: nn.Module) -> None:
        if isinstance(m, LAYER_TYPES) or is_norm_layer(m):
            return
        try:
            pair = [_trace_module(m, name, modules, training) for training in (True, False)]
        except Exception as e:  # fx raises many types (TraceError, TypeError, NotImplementedError, ...)
            if not name:
                notes.append(f"torch.fx could not trace {type(m).__name__} ({type(e).__name__}: {_short(e)})")
            for child_name, child in m.named_children():
                visit(f"{name}.{child_name}" if name else child_name, child)
            return
        traces.extend(pair)
        roots.append(name)

    visit("", model)
    return traces, roots, notes


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0][:200] if text else "")


def _under(name: str, roots: List[str]) -> bool:
    return any(r == "" or name == r or name.startswith(r + ".") for r in roots)


def _fx_analysis(model: nn.Module) -> Analysis:
    modules = dict(model.named_modules())
    norm_layers = _norm_layers(model)  # before tracing: recognising a norm may run its forward (a probe)
    traces, roots, notes = _fx_traces(model, modules)
    if not roots:
        raise ConvBNError(notes[0] if notes else "torch.fx could not trace any submodule")
    if roots != [""]:
        notes.append(f"traced {len(roots)} submodule(s) separately: {', '.join('`%s`' % r for r in roots[:6])}"
                     + (" ..." if len(roots) > 6 else ""))
    # calls per module: a module shared by two traced roots is counted in both (each root traced twice)
    calls: Dict[str, int] = {}
    for state in (0, 1):  # traces alternate train(), eval()
        per_state: Dict[str, int] = {}
        for t in traces[state::2]:
            for n, c in t.calls.items():
                per_state[n] = per_state.get(n, 0) + c
        for n, c in per_state.items():
            calls[n] = max(calls.get(n, 0), c)
    candidates: List[Candidate] = []
    for name, m in norm_layers:
        cand = _norm_candidate(name, m)
        candidates.append(cand)
        if cand.norm is None:
            continue
        if not _under(name, roots):
            cand.reason = (f"`{name}` lies in a part of the model torch.fx cannot trace, so its input is unknown; pass "
                           f"example_inputs=(an input batch,) so convbn can trace it by running the model once")
            continue
        seen = [t for t in traces if name in t.norm_input]
        if not seen:
            cand.reason = (f"`{name}` is not called in forward (in train() or eval()), so there is nothing to convert")
            continue
        relus = {t.relu_of.get(name) for t in seen}
        if len(relus) == 1:
            relu = relus.pop()
            if relu is not None and calls.get(relu, 0) == 1 and calls.get(name, 0) == 1:
                _set_relu(cand, relu, modules[relu])
        functional = {t.functional_relu_of.get(name) for t in seen}
        if len(functional) == 1 and None not in functional and cand.relu is None and calls.get(name, 0) == 1 \
                and not tuple(cand.norm.after(m)):
            cand.functional_relu = functional.pop()
        cand.inner_relu = fusable_relu(m, cand.norm) if calls.get(name, 0) == 1 else None
        sources = {c for t in seen for c in t.norm_input[name]}
        if None in sources:
            desc = next(t.norm_input_desc[name] for t in seen if None in t.norm_input[name])
            cand.reason = (f"the input of `{name}` is not the output of a Conv/Linear module (it comes from `{desc}`), "
                           f"so there is nothing to fold it into")
            continue
        if len(sources) > 1 and calls.get(name, 0) > 1:
            cand.reason = (f"`{name}` is called {calls[name]} times in forward (on the outputs of "
                           f"{' and '.join('`%s`' % s for s in sorted(sources))}); it cannot be folded into one "
                           f"conv. Give each use its own norm module")
            continue
        if len(sources) > 1:
            cand.reason = (f"`{name}` normalizes the outputs of {' and '.join('`%s`' % s for s in sorted(sources))} "
                           f"(in train() or eval()); give each use its own norm layer")
            continue
        conv_name = sources.pop()
        cand.conv_name, cand.conv = conv_name, modules[conv_name]
        others = sorted({u for t in traces for u in t.other_users.get(conv_name, [])})
        feeds = sorted({n for t in traces for n, cs in t.norm_input.items() if conv_name in cs and n != name})
        if calls.get(conv_name, 0) > 1:
            cand.reason = (f"`{conv_name}` is called {calls[conv_name]} times in forward; folding a norm into it would "
                           f"change every call. Give each use its own module")
        elif calls.get(name, 0) > 1:
            cand.reason = (f"`{name}` is called {calls[name]} times in forward; it cannot be folded into one "
                           f"conv. Give each use its own norm module")
        elif others or feeds:
            cand.reason = (f"the output of `{conv_name}` is also used by "
                           f"{', '.join('`%s`' % o for o in others + feeds)} (in train() or eval()), which must "
                           f"see the "
                           f"un-normalized values, so the norm cannot be folded into it")
        else:
            cand.reason = _structural_reason(cand.conv, conv_name, m, name, cand.norm)
    return Analysis(candidates, "torch.fx", notes, {p for t in traces for p in t.volatile})


def _set_relu(cand: Candidate, name: str, module: nn.Module) -> None:
    """Record ``module`` as the block's fusable ReLU if it is a stock, unpatched ``nn.ReLU`` and the norm
    applies nothing after normalizing (a timm act in between would be skipped)."""
    if cand.norm is not None and tuple(cand.norm.after(cand.bn)):
        return
    if type(module) is nn.ReLU and "forward" not in module.__dict__:
        cand.relu_name, cand.relu = name, module


# ---------------------------------------------------------------------------------------------- dynamic


class _UseRecorder(TorchFunctionMode):
    """Records every op that consumes a tracked conv output outside the norm that normalizes it."""

    def __init__(self, tracked: Dict[int, torch.Tensor], active: List[str], other_uses: Dict[int, List[str]]):
        super().__init__()
        self.tracked, self.active, self.other_uses = tracked, active, other_uses

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.tracked and not self.active:
            name = getattr(func, "__name__", "")
            if name == "__get__":
                name = getattr(getattr(func, "__self__", None), "__name__", name)
            if name not in _METADATA_NAMES:
                for a in _flat_values((args, kwargs)):
                    if isinstance(a, torch.Tensor) and self.tracked.get(id(a)) is a:
                        self.other_uses.setdefault(id(a), []).append(name or str(func))
        return func(*args, **kwargs)


@dataclass
class _Run:
    calls: Dict[str, int]
    norm_input: Dict[str, List[Optional[str]]]  # norm -> per call: the conv name feeding it, or None
    others: Dict[str, List[str]]  # conv name -> other uses
    relu_of: Dict[str, Optional[str]]
    norm_other: Dict[str, List[str]]  # norm -> other uses of its output (besides a ReLU)
    out_dims: Dict[str, int]
    volatile: Set[str] = field(default_factory=set)


def _dynamic_run(model: nn.Module, args, kwargs, training: bool) -> _Run:
    names: Dict[int, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, LAYER_TYPES) or norm_type(m) is not None or type(m) is nn.ReLU:
            names.setdefault(id(m), name)
    outputs: Dict[int, Tuple[str, torch.Tensor]] = {}  # id(conv output) -> (conv name, tensor kept alive)
    tracked: Dict[int, torch.Tensor] = {}
    run = _Run({}, {}, {}, {}, {}, {})
    active: List[str] = []
    other_uses: Dict[int, List[str]] = {}
    norm_outputs: Dict[int, Tuple[str, torch.Tensor]] = {}
    relu_users: Dict[str, List[str]] = {}
    handles = []

    def count(name: str) -> None:
        run.calls[name] = run.calls.get(name, 0) + 1

    def layer_hook(m, inp, out):
        name = names[id(m)]
        count(name)
        if isinstance(out, torch.Tensor):
            outputs[id(out)] = (name, out)
            tracked[id(out)] = out
            run.out_dims[name] = out.dim()

    def norm_pre_hook(m, inp):
        name = names[id(m)]
        count(name)
        x = inp[0] if inp else None
        src = outputs.get(id(x)) if isinstance(x, torch.Tensor) else None
        conv = src[0] if src is not None and src[1] is x else None
        run.norm_input.setdefault(name, []).append(conv)
        if conv is not None:
            run.others.setdefault(conv, [])
        active.append(name)

    def norm_hook(m, inp, out):
        active.pop()
        if isinstance(out, torch.Tensor):
            norm_outputs[id(out)] = (names[id(m)], out)
            tracked[id(out)] = out

    def relu_pre_hook(m, inp):
        name = names[id(m)]
        count(name)
        x = inp[0] if inp else None
        src = norm_outputs.get(id(x)) if isinstance(x, torch.Tensor) else None
        if src is not None and src[1] is x:
            relu_users.setdefault(src[0], []).append(name)
        active.append(name)

    def relu_hook(m, inp, out):
        active.pop()

    for m in model.modules():
        if id(m) not in names:
            continue
        if norm_type(m) is not None:
            handles.append(m.register_forward_pre_hook(norm_pre_hook, prepend=True))
            handles.append(m.register_forward_hook(norm_hook))
        elif type(m) is nn.ReLU:
            handles.append(m.register_forward_pre_hook(relu_pre_hook, prepend=True))
            handles.append(m.register_forward_hook(relu_hook))
        else:
            handles.append(m.register_forward_hook(layer_hook))
    state = _State(model)
    # Trace the user's own modules: convbn's installed forwards (an earlier conversion) would pass a
    # norm's input through and look like extra users of the conv output.
    installed = {id(m): (m, m.__dict__.pop("forward")) for m in model.modules()
                 if getattr(m.__dict__.get("forward"), "_convbn_installed", False)}
    try:
        model.train(training)
        for m in model.modules():  # batch statistics are not data flow, and need more than one value per channel
            if norm_type(m) is not None:
                m.training = False
        with torch.random.fork_rng(devices=[]), torch.no_grad(), _UseRecorder(tracked, active, other_uses):
            result = model(*args, **kwargs)
        kept = [("the model's return value", v) for v in _flat_values(_as_containers(result))]
        changed = list(state.stashed())
        kept += [(f"attribute `{p}`", v) for p, v in changed]
        run.volatile = {p for p, _ in changed}
    finally:
        for m, fwd in installed.values():
            m.__dict__["forward"] = fwd
        for h in handles:
            h.remove()
        state.restore()
    for what, v in kept:
        if isinstance(v, torch.Tensor) and tracked.get(id(v)) is v:
            other_uses.setdefault(id(v), []).append(what)
    for out_id, (conv, _) in outputs.items():
        if other_uses.get(out_id):
            run.others.setdefault(conv, []).extend(other_uses[out_id])
    for name, relus in relu_users.items():
        run.relu_of[name] = relus[0] if len(relus) == 1 else None
    for out_id, (name, _) in norm_outputs.items():
        if other_uses.get(out_id):
            run.norm_other.setdefault(name, []).extend(other_uses[out_id])
    return run


def _as_containers(result: Any) -> Any:
    if isinstance(result, (list, tuple, dict, torch.Tensor)):
        return result
    if hasattr(result, "__dict__"):  # dataclass-like outputs
        return list(vars(result).values())
    return []


def _dynamic_analysis(model: nn.Module, example_inputs: Any) -> Analysis:
    args, kwargs = normalize_example_inputs(example_inputs, model)
    notes: List[str] = []
    try:
        runs = [_dynamic_run(model, args, kwargs, model.training)]
    except Exception as e:
        raise ConvBNError(
            f"running the model on example_inputs failed with {type(e).__name__}: {e}. convbn runs "
            f"model(*example_inputs) once to trace the Conv->norm data flow; pass inputs that model.forward "
            f"accepts (a Tensor, a tuple of positional arguments, a list, or a dict of keyword arguments)"
        ) from e
    other = "eval()" if model.training else "train()"
    try:
        runs.append(_dynamic_run(model, args, kwargs, not model.training))
    except Exception as e:
        notes.append(f"the model did not run on example_inputs in {other} ({type(e).__name__}: {_short(e)}); "
                     f"data flow in {other} is checked at run time only")
    modules = dict(model.named_modules())
    candidates: List[Candidate] = []
    for name, m in _norm_layers(model):
        cand = _norm_candidate(name, m)
        cand.proven_by = "dynamic trace"
        candidates.append(cand)
        if cand.norm is None:
            continue
        seen = [r for r in runs if name in r.norm_input]
        if not seen:
            cand.reason = (f"`{name}` was not called when the model ran on example_inputs, so its input is unknown")
            continue
        norm_calls = max(r.calls.get(name, 0) for r in runs)
        relus = {r.relu_of.get(name) for r in seen}
        norm_other = [u for r in runs for u in r.norm_other.get(name, [])]
        module_relu = len(relus) == 1 and None not in relus and not norm_other
        functional = relus == {None} and all(u in ("relu", "relu_") for u in norm_other) and \
            len(norm_other) <= len(runs)
        cand.dynamic_relu_ok = norm_calls == 1 and (module_relu or functional)
        # no nn.ReLU is fused on a dynamic trace's word alone: a branch it did not take could read the norm output
        cand.inner_relu = fusable_relu(m, cand.norm) if norm_calls == 1 else None
        sources = {c for r in seen for c in r.norm_input[name]}
        if None in sources or len(sources) > 1:
            cand.reason = (f"the input of `{name}` is not (always) the output of one Conv/Linear module, so there is "
                           f"nothing to fold it into")
            continue
        conv_name = sources.pop()
        cand.conv_name, cand.conv = conv_name, modules[conv_name]
        cand.layer_output_dim = max(r.out_dims.get(conv_name, 0) for r in seen) or None
        calls = {k: max(r.calls.get(k, 0) for r in runs) for k in (conv_name, name)}
        feeds = sorted({n for r in runs for n, cs in r.norm_input.items() if conv_name in cs and n != name})
        others = sorted({u for r in runs for u in r.others.get(conv_name, [])})
        if calls[conv_name] > 1:
            cand.reason = (f"`{conv_name}` is called {calls[conv_name]} times in forward; folding a norm into it would "
                           f"change every call. Give each use its own module")
        elif calls[name] > 1:
            cand.reason = (f"`{name}` is called {calls[name]} times in forward; it cannot be folded into one "
                           f"conv. Give each use its own norm module")
        elif feeds or others:
            users = ", ".join("`%s`" % o for o in feeds + others)
            cand.reason = (f"the output of `{conv_name}` is also used by {users}, "
                           f"which must see the un-normalized values, so the norm cannot be folded into it")
        else:
            cand.reason = _structural_reason(cand.conv, conv_name, m, name, cand.norm)
    return Analysis(candidates, "dynamic trace", notes, {p for r in runs for p in r.volatile})


def analyze(model: nn.Module, example_inputs: Any = None) -> Analysis:
    """Find every norm layer of ``model`` and the Conv/Linear it can be folded into.

    ``torch.fx`` is tried first (whole model, else per submodule). With ``example_inputs`` the model
    also runs (dynamic trace), which checks the inputs work, records tensor ranks (for
    Linear->BatchNorm1d), sees returned and stashed tensors, and is the source of pairs where fx
    cannot trace.
    """
    try:
        fx: Optional[Analysis] = _fx_analysis(model)
        fx_error = None
    except ConvBNError as e:
        fx, fx_error = None, e
    if example_inputs is None:
        if fx is None:
            raise ConvBNError(
                f"{fx_error}. Pass example_inputs=(an input batch,) so convbn can find the Conv->norm pairs by "
                f"running the model once instead") from None
        return fx
    dyn = _dynamic_analysis(model, example_inputs)
    if fx is None:
        dyn.notes.insert(0, f"{fx_error}; used a dynamic trace")
        return dyn
    # fx proves pairs statically where it traced; the dynamic run adds ranks, uses fx missed
    # (returned or stashed tensors) and the pairs of parts fx could not trace.
    by_bn = {c.bn_name: c for c in dyn.candidates}
    merged: List[Candidate] = []
    for cand in fx.candidates:
        d = by_bn.get(cand.bn_name)
        if d is None or cand.norm is None:
            merged.append(cand)
            continue
        if cand.conv is None and cand.reason is not None and cand.reason.startswith(f"`{cand.bn_name}` lies in a part"):
            merged.append(d)  # fx could not see it; the dynamic trace did
            continue
        if d.conv_name == cand.conv_name:
            cand.layer_output_dim = d.layer_output_dim
        if cand.reason is None and d.reason is not None and cand.conv is not None:
            cand.reason = d.reason
        if d.relu is None:
            cand.relu, cand.relu_name = None, None
        if not d.dynamic_relu_ok:  # the run saw the norm output used otherwise (returned, kept, a second op)
            cand.relu, cand.relu_name, cand.functional_relu = None, None, None
        merged.append(cand)
    fx.candidates = merged
    fx.method = "torch.fx + dynamic trace"
    fx.notes.extend(dyn.notes)
    fx.volatile |= dyn.volatile
    return fx
