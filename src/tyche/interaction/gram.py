"""Means and Gram matrices of node-layer activations, accumulated in one streaming pass.

Positions are samples: an activation ``(B, P, d)`` contributes ``B * P`` rows (rows whose
attention mask is 0 are left out). :class:`GramAccumulator` keeps the count, the mean and
the sum of squared deviations from the mean, merged batch by batch with the update of Chan,
Golub and LeVeque, so the covariance is never formed as ``E[f f^T] - mu mu^T`` (which loses
every digit when the mean is large against the spread). Accumulation is in float64 by default
(``dtype=torch.float32`` is an option); under ``torchrun`` :meth:`GramAccumulator.all_reduce`
merges the ranks' statistics with the same update.

The Gram matrix of the folded activation ``[f, 1]`` follows: centred, ``blockdiag(Cov, 1)``;
uncentred, ``[[Cov + mu mu^T, mu], [mu^T, 1]]`` (:func:`folded_gram`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tyche.distributed import all_reduce_sum, is_distributed
from tyche.errors import InputError

__all__ = ["GramAccumulator", "folded_gram"]


class GramAccumulator:
    """Streaming count, mean ``(d,)`` and scatter ``sum (f - mean)(f - mean)^T`` ``(d, d)``."""

    def __init__(self, d: int, dtype: torch.dtype = torch.float64, device: str | None = None):
        self.dtype = dtype
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.mean = torch.zeros(d, dtype=dtype, device=device)
        self.scatter = torch.zeros(d, d, dtype=dtype, device=device)

    def update(self, rows: Tensor, weights: Tensor | None = None) -> None:
        """Add ``rows`` ``(N, d)`` with optional 0/1 (or any non-negative) ``weights`` ``(N,)``."""
        x = rows.to(self.dtype)
        if weights is None:
            w = None
            nb = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)
        else:
            w = weights.to(self.dtype)
            nb = w.sum().to(torch.float64)
        if nb == 0:
            return
        mb = (x.sum(0) if w is None else w @ x) / nb.to(self.dtype)
        dev = x - mb
        scatter = dev.T @ (dev if w is None else dev * w[:, None])
        self._merge(nb, mb, scatter)

    def _merge(self, nb: Tensor, mb: Tensor, scatter: Tensor) -> None:
        na = self.n
        n = na + nb
        delta = mb - self.mean
        frac = (nb / n).to(self.dtype)
        self.mean = self.mean + delta * frac
        self.scatter = self.scatter + scatter + torch.outer(delta, delta) * (na * frac)
        self.n = n

    def all_reduce(self) -> None:
        """Merge every rank's statistics (no-op in one process); all ranks end equal."""
        if not is_distributed():
            return
        n = all_reduce_sum(self.n)
        if n == 0:
            return
        mean = all_reduce_sum(self.mean * self.n.to(self.dtype)) / n.to(self.dtype)
        delta = self.mean - mean
        self.scatter = all_reduce_sum(
            self.scatter + torch.outer(delta, delta) * self.n.to(self.dtype)
        )
        self.mean, self.n = mean, n

    @property
    def covariance(self) -> Tensor:
        """``(d, d)``: the scatter over the count (the population covariance)."""
        if self.n == 0:
            raise InputError("no rows were accumulated (all masked out?)")
        return self.scatter / self.n.to(self.dtype)


def folded_gram(mean: Tensor, covariance: Tensor, *, center: bool) -> Tensor:
    """The ``(d + 1)``-square Gram matrix of ``[f, 1]`` (of ``[f - mean, 1]`` if ``center``)."""
    d = mean.shape[0]
    g = torch.zeros(d + 1, d + 1, dtype=covariance.dtype, device=covariance.device)
    g[:d, :d] = covariance
    g[d, d] = 1.0
    if not center:
        g[:d, :d] += torch.outer(mean, mean)
        g[:d, d] = mean
        g[d, :d] = mean
    return g
