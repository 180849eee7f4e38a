"""Figures of basin-volume results (PNG, matplotlib Agg): per-direction estimates and the
log-probability against the KL cutoff."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tyche.plotting import pyplot, save_figure

__all__ = ["plot_cutoff_scan", "plot_histogram"]


def plot_histogram(results: Mapping[str, Any], path: str | Path) -> Path:
    """Histogram of per-sample log-estimates (nats), one colour per labelled VolumeResult,
    with each run's log-mean-exp as a vertical line. Saved as PNG at ``path``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, res) in enumerate(results.items()):
        color = f"C{i}"
        values = res.estimates.double().numpy()
        lo, hi = float(values.min()), float(values.max())
        bins, span = min(30, max(5, res.n_samples // 3)), None
        if hi - lo <= 1e-9 * max(1.0, abs(hi)):  # equal up to rounding: one bar, 1 nat wide
            bins, span = 1, (lo - 0.5, hi + 0.5)
        ax.hist(
            values,
            bins=bins,
            range=span,
            alpha=0.5,
            color=color,
            label=f"{label} (n={res.n_samples})",
        )
        ax.axvline(res.log_prob, color=color, linestyle="--")
    ax.set_xlabel("per-sample log-probability estimate (nats)")
    ax.set_ylabel("directions")
    ax.set_title("Basin volume: per-direction estimates (dashed: log-mean-exp)")
    ax.legend()
    return save_figure(fig, path)


def plot_cutoff_scan(
    cutoffs: Sequence[float],
    results: Mapping[str, Sequence[Any]],
    n_params: int,
    path: str | Path,
    fits: Mapping[str, Any] | None = None,
) -> Path:
    """log-probability against log(cutoff) per label, with the quadratic-basin slope D/2.

    ``results`` maps a label to one VolumeResult per cutoff (in the order of ``cutoffs``,
    nats); ``fits`` maps a label to a fitted line with ``value`` (slope λ), ``intercept``,
    ``ci_low``/``ci_high`` and ``cutoffs`` (the fitted ones): drawn dashed over the whole
    range, with λ and its interval in the legend. Saved as PNG at ``path``.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    logc = [math.log(c) for c in cutoffs]
    for i, (label, runs) in enumerate(results.items()):
        ys = [r.log_prob for r in runs]
        ax.plot(logc, ys, "o-", color=f"C{i}", label=label)
        lo = [r.interval()[0] for r in runs]
        hi = [r.interval()[1] for r in runs]
        ax.fill_between(logc, lo, hi, color=f"C{i}", alpha=0.2)
        fit = (fits or {}).get(label)
        if fit is not None:
            ax.plot(
                logc,
                [fit.value * x + fit.intercept for x in logc],
                "--",
                color=f"C{i}",
                label=f"{label}: λ = {fit.value:,.1f} [{fit.ci_low:,.1f}, {fit.ci_high:,.1f}] "
                f"(fit ≤ {max(fit.cutoffs):g})",
            )
    first = next(iter(results.values()))
    y0 = first[0].log_prob
    ax.plot(
        logc,
        [y0 + n_params / 2 * (x - logc[0]) for x in logc],
        "k:",
        label=f"slope D/2 = {n_params / 2:,.0f} per e-fold",
    )
    ax.set_xlabel("ln(cutoff / nats)")
    ax.set_ylabel("log-probability of the basin (nats)")
    ax.set_title("Basin volume against KL cutoff")
    ax.legend()
    return save_figure(fig, path)
