"""Text and JSON summaries of basin-volume runs: the results table and its summary rows.

One `Row` per preconditioner × subset (× component, a part of the parameters): its
`BasinCurve` (one column per cutoff, a single column for one cutoff), the seconds it took
and, when fitted, its learning coefficient λ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tyche.basin.curve import BasinCurve
from tyche.basin.lambda_fit import LearningCoefficient
from tyche.basin.psis import (
    ESTIMATE_BELOW,
    LOWER_BOUND,
    MIN_SAMPLES,
    NOISY,
    NOISY_BELOW,
    VERDICTS,
)
from tyche.basin.result import VolumeResult

#: the verdict column's width: its longest word
VERDICT_WIDTH = max(len(v) for v in VERDICTS)

__all__ = ["Row", "results_table", "summary_rows"]


@dataclass
class Row:
    """One curve of a run: preconditioner ``kind`` on ``subset`` (None: all the data), over
    the parameters of ``component`` (None: all those measured)."""

    kind: str
    subset: str | None
    curve: BasinCurve
    seconds: float
    lam: LearningCoefficient | None = None
    component: str | None = None

    @property
    def label(self) -> str:
        """``"kind [component] [subset]"``."""
        return " ".join(t for t in (self.kind, self.component, self.subset) if t is not None)


def summary_rows(rows: list[Row]) -> list[dict[str, Any]]:
    """One JSON-ready dict per preconditioner × subset × component × cutoff; ``n_params`` is
    the D of the parameters measured (the component's with a component)."""
    out = []
    for row in rows:
        for res in row.curve.results:
            entry: dict[str, Any] = {"preconditioner": row.kind, "cutoff": res.cutoff}
            if row.component is not None:
                entry["component"] = row.component
            if row.subset is not None:
                entry["subset"] = row.subset
            entry["n_params"] = res.n_params
            entry.update(res.summary())
            entry["seconds"] = row.seconds
            entry["curve_cutoffs"] = len(row.curve)
            if row.curve.settings.get("adapt"):  # every round's evaluations, not the last's
                entry["adapt"] = row.curve.settings["adapt"]
                entry["loss_evals_total"] = row.curve.settings["adapt_loss_evals"]
            if row.lam is not None:
                entry.update(_lambda_entry(row.lam))
            out.append({k.rstrip("_"): v for k, v in entry.items()})
    return out


def _lambda_entry(lam: LearningCoefficient) -> dict[str, Any]:
    """λ's keys of a summary row: ``lambda_ci`` is null when λ is unreliable (a fitted log P
    is a lower bound only); ``lambda_spread`` always holds the bootstrap percentiles."""
    interval = lam.interval
    return {
        "lambda_": lam.value,
        "lambda_ci": None if interval is None else list(interval),
        "lambda_spread": [lam.ci_low, lam.ci_high],
        "lambda_khat": max(lam.khats, default=math.nan),
        "lambda_verdict": lam.verdict,
        "lambda_straight": lam.straight,
    }


def results_table(rows: list[Row], n_params: int, fit_hint: str | None = None) -> str:
    """The results table, its footnotes and, over several cutoffs, the slope or λ lines.

    Log-probabilities in nats, time in seconds. ``fit_hint`` ends the slope line of curves
    without a fitted λ (how to get one, in the caller's words). Rows with a component get a
    component column and a D column (its parameter count); the slope line is then given per
    component, beside its own D/2.
    """
    subsets = any(r.subset is not None for r in rows)
    width = max([len(r.subset or "") for r in rows] + [6]) if subsets else 0
    sub = f" {'subset':<{width}}" if subsets else ""
    parts = any(r.component is not None for r in rows)
    cwidth = max([len(r.component or "") for r in rows] + [9]) if parts else 0
    dwidth = max([len(f"{r.curve.n_params:,}") for r in rows] + [1]) if parts else 0
    comp = f" {'component':<{cwidth}} {'D':>{dwidth}}" if parts else ""
    head = (
        f"{'preconditioner':<14}{comp}{sub} {'cutoff':>8} {'log P (nats)':>16} {'95% CI':>27} "
        f"{'k̂':>7} {'verdict':<{VERDICT_WIDTH}} {'max':>12} {'ESS':>6} {'evals/dir':>9} "
        f"{'time (s)':>9}"
    )
    lines = [head, "-" * (len(head) - 1)]  # k̂ is two code points in one column
    for row in rows:
        for res in row.curve.results:
            lo, hi = res.interval()
            cell = f" {row.subset or 'all':<{width}}" if subsets else ""
            if parts:
                cell = f" {row.component or 'all':<{cwidth}} {res.n_params:>{dwidth},}" + cell
            lines.append(
                f"{row.kind:<14}{cell} {res.cutoff:>8.0e} {res.log_prob:>16,.1f} "
                f"{f'[{lo:,.0f}, {hi:,.0f}]':>27} {res.khat:>6.2f} "
                f"{res.verdict:<{VERDICT_WIDTH}} {res.max:>12,.1f} {res.ess:>6.2f} "
                f"{row.curve.evals_per_direction:>9.2f} {row.seconds:>9.1f}"
            )
    lines += _verdict_notes([res for row in rows for res in row.curve.results])
    if rows and len(rows[0].curve) > 1:
        lines.append(
            f"evals/dir and time are per curve: each direction is searched once for all "
            f"{len(rows[0].curve)} cutoffs."
        )
        fitted = [r for r in rows if r.lam is not None]
        for row in fitted:
            lines.append(f"{row.label}: {row.lam.describe()}")
        if not fitted and not parts:
            lines.append(_slope_line(rows[0].curve, n_params, fit_hint))
        elif not fitted:  # one line per component, on its first row's curve and its own D
            first: dict[str | None, Row] = {}
            for row in rows:
                first.setdefault(row.component, row)
            for row in first.values():
                line = _slope_line(row.curve, row.curve.n_params, fit_hint)
                lines.append(f"{row.label}: {line}")
    return "\n".join(lines)


def _verdict_notes(results: list[VolumeResult]) -> list[str]:
    """The footnotes that explain the verdicts the table shows."""
    notes = []
    if any(res.verdict == NOISY for res in results):
        notes.append(
            f"noisy: Pareto k̂ in [{ESTIMATE_BELOW}, {NOISY_BELOW}): the weights' variance is "
            "infinite, so log P converges slowly and its interval is optimistic."
        )
    bound = [res for res in results if res.verdict == LOWER_BOUND]
    if bound:
        few = any(res.n_samples < MIN_SAMPLES for res in bound)
        why = (f"fewer than {MIN_SAMPLES} directions cannot show the weights' tail"
               if few else f"Pareto k̂ ≥ {NOISY_BELOW}")  # fmt: skip
        notes.append(
            f"lower bound only ({why}): the log-mean-exp is dominated by its best directions, "
            "so log P lies below the truth and its CI spans the resampling noise only (the "
            "paper's regime); more directions or a better preconditioner raise it."
        )
    return notes


def _slope_line(curve: BasinCurve, n_params: int, fit_hint: str | None) -> str:
    """The slope of log P against ln(cutoff) between the two smallest cutoffs, beside D/2."""
    c0, c1 = float(curve.cutoffs[0]), float(curve.cutoffs[1])
    p0, p1 = (float(v) for v in curve.log_probs[:2])
    slope = (p1 - p0) / (math.log(c1) - math.log(c0))
    line = (
        f"slope of log P against ln(cutoff) at the smallest cutoffs: {slope:,.0f} "
        f"(D/2 = {n_params / 2:,.0f})"
    )
    return line + (f"; {fit_hint}" if fit_hint else "")
