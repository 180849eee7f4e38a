"""Figures of basin-volume results (PNG, matplotlib Agg): per-direction estimates at one KL
cutoff, and the log-probability against the cutoff (log axis, ticks at the cutoffs; legend
beside the axes, never over the data)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tyche.plotting import integer_ticks, pyplot, save_figure, tick_label

__all__ = ["plot_cutoff_scan", "plot_histogram"]


def plot_histogram(results: Mapping[str, Any], path: str | Path) -> Path:
    """Histogram of per-sample log-estimates (nats), one colour per labelled VolumeResult,
    with each run's log-mean-exp as a vertical line; the title names the KL cutoff (nats), the
    counts axis has whole-number ticks. Saved as PNG at ``path``."""
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
    integer_ticks(ax.yaxis)
    cutoffs = sorted({res.cutoff for res in results.values()})
    at = ", ".join(tick_label(c) for c in cutoffs)
    ax.set_title(f"Basin volume at KL cutoff {at} nats: per-direction estimates\n"
                 "(dashed: log-mean-exp)", fontsize=10)  # fmt: skip
    _legend_beside(ax)
    return save_figure(fig, path)


def plot_cutoff_scan(
    cutoffs: Sequence[float],
    results: Mapping[str, Sequence[Any]],
    n_params: int | None,
    path: str | Path,
    fits: Mapping[str, Any] | None = None,
) -> Path:
    """log-probability against the cutoff (log axis, ticks at the cutoffs) per label, with the
    quadratic-basin slope D/2 per e-fold of the cutoff (none when ``n_params`` is None: curves
    of different D, e.g. one per component); the legend sits right of the axes.

    ``results`` maps a label to one VolumeResult per cutoff (in the order of ``cutoffs``,
    nats); ``fits`` maps a label to a fitted line with ``value`` (slope λ), ``intercept``,
    ``ci_low``/``ci_high`` and ``cutoffs`` (the fitted ones): drawn dashed over the whole
    range, with λ and its interval in the legend. Saved as PNG at ``path``.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    cutoffs = [float(c) for c in cutoffs]
    logc = [math.log(c) for c in cutoffs]
    for i, (label, runs) in enumerate(results.items()):
        ys = [r.log_prob for r in runs]
        ax.plot(cutoffs, ys, "o-", color=f"C{i}", label=label)
        lo = [r.interval()[0] for r in runs]
        hi = [r.interval()[1] for r in runs]
        ax.fill_between(cutoffs, lo, hi, color=f"C{i}", alpha=0.2)
        fit = (fits or {}).get(label)
        if fit is not None:
            ax.plot(
                cutoffs,
                [fit.value * x + fit.intercept for x in logc],
                "--",
                color=f"C{i}",
                label=f"{label}: λ = {fit.value:,.1f} [{fit.ci_low:,.1f}, {fit.ci_high:,.1f}] "
                f"(fit ≤ {tick_label(max(fit.cutoffs))})",
            )
    if n_params is not None:
        y0 = next(iter(results.values()))[0].log_prob
        ax.plot(
            cutoffs,
            [y0 + n_params / 2 * (x - logc[0]) for x in logc],
            "k:",
            label=f"slope D/2 = {n_params / 2:,.0f} per e-fold",
        )
    _cutoff_axis(ax, cutoffs)
    ax.set_ylabel("log-probability of the basin (nats)")
    ax.set_title("Basin volume against KL cutoff")
    _legend_beside(ax)
    return save_figure(fig, path)


def _cutoff_axis(ax: Any, cutoffs: Sequence[float]) -> None:
    """A log x axis labelled at the cutoffs only (``1e-5``, ..., ``1e-1``), no minor labels."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log")
    ax.set_xticks(cutoffs, [tick_label(c) for c in cutoffs])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("KL cutoff (nats)")


def _legend_beside(ax: Any) -> None:
    """The legend right of the axes (saved with ``bbox_inches='tight'``): it covers no data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
