"""Figures for causal bases: energies per layer, causal directions against principal ones."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from tyche.causal.result import CausalBasis

__all__ = ["plot_energies", "energy_table"]


def energy_table(bases: Mapping[str, CausalBasis], n_show: int = 4) -> str:
    """A text table: per site the leading energies, the joint energy, the best PCA energy.

    Columns: ``E1..En`` single-direction energies (nats), ``joint`` the energy of ablating all
    k together, ``PCA best`` the largest energy among the top principal directions, ``E1/PCA``
    their ratio, ``evals/dir`` mean objective evaluations per direction, ``s/dir`` seconds.
    """
    n_show = max(1, min(n_show, max((b.k for b in bases.values()), default=1)))
    width = max([len("site")] + [len(s) for s in bases])
    head = [f"{'site':<{width}}"] + [f"{'E' + str(i + 1):>9}" for i in range(n_show)]
    head += [f"{'joint':>9}", f"{'PCA best':>9}", f"{'E1/PCA':>7}", f"{'evals/dir':>9}",
             f"{'s/dir':>7}"]  # fmt: skip
    lines = ["  ".join(head)]
    for site, b in bases.items():
        row = [f"{site:<{width}}"]
        row += [f"{float(b.energies[i]):9.4g}" if i < b.k else f"{'':>9}" for i in range(n_show)]
        row.append(f"{float(b.subspace_energies[-1]):9.4g}")
        if b.pca_energies is not None and b.pca_energies.numel():
            best = float(b.pca_energies.max())
            ratio = float(b.energies[0]) / best if best > 0 else math.inf
            row += [f"{best:9.4g}", f"{ratio:7.2f}"]
        else:
            row += [f"{'-':>9}", f"{'-':>7}"]
        evals = sum(b.n_evals) / max(len(b.n_evals), 1)
        secs = sum(b.seconds) / max(len(b.seconds), 1)
        row += [f"{evals:9.1f}", f"{secs:7.2f}"]
        lines.append("  ".join(row))
    unit = next(iter(bases.values())).units if bases else "nats"
    lines.append(f"(energies in {unit}: mean KL(clean ‖ ablated) per position, or CE increase)")
    return "\n".join(lines)


def plot_energies(bases: Mapping[str, CausalBasis], path: str | Path) -> Path:
    """One panel per site: energy of each causal direction and of each top principal direction.

    Energies (log scale, nats) against the direction's rank; a last panel shows, per site, the
    first causal direction's energy next to the best principal direction's. Saved as PNG.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
