"""The real-model zoo (issue 12, item 5): torchvision classification / detection (FrozenBN and BN) /
segmentation and timm (BatchNormAct2d families, plain BN, timm's frozen BN), float64, random norm
statistics. Per model:

1. every norm layer has exactly one row in ``report`` of ``convert(model, "tune")`` (by qualified name);
2. every row that is not ``converted`` has a reason (the zoo-wide converted share is test_zoo_share.py);
3. tune == eval with the model in ``train()`` after conversion: output and every parameter gradient,
   per tensor, against ``convert(copy, "eval")`` and against plain PyTorch with every norm module in
   ``eval()`` (timm's BatchNormAct2d: its own eval forward);
4. eval and tune leave every running statistic untouched under ``train()`` forward + backward;
5. ``deploy(model)`` equals the eval reference in ``eval()``; what it folded is gone from the copy;
6. ``convert`` + ``revert`` leaves ``state_dict`` bitwise equal and no instance ``forward`` behind.

Every model is converted with ``example_inputs`` (detectors cannot be fx-traced; for the others the
dynamic trace runs too). The RNG is seeded identically before every forward (dropout, samplers).
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch
from torch import nn

import convbn
from conftest import frozen_reference

from .conftest import ZooModel, record
from .models import (
    is_norm,
    layer_followed_norms,
    loss_of,
    named_outputs,
    norm_buffers,
    norm_modules,
)

pytestmark = pytest.mark.slow

F64 = torch.float64
SEED = 1234
# float64: tune/deploy and eval compute the same function with different rounding (fold, then conv vs
# conv, then scale). Per tensor, relative to the reference tensor's max |value|.
REL = 1e-9
# ... unless the reference itself is that sensitive to rounding: where random statistics make a net
# ill-conditioned (an output 1e3 below the activations it is summed from, gains of 20 stacked), a fold's
# few-ulp rounding moves the output by more than REL. Where a tensor misses REL, the reference is re-run
# with every parameter and norm buffer perturbed by up to PERTURB_ULPS ulps (what a fold's rounding does), and a
# tensor may differ by SENSITIVITY x that perturbation's effect. A wrong function differs by O(1).
PERTURB_ULPS = 4
SENSITIVITY = 10.0
# Gradients that are zero in exact arithmetic come out as rounding noise: a tensor whose reference max
# |value| is below NOISE x (the largest reference gradient of the model) is compared against that floor.
NOISE = 1e-10


# ----------------------------------------------------------------------------- helpers

def perturbed(model: nn.Module, seed: int = 99) -> nn.Module:
    """A deep copy with every float parameter and norm buffer multiplied by 1 + PERTURB_ULPS * eps * U(-1, 1)."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    norm_bufs = [b for m in model.modules() if is_norm(m) for b in m.buffers(recurse=False)]
    with torch.no_grad():
        for t in list(model.parameters()) + norm_bufs:
            if t is not None and t.is_floating_point():
                eps = torch.finfo(t.dtype).eps
                t.mul_(1 + PERTURB_ULPS * eps * (2 * torch.rand(t.shape, generator=g, dtype=torch.float64) - 1)
                       .to(t.dtype))
    return model


def train_step(zm: ZooModel, model: nn.Module) -> Dict[str, Any]:
    """One seeded train() forward + backward; the outputs, every parameter gradient and the norm buffers
    before and after."""
    case = zm.case
    assert model.training, "train_step runs models in train() (the caller sets the norms' own flags)"
    for p in model.parameters():
        p.grad = None
    before = norm_buffers(model)
    args = case.train_args(F64)
    torch.manual_seed(SEED)
    out = model(*args)
    loss = loss_of(case, out)
    loss.backward()
    outputs = ({f"loss[{k!r}]": v.detach() for k, v in out.items()} if case.detector
               else {k: v.detach() for k, v in named_outputs(out).items()})
    outputs["loss"] = loss.detach()
    grads = {n: (None if p.grad is None else p.grad.detach())
             for n, p in model.named_parameters() if p.requires_grad}
    return {"outputs": outputs, "grads": grads, "buffers_before": before, "buffers_after": norm_buffers(model)}


def converted(zm: ZooModel, mode: str) -> Tuple[nn.Module, convbn.Report]:
    """A deep copy converted to ``mode`` in train() with the train-time example inputs, and its report
    (one conversion per case and mode: the report checks and the train() run share it)."""
    def go():
        model = zm.copy().train()
        convbn.convert(model, mode, example_inputs=zm.case.train_args(F64))
        return model, convbn.report(model)
    return zm.memo(f"convert(model, {mode!r}, example_inputs=...)", go)


def tune_report(zm: ZooModel) -> convbn.Report:
    return converted(zm, "tune")[1]


def run_all(zm: ZooModel) -> Dict[str, Dict[str, Any]]:
    """The three train() runs the numerics checks compare: tune, eval, plain frozen PyTorch."""
    def run(mode: str) -> Dict[str, Any]:
        if mode == "plain":
            return zm.memo("train() forward+backward of the plain frozen reference",
                           lambda: train_step(zm, frozen_reference(zm.model, training=True)))
        model, _ = converted(zm, mode)
        return zm.memo(f"train() forward+backward of convert(model, {mode!r})", lambda: train_step(zm, model))
    return {m: run(m) for m in ("tune", "eval", "plain")}


def perturbed_run(zm: ZooModel) -> Dict[str, Any]:
    """The plain frozen reference with a few-ulp perturbation (only computed when a check needs it)."""
    return zm.memo("train() forward+backward of the perturbed plain frozen reference",
                   lambda: train_step(zm, frozen_reference(perturbed(zm.model), training=True)))


def sensitivity(reference: Dict[str, Optional[torch.Tensor]],
                perturbed_ref: Dict[str, Optional[torch.Tensor]]) -> Dict[str, float]:
    """Per tensor: max |reference - perturbed reference| (how far rounding alone moves it)."""
    out = {}
    for k, e in reference.items():
        p = perturbed_ref.get(k)
        if e is not None and p is not None and p.shape == e.shape and e.numel():
            out[k] = float((p.double() - e.double()).abs().max())
    return out


def check_tensors(actual: Dict[str, Optional[torch.Tensor]], expected: Dict[str, Optional[torch.Tensor]],
                  noise_of: Callable[[], Dict[str, float]], floor: float = 0.0) -> Tuple[List[str], float]:
    """:func:`tensor_errors`, first against REL alone; only if that fails is the reference's rounding
    sensitivity (``noise_of()``, a perturbed re-run) computed and the check repeated with it."""
    problems, worst = tensor_errors(actual, expected, floor=floor)
    if problems:
        problems, worst = tensor_errors(actual, expected, floor=floor, noise=noise_of())
    return problems, worst


def tensor_errors(actual: Dict[str, Optional[torch.Tensor]], expected: Dict[str, Optional[torch.Tensor]],
                  floor: float = 0.0, noise: Optional[Dict[str, float]] = None) -> Tuple[List[str], float]:
    """Per tensor: problems (shape/None mismatch; error above max(REL x max|expected|, SENSITIVITY x
    ``noise[name]``), or above ``floor`` where max|expected| is below it), and the largest relative
    error over the tensors above the floor."""
    noise = noise or {}
    problems, worst = [], 0.0
    for name in expected:
        e = expected[name]
        if name not in actual:
            problems.append(f"{name}: missing")
            continue
        a = actual[name]
        if (a is None) != (e is None):
            problems.append(f"{name}: grad is {'None' if a is None else 'set'} but reference grad is "
                            f"{'None' if e is None else 'set'}")
            continue
        if e is None:
            continue
        if a.shape != e.shape:
            problems.append(f"{name}: shape {tuple(a.shape)} != reference {tuple(e.shape)}")
            continue
        a, e = a.double(), e.double()
        scale = float(e.abs().max()) if e.numel() else 0.0  # max propagates NaN: finite iff every entry is
        if not math.isfinite(scale):
            problems.append(f"{name}: reference not finite")
            continue
        err = float((a - e).abs().max()) if e.numel() else 0.0
        if scale > floor:
            worst = max(worst, err / scale)
            allowed = max(REL * scale, SENSITIVITY * noise.get(name, 0.0))
            if err > allowed:
                problems.append(f"{name}: max rel err {err / scale:.3g} > {allowed / scale:.3g} (max |ref| "
                                f"{scale:.3g}; a {PERTURB_ULPS}-ulp perturbation of the reference moves it "
                                f"{noise.get(name, 0.0) / scale:.2g})")
        elif err > floor:
            problems.append(f"{name}: analytically ~0 (max |ref| {scale:.3g}) but max |err| {err:.3g} > noise "
                            f"floor {floor:.3g}")
    extra = sorted(set(actual) - set(expected))
    if extra:
        problems.append(f"tensors not in the reference: {extra[:5]}")
    return problems, worst


def grad_floor(grads: Dict[str, Optional[torch.Tensor]]) -> float:
    scale = max((float(g.abs().max()) for g in grads.values() if g is not None and g.numel()), default=0.0)
    return NOISE * scale


def fmt(problems: List[str], limit: int = 12) -> str:
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return "\n  " + "\n  ".join(problems[:limit]) + more


# ----------------------------------------------------------------------------- 1-2: the report

def test_every_norm_layer_has_one_report_row(zoo: ZooModel) -> None:
    norms = norm_modules(zoo.model)
    assert norms, f"{zoo.case.name}: the zoo found no norm layer (the case is broken)"
    rep = tune_report(zoo)
    counts = Counter(r.bn for r in rep.rows)
    missing = sorted(set(norms) - set(counts))
    twice = sorted(n for n, k in counts.items() if k > 1)
    # convbn also lists the other normalization layers (GroupNorm in FCOS/RetinaNet heads) as skipped, with a reason
    modules = dict(zoo.model.named_modules())
    others = {r.bn for r in rep.rows if r.bn not in norms and r.status == "skipped"
              and isinstance(modules.get(r.bn), (nn.GroupNorm, nn.LayerNorm)) and "per-sample statistics" in r.reason}
    unknown = sorted(set(counts) - set(norms) - others)
    kinds = Counter(type(norms[n]).__name__ for n in missing)
    assert not missing and not twice and not unknown, (
        f"{zoo.case.name}: {len(norms)} norm layers, {len(rep.rows)} report rows ({rep.summary()}); "
        f"missing {len(missing)} ({dict(kinds)}) e.g. {missing[:4]}; listed twice {twice[:4]}; "
        f"rows that name no norm layer {unknown[:4]}")


def test_non_converted_rows_have_reasons(zoo: ZooModel) -> None:
    norms = norm_modules(zoo.model)
    after_layer = zoo.memo("norm layers that follow a Conv/Linear",
                           lambda: layer_followed_norms(zoo.model, zoo.case.train_args(F64), seed=SEED))
    record(zoo.case, norms=len(norms), after_layer=sum(v is not None for v in after_layer.values()))
    rep = tune_report(zoo)
    by_bn = {r.bn: r for r in rep.rows}
    record(zoo.case, converted=len(rep.by_status("converted")), fallback=len(rep.by_status("fallback")),
           skipped=len(rep.by_status("skipped")),
           converted_after_layer=sum(1 for n, layer in after_layer.items()
                                     if layer is not None and n in by_bn and by_bn[n].status == "converted"))
    bad_status = [f"{r.bn}: status {r.status!r}" for r in rep.rows
                  if r.status not in ("converted", "fallback", "skipped")]
    no_reason = [f"{r.bn} ({r.kind}): {r.status} without a reason" for r in rep.rows
                 if r.status != "converted" and not r.reason.strip()]
    assert not bad_status and not no_reason, f"{zoo.case.name}:{fmt(bad_status + no_reason)}"


# ----------------------------------------------------------------------------- 3-4: tune == eval, frozen stats

@pytest.mark.parametrize("reference", ["convert(ref, 'eval')", "plain frozen PyTorch"])
def test_tune_equals_eval_in_train(zoo: ZooModel, reference: str) -> None:
    runs = run_all(zoo)
    tune = runs["tune"]
    ref = runs["eval"] if reference.startswith("convert") else runs["plain"]
    plain = runs["plain"]
    out_problems, out_worst = check_tensors(
        tune["outputs"], ref["outputs"], lambda: sensitivity(plain["outputs"], perturbed_run(zoo)["outputs"]))
    grad_problems, grad_worst = check_tensors(
        tune["grads"], ref["grads"], lambda: sensitivity(plain["grads"], perturbed_run(zoo)["grads"]),
        floor=grad_floor(ref["grads"]))
    if reference.startswith("plain"):
        record(zoo.case, max_rel_err=max(out_worst, grad_worst))
    n_grads = sum(g is not None for g in ref["grads"].values())
    assert not out_problems and not grad_problems, (
        f"{zoo.case.name}: tune vs {reference} in train(), float64: {len(out_problems)} of {len(ref['outputs'])} "
        f"outputs and {len(grad_problems)} of {n_grads} gradients differ:{fmt(out_problems + grad_problems)}")


def test_eval_equals_plain_frozen_in_train(zoo: ZooModel) -> None:
    """convert(model, "eval") itself must be the frozen function (the README's claim under train())."""
    runs = run_all(zoo)
    plain = runs["plain"]
    out_problems, _ = check_tensors(runs["eval"]["outputs"], plain["outputs"],
                                    lambda: sensitivity(plain["outputs"], perturbed_run(zoo)["outputs"]))
    grad_problems, _ = check_tensors(runs["eval"]["grads"], plain["grads"],
                                     lambda: sensitivity(plain["grads"], perturbed_run(zoo)["grads"]),
                                     floor=grad_floor(plain["grads"]))
    assert not out_problems and not grad_problems, (
        f"{zoo.case.name}: eval vs plain frozen PyTorch in train():{fmt(out_problems + grad_problems)}")


@pytest.mark.parametrize("mode", ["eval", "tune"])
def test_running_stats_untouched_in_train(zoo: ZooModel, mode: str) -> None:
    runs = run_all(zoo)
    plain = runs["plain"]
    assert all(torch.equal(plain["buffers_before"][k], plain["buffers_after"][k]) for k in plain["buffers_before"]), \
        f"{zoo.case.name}: the plain frozen reference changed its buffers (the zoo's reference is broken)"
    run = runs[mode]
    changed = [k for k, v in run["buffers_before"].items() if not torch.equal(v, run["buffers_after"][k])]
    assert set(run["buffers_before"]) == set(run["buffers_after"]), f"{zoo.case.name}: buffers added/removed"
    assert not changed, (f"{zoo.case.name}: convert(model, {mode!r}) under train() changed {len(changed)} of "
                         f"{len(run['buffers_before'])} norm buffers, e.g. {changed[:6]}")


# ----------------------------------------------------------------------------- 5: deploy

def _eval_forward(zm: ZooModel, model: nn.Module) -> Dict[str, torch.Tensor]:
    """Seeded eval() forward under no_grad: every output tensor, plus a detector's backbone features."""
    model.eval()
    feats: Dict[str, Any] = {}
    handle = None
    if zm.case.detector:
        handle = model.backbone.register_forward_hook(lambda m, i, o: feats.setdefault("backbone", o))
    torch.manual_seed(SEED)
    try:
        with torch.no_grad():
            out = model(*zm.case.eval_args(F64))
    finally:
        if handle is not None:
            handle.remove()
    named = {k: v.detach() for k, v in named_outputs(out).items()}
    if feats:
        named.update({k: v.detach() for k, v in named_outputs(feats["backbone"], "backbone").items()})
    return named


def test_deploy_equals_eval(zoo: ZooModel) -> None:
    args = zoo.case.eval_args(F64)
    deployed = convbn.deploy(zoo.model, example_inputs=args)
    assert zoo.model.training, "deploy changed the original model's train/eval flag"
    got = _eval_forward(zoo, deployed)
    plain = _eval_forward(zoo, copy.deepcopy(zoo.model))

    def noise() -> Dict[str, float]:
        return zoo.memo("eval() forward of the perturbed reference",
                        lambda: sensitivity(plain, _eval_forward(zoo, perturbed(zoo.model))))

    problems, _ = check_tensors(got, plain, noise)
    assert not problems, f"{zoo.case.name}: deploy vs plain eval():{fmt(problems)}"
    ev = copy.deepcopy(zoo.model).eval()
    convbn.convert(ev, "eval", example_inputs=args)
    problems, _ = check_tensors(got, _eval_forward(zoo, ev), noise)
    assert not problems, f"{zoo.case.name}: deploy vs convert(ref, 'eval') in eval():{fmt(problems)}"
    # What deploy reports as converted is folded away; every norm layer left in the copy says why.
    rep = convbn.report(deployed)
    rows = {r.bn: r for r in rep.rows}
    left = norm_modules(deployed)
    still_there = [n for n, r in rows.items() if r.status == "converted" and n in left]
    unexplained = [n for n in left if n not in rows or not rows[n].reason.strip()]
    assert not still_there and not unexplained, (
        f"{zoo.case.name}: deploy ({rep.summary()}): {len(left)} norm layers left in the copy; reported converted "
        f"but still there: {still_there[:4]}; left without a report row and reason: {unexplained[:4]}")


# ----------------------------------------------------------------------------- 6: revert

def _instance_forwards(model: nn.Module) -> List[str]:
    return [n for n, m in model.named_modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("mode", ["tune", "eval"])
def test_convert_then_revert_is_bitwise(zoo: ZooModel, mode: str) -> None:
    model = zoo.copy()
    before = zoo.model.state_dict()  # the pristine model is never converted
    own_forwards = _instance_forwards(model)
    convbn.convert(model, mode, example_inputs=zoo.case.train_args(F64))
    convbn.revert(model)
    after = model.state_dict()
    assert list(after) == list(before), f"{zoo.case.name}: state_dict keys changed by convert+revert"
    changed = [k for k in before if before[k].dtype != after[k].dtype or not torch.equal(before[k], after[k])]
    assert not changed, f"{zoo.case.name}: convert({mode!r})+revert changed {changed[:6]}"
    left = sorted(set(_instance_forwards(model)) - set(own_forwards))
    assert not left, f"{zoo.case.name}: instance forward left on {left[:6]}"
