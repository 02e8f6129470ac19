"""Train mode on MONAI ResNet-50 (2-D, batch 16, 112x112): plain vs recompute vs checkpoint.

Variants (all PyTorch train-mode semantics, forward+backward w.r.t. parameters):
  plain       stock PyTorch
  recompute   convbn.convert(model, "train", recompute=True)
  checkpoint  torch.utils.checkpoint (non-reentrant) around every Conv-BN(-ReLU) block

Measures saved-for-backward bytes, peak live tensor bytes and step time (warm-up, interleaved
rounds, median of per-round ratios; each variant in its own process, as in bench_tune.py).
Targets (issue 3): saved recompute/plain <= 0.60; time
recompute/plain <= 1.25; recompute faster than checkpoint at <= its memory.

    python benchmarks/bench_recompute.py [--rounds 12] [--out benchmarks/results/recompute.json]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import convbn
from convbn.bench.memory import saved_tensor_bytes
from convbn.bench.peak import peak_live_tensor_bytes, retained_bytes
from convbn.bench.timing import add_benchmark_args, isolated_interleaved_timings, parameter_step


class Checkpointed(nn.Module):
    """Runs ``conv -> bn (-> relu)`` under ``torch.utils.checkpoint``: the BN input is recomputed."""

    def __init__(self, *modules: nn.Module):
        super().__init__()
        self.block = nn.Sequential(*modules)

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=False)


def checkpoint_conv_bn_blocks(model: nn.Module) -> int:
    """Wrap every (conv, bn[, relu]) found by convbn's analysis in :class:`Checkpointed`, in place:
    the conv is replaced by the wrapper and the BN (and fused ReLU) by ``nn.Identity``."""
    report = convbn.report(model, "train")  # dry run: the pairs convbn would recompute
    modules = dict(model.named_modules())
    analysis = convbn.match.analyze(model)
    wrapped = 0
    for cand in analysis.candidates:
        if cand.conv is None or cand.reason is not None:
            continue
        parts = [cand.conv, cand.bn] + ([cand.relu] if cand.relu is not None else [])
        names = [cand.conv_name, cand.bn_name] + ([cand.relu_name] if cand.relu is not None else [])
        for i, name in enumerate(names):
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            setattr(parent, child, Checkpointed(*parts) if i == 0 else nn.Identity())
        wrapped += 1
    assert len(report) >= wrapped
    return wrapped


def _models(batch: int, size: int):
    from monai.networks.nets import resnet50

    torch.manual_seed(0)
    base = resnet50(spatial_dims=2, n_input_channels=3, num_classes=10).train()
    x = torch.randn(batch, 3, size, size)
    models = {"plain": copy.deepcopy(base),
              "recompute": convbn.convert(copy.deepcopy(base), "train", recompute=True),
              "checkpoint": copy.deepcopy(base)}
    n_ckpt = checkpoint_conv_bn_blocks(models["checkpoint"])
    return base, x, models, n_ckpt


def build_step(variant: str, batch: int, size: int):
    """Runs in the variant's worker process."""
    _, x, models, _ = _models(batch, size)
    return parameter_step(models[variant], x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_args(ap, rounds=12, out=str(Path(__file__).parent / "results" / "recompute.json"))
    args = ap.parse_args()

    base, x, models, n_ckpt = _models(args.batch, args.size)
    n_params = sum(p.numel() * p.element_size() for p in base.parameters())

    def step(model):
        return parameter_step(model, x)

    # numerics: one step from identical states
    outs = {}
    for k, m in models.items():
        mm = copy.deepcopy(m)
        out = mm(x)
        out.sum().backward()
        outs[k] = (out.detach(), [p.grad for p in mm.parameters()])
    ref_out, ref_grads = outs["plain"]
    errors = {k: {"output": float((o - ref_out).abs().max() / ref_out.abs().max()),
                  "grads_global_rel_l2": float(sum(((a - b) ** 2).sum() for a, b in zip(g, ref_grads)).sqrt()
                                               / sum((b ** 2).sum() for b in ref_grads).sqrt())}
              for k, (o, g) in outs.items()}

    # saved_tensor_bytes cannot see checkpoint's stash (its own saved-tensor hooks take precedence), so
    # the comparison with checkpoint uses retained_bytes: what stays alive after forward, any mechanism.
    saved = {k: saved_tensor_bytes(lambda m=m: m(x)) for k, m in models.items() if k != "checkpoint"}
    retained = {k: retained_bytes(lambda m=m: m(x)) for k, m in models.items()}
    peak = {k: peak_live_tensor_bytes(step(m))[1] for k, m in models.items()}
    timing = isolated_interleaved_timings({k: functools.partial(build_step, k, args.batch, args.size) for k in models},
                                          rounds=args.rounds, warmup=args.warmup)
    r_rp, r_cp, r_rc = timing.ratio("recompute", "plain"), timing.ratio("checkpoint", "plain"), \
        timing.ratio("recompute", "checkpoint")
    result = {
        "setup": {"model": "monai resnet50 (2-D), train mode", "batch": args.batch, "size": args.size,
                  "rounds": args.rounds, "warmup": args.warmup, "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "checkpointed_blocks": n_ckpt,
                  "recompute_blocks": len(convbn.report(models["recompute"]).converted)},
        "saved_bytes": saved,
        "saved_bytes_without_parameters": {k: v - n_params for k, v in saved.items()},
        "retained_after_forward_bytes": retained,
        "peak_live_bytes": peak,
        "median_step_s": timing.medians(),
        "ratios": {
            "saved_recompute_over_plain": saved["recompute"] / saved["plain"],
            "retained_recompute_over_plain": retained["recompute"] / retained["plain"],
            "retained_checkpoint_over_plain": retained["checkpoint"] / retained["plain"],
            "peak_recompute_over_plain": peak["recompute"] / peak["plain"],
            "peak_checkpoint_over_plain": peak["checkpoint"] / peak["plain"],
            "time_recompute_over_plain": r_rp.median, "time_recompute_over_plain_range": [r_rp.low, r_rp.high],
            "time_checkpoint_over_plain": r_cp.median, "time_checkpoint_over_plain_range": [r_cp.low, r_cp.high],
            "time_recompute_over_checkpoint": r_rc.median,
        },
        "errors_vs_plain": errors,
        "timing_raw": timing.to_dict(),
    }
    targets = {
        "saved recompute/plain <= 0.60": result["ratios"]["saved_recompute_over_plain"] <= 0.60,
        "time recompute/plain <= 1.25": r_rp.median <= 1.25,
        "recompute faster than checkpoint": r_rc.median < 1.0,
        "recompute retained <= checkpoint retained": retained["recompute"] <= retained["checkpoint"],
    }
    result["targets_met"] = targets
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))

    mib = 1 / 2**20
    print(f"MONAI ResNet-50 train, batch {args.batch}, {args.size}x{args.size}, {args.rounds} interleaved rounds, "
          f"{torch.get_num_threads()} threads; {result['setup']['recompute_blocks']} recompute blocks, "
          f"{n_ckpt} checkpointed blocks")
    print(f"{'variant':11}{'saved MiB':>11}{'retained MiB':>14}{'peak MiB':>10}{'median s':>10}"
          f"{'out err':>10}{'grad L2':>10}")
    for k in models:
        sv = f"{saved[k] * mib:11.1f}" if k in saved else f"{'n/a':>11}"
        print(f"{k:11}{sv}{retained[k] * mib:14.1f}{peak[k] * mib:10.1f}"
              f"{timing.median(k):10.3f}{errors[k]['output']:10.1e}{errors[k]['grads_global_rel_l2']:10.1e}")
    print(f"time recompute/plain {r_rp}; checkpoint/plain {r_cp}; recompute/checkpoint {r_rc}")
    for name, ok in targets.items():
        print(f"  [{'met' if ok else 'MISSED'}] {name}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
