"""MONAI DenseNet121 train step (batch 16, 112x112): eager vs BN fission (eager / compiled) vs torch.compile.

Variants, all PyTorch train-mode semantics, forward+backward w.r.t. parameters:
  eager             stock PyTorch
  fission           convbn.convert(model, "train", fission=True)  (C++ sweeps + ICF statistics reuse)
  compiled          torch.compile(stock model), default mode
  fission+compiled  torch.compile(fission model)
  no_bn_floor       every BatchNorm replaced by Identity (not a valid model: the floor that any BN
                    restructuring can approach, since convolutions, pooling and concatenation stay)

Each variant runs in its own process (convbn.bench.timing.isolated_interleaved_timings): variants in
one process share its allocator, and the page faults one variant causes land on another.

Reports compile times (first call), median step time over interleaved rounds and the median of
per-round ratios vs eager, numerics vs eager (issue 4 target: <= 1e-4 relative), and ICF's sweep
savings. Target: fission <= 0.80x eager step time.

    python benchmarks/bench_densenet_fission.py [--rounds 10] [--no-compile]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
from pathlib import Path

import torch

import convbn
from convbn.bench.timing import FirstStepLog, add_benchmark_args, isolated_interleaved_timings, parameter_step
from convbn.icf import root_hooks


def _model(batch: int, size: int):
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    model = DenseNet121(spatial_dims=2, in_channels=3, out_channels=10).train()
    return model, torch.randn(batch, 3, size, size)


def _no_bn(model: torch.nn.Module) -> torch.nn.Module:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
                setattr(module, name, torch.nn.Identity())
    return model


def build_step(variant: str, batch: int, size: int, compile_log: str = ""):
    """Runs in the variant's worker process: build the model, compile if asked (appending the
    compile + first-step seconds to ``compile_log`` as a JSON line), return the step."""
    model, x = _model(batch, size)
    if variant.startswith("fission"):
        model = convbn.convert(model, "train", fission=True)
    elif variant == "no_bn_floor":
        model = _no_bn(model)
    if variant.endswith("compiled"):
        model = torch.compile(model)
        FirstStepLog.time_first_step(compile_log, variant, parameter_step(model, x))
    return parameter_step(model, x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_args(ap, rounds=10, out=str(Path(__file__).parent / "results" / "densenet_fission.json"))
    ap.add_argument("--no-compile", action="store_true", help="skip the two torch.compile variants")
    args = ap.parse_args()

    base, x = _model(args.batch, args.size)
    models = {"eager": copy.deepcopy(base), "fission": convbn.convert(copy.deepcopy(base), "train", fission=True)}

    # numerics: one step from identical states, vs eager
    def one_step(m):
        m = copy.deepcopy(m)
        out = m(x)
        grads = torch.autograd.grad(out.sum(), list(m.parameters()))
        return out.detach(), grads, [b.clone() for b in m.buffers()]

    ref_out, ref_grads, ref_bufs = one_step(models["eager"])
    fis_out, fis_grads, fis_bufs = one_step(models["fission"])
    numerics = {
        "output_max_rel": float((fis_out - ref_out).abs().max() / ref_out.abs().max()),
        "grads_global_rel_l2": float(sum(((a - b) ** 2).sum() for a, b in zip(fis_grads, ref_grads)).sqrt()
                                     / sum((b ** 2).sum() for b in ref_grads).sqrt()),
        "running_stats_max_abs": max(float((a.double() - b.double()).abs().max()) for a, b in zip(fis_bufs, ref_bufs)),
    }
    cache = root_hooks(models["fission"]).cache
    swept0, reused0 = cache.swept_channels, cache.reused_channels
    with torch.no_grad():
        models["fission"](x)
    icf = {"swept_channels": cache.swept_channels - swept0, "reused_channels": cache.reused_channels - reused0}

    variants = ["eager", "fission"] + ([] if args.no_compile else ["compiled", "fission+compiled"]) + ["no_bn_floor"]
    compile_log = FirstStepLog(args.out)
    timing = isolated_interleaved_timings(
        {v: functools.partial(build_step, v, args.batch, args.size, compile_log.path) for v in variants},
        rounds=args.rounds, warmup=args.warmup)
    compile_s = compile_log.read()
    ratios = {k: timing.ratio(k, "eager") for k in variants if k != "eager"}
    result = {
        "setup": {"model": "monai DenseNet121 (2-D), train mode", "batch": args.batch, "size": args.size,
                  "rounds": args.rounds, "warmup": args.warmup, "torch": torch.__version__,
                  "timing": "one process per variant, rounds interleaved",
                  "threads": torch.get_num_threads(),
                  "fission_blocks": len(convbn.report(models["fission"]).converted),
                  "fused_relus": sum("fused" in r.reason for r in convbn.report(models["fission"]).converted)},
        "median_step_s": timing.medians(),
        "ratio_vs_eager": {k: {"median": r.median, "low": r.low, "high": r.high} for k, r in ratios.items()},
        "compile_s": compile_s,
        "numerics_fission_vs_eager": numerics,
        "icf_per_forward": icf,
        "timing_raw": timing.to_dict(),
    }
    result["targets_met"] = {"fission <= 0.80x eager": ratios["fission"].median <= 0.80,
                             "numerics output <= 1e-4 relative": numerics["output_max_rel"] <= 1e-4}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))

    print(f"MONAI DenseNet121 train, batch {args.batch}, {args.size}x{args.size}, {args.rounds} interleaved rounds, "
          f"{torch.get_num_threads()} threads; {result['setup']['fission_blocks']} fission BNs "
          f"({result['setup']['fused_relus']} with fused ReLU)")
    for k in variants:
        r = "" if k == "eager" else f"  {ratios[k]} vs eager"
        c = f"  (compile {compile_s[k]:.1f} s)" if k in compile_s else ""
        print(f"  {k:17}{timing.median(k):8.3f} s{r}{c}")
    print(f"numerics fission vs eager: {numerics}")
    print(f"ICF per forward: swept {icf['swept_channels']} channels, reused {icf['reused_channels']}")
    for name, ok in result["targets_met"].items():
        print(f"  [{'met' if ok else 'MISSED'}] {name}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
