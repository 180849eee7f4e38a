"""Text and JSON summaries of causal bases (what ``tyche causal`` prints and writes)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from tyche.causal.result import CausalBasis

__all__ = ["bases_summary", "energy_table", "joint_table"]


def bases_summary(
    bases: Mapping[str, CausalBasis],
    seconds: float,
    config: Mapping[str, Any],
    inputs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A JSON-ready summary: the run's ``config`` (flat settings), its ``seconds``, what it
    read (``inputs``: model, hashes, rows; left out when None) and, per site, the energies
    (nats) of each direction, of the first i together (refined and greedy), of the top
    principal directions, and the objective evaluations per direction."""
    sites = {
        site: {
            "energies": b.energies.tolist(),
            "subspace_energies": b.subspace_energies.tolist(),
            "greedy_subspace_energies": _listed(b.greedy_subspace_energies),
            "pca_energies": _listed(b.pca_energies),
            "n_evals": b.n_evals,
        }
        for site, b in bases.items()
    }
    head: dict[str, Any] = {"config": dict(config), "seconds": seconds}
    if inputs is not None:
        head["inputs"] = dict(inputs)
    return {**head, "sites": sites}


def _listed(values: Any) -> list[float] | None:
    return None if values is None else values.tolist()


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


def joint_table(bases: Mapping[str, CausalBasis]) -> str:
    """Per site, the joint energy of ablating the first i directions, greedy then refined."""
    lines = ["joint energy of the first i directions (nats), greedy basis / refined basis:"]
    width = max([len("site")] + [len(s) for s in bases])
    for site, b in bases.items():
        greedy = b.greedy_subspace_energies
        cells = ", ".join(
            f"{'-' if greedy is None else f'{float(greedy[i]):.4g}'}/{float(e):.4g}"
            for i, e in enumerate(b.subspace_energies)
        )
        lines.append(f"{site:<{width}}  {cells}")
    return "\n".join(lines)
