"""Eval vs Tune vs Deploy on MONAI ResNet-50 (2-D, batch 16, 112x112): the core issue's benchmark.

Measures, for a forward+backward w.r.t. the parameters (transfer-learning fine-tuning, BN frozen):
  1. bytes saved for backward (deterministic; each storage once), with and without parameters;
  2. peak live tensor bytes during forward+backward;
  3. step time: warm-up, then variants interleaved per round, median of per-round ratios (each
     variant in its own process: variants sharing a process share its allocator's page faults);
  4. convbn.convert() wall time.

Targets (issue 2): saved Tune/Eval <= 0.55 and Tune/Deploy <= 1.005; time Tune/Eval <= 0.85 and
Tune/Deploy <= 1.03; convert <= 1 s. Deploy/Eval is reported too: Deploy has no BN left, so it is
the floor for Tune/Eval (Tune computes Deploy's convolutions plus the fold).

    python benchmarks/bench_tune.py                 # defaults: --batch 16 --size 112 --rounds 12
    python benchmarks/bench_tune.py --rounds 20 --out benchmarks/results/tune.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import convbn
from convbn.bench.memory import saved_tensor_bytes
from convbn.bench.peak import peak_live_tensor_bytes
from convbn.bench.timing import add_benchmark_args, isolated_interleaved_timings, parameter_step
from convbn.bench.stats import calibrate_bn


def _base(batch: int, size: int):
    from monai.networks.nets import resnet50

    torch.manual_seed(0)
    base = resnet50(spatial_dims=2, n_input_channels=3, num_classes=10)
    x = torch.randn(batch, 3, size, size)
    calibrate_bn(base, x[:8])  # realistic BN statistics (true batch statistics, perturbed)
    return base, x


def _variant(base: torch.nn.Module, mode: str) -> torch.nn.Module:
    if mode == "deploy":
        return convbn.deploy(base).train()
    return convbn.convert(copy.deepcopy(base), mode).train()


def build_step(mode: str, batch: int, size: int):
    """Runs in the variant's worker process."""
    base, x = _base(batch, size)
    return parameter_step(_variant(base, mode), x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_args(ap, rounds=12, out=str(Path(__file__).parent / "results" / "tune.json"))
    args = ap.parse_args()

    base, x = _base(args.batch, args.size)

    convert_s = []
    for _ in range(5):
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        convbn.convert(m, "tune")
        convert_s.append(time.perf_counter() - t0)
    models = {mode: _variant(base, mode) for mode in ("eval", "tune", "deploy")}
    n_params = sum(p.numel() * p.element_size() for p in base.parameters())

    def step(model):
        return parameter_step(model, x)

    with torch.no_grad():
        ref = models["eval"](x)
        errors = {k: float((m(x) - ref).abs().max() / ref.abs().max()) for k, m in models.items()}
    saved = {k: saved_tensor_bytes(lambda m=m: m(x)) for k, m in models.items()}
    peak = {k: peak_live_tensor_bytes(step(m))[1] for k, m in models.items()}
    timing = isolated_interleaved_timings({k: functools.partial(build_step, k, args.batch, args.size) for k in models},
                                          rounds=args.rounds, warmup=args.warmup)

    r_te, r_td = timing.ratio("tune", "eval"), timing.ratio("tune", "deploy")
    r_de = timing.ratio("deploy", "eval")  # no BN at all: the floor for Tune/Eval
    result = {
        "setup": {"model": "monai resnet50 (2-D)", "batch": args.batch, "size": args.size, "rounds": args.rounds,
                  "warmup": args.warmup, "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "cpu": platform.processor() or platform.machine()},
        "blocks": {"converted": len(convbn.report(models["tune"]).converted),
                   "total": len(convbn.report(models["tune"]))},
        "saved_bytes": saved,
        "saved_bytes_without_parameters": {k: v - n_params for k, v in saved.items()},
        "peak_live_bytes": peak,
        "median_step_s": timing.medians(),
        "ratios": {
            "saved_tune_over_eval": saved["tune"] / saved["eval"],
            "saved_tune_over_deploy": saved["tune"] / saved["deploy"],
            "peak_tune_over_eval": peak["tune"] / peak["eval"],
            "time_tune_over_eval": r_te.median, "time_tune_over_eval_range": [r_te.low, r_te.high],
            "time_tune_over_deploy": r_td.median, "time_tune_over_deploy_range": [r_td.low, r_td.high],
            "time_deploy_over_eval": r_de.median, "time_deploy_over_eval_iqr": [r_de.q1, r_de.q3],
        },
        "convert_s_median": statistics.median(convert_s),
        "max_rel_error_vs_eval": errors,
        "timing_raw": timing.to_dict(),
    }
    targets = {
        "saved Tune/Eval <= 0.55": result["ratios"]["saved_tune_over_eval"] <= 0.55,
        "saved Tune/Deploy <= 1.005": result["ratios"]["saved_tune_over_deploy"] <= 1.005,
        "time Tune/Eval <= 0.85": r_te.median <= 0.85,
        "time Tune/Deploy <= 1.03": r_td.median <= 1.03,
        "convert <= 1 s": result["convert_s_median"] <= 1.0,
    }
    result["targets_met"] = targets
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))

    mib = 1 / 2**20
    print(f"MONAI ResNet-50, batch {args.batch}, {args.size}x{args.size}, {args.rounds} interleaved rounds, "
          f"{torch.get_num_threads()} threads; {result['blocks']['converted']}/{result['blocks']['total']} "
          f"blocks in tune")
    print(f"{'mode':8}{'saved MiB':>12}{'(no params)':>13}{'peak MiB':>11}{'median s':>10}{'max rel err':>13}")
    for k in models:
        print(f"{k:8}{saved[k] * mib:12.1f}{(saved[k] - n_params) * mib:13.1f}{peak[k] * mib:11.1f}"
              f"{timing.median(k):10.3f}{errors[k]:13.2e}")
    print(f"saved tune/eval {result['ratios']['saved_tune_over_eval']:.3f}  tune/deploy "
          f"{result['ratios']['saved_tune_over_deploy']:.4f}  "
          f"peak tune/eval {result['ratios']['peak_tune_over_eval']:.3f}")
    print(f"time tune/eval {r_te}   tune/deploy {r_td}")
    print(f"time deploy/eval {r_de}  (no BN left: the floor for tune/eval)")
    print(f"convert() median {result['convert_s_median'] * 1000:.1f} ms")
    for name, ok in targets.items():
        print(f"  [{'met' if ok else 'MISSED'}] {name}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
