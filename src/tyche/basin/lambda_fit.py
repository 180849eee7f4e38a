"""The learning coefficient λ from a basin curve: the slope of log P against log(cutoff).

For a loss K(w) ≥ 0 with K(θ) = 0, the prior mass of {K < ε} scales as ε^λ (log ε)^(m−1)
when ε → 0, with λ the real log canonical threshold of K at θ: the local learning
coefficient of singular learning theory, D/2 at a regular (quadratic) minimum, less where
the minimum is degenerate (a direction where K grows like r⁴ contributes 1/4, not 1/2). So
at small cutoffs log P(ε) ≈ λ log ε + c.

`learning_coefficient` fits that line by least squares over the smallest cutoffs of a
`BasinCurve`. Its interval is a percentile bootstrap over directions: the same resample of
directions at every cutoff (the cutoffs share their directions, so their errors are
correlated), the log-mean-exp at each cutoff recomputed, the line refitted. The interval
covers the sampling noise of the directions drawn, not the bias of an estimate that is only
a lower bound; see the caveat in the README: ray sampling sees almost only the quadratic
directions of a degenerate minimum.

Each fitted cutoff's log P carries a Pareto k̂ and a verdict (`VolumeResult.verdict`); λ
carries the worst of them. When that is "lower bound only", every log P it leans on may lie
far below the truth and so may the slope between them: ``describe`` then calls λ
unreliable, reports the bootstrap numbers as a *spread over directions* (not an interval
covering λ), and ``interval`` is None (summary.json: ``lambda_ci`` null, the spread in
``lambda_spread``).

The curve is called *not yet straight* when the local slopes between consecutive fitted
cutoffs differ by more than ``straight_rtol`` of λ and by more than their bootstrap noise:
then the cutoffs are not small enough for the asymptotic line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tyche.basin.curve import BasinCurve
from tyche.basin.psis import LOWER_BOUND, worst_verdict
from tyche.basin.result import log_mean_exp
from tyche.errors import InputError
from tyche.io import ResultIO


@dataclass(frozen=True)
class LearningCoefficient(ResultIO):
    """λ fitted to log P(ε) ≈ λ log ε + c (natural logs; λ in nats per e-fold of cutoff).

    ``cutoffs``/``log_probs`` are the fitted points; ``local_slopes`` the slopes between
    consecutive fitted points (smallest first); ``straight`` is None when fewer than three
    points leave straightness untested. ``ci_low``/``ci_high`` are the bootstrap percentiles
    over directions; ``khats`` the Pareto k̂ at each fitted cutoff and ``verdict`` the worst of
    their verdicts (None for a λ saved before they were recorded).
    """

    value: float
    ci_low: float
    ci_high: float
    level: float
    intercept: float
    cutoffs: tuple[float, ...]
    log_probs: tuple[float, ...]
    local_slopes: tuple[float, ...]
    straight: bool | None
    note: str
    n_params: int
    n_samples: int
    khats: tuple[float, ...] = ()
    verdict: str | None = None

    @property
    def ratio_to_half_dimension(self) -> float:
        """λ / (D/2): 1 for a regular minimum seen in every direction."""
        return self.value / (self.n_params / 2)

    @property
    def reliable(self) -> bool:
        """False when a fitted log P is a lower bound only (or the verdict was not recorded)."""
        return self.verdict is not None and self.verdict != LOWER_BOUND

    @property
    def interval(self) -> tuple[float, float] | None:
        """The bootstrap interval (ci_low, ci_high) when λ is reliable, else None."""
        return (self.ci_low, self.ci_high) if self.reliable else None

    def describe(self) -> str:
        """One line: λ, its interval (or, unreliable, its spread), the k̂s and verdict,
        λ/(D/2) and the straightness note."""
        cutoffs = ", ".join(f"{c:g}" for c in self.cutoffs)
        spread = f"[{self.ci_low:,.1f}, {self.ci_high:,.1f}]"
        khats = ", ".join(f"{k:.2f}" for k in self.khats)
        tail = f"λ/(D/2) = {self.ratio_to_half_dimension:.4f}; {self.note}"
        if self.verdict is None:
            return (f"λ = {self.value:,.1f} {spread} ({self.level:.0%} bootstrap over "
                    f"directions; cutoffs {cutoffs}; no k̂ recorded); {tail}")  # fmt: skip
        if not self.reliable:
            return (
                f"λ = {self.value:,.1f} UNRELIABLE: lower bound only at the fitted cutoffs "
                f"{cutoffs} (k̂ {khats}), so each log P fitted may lie far below the truth and "
                f"λ with it; bootstrap spread over directions {spread} (resampling noise only, "
                f"not an interval covering λ); {tail}"
            )
        return (
            f"λ = {self.value:,.1f} {spread} ({self.level:.0%} bootstrap over directions; "
            f"cutoffs {cutoffs}; k̂ {khats}: {self.verdict}); {tail}"
        )


def _slope_intercept(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares line through (x, y) along the last dim: (slope, intercept), float64."""
    xm = x.mean()
    dx = x - xm
    slope = ((y - y.mean(-1, keepdim=True)) * dx).sum(-1) / (dx * dx).sum()
    return slope, y.mean(-1) - slope * xm


def learning_coefficient(
    curve: BasinCurve,
    *,
    n_points: int = 3,
    level: float = 0.95,
    n_boot: int = 2000,
    straight_rtol: float = 0.02,
    seed: int = 0,
) -> LearningCoefficient:
    """Fit λ over the ``n_points`` smallest cutoffs of ``curve`` (all of them if fewer).

    Raises ValueError for a curve with fewer than two cutoffs or bad arguments.
    """
    if not isinstance(curve, BasinCurve):
        raise TypeError(f"expected a BasinCurve (estimate_basin(..., cutoffs=[...])), got "
                        f"{type(curve).__name__}")  # fmt: skip
    if len(curve) < 2:
        raise InputError("λ needs a curve with at least two cutoffs")
    if not isinstance(n_points, int) or n_points < 2:
        raise InputError(f"n_points must be an integer >= 2, got {n_points!r}")
    if not 0 < level < 1:
        raise InputError(f"level must lie in (0, 1), got {level!r}")
    k = min(n_points, len(curve))
    x = curve.cutoffs[:k].double().log()
    est = curve.estimates[:, :k].double()
    y = log_mean_exp(est, dim=0)
    slope, icpt = _slope_intercept(x, y)
    local = (y[1:] - y[:-1]) / (x[1:] - x[:-1])

    n = est.shape[0]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (n_boot, n), generator=g)
    boot_y = log_mean_exp(est[idx], dim=1)  # (n_boot, k)
    boot_slope, _ = _slope_intercept(x, boot_y)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(boot_slope, q).tolist()

    lam = float(slope)
    fitted = [curve[i] for i in range(k)]
    if k < 3:
        straight, note = None, "straightness untested (fit three or more cutoffs to test it)"
    else:
        bend = float(local[-1] - local[0])
        boot_local = (boot_y[:, 1:] - boot_y[:, :-1]) / (x[1:] - x[:-1])
        boot_bend = boot_local[:, -1] - boot_local[:, 0]
        b_lo, b_hi = torch.quantile(boot_bend, q).tolist()
        noisy = b_lo <= 0 <= b_hi
        straight = abs(bend) <= straight_rtol * abs(lam) or noisy
        shown = " → ".join(f"{float(s):,.1f}" for s in local)
        if straight:
            note = f"straight: local slopes {shown}"
        else:
            note = (
                f"NOT YET STRAIGHT: the local slope moves {shown} across the fitted cutoffs "
                f"({abs(bend) / abs(lam):.1%} of λ, beyond the bootstrap noise); add smaller "
                "cutoffs"
            )
    return LearningCoefficient(
        value=lam,
        ci_low=float(lo),
        ci_high=float(hi),
        level=float(level),
        intercept=float(icpt),
        cutoffs=tuple(float(c) for c in curve.cutoffs[:k]),
        log_probs=tuple(float(v) for v in y),
        local_slopes=tuple(float(s) for s in local),
        straight=straight,
        note=note,
        n_params=curve.n_params,
        n_samples=n,
        khats=tuple(res.khat for res in fitted),
        verdict=worst_verdict([res.verdict for res in fitted]),
    )


def fit_line(lam: LearningCoefficient, cutoffs: list[float]) -> list[float]:
    """λ log ε + c at ``cutoffs`` (for drawing the fit)."""
    return [lam.value * math.log(c) + lam.intercept for c in cutoffs]
