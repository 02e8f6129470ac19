"""Seeded generator of tiny multi-block models with random data-flow patterns (issue 13).

``generate(seed)`` draws a :class:`ModelSpec` (pure data, printable, reproducible from the seed) and
``build(spec)`` turns it into a plain ``nn.Module`` (:class:`FuzzNet`) made of ``nn.Conv1d/2d``,
``nn.ConvTranspose2d``, ``nn.Linear``, ``nn.BatchNorm1d/2d`` and ReLUs, float64, with realistic random
BN statistics. Every stage of the net is ``conv -> BN -> ReLU`` plus the patterns convbn must either
handle exactly or refuse with a ``ConvBNError``:

* a second consumer of the conv output (or of the pre-ReLU BN output) only when ``self.training``
  (deep supervision / aux head), or always (``bn(y) + y.mean()``);
* the conv output / pre-ReLU BN output stashed on ``self`` (exposed by ``features()``) or returned;
* data-dependent branches (``if h.sum() > 0``, on the batch size, on a ``flag`` argument, on a
  ``self.flag`` attribute the user flips) that skip the BN, skip the ReLU, use another BN or use the
  conv output elsewhere;
* forward hooks, pre-hooks (read-only recorders, in-place modifiers, replacers) and full backward
  hooks (recorders, modifiers) on convs, BNs and ReLU modules;
* parametrized conv weights (deterministic, random, ``spectral_norm`` both flavours, ``prune``);
* shared modules (a conv or a BN called twice, one conv feeding two BNs, one ReLU module everywhere);
* root buffers the forward reassigns (``self.steps = self.steps + 1``) or updates in place.

Each model is tiny (N=2-4, C=2-6, 4x4-6x6) so a step costs a few ms.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize, prune

__all__ = ["StageSpec", "HookSpec", "ModelSpec", "FuzzNet", "generate", "build", "make_inputs",
           "randomize_bn", "Recorder", "PATTERN_NAMES", "patterns_of"]

FAMILIES = ("conv2d", "conv2d", "conv1d", "linear")
RELUS = ("none", "module", "module", "module_inplace", "F", "torch", "inplace_", "F_inplace")
BRANCH_CONDS = ("data", "shape", "flag_arg", "flag_attr")
BRANCH_EFFECTS = ("skip_bn", "skip_relu", "use_conv", "other_bn")
HOOK_KINDS = ("fwd_record", "fwd_inplace", "fwd_replace", "pre_record", "pre_inplace", "pre_replace",
              "bwd_record", "bwd_modify")
PARAM_KINDS = ("det", "rand", "spectral", "spectral_old", "prune")


@dataclass(frozen=True)
class StageSpec:
    conv: int  # index into FuzzNet.convs (an earlier stage's index = the conv is shared)
    bn: int  # index into FuzzNet.bns (shared likewise)
    bn2: Optional[int] = None  # a second BN fed by the same conv output: bn(y) + bn2(y)
    relu: str = "module"  # see RELUS
    relu_module: Optional[int] = None  # index into FuzzNet.relus for "module"/"module_inplace"
    aux: str = "none"  # "conv" / "bn": a second consumer that runs only when self.training
    stash: str = "none"  # "conv" / "bn": stored on self (FuzzNet.features() returns it)
    ret: str = "none"  # "conv" / "bn": also returned by forward
    second_use: bool = False  # y also used by an op that always runs
    branch: str = "none"  # see BRANCH_CONDS
    branch_effect: str = "skip_bn"  # see BRANCH_EFFECTS
    other_bn: Optional[int] = None  # for branch_effect "other_bn"
    residual: bool = False


@dataclass(frozen=True)
class HookSpec:
    target: str  # "conv" / "bn" / "relu"
    index: int
    kind: str  # see HOOK_KINDS


@dataclass(frozen=True)
class ModelSpec:
    seed: int
    family: str  # "conv2d" / "conv1d" / "linear"
    channels: int
    size: Tuple[int, ...]  # spatial size (empty for linear)
    convs: Tuple[Tuple[str, bool], ...]  # (layer kind "conv"/"convT", bias)
    bns: Tuple[Tuple[bool, bool, Optional[float], float], ...]  # (affine, track_running_stats, momentum, eps)
    n_relus: int
    relu_inplace: Tuple[bool, ...]
    stages: Tuple[StageSpec, ...]
    hooks: Tuple[HookSpec, ...] = ()
    params: Tuple[Tuple[int, str], ...] = ()  # (conv index, parametrization kind)
    buffer_reassign: bool = False
    buffer_inplace: bool = False
    output: str = "tensor"  # "tensor" / "tuple" / "dict"
    flag_arg: bool = False  # forward(x, flag=False)
    flag_attr: bool = False  # the harness flips model.flag between steps
    simple: bool = False  # drawn without any pattern

    def describe(self) -> str:
        lines = [f"ModelSpec(seed={self.seed}, simple={self.simple}, family={self.family}, C={self.channels}, "
                 f"size={self.size}, output={self.output}, buffers={'reassign ' if self.buffer_reassign else ''}"
                 f"{'inplace' if self.buffer_inplace else ''})"]
        for i, (kind, bias) in enumerate(self.convs):
            lines.append(f"  convs.{i}: {kind} bias={bias}")
        for i, b in enumerate(self.bns):
            lines.append(f"  bns.{i}: affine={b[0]} track={b[1]} momentum={b[2]} eps={b[3]}")
        for i, s in enumerate(self.stages):
            lines.append(f"  stage {i}: {s}")
        for h in self.hooks:
            lines.append(f"  hook: {h}")
        for p in self.params:
            lines.append(f"  parametrization: convs.{p[0]} {p[1]}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ hooks
class Recorder:
    """A hook object: records what it sees (``*_record``) or changes it (``*_inplace``/``*_replace``/
    ``bwd_modify``). An object, not a closure, so ``copy.deepcopy(model)`` gives each copy its own."""

    def __init__(self, kind: str):
        self.kind = kind
        self.records: List[Optional[torch.Tensor]] = []

    @staticmethod
    def _keep(t: Any) -> Optional[torch.Tensor]:
        return t.detach().clone() if isinstance(t, torch.Tensor) else None

    def __call__(self, module: nn.Module, *args: Any) -> Any:
        kind = self.kind
        if kind.startswith("fwd"):
            out = args[1]
            if kind == "fwd_record":
                self.records.append(self._keep(out))
                return None
            if kind == "fwd_inplace":
                out.mul_(1.25)
                return None
            return out * 1.25 + 0.125
        if kind.startswith("pre"):
            inp = args[0][0]
            if kind == "pre_record":
                self.records.append(self._keep(inp))
                return None
            if kind == "pre_inplace":
                inp.mul_(0.75)
                return None
            return (inp * 0.75 - 0.125,)
        grad_input, grad_output = args
        if kind == "bwd_record":
            self.records.append(self._keep(grad_output[0]))
            return None
        return tuple(None if g is None else g * 0.5 for g in grad_input)


# ------------------------------------------------------------------------------------ parametrizations
class ScaleFlip(nn.Module):
    """A deterministic parametrization: W -> 0.8 W + 0.1 W.flip(0)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 0.8 * w + 0.1 * w.flip(0)


class NoisyWeight(nn.Module):
    """A random parametrization (draws from the global RNG every time the weight is computed)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + 0.05 * torch.randn_like(w)


# ------------------------------------------------------------------------------------ the model
class FuzzNet(nn.Module):
    """A plain PyTorch model interpreting a :class:`ModelSpec` (fx-traceable unless the spec has
    data-dependent branches, a ``flag`` argument or buffer updates)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        c = spec.channels
        convs = []
        for kind, bias in spec.convs:
            if spec.family == "linear":
                convs.append(nn.Linear(c, c, bias=bias))
            elif spec.family == "conv1d":
                convs.append(nn.Conv1d(c, c, 3, padding=1, bias=bias))
            elif kind == "convT":
                convs.append(nn.ConvTranspose2d(c, c, 3, padding=1, bias=bias))
            else:
                convs.append(nn.Conv2d(c, c, 3, padding=1, bias=bias))
        self.convs = nn.ModuleList(convs)
        bn_cls = nn.BatchNorm2d if spec.family == "conv2d" else nn.BatchNorm1d
        self.bns = nn.ModuleList(bn_cls(c, eps=eps, momentum=mom, affine=aff, track_running_stats=track)
                                 for aff, track, mom, eps in spec.bns)
        self.relus = nn.ModuleList(nn.ReLU(inplace=ip) for ip in spec.relu_inplace)
        self.flag = False
        self.stash_names: List[str] = []
        for i, s in enumerate(spec.stages):
            if s.stash != "none":
                self.stash_names.append(f"feat{i}")
        if spec.buffer_reassign:
            self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        if spec.buffer_inplace:
            self.register_buffer("count", torch.zeros(c, dtype=torch.float64))

    def features(self) -> Dict[str, torch.Tensor]:
        """The stashed tensors of the last forward (a feature/distillation loss would use them)."""
        return {n: getattr(self, n) for n in self.stash_names if isinstance(getattr(self, n, None), torch.Tensor)}

    def _relu(self, s: StageSpec, z: torch.Tensor) -> torch.Tensor:
        r = s.relu
        if r in ("module", "module_inplace"):
            return self.relus[s.relu_module](z)
        if r == "F":
            return F.relu(z)
        if r == "torch":
            return torch.relu(z)
        if r == "inplace_":
            return z.relu_()
        if r == "F_inplace":
            return F.relu(z, inplace=True)
        return z

    def forward(self, x: torch.Tensor, flag: bool = False):
        spec = self.spec
        if spec.buffer_reassign:
            self.steps = self.steps + 1
        if spec.buffer_inplace:
            self.count += 1.0
        h = x.clone()
        extras: List[Tuple[str, torch.Tensor]] = []
        for i, s in enumerate(spec.stages):
            conv, bn = self.convs[s.conv], self.bns[s.bn]
            y = conv(h)
            if s.branch == "none":
                cond = False
            elif s.branch == "data":
                # not on the sign of a sum that is zero in exact arithmetic (after a train-mode BN): rounding
                # would decide the branch differently in two correct implementations
                cond = bool(h.sum() > 1e-6 * h.abs().sum())
            elif s.branch == "shape":
                cond = h.shape[0] > 2
            elif s.branch == "flag_arg":
                cond = flag
            else:
                cond = self.flag
            if cond and s.branch_effect == "skip_bn":
                z = y
            elif cond and s.branch_effect == "other_bn":
                z = self.bns[s.other_bn](y)
            else:
                z = bn(y)
            if s.bn2 is not None:
                z = z + self.bns[s.bn2](y)
            if s.second_use:
                z = z + 0.5 * y.mean(dim=1, keepdim=True)
            if cond and s.branch_effect == "use_conv":
                z = z + 0.25 * torch.tanh(y)
            if s.stash == "conv":
                setattr(self, f"feat{i}", y)
            elif s.stash == "bn":
                setattr(self, f"feat{i}", z)
            if s.ret == "conv":
                extras.append((f"ret{i}", y))
            elif s.ret == "bn":
                extras.append((f"ret{i}", z))
            if self.training and s.aux != "none":
                src = y if s.aux == "conv" else z
                extras.append((f"aux{i}", torch.tanh(src).flatten(1).mean(1)))
            if not (cond and s.branch_effect == "skip_relu"):
                z = self._relu(s, z)
            h = z + h if s.residual else z
        if spec.output == "tensor":
            return h + sum(e.sum() for _, e in extras) if extras else h
        if spec.output == "tuple":
            return (h,) + tuple(e for _, e in extras)
        out = {"out": h}
        out.update(extras)
        return out


# ------------------------------------------------------------------------------------ generation
def _p(rng: random.Random, prob: float) -> bool:
    return rng.random() < prob


def generate(seed: int, *, simple: bool = False) -> ModelSpec:
    """Draw a random model spec. ``simple=True`` (and one seed in ten) draws no pattern at all: a plain
    chain of blocks with residuals, which every mode must convert and compute exactly."""
    rng = random.Random(seed)
    simple = simple or _p(rng, 0.1)  # one model in ten is a plain chain: it must convert and be equal
    family = rng.choice(FAMILIES)
    c = rng.randint(2, 6)
    size: Tuple[int, ...] = ()
    if family == "conv2d":
        size = (rng.randint(4, 6), rng.randint(4, 6))
    elif family == "conv1d":
        size = (rng.randint(4, 6),)
    n_stages = rng.randint(1, 4)
    convs: List[Tuple[str, bool]] = []
    bns: List[Tuple[bool, bool, Optional[float], float]] = []

    def new_conv() -> int:
        kind = "convT" if family == "conv2d" and _p(rng, 0.25) else "conv"
        convs.append((kind, _p(rng, 0.5)))
        return len(convs) - 1

    def new_bn() -> int:
        track = simple or not _p(rng, 0.08)
        bns.append((_p(rng, 0.85), track, rng.choice([0.1, 0.1, 0.5, None]), rng.choice([1e-5, 1e-3])))
        return len(bns) - 1

    relu_inplace: List[bool] = []
    stages: List[StageSpec] = []
    k = 0.0 if simple else 1.0
    for i in range(n_stages):
        conv_i = rng.choice(range(len(convs))) if convs and _p(rng, 0.12 * k) else new_conv()
        bn_i = rng.choice(range(len(bns))) if bns and _p(rng, 0.10 * k) else new_bn()
        bn2 = new_bn() if _p(rng, 0.08 * k) else None
        relu = rng.choice(RELUS) if not simple else rng.choice(("none", "module"))
        relu_module = None
        if relu in ("module", "module_inplace"):
            inplace = relu == "module_inplace"
            same = [j for j, ip in enumerate(relu_inplace) if ip == inplace]
            if same and _p(rng, 0.4 * k):
                relu_module = rng.choice(same)  # one ReLU module used by several stages (ResNet style)
            else:
                relu_inplace.append(inplace)
                relu_module = len(relu_inplace) - 1
        aux = rng.choice(("conv", "bn")) if _p(rng, 0.15 * k) else "none"
        stash = rng.choice(("conv", "bn")) if _p(rng, 0.12 * k) else "none"
        ret = rng.choice(("conv", "bn")) if _p(rng, 0.12 * k) else "none"
        second_use = _p(rng, 0.06 * k)
        branch = rng.choice(BRANCH_CONDS) if _p(rng, 0.2 * k) else "none"
        effect = rng.choice(BRANCH_EFFECTS)
        other_bn = None
        if branch != "none" and effect == "other_bn":
            other_bn = rng.choice(range(len(bns))) if _p(rng, 0.5) else new_bn()
        stages.append(StageSpec(conv_i, bn_i, bn2, relu, relu_module, aux, stash, ret, second_use, branch, effect,
                                other_bn, residual=_p(rng, 0.25)))
    hooks: List[HookSpec] = []
    if _p(rng, 0.35 * k):
        for _ in range(rng.randint(1, 2)):
            target = rng.choice(("conv", "bn", "relu") if relu_inplace else ("conv", "bn"))
            n = {"conv": len(convs), "bn": len(bns), "relu": len(relu_inplace)}[target]
            hooks.append(HookSpec(target, rng.randrange(n), rng.choice(HOOK_KINDS)))
    stages, hooks = _legalize(stages, hooks, relu_inplace)
    params: List[Tuple[int, str]] = []
    if _p(rng, 0.2 * k):
        params.append((rng.randrange(len(convs)), rng.choice(PARAM_KINDS)))
    flag_arg = any(s.branch == "flag_arg" for s in stages)
    flag_attr = any(s.branch == "flag_attr" for s in stages)
    return ModelSpec(seed, family, c, size, tuple(convs), tuple(bns), len(relu_inplace), tuple(relu_inplace),
                     tuple(stages), tuple(hooks), tuple(params),
                     buffer_reassign=_p(rng, 0.08 * k), buffer_inplace=_p(rng, 0.08 * k),
                     output=rng.choice(("tensor", "tuple", "dict")), flag_arg=flag_arg, flag_attr=flag_attr,
                     simple=simple)


INPLACE_RELUS = ("module_inplace", "inplace_", "F_inplace")


def _legalize(stages: List[StageSpec], hooks: List[HookSpec], relu_inplace: List[bool]):
    """Avoid combinations plain PyTorch itself rejects (autograd errors), so few models are wasted:
    an in-place change of a tensor autograd saved (a ReLU output), or of the output of a module
    with a full backward hook."""
    hooks = list(hooks)
    for i, h in enumerate(hooks):
        if h.target == "relu" and h.kind == "fwd_inplace":  # ReLU's backward reads its output
            hooks[i] = replace(h, kind="pre_inplace")
        elif h.target == "relu" and h.kind.startswith("bwd") and relu_inplace[h.index]:
            hooks[i] = replace(h, kind="fwd_record")
        elif h.target == "conv" and h.kind == "pre_inplace":
            # the input of a conv is a ReLU output except in stage 0 or after a residual sum
            if any(j > 0 and s.conv == h.index and not stages[j - 1].residual and stages[j - 1].relu != "none"
                   for j, s in enumerate(stages)):
                hooks[i] = replace(h, kind="pre_replace")
        elif h.target == "bn" and h.kind == "pre_inplace" and any(s.bn2 == h.index for s in stages):
            hooks[i] = replace(h, kind="pre_replace")  # the first BN saved the conv output for backward
    bwd = [(h.target, h.index) for h in hooks if h.kind.startswith("bwd")]
    fixed = []
    for s in stages:
        bns = {s.bn, s.bn2, s.other_bn if s.branch_effect == "other_bn" else None}
        hooked = any((t == "bn" and i in bns) or (t == "conv" and i == s.conv) for t, i in bwd)
        if hooked and s.relu in INPLACE_RELUS:
            s = replace(s, relu="F", relu_module=None)  # no in-place op on a backward-hooked module's output
        fixed.append(s)
    return fixed, hooks


def randomize_bn(bn: nn.Module, g: torch.Generator) -> None:
    """Realistic statistics (as tests/conftest.py): gamma/sqrt(var+eps) log-uniform in [0.05, 20]."""
    c = bn.num_features
    with torch.no_grad():
        var = torch.exp(torch.empty(c, dtype=torch.float64).uniform_(math.log(1e-2), math.log(4.0), generator=g))
        if bn.track_running_stats:
            bn.running_var.copy_(var)
            bn.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.5)
            bn.num_batches_tracked.fill_(100)
        if bn.affine:
            scale = torch.exp(torch.empty(c, dtype=torch.float64).uniform_(math.log(0.05), math.log(20.0),
                                                                            generator=g))
            sign = torch.where(torch.rand(c, generator=g, dtype=torch.float64) < 0.2, -1.0, 1.0)
            bn.weight.copy_(sign * scale * torch.sqrt(var + bn.eps))
            bn.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.5)


def build(spec: ModelSpec) -> FuzzNet:
    """The plain float64 model of ``spec`` (weights from ``spec.seed``), hooks and parametrizations on."""
    torch.manual_seed(spec.seed)
    model = FuzzNet(spec).double()
    g = torch.Generator().manual_seed(spec.seed + 1)
    for bn in model.bns:
        randomize_bn(bn, g)
    recorders: List[Recorder] = []
    for h in spec.hooks:
        module = {"conv": model.convs, "bn": model.bns, "relu": model.relus}[h.target][h.index]
        rec = Recorder(h.kind)
        recorders.append(rec)
        if h.kind.startswith("fwd"):
            module.register_forward_hook(rec)
        elif h.kind.startswith("pre"):
            module.register_forward_pre_hook(rec)
        else:
            module.register_full_backward_hook(rec)
    model.recorders = recorders
    for idx, kind in spec.params:
        conv = model.convs[idx]
        if kind == "det":
            parametrize.register_parametrization(conv, "weight", ScaleFlip())
        elif kind == "rand":
            parametrize.register_parametrization(conv, "weight", NoisyWeight())
        elif kind == "spectral":
            torch.nn.utils.parametrizations.spectral_norm(conv)
        elif kind == "spectral_old":
            with torch.no_grad():  # the hook's first weight is then a leaf: copy.deepcopy(model) works
                torch.nn.utils.spectral_norm(conv)
        else:
            with torch.no_grad():
                prune.l1_unstructured(conv, "weight", amount=0.3)
    return model


def make_inputs(spec: ModelSpec, steps: int) -> List[Tuple[torch.Tensor, bool, bool]]:
    """Per step: (input, flag, model.training). Batch size and input sign vary, so data- and
    shape-dependent branches go both ways across steps."""
    rng = random.Random(spec.seed * 7 + 3)
    g = torch.Generator().manual_seed(spec.seed + 2)
    out = []
    train_first = _p(rng, 0.7)
    for k in range(steps):
        n = rng.randint(3, 4) if spec.family == "linear" else rng.randint(2, 4)
        x = torch.randn(n, spec.channels, *spec.size, generator=g, dtype=torch.float64)
        x = x + rng.choice((-0.5, 0.5))
        training = train_first if k % 2 == 0 else not train_first
        out.append((x, _p(rng, 0.5), training))
    return out


# ------------------------------------------------------------------------------------ pattern coverage
PATTERN_NAMES = ("aux", "stash", "ret", "second_use", "branch", "residual", "shared_conv", "shared_bn", "bn2",
                 "shared_relu", "inplace_relu", "hooks", "params", "buffers", "no_track", "convT")


def patterns_of(spec: ModelSpec) -> Dict[str, bool]:
    """Which data-flow patterns a spec contains (for coverage checks and failure grouping)."""
    st = spec.stages
    conv_uses = [s.conv for s in st]
    bn_uses = [s.bn for s in st] + [s.bn2 for s in st if s.bn2 is not None] + \
        [s.other_bn for s in st if s.branch != "none" and s.branch_effect == "other_bn"]
    relu_uses = [s.relu_module for s in st if s.relu_module is not None]
    return {
        "aux": any(s.aux != "none" for s in st),
        "stash": any(s.stash != "none" for s in st),
        "ret": any(s.ret != "none" for s in st),
        "second_use": any(s.second_use for s in st),
        "branch": any(s.branch != "none" for s in st),
        "residual": any(s.residual for s in st),
        "shared_conv": len(set(conv_uses)) < len(conv_uses),
        "shared_bn": len(set(bn_uses)) < len(bn_uses),
        "bn2": any(s.bn2 is not None for s in st),
        "shared_relu": len(set(relu_uses)) < len(relu_uses),
        "inplace_relu": any(s.relu in ("module_inplace", "inplace_", "F_inplace") for s in st),
        "hooks": bool(spec.hooks),
        "params": bool(spec.params),
        "buffers": spec.buffer_reassign or spec.buffer_inplace,
        "no_track": any(not b[1] for b in spec.bns),
        "convT": any(k == "convT" for k, _ in spec.convs),
    }


def with_only(spec: ModelSpec, **changes: Any) -> ModelSpec:
    """A copy of ``spec`` with fields replaced (for shrinking a failing case by hand)."""
    return replace(spec, **changes)

