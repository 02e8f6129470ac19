"""``python -m experiments adversarial``: paper Table 10 -- FGSM/PGD input-gradient generation in Eval vs Tune."""

from __future__ import annotations

import argparse

import torch

from .adversarial import DEFAULT_MODELS, AdversarialConfig, adversarial_table, run_adversarial
from .common import monai_available, write_json

from convbn.cli.options import HelpFormatter, add_run_options, out_path, say, settings_line, setup_threads, str_list

DESCRIPTION = """\
Adversarial example generation (paper Table 10) in Eval vs Tune mode: the model is frozen
(model.eval(), requires_grad=False) and each attack step differentiates the loss with respect to
the input. Per model: peak live tensor memory and median time of one step (forward + backward to
the input; interleaved rounds, ratio = median of per-round t_tune / t_eval with IQR), and whether
FGSM and PGD produce the same adversarial examples in both modes.

The equality check runs in float64, where Tune and Eval agree to ~1e-15 and the examples must be
identical (within --tol). In float32 both modes are ~1e-6 off the float64 truth; in deep nets a few
ReLU masks near zero then flip, which changes single gradient entries and hence sign steps of
PGD -- the share of differing elements is reported, not hidden.

Models: MONAI ResNet-18/50, SE-ResNet-50, EfficientNet-B0, DenseNet-121 (random init, calibrated BN
statistics, random inputs and labels) and MobileNetV2 with ImageNet weights on digits images."""

EPILOG = """\
examples:
  python -m experiments adversarial                                   # all default models, batch 8, 64x64
  python -m experiments adversarial --models monai:resnet18,mobilenet_v2_pretrained --steps 20
  python -m experiments adversarial --models monai:unet --input-size 128   # any net with a class/channel output
  python -m experiments adversarial --batch-size 32 --input-size 128 --rounds 10 --threads 2
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = AdversarialConfig()
    p = sub.add_parser("adversarial", help="Table 10: FGSM/PGD in eval vs tune (time, memory, equality)",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--models", type=str_list, default=None,
                   help=f"comma-separated model specs (default: {','.join(DEFAULT_MODELS)}; without MONAI: "
                        f"small_resnet,mobilenet_v2_pretrained)")
    p.add_argument("--batch-size", "-b", type=int, default=d.batch_size, help="batch size")
    p.add_argument("--input-size", type=int, default=d.input_size, help="spatial side of the input")
    p.add_argument("--dims", type=int, choices=(2, 3), default=None, help="spatial dims")
    p.add_argument("--eps", type=float, default=d.eps, help="L-inf budget")
    p.add_argument("--alpha", type=float, default=d.alpha, help="PGD step size")
    p.add_argument("--steps", type=int, default=d.steps, help="PGD steps")
    p.add_argument("--rounds", type=int, default=d.rounds, help="timed rounds of one attack step")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed warm-up steps per mode")
    p.add_argument("--dtype", default=d.dtype, help="dtype of the timed runs (float32 or float64)")
    p.add_argument("--tol", type=float, default=d.tol, help="max |x_eval - x_tune| accepted in float64")
    add_run_options(p, out_name="adversarial")
    p.set_defaults(func=run, command="adversarial")
    return p


def run(args: argparse.Namespace) -> int:
    setup_threads(args)
    models = args.models or (list(DEFAULT_MODELS) if monai_available() else ["small_resnet", "mobilenet_v2_pretrained"])
    cfg = AdversarialConfig(models=tuple(models), batch_size=args.batch_size, input_size=args.input_size,
                            dims=args.dims, eps=args.eps, alpha=args.alpha, steps=args.steps, rounds=args.rounds,
                            warmup=args.warmup, dtype=args.dtype, tol=args.tol)
    settings = {"batch": cfg.batch_size, "input": cfg.input_size, "eps": round(cfg.eps, 5),
                "alpha": round(cfg.alpha, 5), "pgd_steps": cfg.steps, "rounds": cfg.rounds, "dtype": cfg.dtype,
                "threads": torch.get_num_threads()}
    say(f"python -m experiments adversarial: {settings_line(settings)}")
    res = run_adversarial(cfg, progress=not args.quiet)
    res["threads"] = torch.get_num_threads()
    say("", adversarial_table(res), "", res["timing_note"])
    bad = [r["model"] for r in res["rows"]
           if not (r["fgsm"]["identical_within_tol"] and r["pgd"]["identical_within_tol"])]
    json_path = write_json(out_path(args, args.json, "adversarial.json"), res)
    say(f"wrote {json_path}")
    if not args.no_plot:
        from .plots import plot_adversarial

        png = plot_adversarial(res["rows"], out_path(args, args.plot, "adversarial.png"),
                               f"Tune vs Eval, adversarial step (batch {cfg.batch_size}, {cfg.input_size}px, "
                               f"{cfg.dtype})")
        say(f"wrote {png}")
    if bad:
        say(f"FAILED: eval and tune produced different adversarial examples in float64 for {', '.join(bad)}")
        return 1
    return 0
