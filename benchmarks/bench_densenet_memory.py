"""DenseNet121 training against the memory anchors (issue 15 item 3), one run, each variant in its own process.

Variants (all PyTorch train-mode semantics; forward + backward w.r.t. the parameters):
  eager              stock PyTorch
  compiled           torch.compile(stock model), default mode
  memory_efficient   torchvision's densenet121(memory_efficient=True): checkpoints cat+BN+ReLU+conv1 per layer
                     (torchvision model only)
  fission            convbn.convert(model, "train", fission=True)
  fission+low_memory convbn.convert(model, "train", fission=True, low_memory=True)

Reports the step time (median over interleaved rounds) and the median / IQR of per-round ratios vs eager,
and two deterministic memory measures of the eager-mode variants:
  retained_mb   what the autograd graph keeps alive after the forward (every mechanism: saved tensors,
                checkpoint's stash, convbn's recipes), output excluded, parameters and input excluded
  peak_mb       peak bytes of live tensor storages during forward + backward (parameters/input excluded)
(torch.compile's graphs are not measured: a dispatch-mode meter would recompile them.)

    python benchmarks/bench_densenet_memory.py [--model torchvision|monai] [--batch 16 --size 112] [--rounds 20]
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch

import convbn
from convbn.bench.peak import peak_live_tensor_bytes, retained_bytes
from convbn.bench.timing import FirstStepLog, add_benchmark_args, isolated_interleaved_timings, parameter_step

VARIANTS = ("eager", "compiled", "memory_efficient", "fission", "fission+low_memory")


def build(model_name: str, variant: str, batch: int, size: int):
    torch.manual_seed(0)
    if model_name == "torchvision":
        import torchvision

        model = torchvision.models.densenet121(weights=None, num_classes=10,
                                               memory_efficient=variant == "memory_efficient")
    else:
        from monai.networks.nets import DenseNet121

        model = DenseNet121(spatial_dims=2, in_channels=3, out_channels=10)
    model.train()
    if variant.startswith("fission"):
        convbn.convert(model, "train", fission=True, low_memory=variant == "fission+low_memory")
    elif variant == "compiled":
        model = torch.compile(model)
    return model, torch.randn(batch, 3, size, size)


def build_step(model_name: str, variant: str, batch: int, size: int, compile_log: str = ""):
    model, x = build(model_name, variant, batch, size)
    if variant == "compiled":
        FirstStepLog.time_first_step(compile_log, variant, parameter_step(model, x))
    return parameter_step(model, x)


def memory(model_name: str, variant: str, batch: int, size: int) -> dict:
    model, x = build(model_name, variant, batch, size)
    parameter_step(model, x)()  # builds the kernels, warms the caches
    retained = retained_bytes(lambda: model(x)) - 4 * batch * 10  # the output itself
    _, peak = peak_live_tensor_bytes(parameter_step(model, x))
    return {"retained_mb": retained / 2 ** 20, "peak_mb": peak / 2 ** 20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_args(ap, rounds=20, out=str(Path(__file__).parent / "results" / "densenet_memory.json"))
    ap.add_argument("--model", choices=("torchvision", "monai"), default="torchvision")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v and (v != "memory_efficient" or args.model == "torchvision")]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    mem = {v: memory(args.model, v, args.batch, args.size) for v in variants if v != "compiled"}
    compile_log = FirstStepLog(args.out)
    timing = isolated_interleaved_timings(
        {v: functools.partial(build_step, args.model, v, args.batch, args.size, compile_log.path) for v in variants},
        rounds=args.rounds, warmup=args.warmup, threads=args.threads)
    compile_s = compile_log.read()
    ratios = {v: timing.ratio(v, "eager") for v in variants if v != "eager"}
    result = {
        "setup": {"model": f"{args.model} densenet121, train mode", "batch": args.batch, "size": args.size,
                  "rounds": args.rounds, "warmup": args.warmup, "torch": torch.__version__,
                  "threads": args.threads or torch.get_num_threads(),
                  "timing": "one process per variant, rounds interleaved"},
        "median_step_s": timing.medians(),
        "ratio_vs_eager": {k: {"median": r.median, "q1": r.q1, "q3": r.q3, "low": r.low, "high": r.high}
                           for k, r in ratios.items()},
        "memory": mem,
        "compile_s": compile_s,
        "timing_raw": timing.to_dict(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{args.model} densenet121 train, batch {args.batch}, {args.size}x{args.size}, {args.rounds} interleaved "
          f"rounds, {result['setup']['threads']} threads, torch {torch.__version__}")
    print(f"  {'variant':20}{'step s':>8}  {'vs eager':34}{'retained MB':>12}{'peak MB':>9}")
    for v in variants:
        r = "" if v == "eager" else str(ratios[v])
        m = mem.get(v)
        mm = f"{m['retained_mb']:12.1f}{m['peak_mb']:9.1f}" if m else f"{'-':>12}{'-':>9}"
        c = f"  (compile {compile_s[v]:.0f} s)" if v in compile_s else ""
        print(f"  {v:20}{timing.median(v):8.3f}  {r:34}{mm}{c}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
