"""Pareto-smoothed importance sampling (PSIS): the tail diagnostic k̂ of importance weights.

A log-mean-exp of importance weights w_i = exp(log w_i) is only as good as the tail of the
weights' distribution. Vehtari, Simpson, Gelman, Yao & Gabry ("Pareto smoothed importance
sampling", JMLR 25(72), 2024) fit a generalized Pareto distribution (GPD) to the M largest
weights' exceedances over the (M+1)-th largest, M = ceil(min(S/5, 3√S)) for S independent
draws, and read the fitted shape k̂ as the tail index of the weights: the weights have finite
moments of order < 1/k. Their thresholds, which the basin verdicts use:

- k̂ < 0.5: the variance is finite, the central limit theorem holds; an *estimate*;
- 0.5 ≤ k̂ < 0.7: finite mean, infinite variance; the estimate converges slowly, *noisy*;
- k̂ ≥ 0.7: the mean of the sampled weights is dominated by the few largest ones, and with a
  feasible number of draws it lies below the true mean: a *lower bound only*.

The GPD fit is the empirical-Bayes estimator of Zhang & Stephens (Technometrics 51(3), 2009),
with the weakly informative prior of the PSIS paper that pulls k̂ towards 0.5 by 10 pseudo-
observations, as ``arviz.psislw`` and R's ``loo`` compute it.

Two cases the fit cannot make, each given a k̂ that says what is known:

- fewer than 5 weights above the tail's threshold (any S below 21, ties at the top, or a
  tail spanning more than ~708 nats, where exp underflows and the threshold is clamped to
  the smallest float64): no fit, k̂ = inf (as in arviz and loo): the draws do not show the
  tail, so their mean is only a lower bound on the mean of the weights;
- a *flat* tail: the M+1 largest weights equal to 1e-9 relative (an exactly symmetric
  problem: every direction gives the same estimate): k̂ = −inf, the weights are bounded and
  the estimate is exact up to rounding (arviz would report inf there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "ESTIMATE",
    "LOWER_BOUND",
    "MIN_SAMPLES",
    "VERDICTS",
    "NOISY",
    "PsisFit",
    "gpd_fit",
    "pareto_khat",
    "psis",
    "tail_length",
    "verdict",
    "worst_verdict",
]

#: the verdicts, best first (see the module docstring)
ESTIMATE, NOISY, LOWER_BOUND = "estimate", "noisy", "lower bound only"
VERDICTS = (ESTIMATE, NOISY, LOWER_BOUND)
#: k̂ below this: an estimate; below NOISY_BELOW: noisy; from it on: a lower bound only
ESTIMATE_BELOW, NOISY_BELOW = 0.5, 0.7
#: the fewest tail weights a GPD is fitted to (arviz and loo: 5)
MIN_TAIL = 5
#: the fewest draws whose tail holds MIN_TAIL weights (tail_length(21) = ceil(4.2) = 5)
MIN_SAMPLES = 21
#: tail weights within this relative spread of the threshold weight make a flat tail
FLAT_RTOL = 1e-9
#: the prior on k̂ of the PSIS paper: 10 pseudo-observations at k = 0.5
_PRIOR_N, _PRIOR_K = 10, 0.5
#: Zhang & Stephens' prior scale on the grid of b = -k/σ (in units of the tail's quartile)
_PRIOR_B = 3


@dataclass(frozen=True)
class PsisFit:
    """The PSIS fit of S log-weights: ``khat``, the Pareto-smoothed ``log_weights`` (S,)
    (same scale and order as the input; the raw ones where no GPD was fitted) and the
    number ``tail`` of weights the GPD was fitted to (0 without a fit)."""

    khat: float
    log_weights: torch.Tensor
    tail: int

    @property
    def verdict(self) -> str:
        return verdict(self.khat)


def tail_length(n: int) -> int:
    """M = ceil(min(S/5, 3√S)): how many of S draws make the tail (PSIS paper, r_eff = 1)."""
    return math.ceil(min(n / 5.0, 3.0 * math.sqrt(n)))


def verdict(khat: float) -> str:
    """The verdict in words for a tail index k̂ (NaN: a lower bound only)."""
    if khat < ESTIMATE_BELOW:
        return ESTIMATE
    if khat < NOISY_BELOW:
        return NOISY
    return LOWER_BOUND


def worst_verdict(verdicts: list[str] | tuple[str, ...]) -> str:
    """The least reliable of ``verdicts`` (a lower bound only, if ``verdicts`` is empty)."""
    if not verdicts:
        return LOWER_BOUND
    return max(verdicts, key=VERDICTS.index)


def gpd_fit(x: torch.Tensor) -> tuple[float, float]:
    """Zhang & Stephens' estimate of a GPD's shape and scale from exceedances over a threshold.

    ``x``: (M,) positive exceedances sorted ascending, M ≥ 1 (float64). Returns (k, σ): the
    shape after the PSIS paper's prior (M k + 10·0.5)/(M + 10), and the scale, in the units
    of ``x``.
    """
    x = x.to(torch.float64)
    n = x.numel()
    m = 30 + int(math.sqrt(n))
    j = torch.arange(1, m + 1, dtype=torch.float64)
    quartile = x[int(n / 4 + 0.5) - 1]
    b = 1 / x[-1] + (1 - torch.sqrt(m / (j - 0.5))) / (_PRIOR_B * quartile)  # (m,) grid of -k/σ
    k = torch.log1p(-b[:, None] * x).mean(dim=1)  # the profile MLE of k at each b
    profile = n * (torch.log(-b / k) - k - 1)  # its log-likelihood
    weights = torch.softmax(profile, dim=0)
    keep = weights >= 10 * torch.finfo(torch.float64).eps
    weights, b = weights[keep] / weights[keep].sum(), b[keep]
    b_post = float((b * weights).sum())
    k_post = float(torch.log1p(-b_post * x).mean())
    sigma = -k_post / b_post
    return (n * k_post + _PRIOR_N * _PRIOR_K) / (n + _PRIOR_N), sigma


def _gpd_quantiles(p: torch.Tensor, k: float, sigma: float) -> torch.Tensor:
    """The GPD's inverse CDF at probabilities ``p`` in (0, 1)."""
    if abs(k) < torch.finfo(torch.float64).eps:
        return -sigma * torch.log1p(-p)
    return sigma * torch.expm1(-k * torch.log1p(-p)) / k


def psis(log_weights: torch.Tensor) -> PsisFit:
    """Pareto-smooth the importance weights exp(``log_weights``) and diagnose their tail.

    ``log_weights``: (S,) any real scale (nats); -inf is a zero weight. Computed in float64 on
    the CPU. Returns k̂ (see the module docstring for inf, -inf, and NaN when no weight is
    finite and positive) and the smoothed log-weights, whose tail is replaced by the fitted
    GPD's quantiles at (i − ½)/M, capped at the largest raw weight.
    """
    lw = log_weights.detach().reshape(-1).to("cpu", torch.float64)
    n = lw.numel()
    top = lw.max() if n else torch.tensor(math.nan, dtype=torch.float64)
    if n == 0 or not torch.isfinite(top) or torch.isnan(lw).any():
        return PsisFit(math.nan, lw.clone(), 0)
    x = lw - top
    order = torch.argsort(x)
    m = tail_length(n)
    if m + 1 > n:
        return PsisFit(math.inf, lw.clone(), 0)
    cut = max(float(x[order[-m - 1]]), math.log(torch.finfo(torch.float64).tiny))
    if math.expm1(-cut) <= FLAT_RTOL:  # the largest weight is within FLAT_RTOL of the cut
        return PsisFit(-math.inf, lw.clone(), 0)
    tail_idx = order[-m:][x[order[-m:]] > cut]  # ascending: arviz's x > cutoff
    if tail_idx.numel() < MIN_TAIL:
        return PsisFit(math.inf, lw.clone(), 0)
    exceed = torch.exp(x[tail_idx]) - math.exp(cut)
    k, sigma = gpd_fit(exceed)
    smoothed = x.clone()
    if math.isfinite(k):
        size = tail_idx.numel()
        p = (torch.arange(size, dtype=torch.float64) + 0.5) / size
        smoothed[tail_idx] = torch.log(_gpd_quantiles(p, k, sigma) + math.exp(cut)).clamp(max=0)
    return PsisFit(k, smoothed + top, int(tail_idx.numel()))


def pareto_khat(log_weights: torch.Tensor) -> float:
    """k̂ of the importance weights exp(``log_weights``), (S,): see :func:`psis`."""
    return psis(log_weights).khat
