"""Model-level profile of a DenseNet121 train step: where the time goes, eager vs BN fission (issue 15).

For each (model, variant) -- MONAI DenseNet121 and torchvision densenet121 (if installed); eager and
``convbn.convert(model, "train", fission=True)`` -- in its own process: a few warm-up steps, then
``torch.profiler`` over the forward and the backward of several steps, each direction separately. Every
op's *self* CPU time is put in one category (conv, norm, relu, cat, grad accumulation, pooling/linear,
other aten, convbn ops); "python/dispatch" is the direction's wall time minus all ops' self time (the
interpreter between ops: module calls, hooks, ICF's TorchFunctionMode). Also the wall time of each
direction without the profiler, so the profiler's own overhead can be seen.

    python benchmarks/profile_densenet.py [--batch 16] [--size 112] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

CATEGORIES = (
    ("convbn", ("convbn::",)),
    ("conv", ("convolution", "conv2d", "mkldnn_conv", "_slow_conv", "thnn_conv")),
    ("norm", ("batch_norm", "native_batch_norm")),
    ("relu", ("relu", "threshold")),
    ("cat", ("aten::cat", "aten::narrow", "aten::slice", "aten::split")),
    ("grad accumulation", ("aten::add", "AccumulateGrad")),
    ("pool/linear", ("pool", "aten::addmm", "aten::mm", "aten::linear", "aten::mean", "aten::sum")),
    ("memory", ("aten::empty", "aten::zeros", "aten::copy_", "aten::clone", "aten::contiguous", "aten::fill_",
                "aten::resize_", "aten::to", "aten::_to_copy")),
)


def category(name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "other aten" if name.startswith("aten::") else "autograd/other"


def _model(which: str):
    torch.manual_seed(0)
    if which == "monai":
        from monai.networks.nets import DenseNet121

        return DenseNet121(spatial_dims=2, in_channels=3, out_channels=10)
    import torchvision

    return torchvision.models.densenet121(weights=None, num_classes=10)


def profile_one(which: str, variant: str, batch: int, size: int, steps: int) -> dict:
    import convbn

    model = _model(which).train()
    if variant == "fission":
        model = convbn.convert(model, "train", fission=True)
    x = torch.randn(batch, 3, size, size)
    params = list(model.parameters())

    def forward():
        for p in params:
            p.grad = None
        return model(x).sum()

    for _ in range(2):
        forward().backward()
    wall = {"forward": [], "backward": []}
    for _ in range(steps):  # without the profiler
        t0 = time.perf_counter()
        loss = forward()
        t1 = time.perf_counter()
        loss.backward()
        wall["forward"].append(t1 - t0)
        wall["backward"].append(time.perf_counter() - t1)
    out = {"wall_s": {k: sorted(v)[len(v) // 2] for k, v in wall.items()}}
    for direction in ("forward", "backward"):
        totals, counts, profiled = defaultdict(float), defaultdict(int), []
        for _ in range(steps):
            loss = None
            if direction == "backward":
                loss = forward()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                if direction == "forward":
                    loss = forward()
                else:
                    loss.backward()
                profiled.append(time.perf_counter() - t0)
            if direction == "forward":
                loss.backward()
            for ev in prof.key_averages():
                totals[category(ev.key)] += ev.self_cpu_time_total / 1e6 / steps
                counts[category(ev.key)] += ev.count // steps
        wall_p = sorted(profiled)[len(profiled) // 2]
        totals["python/dispatch"] = max(wall_p - sum(totals.values()), 0.0)
        out[direction] = {"profiled_wall_s": wall_p, "self_s": dict(sorted(totals.items(), key=lambda kv: -kv[1])),
                          "op_calls": dict(counts)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--models", default="monai,torchvision")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "profile_densenet.json"))
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(profile_one(*args.one, args.batch, args.size, args.steps)))
        return
    result = {"setup": {"batch": args.batch, "size": args.size, "steps": args.steps, "torch": torch.__version__,
                        "threads": torch.get_num_threads()}}
    for which in args.models.split(","):
        if which == "torchvision":
            try:
                import torchvision  # noqa: F401
            except ImportError:
                print("torchvision not installed: skipped")
                continue
        for variant in ("eager", "fission"):
            cmd = [sys.executable, __file__, "--one", which, variant, "--batch", str(args.batch), "--size",
                   str(args.size), "--steps", str(args.steps)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            result[f"{which}/{variant}"] = res
            print(f"{which:11} {variant:8} forward {res['wall_s']['forward']:.3f} s, "
                  f"backward {res['wall_s']['backward']:.3f} s (unprofiled)")
            for direction in ("forward", "backward"):
                parts = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in res[direction]["self_s"].items() if v > 0.002)
                print(f"    {direction:8} {res[direction]['profiled_wall_s'] * 1e3:6.0f} ms: {parts}")
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
