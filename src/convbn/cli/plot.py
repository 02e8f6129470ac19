"""The default run's PNG (matplotlib, Agg backend: no display needed; imported only when plotting)."""

from __future__ import annotations

import os
from typing import Any, Sequence

from ..bench.compare import mib
from .options import CLIError

__all__ = ["pyplot", "plot_mode_bars"]

_COLORS = {"train": "#7f7f7f", "train+recompute": "#bcbd22", "train+fission": "#17becf", "eval": "#1f77b4",
           "tune": "#2ca02c", "deploy": "#d62728"}


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or a clear error when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CLIError("plots need matplotlib, which is not installed. Install it with `pip install matplotlib` "
                       "(or `pip install \"convbn[bench]\"`), or pass --no-plot") from None
    return plt


def save_figure(fig: Any, path: str) -> str:
    """Lay out, save (creating the folder) and close ``fig``; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def mode_color(name: str) -> str:
    """The colour of a mode in every convbn plot (``"tune"``, ``"train+recompute"``, ...)."""
    return _COLORS.get(name, "#9467bd")


def plot_mode_bars(rows: Sequence[Any], path: str, title: str) -> str:
    """Three bar panels (saved MiB, peak MiB, median step ms with IQR whiskers) for ``ModeRow`` s."""
    plt = pyplot()
    names = [r.name for r in rows]
    colors = [mode_color(n) for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].bar(names, [mib(r.saved_bytes) for r in rows], color=colors)
    axes[0].set_ylabel("MiB saved for backward")
    axes[1].bar(names, [mib(r.peak_bytes) for r in rows], color=colors)
    axes[1].set_ylabel("peak live tensor MiB (fwd+bwd)")
    med = [r.median_s * 1e3 for r in rows]
    lo = [max(m - quantile(r.times_s, 0.25) * 1e3, 0) for m, r in zip(med, rows)]
    hi = [max(quantile(r.times_s, 0.75) * 1e3 - m, 0) for m, r in zip(med, rows)]
    axes[2].bar(names, med, color=colors, yerr=[lo, hi], capsize=4)
    axes[2].set_ylabel("median step ms (IQR)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of ``xs``; ``nan`` for no values.

    Example:
        >>> quantile([1.0, 2.0, 3.0, 4.0], 0.25)
        1.75
    """
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
