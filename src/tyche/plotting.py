"""Matplotlib figures for Tyche's results (PNG files; the Agg backend, no screen needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: matplotlib is slow)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def basin_histogram(results: Mapping[str, Any], path: str | Path) -> Path:
    """Histogram of per-sample log-estimates (nats), one colour per labelled VolumeResult,
    with each run's log-mean-exp as a vertical line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, res) in enumerate(results.items()):
        color = f"C{i}"
        ax.hist(
            res.estimates.numpy(),
            bins=min(30, max(5, res.n_samples // 3)),
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


def basin_cutoff_scan(
    cutoffs: Sequence[float],
    results: Mapping[str, Sequence[Any]],
    n_params: int,
    path: str | Path,
    fits: Mapping[str, Any] | None = None,
) -> Path:
    """log-probability against log(cutoff) per label, with the quadratic-basin slope D/2.

    ``fits`` maps a label to a fitted line with ``value`` (slope λ), ``intercept``,
    ``ci_low``/``ci_high`` and ``cutoffs`` (the fitted ones): drawn dashed over the whole
    range, with λ and its interval in the legend.
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


def causal_energies(bases: Mapping[str, Any], path: str | Path) -> Path:
    """One panel per site: energy of each causal direction and of each top principal direction.

    Energies (log scale, nats) against the direction's rank; a last panel shows, per site, the
    first causal direction's energy next to the best principal direction's. Saved as PNG.
    """
    plt = pyplot()
    n = len(bases) + 1
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    flat = axes.ravel()
    for ax, (site, b) in zip(flat, bases.items()):
        ax.semilogy(range(1, b.k + 1), b.energies.clamp_min(1e-12), "o-", ms=3, label="causal")
        if b.pca_energies is not None:
            pca = b.pca_energies.clamp_min(1e-12)
            ax.semilogy(range(1, len(pca) + 1), pca, "s--", ms=3, label="PCA")
        ax.set_title(site, fontsize=9)
        ax.set_xlabel("direction")
        ax.set_ylabel(f"energy ({b.units})")
    flat[0].legend(fontsize=8)
    summary = flat[len(bases)]
    sites = list(bases)
    x = range(len(sites))
    summary.semilogy(x, [float(b.energies[0]) for b in bases.values()], "o-", label="causal #1")
    best_pca = [float(b.pca_energies.max()) if b.pca_energies is not None else math.nan
                for b in bases.values()]  # fmt: skip
    summary.semilogy(x, best_pca, "s--", label="best PCA")
    summary.set_xticks(list(x), sites, rotation=45, ha="right", fontsize=7)
    summary.set_title("first causal vs best principal direction", fontsize=9)
    summary.legend(fontsize=8)
    for ax in flat[n:]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as an image at ``path`` (folders made as needed), close it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return path
