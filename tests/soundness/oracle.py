"""The judge: run a model as plain PyTorch and as convbn converts it, step by step, and classify.

Per (model, mode) the only acceptable outcomes are

* ``equal``: every step (forward + backward + SGD step, ``train()``/``eval()`` alternating) gives
  the reference's outputs (returned and stashed tensors), input and parameter gradients, buffers
  and hook records; ``report`` (the dry run) and ``convert`` change no buffer, no RNG state and leave
  no ``torch.fx.Proxy`` on the model;
* ``ConvBNError`` (at convert or at any forward/backward) whose message names a module of the model.

Anything else -- another exception, a mismatch -- is ``FAILED`` with a kind.

References (deep copies of the ORIGINAL plain model, run as plain PyTorch, same RNG seed per step):
train variants == plain train; eval/tune == every BatchNorm in ``.eval()`` while the rest follows
``model.train()/eval()``; deploy == plain ``model.eval()`` (deploy steps are all eval, no SGD step:
the folded parameters are other tensors).
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import convbn

from .generators import ModelSpec, build, generate, make_inputs

MODES = ("train", "train+recompute", "train+fission", "eval", "tune", "deploy")
SEMANTICS = {"train": "train", "train+recompute": "train", "train+fission": "train", "eval": "frozen",
             "tune": "frozen", "deploy": "deploy"}
STEPS = 3
LR = 1e-3
RTOL = 1e-7  # float64, relative to each tensor's largest value
FLOOR = 1e-6  # ... floored at this fraction of the step's largest output (analytic zeros)
# Gradients that are zero in exact arithmetic (a conv bias before a batch-statistics BN) come out as
# cancellation round-off up to ~2e-13 of the step's largest gradient after a few SGD steps (seen:
# seed 312, train+fission): their floor is 1e-4 of it, i.e. an absolute tolerance of 1e-11 x that.
GRAD_FLOOR = 1e-4


class Mismatch(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


class ReferenceInvalid(Exception):
    """Plain PyTorch itself rejects the generated model (the generator drew an illegal combination)."""


@dataclass
class Snap:
    outputs: List[Tuple[str, torch.Tensor]]
    input_grad: Optional[torch.Tensor]
    grads: Dict[str, Optional[torch.Tensor]]
    buffers: Dict[str, torch.Tensor]
    records: List[List[Optional[torch.Tensor]]]


@dataclass
class Outcome:
    seed: int
    mode: str
    status: str  # "equal" / "error" / "invalid" / "FAILED"
    kind: str = ""  # failure kind, or where the ConvBNError was raised
    detail: str = ""
    side_effects: List[Tuple[str, str]] = field(default_factory=list)  # (kind, detail) of report/convert
    options: Dict[str, Any] = field(default_factory=dict)
    converted: int = 0  # blocks the report lists as converted
    cpu: float = 0.0


# ------------------------------------------------------------------------------------ running
def _flatten(out: Any, prefix: str = "out") -> List[Tuple[str, torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return [(prefix, out)]
    if isinstance(out, (tuple, list)):
        return [kv for i, o in enumerate(out) for kv in _flatten(o, f"{prefix}[{i}]")]
    if isinstance(out, dict):
        return [kv for k in sorted(out) for kv in _flatten(out[k], f"{prefix}[{k!r}]")]
    return []


def _loss_weight(step: int, i: int, t: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 * step + i)
    return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)


def buffers_of(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers() if b is not None}


def _records(model: nn.Module) -> List[List[Optional[torch.Tensor]]]:
    out = []
    for rec in getattr(model, "recorders", []):
        out.append(list(rec.records))
        rec.records.clear()
    return out


def step(model: nn.Module, spec: Optional[ModelSpec], k: int, x: torch.Tensor, flag: bool, training: bool,
         semantics: str, reference: bool, sgd: bool) -> Snap:
    """One forward + backward (+ SGD step). ``semantics`` only shapes a reference: convbn's model
    gets ``model.train(training)`` and nothing else."""
    model.train(training and semantics != "deploy")
    if reference and semantics == "frozen":
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.eval()
    if spec is not None and spec.flag_attr:
        # deploy folds permanently the data flow proven with the attributes as they were at conversion (README:
        # "What convbn proves"); only the modes that run code at call time can follow a switch flipped later
        model.flag = flag if semantics != "deploy" else False
    torch.manual_seed(1000 + k)
    xin = x.clone().requires_grad_(True)
    out = model(xin, flag=flag) if spec is not None and spec.flag_arg else model(xin)
    outs = _flatten(out)
    feats = model.features() if hasattr(model, "features") else {}
    outs += [(f"features()[{n!r}]", t) for n, t in sorted(feats.items())]
    loss = None
    for i, (_, t) in enumerate(outs):
        if t.is_floating_point() and t.requires_grad:
            term = (t * _loss_weight(k, i, t)).sum()
            loss = term if loss is None else loss + term
    if loss is not None:
        loss.backward()
    outputs = [(n, t.detach().clone()) for n, t in outs]
    params = dict(model.named_parameters())
    grads = {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in params.items()}
    if sgd:
        with torch.no_grad():
            for p in params.values():
                if p.grad is not None:
                    p.sub_(LR * p.grad)
    for p in params.values():
        p.grad = None
    return Snap(outputs, None if xin.grad is None else xin.grad.detach().clone(), grads, buffers_of(model),
                _records(model))


def run_reference(model: nn.Module, spec: ModelSpec, inputs, semantics: str) -> List[Snap]:
    ref = copy.deepcopy(model)
    snaps = []
    try:
        for k, (x, flag, training) in enumerate(inputs):
            snap = step(ref, spec, k, x, flag, training, semantics, reference=True, sgd=semantics != "deploy")
            for n, t in snap.outputs:
                if not torch.isfinite(t).all():
                    raise ReferenceInvalid(f"reference output {n} is not finite")
            snaps.append(snap)
    except ReferenceInvalid:
        raise
    except Exception as e:  # plain PyTorch rejects it (e.g. an in-place hook on a tensor autograd saved)
        raise ReferenceInvalid(f"{type(e).__name__}: {e}") from e
    return snaps


# ------------------------------------------------------------------------------------ comparing
def _err(a: torch.Tensor, e: torch.Tensor, floor: float) -> float:
    if not a.is_floating_point() or not e.is_floating_point():
        return 0.0 if torch.equal(a, e) else float("inf")
    if not torch.isfinite(a).all():
        return float("inf")
    scale = max(float(e.abs().max()) if e.numel() else 0.0, floor, 1e-300)
    return float((a - e).abs().max()) / scale if a.numel() else 0.0


def _cmp(kind: str, name: str, a: Optional[torch.Tensor], e: Optional[torch.Tensor], floor: float) -> None:
    if e is None and a is None:
        return
    if e is None or a is None:  # an unused parameter's grad is None in one, zeros in the other: fine
        t = a if e is None else e
        if float(t.abs().max()) <= RTOL * max(floor, 1e-300) or not t.any():
            return
        raise Mismatch(kind, f"{name}: {'None' if a is None else 'a tensor'} vs reference "
                             f"{'None' if e is None else 'a tensor'}")
    if a.shape != e.shape or a.dtype != e.dtype:
        raise Mismatch(kind, f"{name}: shape/dtype {tuple(a.shape)} {a.dtype} vs reference {tuple(e.shape)} {e.dtype}")
    err = _err(a, e, floor)
    if err > RTOL:
        raise Mismatch(kind, f"{name}: relative error {err:.3g}")


def _scale(ts) -> float:
    vals = [float(t.abs().max()) for t in ts if t is not None and t.is_floating_point() and t.numel()]
    return max(vals) if vals else 0.0


def compare(got: Snap, ref: Snap, k: int, deploy: bool) -> None:
    names = [n for n, _ in got.outputs]
    if names != [n for n, _ in ref.outputs]:
        raise Mismatch("output", f"step {k}: outputs {names} vs reference {[n for n, _ in ref.outputs]}")
    floor = FLOOR * _scale([t for _, t in ref.outputs])
    for (n, a), (_, e) in zip(got.outputs, ref.outputs):
        _cmp("output", f"step {k} {n}", a, e, floor)
    _cmp("input grad", f"step {k} input.grad", got.input_grad, ref.input_grad, GRAD_FLOOR * _scale([ref.input_grad]))
    if not deploy:
        if set(got.grads) != set(ref.grads):
            raise Mismatch("grad", f"step {k}: parameter names differ: {sorted(set(got.grads) ^ set(ref.grads))}")
        floor = GRAD_FLOOR * _scale(ref.grads.values())
        for n, e in ref.grads.items():
            _cmp("grad", f"step {k} {n}.grad", got.grads[n], e, floor)
    extra = set(got.buffers) - set(ref.buffers)
    missing = set(ref.buffers) - set(got.buffers)
    if extra or (missing and not deploy):
        raise Mismatch("buffer", f"step {k}: buffer names differ: {sorted(extra | missing)}")
    for n, a in got.buffers.items():
        _cmp("buffer", f"step {k} buffer {n}", a, ref.buffers[n], 0.0)
    if len(got.records) != len(ref.records):
        raise Mismatch("hook record", f"step {k}: {len(got.records)} recorders vs {len(ref.records)}")
    for i, (ra, re_) in enumerate(zip(got.records, ref.records)):
        if len(ra) != len(re_):
            raise Mismatch("hook record", f"step {k}: recorder {i} saw {len(ra)} calls, reference {len(re_)}")
        for j, (a, e) in enumerate(zip(ra, re_)):
            _cmp("hook record", f"step {k} recorder {i} call {j}", a, e, FLOOR * _scale([e]))


# ------------------------------------------------------------------------------------ one case
def names_a_module(msg: str, model: nn.Module) -> bool:
    names = [n for n, _ in model.named_modules() if n]
    return any(f"`{n}`" in msg for n in names) or any(n in msg for n in names if "." in n) or \
        type(model).__name__ in msg


def _proxies(model: nn.Module) -> List[str]:
    found = []
    for name, m in model.named_modules():
        for k, v in m.__dict__.items():
            if isinstance(v, torch.fx.Proxy):
                found.append(f"{name or type(model).__name__}.{k}")
    return found


def _check_untouched(model: nn.Module, before: Dict[str, torch.Tensor], rng: torch.Tensor, what: str,
                     deploy: bool = False) -> List[Mismatch]:
    """Side effects of ``what`` (the dry run or convert): changed/replaced buffers, a moved RNG,
    ``torch.fx.Proxy`` objects left on the model. Each is undone after being recorded, so the steps
    that follow still judge the conversion itself."""
    found: List[Mismatch] = []
    after = buffers_of(model)
    for n, b in before.items():
        if n not in after:
            if not deploy:
                found.append(Mismatch(f"{what} buffers", f"buffer {n} disappeared"))
            continue
        if b.shape != after[n].shape or not torch.equal(b, after[n]):
            found.append(Mismatch(f"{what} buffers", f"{what} changed buffer {n}: {b.flatten()[:4].tolist()} -> "
                                                     f"{after[n].flatten()[:4].tolist()}"))
            owner, _, leaf = n.rpartition(".")
            mod = model.get_submodule(owner)
            with torch.no_grad():
                if mod._buffers[leaf].shape == b.shape:
                    mod._buffers[leaf].copy_(b)
                else:
                    mod._buffers[leaf] = b.clone()
    if not torch.equal(torch.get_rng_state(), rng):
        found.append(Mismatch(f"{what} rng", f"{what} moved the global RNG"))
        torch.set_rng_state(rng)
    proxies = []
    for name, m in model.named_modules():
        for k, v in list(m.__dict__.items()):
            if isinstance(v, torch.fx.Proxy):
                proxies.append(f"{name or type(model).__name__}.{k}")
                del m.__dict__[k]
    if proxies:
        found.append(Mismatch(f"{what} state", f"{what} left torch.fx Proxy objects on the model: {proxies}"))
    return found


def case_options(seed: int, mode: str) -> Dict[str, Any]:
    rng = random.Random(seed * 977 + MODES.index(mode))
    return {"example_inputs": rng.random() < 0.5, "convert_in_train": rng.random() < 0.5,
            "deploy_api": mode == "deploy" and rng.random() < 0.5}


def _convert_args(mode: str) -> Tuple[str, Dict[str, bool]]:
    if mode == "train+recompute":
        return "train", {"recompute": True}
    if mode == "train+fission":
        return "train", {"fission": True}
    return mode, {}


def run_case(model: nn.Module, spec: ModelSpec, inputs, mode: str, ref: List[Snap],
             options: Optional[Dict[str, Any]] = None) -> Outcome:
    t0 = time.process_time()
    opts = options if options is not None else case_options(spec.seed, mode)
    side: List[Mismatch] = []
    out = _run_case(model, spec, inputs, mode, ref, opts, side)
    out.options = opts
    out.side_effects = [(e.kind, e.detail) for e in side]
    if side and out.status != "FAILED":
        out.status, out.kind, out.detail = "FAILED", side[0].kind, side[0].detail + (
            f" (then: {out.status} {out.kind})" if out.kind else "")
    out.cpu = time.process_time() - t0
    return out


def _run_case(model: nn.Module, spec: ModelSpec, inputs, mode: str, ref: List[Snap], opts,
              side: List[Mismatch]) -> Outcome:
    seed = spec.seed
    m = copy.deepcopy(model)
    m.train(opts["convert_in_train"])
    ex = None
    if opts["example_inputs"]:
        g = torch.Generator().manual_seed(seed + 5)
        x0 = inputs[0][0]
        xe = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
        ex = (xe, True) if spec.flag_arg else (xe,)
    base, flags = _convert_args(mode)
    deploy = mode == "deploy"

    def refused(e: BaseException, where: str, target: nn.Module) -> Outcome:
        msg = str(e)
        if names_a_module(msg, target):
            return Outcome(seed, mode, "error", where, msg[:300])
        return Outcome(seed, mode, "FAILED", "ConvBNError naming no module", f"{where}: {msg[:300]}")

    # the dry run
    before, rng = buffers_of(m), torch.get_rng_state()
    try:
        convbn.report(m, base, example_inputs=ex)
    except convbn.ConvBNError:
        pass  # convert will say it too
    except Exception as e:
        return Outcome(seed, mode, "FAILED", f"crash: {type(e).__name__} in report", f"{e}"[:300])
    side += _check_untouched(m, before, rng, "report()")
    # the conversion
    try:
        if deploy and opts["deploy_api"]:
            m = convbn.deploy(m, example_inputs=ex)
        else:
            convbn.convert(m, base, example_inputs=ex, **flags)
    except convbn.ConvBNError as e:
        return refused(e, "convert", m)
    except Exception as e:
        return Outcome(seed, mode, "FAILED", f"crash: {type(e).__name__} in convert", f"{e}"[:300])
    side += _check_untouched(m, before, rng, "convert()", deploy=deploy)
    _records(m)  # what hooks saw while convbn traced the model is not part of any step
    try:
        converted = len(convbn.report(m).converted)
    except Exception as e:
        return Outcome(seed, mode, "FAILED", f"crash: {type(e).__name__} in report of converted model", f"{e}"[:300])
    for k, (x, flag, training) in enumerate(inputs):
        try:
            got = step(m, spec, k, x, flag, training, SEMANTICS[mode], reference=False, sgd=not deploy)
        except convbn.ConvBNError as e:
            o = refused(e, f"step {k}", m)
            o.converted = converted
            return o
        except Exception as e:
            return Outcome(seed, mode, "FAILED", f"crash: {type(e).__name__} at step", f"step {k}: {e}"[:300],
                           converted=converted)
        try:
            compare(got, ref[k], k, deploy)
        except Mismatch as e:
            return Outcome(seed, mode, "FAILED", f"mismatch: {e.kind}", e.detail, converted=converted)
    return Outcome(seed, mode, "equal", converted=converted)


# ------------------------------------------------------------------------------------ the fuzz
def references(model: nn.Module, spec: ModelSpec, inputs, modes=MODES) -> Dict[str, Any]:
    refs: Dict[str, Any] = {}
    for sem in sorted({SEMANTICS[m] for m in modes}):
        sem_inputs = [(x, f, False) for x, f, _ in inputs] if sem == "deploy" else inputs
        try:
            refs[sem] = run_reference(model, spec, sem_inputs, sem)
        except ReferenceInvalid as e:
            refs[sem] = e
    return refs


def fuzz_one(seed: int, modes=MODES) -> List[Outcome]:
    spec = generate(seed)
    model = build(spec)
    inputs = make_inputs(spec, STEPS)
    t0 = time.process_time()
    refs = references(model, spec, inputs, modes)
    ref_cpu = (time.process_time() - t0) / max(1, len(modes))
    outcomes = []
    for mode in modes:
        ref = refs[SEMANTICS[mode]]
        if isinstance(ref, ReferenceInvalid):
            outcomes.append(Outcome(seed, mode, "invalid", "reference", str(ref)[:200]))
            continue
        sem_inputs = [(x, f, False) for x, f, _ in inputs] if mode == "deploy" else inputs
        o = run_case(model, spec, sem_inputs, mode, ref)
        o.cpu += ref_cpu
        outcomes.append(o)
    return outcomes


def table(outcomes: List[Outcome]) -> str:
    """Per-mode outcome counts, then every failure kind with its count and first seeds."""
    lines = [f"{'mode':<16} {'models':>6} {'equal':>6} {'ConvBNError at convert / run':>28} {'FAILED':>6} "
             f"{'invalid':>7} {'blocks conv.':>12} {'cpu ms/case':>11}"]
    kinds: Dict[Tuple[str, str], List[int]] = {}
    for mode in MODES:
        os_ = [o for o in outcomes if o.mode == mode]
        if not os_:
            continue
        c = {s: sum(o.status == s for o in os_) for s in ("equal", "error", "FAILED", "invalid")}
        at_convert = sum(o.status == "error" and o.kind == "convert" for o in os_)
        errors = f"{at_convert} / {c['error'] - at_convert}"
        cpu = 1000 * sum(o.cpu for o in os_) / len(os_)
        lines.append(f"{mode:<16} {len(os_):>6} {c['equal']:>6} {errors:>28} {c['FAILED']:>6} {c['invalid']:>7} "
                     f"{sum(o.converted for o in os_):>12} {cpu:>11.1f}")
        for o in os_:
            if o.status == "FAILED":
                for kind in {o.kind, *(k for k, _ in o.side_effects)}:
                    kinds.setdefault((mode, kind), []).append(o.seed)
    if kinds:
        lines.append("FAILED by kind (mode: kind x count, first seeds):")
        for (mode, kind), seeds in sorted(kinds.items()):
            lines.append(f"  {mode}: {kind} x{len(seeds)}  seeds {seeds[:6]}")
    return "\n".join(lines)
