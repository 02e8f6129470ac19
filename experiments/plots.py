"""PNG figures of the experiments (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from convbn.cli.plot import mode_color, plot_mode_bars, pyplot, quantile, save_figure  # noqa: F401 (re-exported)

from .common import mib

__all__ = ["pyplot", "plot_mode_bars", "plot_sweep", "plot_scale_histogram", "plot_appendix_m",
           "plot_transfer", "plot_adversarial"]


def plot_sweep(records: List[Dict[str, Any]], path: str, title: str, fixed_size: int, fixed_batch: int) -> str:
    """2x2 lines: peak MiB and step ms vs batch size (at ``fixed_size``) and vs input size (at
    ``fixed_batch``), one line per mode."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    modes = list(dict.fromkeys(r["mode"] for r in records))
    for col, (key, fixed_key, fixed) in enumerate((("batch_size", "input_size", fixed_size),
                                                   ("input_size", "batch_size", fixed_batch))):
        for mode in modes:
            pts = sorted((r[key], r) for r in records if r["mode"] == mode and r[fixed_key] == fixed)
            if not pts:
                continue
            xs = [p[0] for p in pts]
            axes[0][col].plot(xs, [mib(p[1]["peak_bytes"]) for p in pts], "o-", color=mode_color(mode), label=mode)
            axes[1][col].plot(xs, [p[1]["median_s"] * 1e3 for p in pts], "o-", color=mode_color(mode), label=mode)
        axes[0][col].set_title(f"vs {key.replace('_', ' ')} ({fixed_key.replace('_', ' ')} {fixed})", fontsize=9)
        axes[1][col].set_xlabel(key.replace("_", " "))
        axes[0][col].set_ylabel("peak live tensor MiB")
        axes[1][col].set_ylabel("median step ms")
        for row in axes:
            row[col].grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_scale_histogram(values: Sequence[float], path: str, title: str) -> str:
    """Histogram of |gamma| / sqrt(var + eps) on a log axis (paper Fig. 2a)."""
    import math

    plt = pyplot()
    vals = [abs(v) for v in values if v != 0 and math.isfinite(v)]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if vals:
        lo, hi = math.log10(min(vals)), math.log10(max(vals))
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
        bins = [10 ** (lo + (hi - lo) * i / 60) for i in range(61)]
        ax.hist(vals, bins=bins, color="#1f77b4")
        ax.set_xscale("log")
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("|gamma| / sqrt(running_var + eps)   (Deploy: weight x this, gradient / this)")
    ax.set_ylabel("channels")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def plot_appendix_m(blocks: List[Dict[str, Any]], path: str, title: str) -> str:
    """Per block: measured saving vs the two predictions (Appendix M: Y - w'; convbn: Y)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    meas = [mib(b["measured_saving_bytes"]) for b in blocks]
    ax.scatter([mib(b["predicted_paper_bytes"]) for b in blocks], meas, s=14, label="paper App. M: |Y| - |w'|")
    ax.scatter([mib(b["predicted_convbn_bytes"]) for b in blocks], meas, s=14, marker="x",
               label="convbn (w' rebuilt in backward): |Y|")
    lim = [min(meas + [0]), max(meas + [1e-3]) * 1.05]
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set_xlabel("predicted saving per block (MiB)")
    ax.set_ylabel("measured saving per block (MiB)")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def plot_transfer(result: Dict[str, Any], path: str, title: str) -> str:
    """Left: training loss curves (mean over seeds) per mode. Right: test accuracy per mode."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for mode, s in result["modes"].items():
        curves = s["loss_curves"]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
        xs = [i * result["config"]["log_every"] for i in range(n)]
        axes[0].plot(xs, mean, color=mode_color(mode), label=mode)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("train loss (mean over seeds)")
    axes[0].legend(fontsize=8)
    names = list(result["modes"])
    accs = [result["modes"][m]["acc_mean"] * 100 for m in names]
    stds = [result["modes"][m]["acc_std"] * 100 for m in names]
    axes[1].bar(names, accs, yerr=stds, capsize=4, color=[mode_color(m) for m in names])
    for i, a in enumerate(accs):
        axes[1].text(i, a + 1, f"{a:.1f}", ha="center", fontsize=8)
    axes[1].set_ylabel("test accuracy % (mean +- std over seeds)")
    axes[1].set_ylim(0, 105)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_adversarial(rows: List[Dict[str, Any]], path: str, title: str) -> str:
    """Per model: Tune/Eval ratio of peak memory and of step time (lower is better)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    names = [r["model"] for r in rows]
    xs = list(range(len(rows)))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [r["peak_ratio_tune_vs_eval"] for r in rows], w, label="peak memory tune/eval",
           color="#2ca02c")
    ax.bar([x + w / 2 for x in xs], [r["time_ratio_tune_vs_eval"]["median"] for r in rows], w,
           yerr=[[r["time_ratio_tune_vs_eval"]["median"] - r["time_ratio_tune_vs_eval"]["q1"] for r in rows],
                 [r["time_ratio_tune_vs_eval"]["q3"] - r["time_ratio_tune_vs_eval"]["median"] for r in rows]],
           capsize=3, label="step time tune/eval (IQR)", color="#1f77b4")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=25, fontsize=8)
    ax.set_ylabel("tune / eval")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
