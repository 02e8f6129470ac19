"""``convbn`` (no arguments) / ``convbn run``: every mode side by side on one model."""

from __future__ import annotations

import argparse
import time

import torch

from convbn.experiments.common import (default_model_spec, input_shape, make_input, memory_format_for, mib,
                                       mode_variants, parse_dtype, resolve_model, write_json, Progress)
from convbn.experiments.compare import compare_modes, compare_ticks
from convbn.experiments.stats import calibrate_if_untouched

from ._options import (HelpFormatter, add_model_options, add_run_options, out_path, say, settings_line,
                       setup_threads, str_list)

DESCRIPTION = """\
The main job: put one model in every ConvBN mode (train, the train variants when convbn has them,
eval, tune, deploy) and measure, side by side, for one training step (forward + backward):

  saved MiB        bytes autograd keeps for backward (exact, deterministic)
  peak MiB         peak bytes of live tensors during forward + backward (a TorchDispatchMode meter,
                   not process RSS; parameters and the input are not counted)
  step ms          median wall time over interleaved rounds (after warm-up)
  time/eval        median of the per-round ratio t_mode / t_eval, with its IQR
  err vs eval      max relative error (max|a-b| / max|b|) of the output and of dLoss/dinput against
                   eval mode (train uses batch statistics: a different function by design)

Default model: MONAI ResNet-50 when MONAI is installed, else convbn's small ResNet. BN statistics
of a freshly built model are calibrated so every mode computes something realistic. Takes about a
minute on 2 CPU cores with the defaults."""

EPILOG = """\
examples:
  convbn                                   # the default run (MONAI ResNet-50, batch 8, 80x80)
  convbn run --model small_resnet --input-size 64 --batch-size 32
  convbn run --model monai:unet --dims 3 --input-size 32 --batch-size 2
  convbn run --modes eval,tune --rounds 10 --threads 2
  convbn run --model mypkg.models:make_net --input-size 128 --channels 1
  convbn run --out-dir /tmp/convbn --no-plot
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="the default job: all modes side by side (memory, time, error)",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    add_model_options(p, None)
    p.add_argument("--batch-size", "-b", type=int, default=8, help="batch size")
    p.add_argument("--input-size", type=int, default=None,
                   help="spatial side of the input (default: 80 for monai:resnet50, else the model's default)")
    p.add_argument("--modes", type=str_list, default=None,
                   help="comma-separated subset of train,train+recompute,train+fission,eval,tune,deploy "
                        "(default: all this convbn supports)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs every mode once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls per mode")
    p.add_argument("--dtype", default="float32", help="float32, float64 or bfloat16")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    add_run_options(p, out_name="default")
    p.set_defaults(func=run, command="run")
    return p


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    setup_threads(args)
    spec = args.model or default_model_spec()
    size = args.input_size
    if size is None and spec == "monai:resnet50" and args.dims in (None, 2):
        size = 80  # 224x224 would take minutes per mode on 2 cores; 80x80 keeps the run near a minute
    variants, notes = mode_variants(args.modes)
    dtype = parse_dtype(args.dtype)
    model = resolve_model(spec, in_channels=args.channels, dims=args.dims)
    shape = input_shape(spec, args.batch_size, input_size=size, in_channels=args.channels, dims=args.dims)
    if calibrate_if_untouched(model, make_input(shape, 1)):
        notes.append("BN statistics calibrated (freshly built model): batch statistics of one random batch, "
                     "perturbed")
    x = make_input(shape, 0, dtype)
    fmt = memory_format_for(x, args.channels_last)
    x = x.contiguous(memory_format=fmt)
    model = model.to(dtype)
    if args.channels_last:
        model = model.to(memory_format=fmt)
    settings = {"model": spec, "input": "x".join(map(str, shape)), "dtype": args.dtype, "rounds": args.rounds,
                "warmup": args.warmup, "threads": torch.get_num_threads(), "channels_last": args.channels_last}
    say(f"convbn: {settings_line(settings)}")
    for n in notes:
        say(f"note: {n}")
    bar = Progress(compare_ticks(len(variants), args.rounds, args.warmup), "measuring", enabled=not args.quiet)
    res = compare_modes(model, x, variants, rounds=args.rounds, warmup=args.warmup, progress=bar)
    say("", res.table(), "")
    counts = res.rows[0].blocks if res.rows else {}
    for r in res.rows:
        if r.name == "tune":
            counts = r.blocks
    say(f"blocks (tune): {counts.get('converted', 0)} converted, {counts.get('fallback', 0)} fallback, "
        f"{counts.get('skipped', 0)} skipped -- `convbn inspect {spec}` says which and why")
    say(f"step = forward + backward of sum(out * g), fixed random g; time = median of {args.rounds} interleaved "
        f"rounds after {args.warmup} warm-up; time/eval = median (IQR) of per-round ratios.")
    say("err: float32 round-off; dL/dx of a deep net amplifies it where a ReLU input sits next to 0 (tune and "
        "deploy fold the BN alike, so they agree with each other); --dtype float64 shows the exact agreement.")
    if any(r.name == "eval" for r in res.rows) and any(r.name == "tune" for r in res.rows):
        ev, tu = res.row("eval"), res.row("tune")
        say(f"tune vs eval: peak memory -{100 * (1 - tu.peak_bytes / ev.peak_bytes):.0f}% "
            f"({mib(ev.peak_bytes):.1f} -> {mib(tu.peak_bytes):.1f} MiB), saved-for-backward "
            f"-{100 * (1 - tu.saved_bytes / ev.saved_bytes):.0f}%, time x{tu.time_ratio_vs_eval['median']:.2f}")
    elapsed = time.perf_counter() - start
    json_path = out_path(args, args.json, "default.json")
    write_json(json_path, {"experiment": "default run (all modes side by side)", "settings": settings,
                           "elapsed_s": elapsed,
                           "notes": notes, **res.to_dict()})
    say(f"wrote {json_path}")
    if not args.no_plot:
        from convbn.experiments.plots import plot_mode_bars

        png = plot_mode_bars(res.rows, out_path(args, args.plot, "default.png"),
                             f"convbn modes: {spec}, input {settings['input']}, {args.dtype}, "
                             f"{settings['threads']} thread(s)")
        say(f"wrote {png}")
    say(f"finished in {time.perf_counter() - start:.0f} s")
    return 0
