"""``convbn`` (no arguments) / ``convbn run``: the main job -- every mode side by side on MONAI ResNet-50."""

from __future__ import annotations

import argparse

from .options import HelpFormatter, add_model_options, add_run_options, out_path
from .bench import DESCRIPTION as BENCH_DESCRIPTION
from .bench import add_measure_options, measure

DEFAULT_MODEL = "monai:resnet50"

DESCRIPTION = """\
The main job: `convbn bench` on a default model (MONAI ResNet-50, batch 8, 80x80) with a PNG bar
chart. Needs MONAI and matplotlib (`pip install "convbn[bench]"`); both are checked before any work
starts. Takes about a minute on 2 CPU cores.

""" + BENCH_DESCRIPTION.split("\n\n", 1)[0]

EPILOG = """\
examples:
  convbn                                   # the default run (MONAI ResNet-50, batch 8, 80x80)
  convbn run --modes eval,tune --rounds 10 --threads 2
  convbn run --model torchvision:resnet18 --input-size 112
  convbn run --out-dir /tmp/convbn --no-plot
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="the default job: all modes side by side on MONAI ResNet-50 (memory, time, error)",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    add_model_options(p, DEFAULT_MODEL)
    add_measure_options(p, batch_size=8)
    add_run_options(p, out_name="default")
    p.set_defaults(func=run, command="run")
    return p


def run(args: argparse.Namespace) -> int:
    size = args.input_size
    if size is None and args.model == DEFAULT_MODEL and args.dims in (None, 2):
        size = 80  # 224x224 would take minutes per mode on 2 cores; 80x80 keeps the run near a minute
    png = None if args.no_plot else out_path(args, args.plot, "default.png")
    return measure(args, args.model, "default.json", png, size)
