"""Shrink a failing fuzz case to the smallest spec that still fails the same way.

    PYTHONPATH=src:tests python -m soundness.shrink SEED MODE [KIND]

prints the failing outcome, then the minimal :class:`ModelSpec` (fewest stages, no pattern the
failure does not need) and its outcome. Used to group the fuzz's failures into classes.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any, Dict, Iterator, Optional, Set

from .generators import ModelSpec, StageSpec, build, generate, make_inputs
from .oracle import SEMANTICS, STEPS, Outcome, ReferenceInvalid, case_options, references, run_case

__all__ = ["outcome_of", "failure_kinds", "shrink", "signature"]


def outcome_of(spec: ModelSpec, mode: str, opts: Dict[str, Any]) -> Outcome:
    model, inputs = build(spec), make_inputs(spec, STEPS)
    ref = references(model, spec, inputs, (mode,))[SEMANTICS[mode]]
    if isinstance(ref, ReferenceInvalid):
        return Outcome(spec.seed, mode, "invalid", "reference", str(ref))
    if mode == "deploy":
        inputs = [(x, f, False) for x, f, _ in inputs]
    return run_case(model, spec, inputs, mode, ref, opts)


def failure_kinds(o: Outcome) -> Set[str]:
    return {o.kind, *(k for k, _ in o.side_effects)} if o.status == "FAILED" else set()


def _flags(spec: ModelSpec) -> ModelSpec:
    return replace(spec, flag_arg=any(s.branch == "flag_arg" for s in spec.stages),
                   flag_attr=any(s.branch == "flag_attr" for s in spec.stages))


_STAGE_DEFAULTS = dict(aux="none", stash="none", ret="none", second_use=False, branch="none", residual=False,
                       bn2=None)


def _candidates(spec: ModelSpec, opts: Dict[str, Any]) -> Iterator[tuple]:
    for j in reversed(range(len(spec.stages))):
        if len(spec.stages) > 1:
            yield _flags(replace(spec, stages=spec.stages[:j] + spec.stages[j + 1:])), opts
    for j in range(len(spec.hooks)):
        yield replace(spec, hooks=spec.hooks[:j] + spec.hooks[j + 1:]), opts
    if spec.params:
        yield replace(spec, params=()), opts
    for name in ("buffer_reassign", "buffer_inplace"):
        if getattr(spec, name):
            yield replace(spec, **{name: False}), opts
    if spec.output != "tensor":
        yield replace(spec, output="tensor"), opts
    for j, s in enumerate(spec.stages):
        for field, default in _STAGE_DEFAULTS.items():
            if getattr(s, field) != default:
                yield _flags(_with_stage(spec, j, replace(s, **{field: default}))), opts
        if s.relu != "none":
            yield _with_stage(spec, j, replace(s, relu="none", relu_module=None)), opts
    for key in ("example_inputs", "deploy_api"):
        if opts.get(key):
            yield spec, {**opts, key: False}


def _with_stage(spec: ModelSpec, j: int, stage: StageSpec) -> ModelSpec:
    return replace(spec, stages=spec.stages[:j] + (stage,) + spec.stages[j + 1:])


def shrink(spec: ModelSpec, mode: str, kind: str, opts: Optional[Dict[str, Any]] = None, budget: int = 120):
    """Greedy: apply any simplification that keeps ``kind`` among the failure kinds, until none does."""
    opts = dict(opts if opts is not None else case_options(spec.seed, mode))
    best = outcome_of(spec, mode, opts)
    if kind not in failure_kinds(best):
        return spec, opts, best
    improved, tries = True, 0
    while improved and tries < budget:
        improved = False
        for cand, cand_opts in _candidates(spec, opts):
            tries += 1
            o = outcome_of(cand, mode, cand_opts)
            if kind in failure_kinds(o):
                spec, opts, best, improved = cand, cand_opts, o, True
                break
            if tries >= budget:
                break
    return spec, opts, best


def signature(spec: ModelSpec, opts: Dict[str, Any]) -> str:
    """What a minimal spec still contains (the family and channel counts aside)."""
    parts = [f"{len(spec.stages)} stage(s)"]
    for j, s in enumerate(spec.stages):
        feats = [f"{f}={getattr(s, f)}" for f, d in _STAGE_DEFAULTS.items() if getattr(s, f) != d]
        if s.branch != "none":
            feats.append(f"effect={s.branch_effect}")
        if s.relu != "none":
            feats.append(f"relu={s.relu}")
        if j > 0 and s.conv in [t.conv for t in spec.stages[:j]]:
            feats.append("shared conv")
        if j > 0 and s.bn in [t.bn for t in spec.stages[:j]]:
            feats.append("shared bn")
        parts.append(f"s{j}[{' '.join(feats)}]")
    parts += [f"hook {h.target}:{h.kind}" for h in spec.hooks]
    parts += [f"param {k}" for _, k in spec.params]
    if spec.buffer_reassign:
        parts.append("buffer reassign")
    if spec.buffer_inplace:
        parts.append("buffer inplace")
    if spec.output != "tensor":
        parts.append(f"output {spec.output}")
    parts.append(f"ex={opts['example_inputs']} convert_in_train={opts['convert_in_train']}")
    return " ".join(parts)


def main(argv) -> None:
    seed, mode = int(argv[0]), argv[1]
    spec = generate(seed)
    o = outcome_of(spec, mode, case_options(seed, mode))
    print(spec.describe(), "\n->", o.status, o.kind, o.detail, o.side_effects)
    for kind in ([argv[2]] if len(argv) > 2 else sorted(failure_kinds(o))):
        small, opts, so = shrink(spec, mode, kind)
        print(f"\n[{kind}] minimal: {signature(small, opts)}\n{small.describe()}\n-> {so.status} {so.kind} "
              f"{so.detail} {so.side_effects}")


if __name__ == "__main__":
    main(sys.argv[1:])
