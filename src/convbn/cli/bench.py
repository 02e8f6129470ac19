"""``convbn bench SPEC``: every mode side by side on your model (saved bytes, peak bytes, time, error vs eval)."""

from __future__ import annotations

import argparse
import time
from typing import Optional

import torch

from ..bench.compare import compare_modes, compare_ticks, mib, mode_variants
from ..bench.stats import calibrate_if_untouched
from .options import (CLIError, HelpFormatter, Progress, add_model_options, add_run_options, memory_format_for,
                       out_path, parse_dtype, require, say, settings_line, setup_threads, str_list, write_json)
from .spec import build_workload, split_spec

DESCRIPTION = """\
Put SPEC's model in every ConvBN mode (train, train+recompute, train+fission, eval, tune, deploy)
and measure, side by side, one training step (forward + backward of sum(out * g), g fixed random):

  saved MiB        bytes autograd keeps for backward (exact, deterministic)
  peak MiB         peak bytes of live tensors during forward + backward (a TorchDispatchMode meter,
                   not process RSS; parameters and the input are not counted)
  step ms          median wall time over interleaved rounds after warm-up, each mode in its own
                   process (convbn.bench.timing.isolated_interleaved_timings)
  time/eval        median of the per-round ratio t_mode / t_eval, with its IQR
  err vs eval      max relative error (max|a-b| / max|b|) of the output and of dLoss/dinput against
                   eval mode (train uses batch statistics: a different function by design)

BN statistics of a freshly built model (mean 0, var 1 everywhere) are calibrated first so every mode
computes something realistic. SPEC: package.module:factory (your model), torchvision:NAME,
timm:NAME or monai:NAME. The model must take one batch tensor (detectors: use `convbn inspect`)."""

EPILOG = """\
examples:
  convbn bench torchvision:resnet50 --input-size 112 --batch-size 8
  convbn bench timm:efficientnet_b0 --modes eval,tune,deploy --rounds 10 --threads 2
  convbn bench monai:unet --dims 3 --input-size 32 --batch-size 2
  convbn bench mypkg.nets:build --input-size 128 --channels 1 --dtype float64 --rounds 0   # memory only
"""


def add_measure_options(p: argparse.ArgumentParser, *, batch_size: int) -> None:
    p.add_argument("--batch-size", "-b", type=int, default=batch_size, help="batch size")
    p.add_argument("--input-size", type=int, default=None,
                   help="spatial side of the input (default: the model's; required for your own model)")
    p.add_argument("--modes", type=str_list, default=None,
                   help="comma-separated subset of train,train+recompute,train+fission,eval,tune,deploy "
                        "(default: all this convbn supports)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs every mode once); 0: no timing")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls per mode")
    p.add_argument("--dtype", default="float32", help="float32, float64 or bfloat16")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="every mode on your model: memory, time, error vs eval",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    add_model_options(p, None, positional=True)
    add_measure_options(p, batch_size=8)
    add_run_options(p, out_name="bench_SPEC", plot=False)
    p.add_argument("--plot", default=None, metavar="PATH", help="also write a PNG bar chart (needs matplotlib)")
    p.set_defaults(func=run, command="bench")
    return p


def measure(args: argparse.Namespace, spec: str, json_name: str, png: Optional[str], size: Optional[int]) -> int:
    """The comparison shared by ``convbn`` (the default run) and ``convbn bench``."""
    start = time.perf_counter()
    if args.rounds < 0 or args.warmup < 0:
        raise CLIError(f"--rounds and --warmup must be >= 0, got {args.rounds} and {args.warmup}")
    prefix, _ = split_spec(spec)
    # optional dependencies first: fail before any work, saying what to install
    if prefix == "monai":
        require("monai", why=f"the model {spec}")
    if png is not None:
        require("matplotlib", why="the PNG (pass --no-plot to skip it)")
    setup_threads(args)
    variants, notes = mode_variants(args.modes)
    dtype = parse_dtype(args.dtype)
    work = build_workload(spec, batch_size=args.batch_size, input_size=size, in_channels=args.channels,
                          dims=args.dims, seed=0)
    x = work.batch
    model = work.model
    if calibrate_if_untouched(model, x):
        notes.append("BN statistics calibrated (freshly built model): batch statistics of one random batch, "
                     "perturbed")
    fmt = memory_format_for(x, args.channels_last)
    x = x.to(dtype).contiguous(memory_format=fmt)
    model = model.to(dtype)
    if args.channels_last:
        model = model.to(memory_format=fmt)
    settings = {"model": spec, "input": "x".join(map(str, x.shape)), "dtype": args.dtype, "rounds": args.rounds,
                "warmup": args.warmup, "threads": torch.get_num_threads(), "channels_last": args.channels_last}
    say(f"convbn: {settings_line(settings)}")
    for n in notes:
        say(f"note: {n}")
    bar = Progress(compare_ticks(len(variants), args.rounds), "measuring", enabled=not args.quiet)
    res = compare_modes(model, x, variants, rounds=args.rounds, warmup=args.warmup, progress=bar)
    say("", res.table(), "")
    counts = next((r.blocks for r in res.rows if r.name == "tune"), res.rows[0].blocks if res.rows else {})
    say(f"blocks (tune): {counts.get('converted', 0)} converted, {counts.get('fallback', 0)} fallback, "
        f"{counts.get('skipped', 0)} skipped -- `convbn inspect {spec}` says which and why")
    if args.rounds:
        say(f"step = forward + backward of sum(out * g), fixed random g; time = median of {args.rounds} interleaved "
            f"rounds after {args.warmup} warm-up, each mode in its own process; time/eval = median (IQR) of "
            f"per-round ratios.")
    say("err: float32 round-off; dL/dx of a deep net amplifies it where a ReLU input sits next to 0 (tune and "
        "deploy fold the BN alike, so they agree with each other); --dtype float64 shows the exact agreement.")
    if any(r.name == "eval" for r in res.rows) and any(r.name == "tune" for r in res.rows):
        ev, tu = res.row("eval"), res.row("tune")
        line = (f"tune vs eval: peak memory -{100 * (1 - tu.peak_bytes / ev.peak_bytes):.0f}% "
                f"({mib(ev.peak_bytes):.1f} -> {mib(tu.peak_bytes):.1f} MiB), saved-for-backward "
                f"-{100 * (1 - tu.saved_bytes / ev.saved_bytes):.0f}%")
        if tu.time_ratio_vs_eval:
            line += f", time x{tu.time_ratio_vs_eval['median']:.2f}"
        say(line)
    json_path = out_path(args, args.json, json_name)
    write_json(json_path, {"experiment": "all modes side by side", "settings": settings,
                           "elapsed_s": time.perf_counter() - start, "notes": notes, **res.to_dict()})
    say(f"wrote {json_path}")
    if png is not None:
        from .plot import plot_mode_bars

        title = f"convbn modes: {spec}, input {settings['input']}, {args.dtype}, {settings['threads']} thread(s)"
        say(f"wrote {plot_mode_bars(res.rows, png, title)}")
    say(f"finished in {time.perf_counter() - start:.0f} s")
    return 0


def _slug(spec: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec).strip("_")


def run(args: argparse.Namespace) -> int:
    return measure(args, args.model, f"bench_{_slug(args.model)}.json", args.plot, args.input_size)
