"""``python -m experiments sweep``: the efficiency sweep of paper Table 6 / Figure 3
(modes x batch sizes x input sizes)."""

from __future__ import annotations

import argparse

import torch

from .common import MODEL_HELP, monai_available, write_json
from .sweep import CSV_COLUMNS, SweepConfig, csv_rows, run_sweep, sweep_table

from convbn.cli.options import (HelpFormatter, add_model_options, add_run_options, int_list, out_path, say,
                       settings_line, setup_threads, str_list, write_csv)

DESCRIPTION = """\
Paper Table 6 / Figure 3 on CPU: peak live tensor memory, bytes saved for backward and median step
time (forward + backward) of every mode, while the batch size and the input size vary.

By default two one-dimensional sweeps share their centre point: every batch size at the middle
input size, and every input size at the middle batch size (what Figure 3 plots); --grid measures
all combinations. Each point times the modes in interleaved rounds after warm-up and reports the
median and the per-round ratio against eval (IQR). Writes JSON (and optionally CSV) with the raw
per-round times, and a PNG with memory and time vs batch size and vs input size."""

EPILOG = """\
examples:
  python -m experiments sweep                                          # monai:resnet18 (or small_resnet), 2-D
  python -m experiments sweep --model small_resnet --batch-sizes 8,16,32,64 --input-sizes 32,64,96
  python -m experiments sweep --model monai:resnet50 --dims 3 --input-sizes 16,24,32 --batch-sizes 1,2,4
  python -m experiments sweep --modes eval,tune,deploy --rounds 10 --csv sweep.csv
  python -m experiments sweep --dtype bfloat16 --channels-last
  python -m experiments sweep --grid --json results/bench.json --plot results/bench.png
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("sweep", help="Table 6 / Fig. 3: memory and time vs batch size and input size",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    add_model_options(p, None, help=MODEL_HELP)
    p.add_argument("--batch-sizes", type=int_list, default=[2, 4, 8, 16], help="comma-separated batch sizes")
    p.add_argument("--input-sizes", type=int_list, default=[32, 64, 96], help="comma-separated spatial sides")
    p.add_argument("--grid", action="store_true", help="every (batch, size) pair instead of two 1-D sweeps")
    p.add_argument("--modes", type=str_list, default=None, help="comma-separated modes (default: all available)")
    p.add_argument("--rounds", "--repetitions", type=int, default=3, dest="rounds",
                   help="timed rounds per point (each runs every mode once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls per mode and point")
    p.add_argument("--dtype", default="float32", help="float32, float64 or bfloat16")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--check-errors", action="store_true", help="also measure the error vs eval at each point")
    p.add_argument("--csv", default=None, metavar="PATH", help="also write the records as CSV")
    add_run_options(p, out_name="bench")
    p.set_defaults(func=run, command="sweep")
    return p


def run(args: argparse.Namespace) -> int:
    setup_threads(args)
    model = args.model or ("monai:resnet18" if monai_available() else "small_resnet")
    cfg = SweepConfig(model=model, batch_sizes=tuple(args.batch_sizes), input_sizes=tuple(args.input_sizes),
                      modes=tuple(args.modes) if args.modes else None, dims=args.dims, channels=args.channels,
                      dtype=args.dtype, channels_last=args.channels_last, rounds=args.rounds, warmup=args.warmup,
                      grid=args.grid, check_errors=args.check_errors)
    settings = {"model": model, "batch_sizes": list(cfg.batch_sizes), "input_sizes": list(cfg.input_sizes),
                "dtype": cfg.dtype, "rounds": cfg.rounds, "warmup": cfg.warmup, "threads": torch.get_num_threads()}
    say(f"python -m experiments sweep: {settings_line(settings)}")
    res = run_sweep(cfg, progress=not args.quiet)
    res["threads"] = torch.get_num_threads()
    for n in res["notes"]:
        say(f"note: {n}")
    say("", "peak live tensor MiB and median step ms per mode:", sweep_table(res), "")
    json_path = write_json(out_path(args, args.json, "bench.json"), res)
    say(f"wrote {json_path}")
    if args.csv:
        say(f"wrote {write_csv(args.csv, CSV_COLUMNS, csv_rows(res))}")
    if not args.no_plot:
        from .plots import plot_sweep

        png = plot_sweep(res["records"], out_path(args, args.plot, "bench.png"),
                         f"{model}, {cfg.dtype}, {res['threads']} thread(s): peak memory and step time",
                         res["fixed_size"], res["fixed_batch"])
        say(f"wrote {png}")
    return 0
