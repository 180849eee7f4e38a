"""`VolumeResult`: the per-sample record of a basin-volume run and its aggregates."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from tyche.basin.psis import LOWER_BOUND, MIN_SAMPLES, NOISY_BELOW, pareto_khat, verdict
from tyche.io import ResultIO


def log_mean_exp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log(mean(exp(x))) along ``dim``, stable for values of any magnitude."""
    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])


def effective_sample_size(log_weights: torch.Tensor) -> float:
    """Kish's ESS, (Σw)²/Σw², of importance weights given in log space."""
    w = torch.exp(log_weights.double() - log_weights.max())
    return float(w.sum() ** 2 / (w**2).sum())


def max_weight_share(log_weights: torch.Tensor) -> float:
    """The largest normalised importance weight, max w / Σw (1/n for equal weights)."""
    lw = log_weights.double()
    return float(torch.exp(lw.max() - torch.logsumexp(lw, dim=0)))


def bootstrap_interval(
    estimates: torch.Tensor, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the log-mean-exp of ``estimates`` (nats)."""
    n = estimates.numel()
    if n < 2:
        v = float(estimates.reshape(-1)[0])
        return (v, v)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (n_boot, n), generator=g)
    stats = log_mean_exp(estimates.double().cpu()[idx], dim=1)
    lo, hi = torch.quantile(
        stats, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=stats.dtype)
    )
    return (float(lo), float(hi))


@dataclass(frozen=True)
class VolumeResult(ResultIO):
    """One basin-volume estimate: per-sample values (length n_samples) and their aggregates.

    ``estimates[i]`` is the log of an unbiased importance-sampling estimate of the prior
    probability (Gaussian prior) or of the volume (uniform prior) of the region, in nats;
    exp(estimates) averages to the answer, so ``log_prob`` is their log-mean-exp.

    How far to trust it is computed from ``estimates`` on construction (and saved with the
    result; a result saved before these existed gets them computed on load): ``khat``, the
    Pareto tail index of the weights exp(estimates) (:mod:`tyche.basin.psis`; inf with fewer
    than 21 samples, −inf when every sample gives the same estimate), ``ess`` (Kish),
    ``max_weight_share`` (the largest normalised weight) and ``verdict``: "estimate"
    (k̂ < 0.5), "noisy" (0.5 ≤ k̂ < 0.7) or "lower bound only" (k̂ ≥ 0.7, or too few
    samples to tell): the log-mean-exp then lies below log P and its bootstrap interval
    spans the resampling noise only, not the distance to log P.
    """

    UNITS = {
        "estimates": "nats (natural log of probability, or of volume for prior='uniform')",
        "radii": "parameter-space Euclidean distance from the anchor",
        "deltas": "nats (loss rise at the returned radius)",
        "props": "|P u| (dimensionless)",
        "mults": "radius / props",
        "logabsint": "nats (log of the radial integral)",
        "cutoff": "nats",
        "sigma": "parameter units (prior standard deviation)",
    }

    estimates: torch.Tensor
    radii: torch.Tensor
    deltas: torch.Tensor
    props: torch.Tensor
    mults: torch.Tensor
    logabsint: torch.Tensor
    n_evals: torch.Tensor
    cutoff: float
    sigma: float
    n_params: int
    prior: str
    settings: dict[str, Any] = field(default_factory=dict)
    khat: float = field(init=False, default=math.nan)
    ess: float = field(init=False, default=math.nan)
    max_weight_share: float = field(init=False, default=math.nan)
    verdict: str = field(init=False, default=LOWER_BOUND)

    def __post_init__(self) -> None:
        if self.estimates.numel() == 0:
            return
        khat = pareto_khat(self.estimates)
        object.__setattr__(self, "khat", khat)
        object.__setattr__(self, "ess", effective_sample_size(self.estimates))
        object.__setattr__(self, "max_weight_share", max_weight_share(self.estimates))
        object.__setattr__(self, "verdict", verdict(khat))

    @property
    def n_samples(self) -> int:
        return int(self.estimates.numel())

    @property
    def log_prob(self) -> float:
        """log-mean-exp of the per-sample estimates (nats): the estimator's answer."""
        return float(log_mean_exp(self.estimates.double()))

    @property
    def max(self) -> float:
        """Largest per-sample estimate (nats); what the original paper's figures plot."""
        return float(self.estimates.max())

    @property
    def is_lower_bound(self) -> bool:
        """True when the verdict is "lower bound only" (k̂ ≥ 0.7 or too few samples)."""
        return self.verdict == LOWER_BOUND

    @property
    def bound_reason(self) -> str:
        """Why the verdict is "lower bound only", in words (for warnings and footnotes)."""
        if self.n_samples < MIN_SAMPLES:
            return f"{self.n_samples} samples are too few to see the weights' tail (k̂ needs " \
                   f"at least {MIN_SAMPLES})"  # fmt: skip
        return f"the weights' tail is heavy (Pareto k̂ ≥ {NOISY_BELOW})"

    def interval(self, level: float = 0.95, n_boot: int = 2000) -> tuple[float, float]:
        """Bootstrap confidence interval of ``log_prob`` (nats)."""
        return bootstrap_interval(self.estimates, level=level, n_boot=n_boot)

    @property
    def evals_per_direction(self) -> float:
        return float(self.n_evals.double().mean())

    def warn_if_bound(self, stacklevel: int = 2) -> None:
        if self.is_lower_bound:
            warnings.warn(
                f"effective sample size {self.ess:.2f} of {self.n_samples}, Pareto k̂ "
                f"{self.khat:.2f}: lower bound only: "
                f"{self.bound_reason}, so the log-mean-exp lies below the log-probability and "
                "its interval spans the resampling noise only; use a preconditioner or more "
                "samples.",
                stacklevel=stacklevel,
            )

    def summary(self) -> dict[str, Any]:
        """log P, its bootstrap interval and the diagnostics (a k̂ of ±inf is null in JSON)."""
        lo, hi = self.interval()
        return {
            "log_prob": self.log_prob,
            "ci_low": lo,
            "ci_high": hi,
            "max": self.max,
            "ess": self.ess,
            "khat": self.khat,
            "max_weight_share": self.max_weight_share,
            "verdict": self.verdict,
            "evals_per_direction": self.evals_per_direction,
            "n_samples": float(self.n_samples),
        }
