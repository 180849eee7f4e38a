"""The Pareto k̂ diagnostic (tyche.basin.psis) against known tails and against arviz."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from interop_support import require

from tyche.basin.psis import (
    ESTIMATE,
    LOWER_BOUND,
    MIN_SAMPLES,
    NOISY,
    pareto_khat,
    psis,
    tail_length,
    verdict,
    worst_verdict,
)

S = 10_000
SEEDS = 16


def pareto_log_weights(xi: float, n: int, seed: int) -> torch.Tensor:
    """log w for w = U^(−ξ), U uniform: a Pareto tail whose GPD shape is exactly ξ (ξ > 0);
    for ξ < 0, w = U^(−ξ) is bounded (ξ = −1: uniform weights, a GPD tail with k = −1)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return -xi * torch.log(u)


@pytest.mark.parametrize("xi", [0.2, 0.5, 0.8, 1.2])
def test_khat_recovers_a_known_tail_index(xi):
    m = tail_length(S)
    khats = torch.tensor([pareto_khat(pareto_log_weights(xi, S, seed)) for seed in range(SEEDS)])
    # the GPD fit's standard error is (1 + ξ)/√M (M = 300 tail draws), so the mean of 16 seeds
    # lies within 3 of its standard errors, 3(1 + ξ)/√(16 M); the prior (10 pseudo-draws at
    # 0.5) moves k̂ by at most 10|ξ − 0.5|/(M + 10). Measured: |mean − ξ| ≤ 0.018 (ξ = 1.2),
    # against a tolerance of 0.12
    tolerance = 3 * (1 + xi) / math.sqrt(SEEDS * m) + 10 * abs(xi - 0.5) / (m + 10)
    assert float(khats.mean()) == pytest.approx(xi, abs=tolerance)  # tolerance derived above
    # each seeded draw on its own lands in its verdict's band where ξ is far from the
    # thresholds: 0.2 is 4.3 standard errors below 0.5, 1.2 is 3.9 above 0.7
    if xi in (0.2, 1.2):
        assert {verdict(float(k)) for k in khats} == {ESTIMATE if xi < 0.5 else LOWER_BOUND}


def test_bounded_weights_give_a_negative_khat():
    khats = [pareto_khat(pareto_log_weights(-1.0, S, seed)) for seed in range(4)]
    # a uniform tail has k = −1; the prior pulls the fit to (300·(−1) + 5)/310 = −0.95
    assert all(-1.2 < k < -0.7 for k in khats)
    assert verdict(max(khats)) == ESTIMATE


def test_verdict_thresholds_and_the_worst_of_several():
    cases = {0.49: ESTIMATE, 0.5: NOISY, 0.69: NOISY, 0.7: LOWER_BOUND, -math.inf: ESTIMATE,
             math.inf: LOWER_BOUND, math.nan: LOWER_BOUND}  # fmt: skip
    assert {k: verdict(k) for k in cases} == cases
    assert worst_verdict([ESTIMATE, NOISY, ESTIMATE]) == NOISY
    assert worst_verdict([NOISY, LOWER_BOUND]) == LOWER_BOUND
    assert worst_verdict([ESTIMATE]) == ESTIMATE and worst_verdict([]) == LOWER_BOUND


def test_too_few_samples_a_flat_tail_and_bad_input():
    lw = pareto_log_weights(0.3, 200, 0)
    # 20 draws leave 4 tail weights, too few for a fit (arviz and loo: k̂ = inf); 21 leave 5
    assert MIN_SAMPLES == 21 and tail_length(20) == 4 and tail_length(21) == 5
    assert pareto_khat(lw[:20]) == math.inf and verdict(pareto_khat(lw[:20])) == LOWER_BOUND
    assert math.isfinite(pareto_khat(lw[:21]))
    assert pareto_khat(lw[:1]) == math.inf
    # every weight equal (rounding aside): bounded weights, an exact estimate
    flat = torch.full((500,), -3.0, dtype=torch.float64) + 1e-15 * torch.rand(500)
    assert pareto_khat(flat) == -math.inf and verdict(pareto_khat(flat)) == ESTIMATE
    assert math.isnan(pareto_khat(torch.tensor([1.0, math.nan] * 20, dtype=torch.float64)))
    assert math.isnan(pareto_khat(torch.full((30,), -math.inf, dtype=torch.float64)))
    assert math.isnan(pareto_khat(torch.empty(0)))
    # a zero weight (log w = −inf) is a weight like any other, below the tail
    with_zeros = torch.cat([lw, torch.full((5,), -math.inf, dtype=torch.float64)])
    assert math.isfinite(pareto_khat(with_zeros))


def test_smoothing_replaces_only_the_tail_and_keeps_the_largest_weight():
    lw = pareto_log_weights(0.8, 1000, 1) + 7.0
    fit = psis(lw)
    m = tail_length(1000)
    order = torch.argsort(lw)
    body, tail = order[:-m], order[-m:]
    assert fit.tail == m and fit.log_weights.shape == lw.shape
    assert torch.equal(fit.log_weights[body], lw[body])  # the body is the raw weights, bitwise
    assert not torch.equal(fit.log_weights[tail], lw[tail])
    # capped at the largest raw weight, and still in the raw weights' order
    assert float(fit.log_weights.max()) <= float(lw.max())
    assert torch.equal(torch.argsort(fit.log_weights[tail]), torch.argsort(lw[tail]))


def _arviz():
    with warnings.catch_warnings():  # arviz announces its refactor on import
        warnings.simplefilter("ignore")
        return require("arviz")  # in the [dev] extra; CI must not skip


@pytest.mark.parametrize("n", [21, 100, 1000, S])
def test_khat_and_smoothed_weights_match_arviz(n):
    az = _arviz()
    rng = np.random.default_rng(n)
    cases = {
        "pareto 0.3": -0.3 * np.log(rng.uniform(size=n)),
        "pareto 1.1": -1.1 * np.log(rng.uniform(size=n)) + 40.0,
        "lognormal": 2.0 * rng.standard_normal(n) - 700.0,
        "uniform": np.log(rng.uniform(size=n)),
    }
    for name, lw in cases.items():
        smoothed, khat = az.psislw(lw.copy(), normalize=False)
        fit = psis(torch.from_numpy(lw))
        # the same formulas in float64 (arviz: numpy; ours: torch, a softmax for the grid
        # weights): measured within 2.5e-14 over these cases; 1e-10 leaves room for any BLAS
        assert fit.khat == pytest.approx(float(khat), abs=1e-10), name  # float64, see above
        # float64 rounding of the same smoothed tail, as above
        np.testing.assert_allclose(fit.log_weights.numpy(), smoothed, rtol=0, atol=1e-10)
