"""``python -m experiments appendix-m MODEL``: the conversion report, the gamma/sqrt(var+eps) histogram (paper Fig. 2a)
and the per-block memory saving of Tune, predicted by Appendix M vs measured."""

from __future__ import annotations

import argparse
import os
import re

import torch

from .appendix_m import appendix_m_table, inspect_model
from .common import MODEL_HELP, default_model_spec, write_json
from .models.registry import _REGISTRY, available_models

from convbn.cli.options import HelpFormatter, add_model_options, add_run_options, out_path, say, setup_threads

DESCRIPTION = """\
What convbn does to MODEL, and what it buys:

1. the report: every BatchNorm with its Conv/Linear, the mode it would run in, and -- for blocks
   that are not converted -- the reason (a dry run; the model is not changed);
2. the distribution of gamma / sqrt(running_var + eps) over all BN channels, as a histogram PNG
   (paper Fig. 2a): Deploy multiplies the conv weight by this and its gradient by the inverse;
3. per block, the bytes Tune saves over Eval: predicted by paper Appendix M (|Y| - |w'|, Y the conv
   output, w' the folded weight), predicted for convbn's Tune (|Y|: convbn rebuilds w' in backward
   instead of keeping it), and measured (bytes saved for backward, eval vs that block in tune).

A freshly initialised model has trivial BN statistics; they are calibrated (synthetic) unless
--no-calibrate. Use mobilenet_v2_pretrained for real ImageNet statistics."""

EPILOG = """\
examples:
  python -m experiments appendix-m mobilenet_v2_pretrained         # real pretrained statistics
  python -m experiments appendix-m monai:resnet50 --input-size 64
  python -m experiments appendix-m monai:densenet121               # pre-activation: many blocks fall back, with reasons
  python -m experiments appendix-m monai:unet --dims 3 --input-size 32
  python -m experiments appendix-m mypkg.models:make_net --input-size 128 --channels 1
  python -m experiments appendix-m --list                          # the model names convbn knows
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("appendix-m", help="report, Fig. 2a histogram, Appendix M saving per block",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    add_model_options(p, None, positional=True, optional=True, help=MODEL_HELP)
    p.add_argument("--list", action="store_true", help="list the known model names and exit")
    p.add_argument("--mode", default="tune", choices=("train", "eval", "tune", "deploy"),
                   help="mode of the report (dry run)")
    p.add_argument("--batch-size", "-b", type=int, default=2, help="batch size of the measured input")
    p.add_argument("--input-size", type=int, default=None, help="spatial side (default: the model's)")
    p.add_argument("--no-calibrate", action="store_true", help="keep untouched BN statistics as they are")
    p.add_argument("--no-measure", action="store_true", help="skip the per-block Appendix M measurement")
    p.add_argument("--max-rows", type=int, default=60, help="per-block rows printed (all are in the JSON)")
    add_run_options(p, out_name="inspect_MODEL")
    p.set_defaults(func=run, command="appendix-m")
    return p


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec).strip("_")


def run(args: argparse.Namespace) -> int:
    if args.list:
        say("models:")
        for name in available_models():
            say(f"  {name:26s} {_REGISTRY[name].description}")
        say("  torchvision:NAME / timm:NAME   when those packages are importable",
            "  package.module:factory         your own model (called with no arguments unless you pass "
            "--channels/--dims)")
        return 0
    setup_threads(args)
    spec = args.model or default_model_spec()
    size = args.input_size
    if size is None and spec in ("monai:resnet50", "monai:seresnet50", "monai:densenet121") and args.dims in (None, 2):
        size = 64
    res = inspect_model(spec, batch_size=args.batch_size, input_size=size, channels=args.channels,
                        dims=args.dims, mode=args.mode, calibrate=not args.no_calibrate,
                        measure=not args.no_measure, progress=not args.quiet)
    report = res.pop("_report")
    say(f"python -m experiments appendix-m {spec}: input {'x'.join(map(str, res['input_shape']))}, "
        f"threads {torch.get_num_threads()}")
    for n in res["notes"]:
        say(f"note: {n}")
    say("", str(report), "")
    s = res["scales"]["summary"]
    if s:
        say(f"gamma/sqrt(var+eps) over {s['channels']} BN channels (|value|): min {s['min']:.3g}, p10 {s['p10']:.3g}, "
            f"median {s['median']:.3g}, p90 {s['p90']:.3g}, max {s['max']:.3g}; "
            f"{100 * s['share_below_1']:.0f}% < 1, {100 * s['share_below_0.1']:.1f}% < 0.1, "
            f"{100 * s['share_above_10']:.1f}% > 10")
    if "appendix_m" in res:
        say("", "memory saved for backward by Tune over Eval, per block (KiB):",
            appendix_m_table(res["appendix_m"], limit=args.max_rows))
        t = res["appendix_m"]["total"]
        say(f"whole model: eval saves {t['eval_saved_bytes'] / 2 ** 20:.2f} MiB, "
            f"tune {t['tune_saved_bytes'] / 2 ** 20:.2f} "
            f"MiB (-{100 * t['measured_saving_bytes'] / t['eval_saved_bytes']:.0f}%)")
    name = f"inspect_{_slug(spec)}"
    json_path = write_json(out_path(args, args.json, name + ".json"), res)
    say("", f"wrote {json_path}")
    if not args.no_plot:
        from .plots import plot_appendix_m, plot_scale_histogram

        hist = out_path(args, args.plot, name + "_scales.png")
        title = f"{spec}: gamma/sqrt(var+eps) per BN channel (paper Fig. 2a)"
        say(f"wrote {plot_scale_histogram(res['scales']['values'], hist, title)}")
        if "appendix_m" in res and res["appendix_m"]["blocks"]:
            base, _ = os.path.splitext(hist)
            path = (base[: -len("_scales")] if base.endswith("_scales") else base) + "_appendix_m.png"
            title = f"{spec}: Tune saving per block, predicted vs measured"
            say(f"wrote {plot_appendix_m(res['appendix_m']['blocks'], path, title)}")
    return 0
