"""Figures of causal bases (PNG, matplotlib Agg): each site's direction energies beside those
of its top principal directions."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from tyche.causal.result import CausalBasis
from tyche.plotting import integer_ticks, pyplot, save_figure

__all__ = ["plot_energies"]


def plot_energies(bases: Mapping[str, CausalBasis], path: str | Path) -> Path:
    """One panel per site: energy of each causal direction and of each top principal direction.

    Energies (log scale, in each basis's ``units``, nats) against the direction's rank; a last
    panel shows, per site, the first causal direction's energy next to the best principal
    direction's. Saved as PNG at ``path``.
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
        integer_ticks(ax.xaxis)
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
