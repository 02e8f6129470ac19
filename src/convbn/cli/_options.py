"""Options and output helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import csv
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

DEFAULT_OUT_DIR = "convbn_results"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the epilog's example lines as written and shows defaults."""


def int_list(text: str) -> List[int]:
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 2,4,8; got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 2,4,8; got {text!r}")
    return vals


def str_list(text: str) -> List[str]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    if not vals:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return vals


def add_model_options(p: argparse.ArgumentParser, default_model: Optional[str], *, positional: bool = False) -> None:
    help_model = ("model spec: a built-in (small_resnet, mobilenet_v2, mobilenet_v2_pretrained), a MONAI name "
                  "(monai:resnet50, monai:unet, ...), torchvision:NAME / timm:NAME when installed, or "
                  "package.module:factory for your own model. `convbn inspect --list` shows them all")
    if positional:
        p.add_argument("model", nargs="?", default=default_model, help=help_model)
    else:
        p.add_argument("--model", "-m", default=default_model, help=help_model)
    p.add_argument("--channels", type=int, default=None, help="input channels (default: the model's)")
    p.add_argument("--dims", type=int, choices=(1, 2, 3), default=None, help="spatial dims (default: the model's)")


def add_run_options(p: argparse.ArgumentParser, *, out_name: str, plot: bool = True) -> None:
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 keeps timings stable on a shared machine, 0 = torch's default")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="directory for the JSON and PNG files")
    p.add_argument("--json", default=None, metavar="PATH", help=f"JSON output (default: OUT_DIR/{out_name}.json)")
    if plot:
        p.add_argument("--plot", default=None, metavar="PATH", help=f"PNG output (default: OUT_DIR/{out_name}.png)")
        p.add_argument("--no-plot", action="store_true", help="do not write PNGs (no matplotlib needed)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def setup_threads(args: argparse.Namespace) -> None:
    threads = getattr(args, "threads", 0)
    if threads and threads > 0:
        torch.set_num_threads(threads)


def out_path(args: argparse.Namespace, explicit: Optional[str], name: str) -> str:
    return explicit if explicit else os.path.join(args.out_dir, name)


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def say(*lines: str) -> None:
    for line in lines:
        print(line)
    sys.stdout.flush()


def settings_line(d: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())
