"""`BasinCurve`: the basin's log-probability at several cutoffs, from one search per direction.

Every direction is searched once for all cutoffs (``estimate_basin(..., cutoffs=[...])``), so
the K results share their directions, their ``props`` and their evaluation count; each
cutoff's column is a complete `VolumeResult` (``curve[k]`` or ``curve.at(cutoff)``), with
its own Pareto k̂ and verdict (``curve.khats``, ``curve.verdicts``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tyche.basin.result import VolumeResult, log_mean_exp
from tyche.io import ResultIO


@dataclass(frozen=True)
class BasinCurve(ResultIO):
    """Per-direction estimates at K cutoffs (columns sorted by cutoff, ascending).

    Shapes: ``cutoffs`` (K,); ``estimates``, ``radii``, ``deltas``, ``logabsint`` (n, K);
    ``props``, ``n_evals`` (n,): ``n_evals[i]`` counts the loss evaluations of direction i
    for all K cutoffs together.
    """

    UNITS = {
        "cutoffs": "nats",
        "estimates": "nats (natural log of probability, or of volume for prior='uniform')",
        "radii": "parameter-space Euclidean distance from the anchor",
        "deltas": "nats (loss rise at the returned radius)",
        "props": "|P u| (dimensionless)",
        "logabsint": "nats (log of the radial integral)",
        "n_evals": "loss evaluations per direction, all cutoffs together",
        "sigma": "parameter units (prior standard deviation)",
    }

    cutoffs: torch.Tensor
    estimates: torch.Tensor
    radii: torch.Tensor
    deltas: torch.Tensor
    props: torch.Tensor
    logabsint: torch.Tensor
    n_evals: torch.Tensor
    sigma: float
    n_params: int
    prior: str
    settings: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.cutoffs.numel())

    @property
    def n_samples(self) -> int:
        return int(self.estimates.shape[0])

    def __getitem__(self, k: int) -> VolumeResult:
        """The `VolumeResult` at ``cutoffs[k]`` (its ``n_evals`` are the shared counts)."""
        if not -len(self) <= k < len(self):
            raise IndexError(f"cutoff index {k} out of range for {len(self)} cutoffs")
        c = float(self.cutoffs[k])
        return VolumeResult(
            estimates=self.estimates[:, k],
            radii=self.radii[:, k],
            deltas=self.deltas[:, k],
            props=self.props,
            mults=self.radii[:, k] / self.props,
            logabsint=self.logabsint[:, k],
            n_evals=self.n_evals,
            cutoff=c,
            sigma=self.sigma,
            n_params=self.n_params,
            prior=self.prior,
            settings={**self.settings, "cutoff": c, "curve_cutoffs": self.cutoffs.tolist()},
        )

    def at(self, cutoff: float) -> VolumeResult:
        """The `VolumeResult` at ``cutoff`` (one of ``cutoffs``, matched to 1e-12 relative)."""
        match = ((self.cutoffs - cutoff).abs() <= 1e-12 * abs(cutoff)).nonzero()
        if match.numel() == 0:
            raise KeyError(f"cutoff {cutoff:g} is not among {self.cutoffs.tolist()}")
        return self[int(match[0, 0])]

    @property
    def results(self) -> tuple[VolumeResult, ...]:
        return tuple(self[k] for k in range(len(self)))

    @property
    def log_probs(self) -> torch.Tensor:
        """log-mean-exp of the estimates at each cutoff, (K,) nats."""
        return log_mean_exp(self.estimates.double(), dim=0)

    @property
    def khats(self) -> tuple[float, ...]:
        """The Pareto k̂ of the weights at each cutoff (`VolumeResult.khat`), (K,)."""
        return tuple(res.khat for res in self.results)

    @property
    def verdicts(self) -> tuple[str, ...]:
        """The verdict at each cutoff (`VolumeResult.verdict`), (K,)."""
        return tuple(res.verdict for res in self.results)

    @property
    def evals_per_direction(self) -> float:
        """Mean loss evaluations per direction for the whole curve."""
        return float(self.n_evals.double().mean())
