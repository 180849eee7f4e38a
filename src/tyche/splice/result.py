"""The frozen result of a spliced-faithfulness measurement: :class:`SpliceResult`, one row per
measured configuration (a bottleneck at all its sites, or at one alone), and its table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

from tyche.io import ResultIO

__all__ = ["RECOVERED_EPS", "SpliceResult"]

#: nats: an ablation that changes the loss by at most this much leaves nothing to recover
RECOVERED_EPS = 1e-6


@dataclass(frozen=True)
class SpliceResult(ResultIO):
    """The scores of every measured configuration (one per row of the table).

    Row ``i``: bottleneck ``names[i]`` spliced at ``sites[i]`` (all of its sites, or one
    alone); ``families[i]`` and ``ks[i]`` are the bottleneck's. ``kl`` (nats/token),
    ``ce``/``ce_ablated`` (nats), ``ce_recovered`` (NaN where undefined, see
    :data:`RECOVERED_EPS`) and ``accuracy`` are ``(n,)`` float64. ``n_kl_positions`` and
    ``n_ce_positions`` count the positions the means run over (all ranks).
    """

    UNITS: ClassVar[dict[str, str]] = {
        "kl": "nats per token",
        "ce": "nats",
        "ce_ablated": "nats",
        "ce_clean": "nats",
        "ce_recovered": "fraction",
        "accuracy": "fraction",
        "accuracy_clean": "fraction",
    }

    names: list[str]
    sites: list[list[str]]
    families: list[str]
    ks: list[int | None]
    kl: Tensor
    ce: Tensor
    ce_ablated: Tensor
    ce_recovered: Tensor
    accuracy: Tensor
    ce_clean: float
    accuracy_clean: float
    n_kl_positions: int
    n_ce_positions: int
    ablation: str
    model_hash: str | None = None
    settings: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    def rows(self) -> list[dict[str, Any]]:
        """The table as JSON-ready dicts (``ce_recovered`` None where undefined)."""
        out = []
        for i, name in enumerate(self.names):
            recovered = float(self.ce_recovered[i])
            out.append({"bottleneck": name, "sites": self.sites[i], "family": self.families[i],
                        "k": self.ks[i], "kl": float(self.kl[i]), "ce": float(self.ce[i]),
                        "ce_ablated": float(self.ce_ablated[i]),
                        "ce_recovered": recovered if math.isfinite(recovered) else None,
                        "accuracy": float(self.accuracy[i])})  # fmt: skip
        return out

    def index(self, name: str, sites: Sequence[str] | None = None) -> int:
        """The row of bottleneck ``name`` at ``sites`` (default: its row with the most sites)."""
        found = [i for i, n in enumerate(self.names) if n == name]
        if sites is not None:
            found = [i for i in found if list(self.sites[i]) == list(sites)]
        if not found:
            raise KeyError(f"no row for bottleneck {name!r} at sites {sites}")
        return max(found, key=lambda i: len(self.sites[i]))

    def table(self) -> str:
        """The scores as a text table, the clean model first."""
        rows = self.rows()
        cells = [[r["bottleneck"], ",".join(r["sites"]), f"{r['kl']:.4g}", f"{r['ce']:.4f}",
                  f"{r['ce_ablated']:.4f}",
                  "n/a" if r["ce_recovered"] is None else f"{r['ce_recovered']:.4f}",
                  f"{r['accuracy']:.4f}"] for r in rows]  # fmt: skip
        head = ["bottleneck", "sites", "KL nats/tok", "CE", f"CE {self.ablation}-abl",
                "CE recov", "accuracy"]  # fmt: skip
        clean = ["clean", "", "0", f"{self.ce_clean:.4f}", "", "", f"{self.accuracy_clean:.4f}"]
        widths = [max(len(row[i]) for row in [head, clean, *cells]) for i in range(len(head))]

        def line(row: list[str]) -> str:
            left = [f"{c:<{w}}" for c, w in zip(row[:2], widths)]
            return "  ".join(left + [f"{c:>{w}}" for c, w in zip(row[2:], widths[2:])]).rstrip()

        lines = [line(head), line(clean), *(line(c) for c in cells)]
        if any(r["ce_recovered"] is None for r in rows):
            lines.append(f"n/a: ablating those sites changes the loss by at most "
                         f"{RECOVERED_EPS:g} nats, so there is nothing to recover")  # fmt: skip
        return "\n".join(lines)
