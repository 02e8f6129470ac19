"""Adversarial example generation in Eval vs Tune mode (paper Table 10) on CPU.

Generating adversarial examples differentiates the loss with respect to the *input* of a frozen
model (parameters ``requires_grad=False``, ``model.eval()``). Eval mode keeps each conv output Y
for the BN's backward; Tune mode folds the BN into the conv weight and keeps only the conv input.
Both compute the same function and the same input gradient, so FGSM / PGD must produce the same
adversarial examples -- checked here element-wise.

Attacks (L-infinity, untargeted; labels: the true digit for MobileNetV2 on digits images, seeded
random labels for random inputs -- the clean prediction of a random-init net is so confident that
its gradient underflows; no clamping to a pixel range because the inputs are standardised):
FGSM ``x + eps * sign(g)``; PGD with a seeded uniform
random start, ``steps`` steps of size ``alpha``, projected onto the eps-ball. One *step* (timed and
metered) = forward + backward to the input.

Equality is checked twice. In float64 (on the first ``check_batch`` samples) Tune and Eval agree to
~1e-15 and the examples must be identical within ``tol``. In the timing dtype (float32) the two
modes round differently (~1e-6 relative); in a deep net a few ReLU masks near 0 then flip, which can
change individual input-gradient entries and so the *sign* step of FGSM/PGD for a few elements; the
report gives the share of such elements rather than hiding it.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import convbn
from convbn.bench.memory import saved_tensor_bytes
from convbn.bench.peak import peak_live_tensor_bytes
from convbn.bench.timing import isolated_interleaved_timings

from .common import (ExperimentError, Progress, input_shape, make_input, max_rel_err, mib, parse_dtype,
                     resolve_model)
from convbn.bench.compare import format_table
from convbn.bench.stats import calibrate_if_untouched

__all__ = ["AdversarialConfig", "input_gradient", "fgsm", "pgd", "run_adversarial", "adversarial_table",
           "DEFAULT_MODELS"]

DEFAULT_MODELS = ("monai:resnet18", "monai:resnet50", "monai:seresnet50", "monai:efficientnet-b0",
                  "monai:densenet121", "mobilenet_v2_pretrained")


@dataclass
class AdversarialConfig:
    """Settings of :func:`run_adversarial`.

    Attributes:
        models: model specs (classifiers).
        batch_size, input_size, dims: the input batch (``input_size`` per spatial side).
        eps, alpha, steps: attack budget, PGD step size and number of PGD steps.
        rounds, warmup: interleaved timing of one attack step.
        dtype: ``float32`` or ``float64``.
        tol: max |x_adv(eval) - x_adv(tune)| accepted as "identical" (float64 check).
        check_batch: samples used by the float64 equality check.
        seed: input / random-start seed.
    """

    models: Tuple[str, ...] = DEFAULT_MODELS
    batch_size: int = 8
    input_size: int = 64
    dims: Optional[int] = None
    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 10
    rounds: int = 5
    warmup: int = 1
    dtype: str = "float32"
    tol: float = 1e-6
    check_batch: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        self.models = tuple(self.models)
        if not self.models:
            raise ExperimentError("adversarial: no models given; pass e.g. --models monai:resnet18")
        for name, ok in (("batch_size", self.batch_size >= 1), ("input_size", self.input_size >= 1),
                         ("eps", self.eps > 0), ("alpha", self.alpha > 0), ("steps", self.steps >= 1),
                         ("rounds", self.rounds >= 1), ("warmup", self.warmup >= 0), ("tol", self.tol >= 0),
                         ("check_batch", self.check_batch >= 1)):
            if not ok:
                raise ExperimentError(f"adversarial: invalid {name}={getattr(self, name)!r}")


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d cross_entropy(model(x), y) / d x (one attack step's forward + backward)."""
    xa = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xa), y), [xa])
    return g


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method: ``x + eps * sign(grad)``.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> x = torch.randn(2, 4)
        >>> float((fgsm(m, x, torch.tensor([0, 1]), 0.1) - x).abs().max()) <= 0.1 + 1e-7
        True
    """
    return (x + eps * input_gradient(model, x, y).sign()).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
        start: torch.Tensor) -> torch.Tensor:
    """Projected gradient descent (L-inf) from ``x + start`` (``start`` in [-eps, eps])."""
    xa = (x + start).detach()
    for _ in range(steps):
        g = input_gradient(model, xa, y)
        xa = (x + (xa + alpha * g.sign() - x).clamp(-eps, eps)).detach()
    return xa


def _attack_step(model: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One timed attack step (forward + backward to the input), built in its worker process."""
    m = convbn.convert(model, mode).eval()
    return functools.partial(input_gradient, m, x, y)


def _digits_batch(n: int, size: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    from experiments.data import load_digits_dataset

    try:
        _, _, tx, ty = load_digits_dataset(image_size=size, channels=3, seed=0)
    except ImportError as e:
        raise ExperimentError(str(e)) from None
    return tx[:n].to(dtype), ty[:n]


def _diff(a: torch.Tensor, b: torch.Tensor, tol: float) -> Dict[str, Any]:
    d = (a - b).abs()
    return {"max_abs_diff": float(d.max()), "elements_differing": int((d > tol).sum()), "elements": d.numel(),
            "identical_within_tol": bool(float(d.max()) <= tol)}


def _float64_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AdversarialConfig) -> Dict[str, Any]:
    """FGSM and PGD in float64 with Eval and Tune: element-wise comparison of the examples."""
    m64 = copy.deepcopy(model).double()
    m_eval = convbn.convert(copy.deepcopy(m64), "eval").eval()
    m_tune = convbn.convert(m64, "tune").eval()
    start = (torch.rand(x.shape, generator=torch.Generator().manual_seed(cfg.seed + 7)).double() * 2 - 1) * cfg.eps
    truth = input_gradient(m_eval, x, y)
    out: Dict[str, Any] = {"grad": max_rel_err(input_gradient(m_tune, x, y), truth)}
    # how far float32 is from the float64 truth, for each mode (shows float32 round-off is not tune's alone)
    for mode in ("eval", "tune"):
        m32 = convbn.convert(copy.deepcopy(model).float(), mode).eval()
        out[f"float32_{mode}_grad_err_vs_float64"] = max_rel_err(input_gradient(m32, x.float(), y), truth)
    out["fgsm"] = _diff(fgsm(m_eval, x, y, cfg.eps), fgsm(m_tune, x, y, cfg.eps), cfg.tol)
    out["pgd"] = _diff(pgd(m_eval, x, y, cfg.eps, cfg.alpha, cfg.steps, start),
                       pgd(m_tune, x, y, cfg.eps, cfg.alpha, cfg.steps, start), cfg.tol)
    return out


def run_adversarial(cfg: AdversarialConfig, progress: bool = True) -> Dict[str, Any]:
    """Eval vs Tune for every model: time and peak memory per attack step, equality of the examples.

    Example:
        >>> cfg = AdversarialConfig(models=("small_resnet",), batch_size=2, input_size=8, steps=2, rounds=1,
        ...                         warmup=0)
        >>> row = run_adversarial(cfg, progress=False)["rows"][0]
        >>> row["pgd"]["identical_within_tol"], row["fgsm"]["identical_within_tol"]
        (True, True)
    """
    dtype = parse_dtype(cfg.dtype)
    bar = Progress(len(cfg.models) * (cfg.rounds + cfg.warmup + 2), "adversarial", enabled=progress)
    rows: List[Dict[str, Any]] = []
    for spec in cfg.models:
        model = resolve_model(spec, dims=cfg.dims)
        shape = input_shape(spec, cfg.batch_size, input_size=cfg.input_size, dims=cfg.dims)
        data = "random normal (seeded)"
        if spec.strip().lower() == "mobilenet_v2_pretrained" and len(shape) == 4:
            x, y = _digits_batch(cfg.batch_size, cfg.input_size, dtype)
            data = "scikit-learn digits test images, true labels"
        else:
            x = make_input(shape, cfg.seed, dtype)
        calibrated = calibrate_if_untouched(model, make_input(shape, cfg.seed + 1))
        model = model.eval().requires_grad_(False)
        if data.startswith("random"):
            with torch.no_grad():
                n_out = model(x[:1].float()).shape[1]
            y = torch.randint(0, n_out, (x.shape[0],), generator=torch.Generator().manual_seed(cfg.seed + 3))
        check64 = _float64_check(model, x[:cfg.check_batch].double(), y[:cfg.check_batch], cfg)
        model = model.to(dtype)
        m_eval = convbn.convert(copy.deepcopy(model), "eval").eval()
        m_tune = convbn.convert(copy.deepcopy(model), "tune").eval()
        rep = convbn.report(m_tune)
        start = (torch.rand(x.shape, generator=torch.Generator().manual_seed(cfg.seed + 7)) * 2 - 1).to(dtype) * cfg.eps
        g_eval, g_tune = input_gradient(m_eval, x, y), input_gradient(m_tune, x, y)
        adv = {}
        for name, m in (("eval", m_eval), ("tune", m_tune)):
            adv[name] = {"fgsm": fgsm(m, x, y, cfg.eps), "pgd": pgd(m, x, y, cfg.eps, cfg.alpha, cfg.steps, start)}
        bar.update(f"{spec} attacks")
        mem = {}
        for name, m in (("eval", m_eval), ("tune", m_tune)):
            xr = x.detach().requires_grad_(True)
            saved = saved_tensor_bytes(lambda: F.cross_entropy(m(xr), y))
            _, peak = peak_live_tensor_bytes(lambda: input_gradient(m, x, y))
            mem[name] = {"saved_bytes": saved, "peak_bytes": peak}
        bar.update(f"{spec} memory")

        # each mode in its own process (a shared allocator bills one mode's page faults to the other)
        timing = isolated_interleaved_timings(
            {mode: functools.partial(_attack_step, model, mode, x, y) for mode in ("eval", "tune")},
            rounds=cfg.rounds, warmup=cfg.warmup)
        bar.update(f"{spec} timing", cfg.rounds + cfg.warmup)
        r = timing.ratio("tune", "eval")
        with torch.no_grad():
            adv_acc = {k: float((m_eval(v["pgd"]).argmax(1) == y).float().mean()) for k, v in adv.items()}
        rows.append({
            "model": spec, "input_shape": list(x.shape), "data": data, "bn_calibrated": calibrated,
            "blocks": {s: len(rep.by_status(s)) for s in ("converted", "fallback", "skipped")},
            "eval": {**mem["eval"], "median_s": timing.median("eval"), "times_s": timing.times["eval"]},
            "tune": {**mem["tune"], "median_s": timing.median("tune"), "times_s": timing.times["tune"]},
            "peak_ratio_tune_vs_eval": mem["tune"]["peak_bytes"] / mem["eval"]["peak_bytes"],
            "saved_ratio_tune_vs_eval": mem["tune"]["saved_bytes"] / mem["eval"]["saved_bytes"],
            "time_ratio_tune_vs_eval": {"median": r.median, "q1": r.q1, "q3": r.q3, "low": r.low, "high": r.high},
            "input_grad_rel_err": max_rel_err(g_tune, g_eval),
            "fgsm": check64["fgsm"], "pgd": check64["pgd"], "input_grad_rel_err_float64": check64["grad"],
            "float32_grad_err_vs_float64": {m: check64[f"float32_{m}_grad_err_vs_float64"] for m in ("eval", "tune")},
            f"fgsm_{cfg.dtype}": _diff(adv["eval"]["fgsm"], adv["tune"]["fgsm"], cfg.tol),
            f"pgd_{cfg.dtype}": _diff(adv["eval"]["pgd"], adv["tune"]["pgd"], cfg.tol),
            "pgd_still_correct": adv_acc,
        })
    return {"experiment": "adversarial (paper Table 10)", "config": asdict(cfg), "rows": rows,
            "timing_note": f"one step = forward + backward to the input, each mode in its own process; "
                           f"{cfg.rounds} interleaved rounds after "
                           f"{cfg.warmup} warm-up; ratio = median of per-round t_tune/t_eval (IQR)"}


def adversarial_table(res: Dict[str, Any]) -> str:
    dt = res["config"]["dtype"]
    headers = ["model", "tuned/BNs", "eval peak MiB", "tune peak MiB", "peak t/e", "eval ms", "tune ms",
               "time t/e (IQR)", "PGD diff f64", "same (f64)", "f32 grad err eval|tune vs f64",
               f"PGD elems differing {dt}"]
    body = []
    for r in res["rows"]:
        t = r["time_ratio_tune_vs_eval"]
        b = r["blocks"]
        body.append([
            r["model"], f"{b['converted']}/{sum(b.values())}", f"{mib(r['eval']['peak_bytes']):.1f}",
            f"{mib(r['tune']['peak_bytes']):.1f}", f"{r['peak_ratio_tune_vs_eval']:.2f}",
            f"{r['eval']['median_s'] * 1e3:.0f}", f"{r['tune']['median_s'] * 1e3:.0f}",
            f"{t['median']:.2f} ({t['q1']:.2f}-{t['q3']:.2f})", f"{r['pgd']['max_abs_diff']:.1e}",
            "yes" if r["fgsm"]["identical_within_tol"] and r["pgd"]["identical_within_tol"] else "NO",
            "{eval:.0e} | {tune:.0e}".format(**r["float32_grad_err_vs_float64"]),
            f"{100 * r[f'pgd_{dt}']['elements_differing'] / r[f'pgd_{dt}']['elements']:.3f}%",
        ])
    return format_table(headers, body)
