"""torch.compile and convbn tune on MONAI ResNet-50 (2-D, batch 16, 112x112, BN frozen), fwd+bwd.

One training step of transfer-learning fine-tuning: forward, then backward w.r.t. the parameters
(the input needs no gradient), every BN normalizing with its running statistics. Variants:

  eager_eval            plain PyTorch, BN modules in eval()                      (the baseline)
  eager_tune            convbn.convert(model, "tune")
  compiled_eval         torch.compile of eager_eval
  compiled_eval_ecbe    same, compiled with torch._inductor.config.efficient_conv_bn_eval_fx_passes
  compiled_tune         torch.compile of eager_tune
  compiled_deploy       torch.compile of convbn.deploy(model): no BN at all -- the floor for any way
                        of computing the frozen BN (not the same training semantics)

Each variant runs in its own process (convbn.bench.timing.isolated_interleaved_timings: variants
sharing a process share its allocator and each other's page faults), built and compiled one after
another; the compile (first call: dynamo + inductor, forward and backward, cold inductor cache
unless --warm-cache) is timed in the worker. Then --warmup untimed steps, then --rounds interleaved
rounds (order rotates each round); we report per-variant medians and the median and spread (IQR,
range) of the per-round ratio variant / eager_eval and compiled_tune / each other compiled variant.

Issue-6 target: compiled_tune <= 0.75x eager_eval and faster than both torch.compile alone and
torch.compile + the inductor pass (the issue measured those at 0.785x and 0.804x).

    python benchmarks/bench_compile.py                      # writes benchmarks/results/compile.json
    python benchmarks/bench_compile.py --rounds 20 --batch 8 --size 64
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

if "--warm-cache" not in sys.argv:  # cold inductor cache: compile times are what a new user pays
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="convbn_bench_compile_"))

import torch  # noqa: E402

import convbn  # noqa: E402
from convbn.bench.timing import add_benchmark_args, isolated_interleaved_timings  # noqa: E402
from convbn.bench.stats import calibrate_bn  # noqa: E402

BASELINE = "eager_eval"
VARIANTS = ("eager_eval", "eager_tune", "compiled_eval", "compiled_eval_ecbe", "compiled_tune", "compiled_deploy")


def bn_eval(model: torch.nn.Module) -> torch.nn.Module:
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def _base(batch: int, size: int):
    from monai.networks.nets import resnet50

    torch.manual_seed(0)
    base = resnet50(spatial_dims=2, n_input_channels=3, num_classes=10)
    x = torch.randn(batch, 3, size, size)
    calibrate_bn(base, x)
    return base, x, torch.randn(batch, 10)


def _model(variant: str, base: torch.nn.Module) -> torch.nn.Module:
    if variant.endswith("tune"):
        return convbn.convert(copy.deepcopy(base), "tune").train()
    if variant.endswith("deploy"):
        return convbn.deploy(base).train()
    return bn_eval(copy.deepcopy(base))


def make_step(model, x: torch.Tensor, grad: torch.Tensor, params=None):
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params

    def step():
        for p in params:
            p.grad = None
        model(x).backward(grad)

    return step


def build_step(variant: str, batch: int, size: int, log: str):
    """Runs in the variant's worker process: build (and compile) the variant, check its output
    against eager eval, append ``{variant: {compile_s, max_rel_err}}`` to ``log`` as a JSON line."""
    base, x, grad = _base(batch, size)
    model = _model(variant, base)
    fn = model
    if variant.startswith("compiled"):
        if variant == "compiled_eval_ecbe":
            torch._inductor.config.efficient_conv_bn_eval_fx_passes = True
        fn = torch.compile(model)
    step = make_step(fn, x, grad, [p for p in model.parameters() if p.requires_grad])
    t0 = time.perf_counter()
    step()  # compiles forward + backward
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    step()
    steady = time.perf_counter() - t0
    with torch.no_grad():
        expected = bn_eval(copy.deepcopy(base))(x)
        err = float((fn(x) - expected).abs().max() / expected.abs().max())
    entry = {"max_rel_err": err}
    if variant.startswith("compiled"):
        entry["compile_s"] = first - steady
    with open(log, "a") as f:
        f.write(json.dumps({variant: entry}) + "\n")
    print(f"{variant}: " + ", ".join(f"{k} {v:.3g}" for k, v in entry.items()), flush=True)
    return step


def _ratio_dict(r):
    return {"median": r.median, "q1": r.q1, "q3": r.q3, "low": r.low, "high": r.high, "per_round": list(r.values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_args(ap, rounds=10, out=str(Path(__file__).parent / "results" / "compile.json"))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--warm-cache", action="store_true", help="reuse the inductor cache (compile times drop)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base, _, _ = _base(args.batch, args.size)
    t0 = time.perf_counter()
    tuned = convbn.convert(copy.deepcopy(base), "tune")
    convert_s = time.perf_counter() - t0
    report = convbn.report(tuned)

    log = Path(args.out).with_suffix(".workers.jsonl")
    log.unlink(missing_ok=True)
    res = isolated_interleaved_timings({v: functools.partial(build_step, v, args.batch, args.size, str(log))
                                        for v in VARIANTS}, rounds=args.rounds, warmup=args.warmup)
    workers = {}
    for line in log.read_text().splitlines():
        workers.update(json.loads(line))
    log.unlink()
    print(res)
    ratios = {name: res.ratio(name, BASELINE) for name in VARIANTS if name != BASELINE}
    for name, r in ratios.items():
        print(f"{name:20s} / {BASELINE}: {r}")
    vs_compiled = {other: res.ratio("compiled_tune", other)
                   for other in ("compiled_eval", "compiled_eval_ecbe", "compiled_deploy")}
    for other, r in vs_compiled.items():
        print(f"compiled_tune / {other:18s}: {r}")

    targets = {
        "compiled_tune <= 0.75x eager_eval": ratios["compiled_tune"].median <= 0.75,
        "compiled_tune faster than compiled_eval": vs_compiled["compiled_eval"].median < 1.0,
        "compiled_tune faster than compiled_eval_ecbe": vs_compiled["compiled_eval_ecbe"].median < 1.0,
    }
    out = {
        "benchmark": "MONAI ResNet-50 2-D, fwd+bwd w.r.t. parameters, BN frozen (running statistics)",
        "batch": args.batch, "size": args.size, "rounds": args.rounds, "warmup": args.warmup,
        "timing": "one process per variant, steady allocator, rounds interleaved",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.platform(),
        "processor": platform.processor(), "cpu_count": os.cpu_count(), "cold_inductor_cache": not args.warm_cache,
        "convbn_convert_s": convert_s,
        "blocks": {"converted": len(report.converted), "total": len(report)},
        "compile_s": {k: v["compile_s"] for k, v in workers.items() if "compile_s" in v},
        "output_max_rel_err_vs_eager_eval": {k: v["max_rel_err"] for k, v in workers.items()},
        "median_s": res.medians(),
        "ratio_vs_eager_eval": {name: _ratio_dict(r) for name, r in ratios.items()},
        "compiled_tune_vs": {other: _ratio_dict(r) for other, r in vs_compiled.items()},
        "targets_met": targets,
        "raw": res.to_dict(),
    }
    for name, ok in targets.items():
        print(f"  [{'met' if ok else 'MISSED'}] {name}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
