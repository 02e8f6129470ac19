"""Benchmark: train-mode BatchNorm2d + ReLU, forward + backward, at DenseNet-121 shapes.

Variants (all fwd+bwd, the running statistics updated each call):
  eager           torch.relu(nn.BatchNorm2d(x))
  compiled        torch.compile (default mode) of the same
  convbn          convbn.functions.bn_fission.bn_relu_train (C++ kernel)
  convbn_compiled torch.compile of bn_relu_train (the convbn::bn_fission_* ops stay opaque: the same kernel)

Each variant runs in its own process (``convbn.bench.timing.isolated_interleaved_timings``: variants sharing a
process share its allocator and each other's page faults); each round runs every variant once in a shuffled
order; we report per-variant median times and the median over rounds of the per-round ratio ``eager / variant``
(> 1 is faster than eager), which is robust to the shared, noisy CPU. Compile time = first call (fwd+bwd) minus a
steady-state call, measured in this process.

    python benchmarks/bench_bn_fission.py                 # writes benchmarks/results/bn_fission.json
    python benchmarks/bench_bn_fission.py --rounds 20 --shapes 32,256,28,28 --threads 1 2
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

if "--warm-cache" not in sys.argv:  # cold inductor cache so compile times are what a new user pays
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="convbn_bench_inductor_"))

import torch  # noqa: E402

from convbn.bench.timing import isolated_interleaved_timings  # noqa: E402
from convbn.functions import bn_fission  # noqa: E402
from convbn.ops import bn_fission as fission_ops  # noqa: E402

SHAPES = [(32, 256, 28, 28), (32, 128, 56, 56), (32, 512, 14, 14)]  # DenseNet-121 block 2/1/3 widths


def _variants(shape, channels_last: bool):
    c = shape[1]
    mf = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape).mul_(2).add_(0.5).contiguous(memory_format=mf).requires_grad_()
    dy = torch.randn(shape).contiguous(memory_format=mf)

    def make_bn():
        bn = torch.nn.BatchNorm2d(c)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.5)
        return bn

    bn_e, bn_c, bn_f, bn_fc = make_bn(), make_bn(), make_bn(), make_bn()

    def plain(bn):
        return lambda t: torch.relu(bn(t))

    def fission(bn):
        return lambda t: bn_fission.bn_relu_train(t, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                                  bn.num_batches_tracked, bn.momentum, bn.eps)

    fns = {
        "eager": plain(bn_e),
        "compiled": torch.compile(plain(bn_c)),
        "convbn": fission(bn_f),
        "convbn_compiled": torch.compile(fission(bn_fc)),
    }

    def step(fn):
        def run():
            fn(x).backward(dy)
            x.grad = None
        return run

    return {k: step(f) for k, f in fns.items()}


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _variant_step(name: str, shape, channels_last: bool):
    """Builds one variant's step in its worker process."""
    torch.manual_seed(0)
    return _variants(shape, channels_last)[name]


def bench(shape, channels_last: bool, rounds: int, warmup: int, threads: int) -> dict:
    torch._dynamo.reset()
    steps = _variants(shape, channels_last)
    first = {k: _time(f) for k, f in steps.items()}  # includes compilation for the compiled variants
    steady = {k: _time(f) for k, f in steps.items()}
    res = isolated_interleaved_timings(
        {k: functools.partial(_variant_step, k, shape, channels_last) for k in steps},
        rounds=rounds, warmup=warmup, order="shuffle", seed=0, threads=threads)
    times = res.times
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: statistics.median(e / t for e, t in zip(times["eager"], times[k])) for k in steps}
    return {
        "shape": list(shape),
        "channels_last": channels_last,
        "median_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
        "median_ratio_vs_eager": {k: round(v, 3) for k, v in ratios.items()},
        "convbn_vs_compiled_ratio": round(statistics.median(
            c / f for c, f in zip(times["compiled"], times["convbn"])), 3),
        "first_call_s": {k: round(v, 2) for k, v in first.items()},
        "compile_s": {k: round(first[k] - steady[k], 2) for k in ("compiled", "convbn_compiled")},
        "raw_ms": {k: [round(t * 1e3, 3) for t in v] for k, v in times.items()},
    }


def extension_build_seconds() -> float:
    """Cold build of the C++ kernel into an empty cache directory (what a clean CI machine pays)."""
    old = os.environ.get("TORCH_EXTENSIONS_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TORCH_EXTENSIONS_DIR"] = tmp
        try:
            t0 = time.perf_counter()
            fission_ops.LIB.build()
            return time.perf_counter() - t0
        finally:
            if old is None:
                del os.environ["TORCH_EXTENSIONS_DIR"]
            else:
                os.environ["TORCH_EXTENSIONS_DIR"] = old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--shapes", nargs="*", default=None, help="e.g. 32,256,28,28 (default: DenseNet-121 set)")
    ap.add_argument("--threads", type=int, nargs="*", default=None, help="torch thread counts (default: current and 1)")
    ap.add_argument("--warm-cache", action="store_true", help="reuse the inductor cache (compile times drop)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bn_fission.json"))
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    torch.manual_seed(0)
    random.seed(0)
    build_s = extension_build_seconds()
    if not bn_fission.extension_available():
        raise SystemExit("the C++ kernel did not build; this benchmark measures it")
    configs = [(s, False) for s in shapes] + [(shapes[0], True)]
    results = []
    for threads in args.threads or sorted({torch.get_num_threads(), 1}, reverse=True):
        torch.set_num_threads(threads)
        for shape, cl in configs:
            r = {"threads": threads, **bench(shape, cl, args.rounds, args.warmup, threads)}
            print(f"t={threads} {str(shape):>18} cl={cl!s:5} ms={r['median_ms']} "
                  f"ratio_vs_eager={r['median_ratio_vs_eager']} compile_s={r['compile_s']}", flush=True)
            results.append(r)
    out = {
        "op": "bn_relu_train (BatchNorm2d train + ReLU), forward + backward, float32",
        "torch": torch.__version__,
        "inductor_cache": "warm" if args.warm_cache else "cold (fresh TORCHINDUCTOR_CACHE_DIR)",
        "cpu": platform.processor() or platform.machine(),
        "rounds": args.rounds,
        "extension_cold_build_s": round(build_s, 2),
        "note": "shared 2-core machine, other jobs running: use the per-round ratios, not absolute times",
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"extension cold build: {build_s:.2f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
