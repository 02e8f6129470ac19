"""``convbn inspect SPEC``: what ``convbn.convert`` would do to your model, block by block, with reasons."""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from typing import Any, Dict, List

import torch

import convbn

from ..bench.stats import bn_scales
from .options import HelpFormatter, add_model_options, require, say, setup_threads, write_json
from .spec import build_workload, monai_models, split_spec

DESCRIPTION = """\
The report of SPEC's model (a dry run; nothing is changed): every BatchNorm with its Conv/Linear,
the mode it would run in, and -- for blocks that are not converted -- the reason; plus the spread of
gamma / sqrt(running_var + eps) over the BN channels (the factor Deploy multiplies the conv weight by,
paper Fig. 2a). convbn traces the model with torch.fx and, with the example inputs built here
(a batch tensor, or a list of images for torchvision detectors), by running it once.

SPEC: package.module:factory (your model; pass --input-size), torchvision:NAME (weights=None),
timm:NAME (pretrained=False) or monai:NAME."""

EPILOG = """\
examples:
  convbn inspect torchvision:resnet50
  convbn inspect torchvision:fasterrcnn_resnet50_fpn       # a detector: a list of images as input
  convbn inspect timm:efficientnet_b0 --mode deploy
  convbn inspect monai:unet --dims 3 --input-size 32
  convbn inspect mypkg.nets:build --input-size 128 --channels 1 --json report.json
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("inspect", help="the conversion report of your model: every block, its mode and why",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    add_model_options(p, None, positional=True)
    p.add_argument("--mode", default="tune", choices=("train", "eval", "tune", "deploy"),
                   help="mode of the report (dry run)")
    p.add_argument("--batch-size", "-b", type=int, default=2, help="batch size of the example input")
    p.add_argument("--input-size", type=int, default=None, help="spatial side (default: the model's)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    p.set_defaults(func=run, command="inspect")
    return p


def scale_summary(values: List[float]) -> Dict[str, float]:
    """Quantiles of |gamma|/sqrt(var+eps) and the shares below 0.1 / 1 and above 10.

    Example:
        >>> scale_summary([0.05, 1.0, 20.0])["median"]
        1.0
    """
    a = sorted(abs(v) for v in values)
    if not a:
        return {}
    n = len(a)

    def q(p: float) -> float:
        return a[min(int(p * (n - 1) + 0.5), n - 1)]

    return {"channels": n, "min": a[0], "p10": q(0.1), "median": statistics.median(a), "p90": q(0.9),
            "max": a[-1], "share_below_0.1": sum(v < 0.1 for v in a) / n, "share_below_1": sum(v < 1 for v in a) / n,
            "share_above_10": sum(v > 10 for v in a) / n}


def _row(r: Any) -> Dict[str, Any]:
    if dataclasses.is_dataclass(r):
        return dataclasses.asdict(r)
    return r._asdict() if hasattr(r, "_asdict") else dict(vars(r))


def run(args: argparse.Namespace) -> int:
    spec = args.model
    if split_spec(spec)[0] == "monai":
        require("monai", extra="monai", why=f"the model {spec} ({', '.join(monai_models())})")
    setup_threads(args)
    work = build_workload(spec, batch_size=args.batch_size, input_size=args.input_size, in_channels=args.channels,
                          dims=args.dims)
    report = convbn.report(work.model, args.mode, example_inputs=work.example_inputs)
    say(f"convbn inspect {spec}: {args.mode} mode, example input {work.description}, threads "
        f"{torch.get_num_threads()}", "", str(report))
    scales = [float(v) for _, s in bn_scales(work.model) for v in s.tolist()]
    s = scale_summary(scales)
    if s:
        say("", f"gamma/sqrt(var+eps) over {s['channels']} BN channels (|value|): min {s['min']:.3g}, "
            f"p10 {s['p10']:.3g}, median {s['median']:.3g}, p90 {s['p90']:.3g}, max {s['max']:.3g}; "
            f"{100 * s['share_below_1']:.0f}% < 1, {100 * s['share_below_0.1']:.1f}% < 0.1, "
            f"{100 * s['share_above_10']:.1f}% > 10 (a freshly built model has 1 everywhere)")
    if args.json:
        path = write_json(args.json, {
            "model": spec, "mode": args.mode, "example_input": work.description,
            "report": {"summary": report.summary(), "rows": [_row(r) for r in report.rows]},
            "scales": {"summary": s, "values": scales}})
        say(f"wrote {path}")
    return 0
