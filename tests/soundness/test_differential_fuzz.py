"""Differential fuzz (issue 13): random multi-block models with random data flows, every mode, step by step.

For each of ``CONVBN_FUZZ_MODELS`` (default 1,000) seeded models (see ``generators.py``) and each mode
(train, train+recompute, train+fission, eval, tune, deploy), the converted model must equal plain
PyTorch at every step -- outputs, stashed tensors, input and parameter gradients, buffers, hook
records, no side effect of the dry run or of ``convert`` -- or raise a ``ConvBNError`` naming a
module (see ``oracle.py``). The per-mode table is printed at the end of the session.

Reproduce one case::

    PYTHONPATH=src:tests python -c "from soundness.oracle import fuzz_one; from soundness.generators import generate; \\
        print(generate(SEED).describe()); [print(o) for o in fuzz_one(SEED, ('tune',))]"
"""

from __future__ import annotations

import copy
import functools
import os
import time
from collections import Counter
from typing import Dict, List

import pytest
import torch

import convbn

from .generators import (
    BRANCH_CONDS,
    BRANCH_EFFECTS,
    HOOK_KINDS,
    PARAM_KINDS,
    PATTERN_NAMES,
    RELUS,
    build,
    generate,
    make_inputs,
    patterns_of,
)
from .oracle import MODES, SEMANTICS, STEPS, Outcome, fuzz_one, references, run_case, table

N_MODELS = int(os.environ.get("CONVBN_FUZZ_MODELS", "1000"))
SEEDS = range(N_MODELS)
SUMMARY: List[str] = []  # printed by conftest.pytest_terminal_summary


@functools.lru_cache(maxsize=1)
def fuzz_results() -> Dict[str, List[Outcome]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    t0, w0 = time.process_time(), time.time()
    try:
        outcomes = [o for seed in SEEDS for o in fuzz_one(seed)]
    finally:
        torch.set_num_threads(threads)
    cpu, wall = time.process_time() - t0, time.time() - w0
    SUMMARY.append(f"convbn differential fuzz: {N_MODELS} models x {len(MODES)} modes, {STEPS} steps each; "
                   f"{cpu:.1f} s CPU ({wall:.1f} s wall)\n{table(outcomes)}")
    return {mode: [o for o in outcomes if o.mode == mode] for mode in MODES}


def _may_fall_back(o: Outcome) -> bool:
    """Documented fallback: deploy folds Linear->BatchNorm1d only when example_inputs prove 2-D input."""
    return o.mode == "deploy" and generate(o.seed).family == "linear" and not o.options["example_inputs"]


def _failure_report(outcomes: List[Outcome], limit: int = 12) -> str:
    lines = []
    for o in [o for o in outcomes if o.status == "FAILED"][:limit]:
        lines.append(f"seed {o.seed} {o.mode} {o.options}: {o.kind}: {o.detail}")
        for kind, detail in o.side_effects[1:]:
            lines.append(f"    also {kind}: {detail}")
    return "\n".join(lines)


@pytest.mark.slow  # ~100 s CPU for all six modes together (measured: 1,000 models, ~17 ms per case)
@pytest.mark.parametrize("mode", MODES)
def test_fuzz_equal_or_convbn_error(mode: str) -> None:
    results = fuzz_results()
    outcomes = results[mode]
    assert len(outcomes) == N_MODELS
    invalid = [o for o in outcomes if o.status == "invalid"]
    assert len(invalid) <= 0.05 * N_MODELS, f"the generator draws too many models plain PyTorch rejects: {invalid[:3]}"
    # a plain chain of blocks (one model in ten) must convert and compute exactly: the fuzz is not vacuous
    simple = [o for o in outcomes if generate(o.seed).simple]
    bad_simple = [o for o in simple if o.status != "equal" or (o.converted == 0 and not _may_fall_back(o))]
    failed = [o for o in outcomes if o.status == "FAILED"]
    assert not failed and not bad_simple, (
        f"{mode}: {len(failed)} of {len(outcomes)} models FAILED (neither equal to plain PyTorch nor a ConvBNError "
        f"naming a module); {len(bad_simple)} of {len(simple)} plain chains not converted-and-equal "
        f"{[(o.seed, o.status, o.kind, o.converted) for o in bad_simple[:5]]}\n"
        f"{table([o for os_ in results.values() for o in os_])}\n{_failure_report(failed)}")


def test_generator_is_reproducible() -> None:
    for seed in (0, 7, 123):
        a, b = generate(seed), generate(seed)
        assert a == b
        ma, mb = build(a), build(b)
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        ia, ib = make_inputs(a, STEPS), make_inputs(b, STEPS)
        assert all(torch.equal(x, y) and fa == fb and ta == tb for (x, fa, ta), (y, fb, tb) in zip(ia, ib))


def test_generator_draws_every_pattern() -> None:
    """Every knob of the generator is drawn often enough over the seed list to matter."""
    specs = [generate(s) for s in SEEDS]
    counts = Counter(p for s in specs for p, on in patterns_of(s).items() if on)
    counts.update(f"relu:{st.relu}" for s in specs for st in s.stages)
    counts.update(f"branch:{st.branch}/{st.branch_effect}" for s in specs for st in s.stages if st.branch != "none")
    counts.update(f"branch:{st.branch}" for s in specs for st in s.stages if st.branch != "none")
    counts.update(f"hook:{h.target}:{h.kind}" for s in specs for h in s.hooks)
    counts.update(f"hook:{h.kind}" for s in specs for h in s.hooks)
    counts.update(f"param:{k}" for s in specs for _, k in s.params)
    counts.update(f"family:{s.family}" for s in specs)
    counts.update(f"output:{s.output}" for s in specs)
    counts.update("simple" for s in specs if s.simple)
    scale = N_MODELS / 1000
    need = {p: 20 for p in PATTERN_NAMES}
    need.update({f"relu:{r}": 20 for r in RELUS})
    need.update({f"branch:{c}": 15 for c in BRANCH_CONDS})
    need.update({f"branch:{c}/{e}": 3 for c in BRANCH_CONDS for e in BRANCH_EFFECTS})
    need.update({f"hook:{k}": 20 for k in HOOK_KINDS})
    need.update({f"param:{k}": 20 for k in PARAM_KINDS})
    need.update({f"family:{f}": 100 for f in ("conv2d", "conv1d", "linear")})
    need.update({f"output:{o}": 100 for o in ("tensor", "tuple", "dict")})
    need["simple"] = 50
    low = {p: counts[p] for p, n in need.items() if counts[p] < n * scale}
    assert not low, f"patterns drawn too rarely over {N_MODELS} seeds: {low}"


# ------------------------------------------------------------------------------------ the judge can fail
def _case(seed: int = 0, mode: str = "train"):
    """A plain chain (``simple``) so that only the injected fault can make the case fail."""
    spec = generate(seed, simple=True)
    model, inputs = build(spec), make_inputs(spec, STEPS)
    ref = references(model, spec, inputs, (mode,))
    sem = next(iter(ref.values()))
    return spec, model, inputs, sem


def _opts(**kw):
    return {"example_inputs": False, "convert_in_train": True, "deploy_api": False, **kw}


def test_judge_accepts_a_correct_conversion() -> None:
    for mode in MODES:
        spec, model, inputs, ref = _case(3, mode)
        if mode == "deploy":
            inputs = [(x, f, False) for x, f, _ in inputs]
        o = run_case(model, spec, inputs, mode, ref, _opts())
        assert o.status == "equal" and o.converted > 0, (mode, o)


@pytest.mark.parametrize("fault", ["bn_frozen", "buffer", "rng", "grad", "hook_sees_other", "error_no_name",
                                   "crash", "extra_output"])
def test_judge_catches_injected_faults(fault: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake ``convbn.convert`` that is wrong in one way each: the judge must say FAILED."""
    spec, model, inputs, ref = _case(5, "train")
    real = convbn.convert

    def fake(m, mode, **kw):
        real(m, mode, **kw)
        bn = m.bns[0]
        if fault == "bn_frozen":  # eval statistics where train ones are due
            bn.forward = lambda x, bn=bn: torch.nn.functional.batch_norm(
                x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        elif fault == "buffer":
            bn.running_mean.add_(1e-6)
        elif fault == "rng":
            torch.rand(1)
        elif fault == "grad":  # same forward, a gradient scaled on the way back
            conv = m.convs[0]
            conv.register_full_backward_pre_hook(lambda mod, g: (g[0] * (1 + 1e-5),))
        elif fault == "hook_sees_other":
            from .generators import Recorder
            rec = Recorder("fwd_record")
            m.recorders.append(rec)
            m.convs[0].register_forward_hook(rec)
        elif fault == "error_no_name":
            raise convbn.ConvBNError("something went wrong")
        elif fault == "crash":
            raise RuntimeError("boom")
        elif fault == "extra_output":
            m.stash_names.append("feat_extra")
            m.feat_extra = torch.zeros(())
        return m

    monkeypatch.setattr(convbn, "convert", fake)
    o = run_case(model, spec, inputs, "train", ref, _opts())
    assert o.status == "FAILED", (fault, o)


def test_judge_accepts_a_convbn_error_naming_a_module(monkeypatch: pytest.MonkeyPatch) -> None:
    spec, model, inputs, ref = _case(5, "train")

    def fake(m, mode, **kw):
        raise convbn.ConvBNError("`convs.0` is used twice")

    monkeypatch.setattr(convbn, "convert", fake)
    o = run_case(model, spec, inputs, "train", ref, _opts())
    assert o.status == "error" and o.kind == "convert", o


def test_the_original_model_is_never_run_or_changed() -> None:
    """References and converted cases each run on their own deep copy of the original model."""
    spec = generate(11)
    model = build(spec)
    before = copy.deepcopy(model.state_dict())
    inputs = make_inputs(spec, STEPS)
    refs = references(model, spec, inputs)
    for mode in MODES:
        if not isinstance(refs[SEMANTICS[mode]], Exception):
            sem_inputs = [(x, f, False) for x, f, _ in inputs] if mode == "deploy" else inputs
            run_case(model, spec, sem_inputs, mode, refs[SEMANTICS[mode]])
    assert "_convbn_state" not in model.__dict__ and all(r.records == [] for r in model.recorders)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
