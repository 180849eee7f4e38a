"""Every basin estimate carries its Pareto k̂ and a verdict: on closed-form basins, through
the learning coefficient, the report and a save/load round trip (old files included)."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace

import pytest
import torch
from scipy import stats

from tyche.basin import BasinCurve, LearningCoefficient, VolumeResult, learning_coefficient
from tyche.basin.core import estimate_basin
from tyche.basin.options import BasinOptions
from tyche.basin.psis import ESTIMATE, LOWER_BOUND
from tyche.basin.report import Row, results_table, summary_rows

SLAB_CUTOFFS = [1e-10, 1e-8, 1e-6]


def slab(off: torch.Tensor) -> torch.Tensor:
    """K(w) = w₂² in D = 2 (w₁ flat): P(|w₂| < √ε) = erf(√(ε/2)), λ = 1/2."""
    return off.double()[:, 1] ** 2


def ball(off: torch.Tensor) -> torch.Tensor:
    """K = |δ|²: the region is the ball of radius √ε around the anchor."""
    return (off.double() ** 2).sum(-1)


@pytest.fixture(scope="module")
def slab_curve() -> BasinCurve:
    opts = BasinOptions(cutoffs=SLAB_CUTOFFS, sigma=1.0, n_samples=1000, seed=0)
    with warnings.catch_warnings():  # it warns "lower bound only", as the tests below check
        warnings.simplefilter("ignore")
        return estimate_basin(slab, torch.zeros(2, dtype=torch.float64), opts, progress=False)


def test_a_flat_direction_makes_a_lower_bound_not_an_estimate(slab_curve):
    """Rays see the slab's mass as ε/(2 sin²φ): weights with tail index 2, so the log-mean-exp
    of 1000 directions lies far below log P and its slope is 1, not λ = 1/2."""
    for res in slab_curve.results:
        truth = math.log(math.erf(math.sqrt(res.cutoff / 2)))
        assert res.verdict == LOWER_BOUND and res.is_lower_bound
        assert res.khat > 1.0  # measured 1.79 at every cutoff (the tail index is 2)
        assert res.log_prob < truth - 0.3  # measured 4.9, 2.6 and 0.36 nats below
        assert 0 < res.max_weight_share <= 1 and res.ess < 10
    lam = learning_coefficient(slab_curve)
    assert lam.value > 0.9  # measured 0.989: ray sampling's slope, not λ = 0.5
    assert lam.verdict == LOWER_BOUND and not lam.reliable and lam.interval is None
    assert lam.khats == slab_curve.khats
    text = lam.describe()
    assert "UNRELIABLE" in text and "not an interval covering λ" in text
    assert "bootstrap spread over directions" in text and "estimate" not in text
    row = summary_rows([Row("none", None, slab_curve, 1.0, lam)])[0]
    assert row["verdict"] == LOWER_BOUND and row["lambda_verdict"] == LOWER_BOUND
    assert row["lambda_ci"] is None and row["lambda_spread"] == [lam.ci_low, lam.ci_high]
    table = results_table([Row("none", None, slab_curve, 1.0, lam)], 2)
    body = [line for line in table.splitlines() if line.startswith("none ")]
    assert len(body) == 3 and all("lower bound only" in line for line in body)
    assert "lower bound only (Pareto k̂ ≥ 0.7)" in table and "ESS ≈ 1" not in table


def test_the_warning_names_the_verdict():
    opts = BasinOptions(cutoff=1e-8, sigma=1.0, n_samples=200, seed=0)
    with pytest.warns(UserWarning, match=r"Pareto k̂ \d\.\d\d: lower bound only: the weights'"):
        estimate_basin(slab, torch.zeros(2, dtype=torch.float64), opts, progress=False)
    with pytest.warns(UserWarning, match="10 samples are too few to see the weights' tail"):
        opts = BasinOptions(cutoff=1.0, sigma=1.0, n_samples=10)
        estimate_basin(ball, torch.ones(2, dtype=torch.float64), opts, progress=False)


def test_isotropic_quadratic_is_an_estimate_with_the_chi_square_mass():
    """Anchor at the prior's centre: every direction gives the same estimate (a flat tail,
    k̂ = −inf), and P = P(χ²₂ < ε) = 1 − exp(−ε/2)."""
    opts = BasinOptions(cutoffs=[1e-2, 1e-1, 1.0], sigma=1.0, n_samples=1000, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an estimate: no lower-bound warning
        curve = estimate_basin(ball, torch.zeros(2, dtype=torch.float64), opts, progress=False)
    for res in curve.results:
        assert res.khat == -math.inf and res.verdict == ESTIMATE
        # the radius search stops within rtol 1e-2 of the cutoff: D·rtol/2 = 1e-2 nats
        assert res.log_prob == pytest.approx(math.log(-math.expm1(-res.cutoff / 2)), abs=1e-2)
    assert learning_coefficient(curve).verdict == ESTIMATE


@pytest.mark.parametrize("cutoff", [0.1, 1.0])
def test_off_centre_quadratic_is_an_estimate_with_the_noncentral_mass(cutoff):
    """Anchor θ = (1, ½) off the prior's centre: the weights vary but are bounded (k̂ < 0),
    and P = P(χ²₂(|θ|²) < ε), the noncentral chi-square CDF."""
    theta = torch.tensor([1.0, 0.5], dtype=torch.float64)
    opts = BasinOptions(cutoff=cutoff, sigma=1.0, n_samples=2000, seed=0)
    res = estimate_basin(ball, theta, opts, progress=False)
    assert res.verdict == ESTIMATE and res.khat < 0  # measured −1.61
    truth = math.log(stats.ncx2.cdf(cutoff, df=2, nc=float(theta @ theta)))
    w = (res.estimates - res.estimates.max()).exp()
    se = float(w.std() / (w.mean() * math.sqrt(w.numel())))  # delta-method s.e. (nats)
    # Monte Carlo over 2000 directions: 4 standard errors (measured 0.9 and 0.75) plus the
    # search's rtol 1e-2 on a radius, D·rtol/2 = 1e-2 nats
    assert res.log_prob == pytest.approx(truth, abs=4 * se + 1e-2)  # tolerance derived above
    assert res.interval()[0] <= res.log_prob <= res.interval()[1]


def test_diagnostics_save_load_and_old_results_still_load(slab_curve, tmp_path):
    res = slab_curve[0]
    folder = res.save(tmp_path / "new")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["fields"]["verdict"] == LOWER_BOUND
    assert meta["fields"]["khat"] == res.khat  # in the JSON, readable without torch
    back = VolumeResult.load(folder)
    assert (back.khat, back.ess, back.max_weight_share, back.verdict) == (
        res.khat, res.ess, res.max_weight_share, res.verdict)  # fmt: skip
    # a result saved before the diagnostics existed: computed from its estimates on load
    for name in ("khat", "ess", "max_weight_share", "verdict"):
        del meta["fields"][name]
    (folder / "meta.json").write_text(json.dumps(meta))
    old = VolumeResult.load(folder)
    assert (old.khat, old.verdict) == (res.khat, res.verdict)
    # ±inf k̂ round-trips too (tagged floats in meta.json)
    equal = replace(res, estimates=torch.zeros(30, dtype=torch.float64))
    flat = VolumeResult.load(equal.save(tmp_path / "flat"))
    assert flat.khat == -math.inf and flat.verdict == ESTIMATE

    lam = learning_coefficient(slab_curve)
    lam_back = LearningCoefficient.load(lam.save(tmp_path / "lam"))
    assert (lam_back.khats, lam_back.verdict) == (lam.khats, lam.verdict)
    meta = json.loads((tmp_path / "lam" / "meta.json").read_text())
    for name in ("khats", "verdict"):
        del meta["fields"][name]
    (tmp_path / "lam" / "meta.json").write_text(json.dumps(meta))
    old_lam = LearningCoefficient.load(tmp_path / "lam")
    assert old_lam.verdict is None and old_lam.interval is None
    assert "no k̂ recorded" in old_lam.describe()


def quantile_curve(xis: list[float], cutoffs: list[float], n: int = 1000) -> BasinCurve:
    """A curve whose column k holds log w = −ξ_k log p + 2 ln ε_k at the n Pareto quantiles
    p = (i + ½)/n: a tail of index ξ_k without sampling noise, and a slope of 2."""
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    est = torch.stack([-xi * torch.log(p) + 2 * math.log(c) for xi, c in zip(xis, cutoffs)], 1)
    ones = torch.ones_like(est)
    return BasinCurve(cutoffs=torch.tensor(cutoffs, dtype=torch.float64), estimates=est,
                      radii=ones, deltas=ones, props=torch.ones(n, dtype=torch.float64),
                      logabsint=est, n_evals=torch.ones(n, dtype=torch.long), sigma=1.0,
                      n_params=4, prior="uniform")  # fmt: skip


def test_a_noisy_cutoff_makes_a_noisy_lambda_with_an_interval():
    curve = quantile_curve([0.3, 0.6, 0.3], [1e-3, 1e-2, 1e-1])
    # exact quantiles: k̂ 0.32 and 0.58 (the GPD fit of a noiseless Pareto tail)
    assert curve.verdicts == (ESTIMATE, "noisy", ESTIMATE)
    lam = learning_coefficient(curve)
    assert lam.verdict == "noisy" and lam.reliable and lam.interval == (lam.ci_low, lam.ci_high)
    assert "UNRELIABLE" not in lam.describe() and ": noisy);" in lam.describe()
    table = results_table([Row("none", None, curve, 1.0, lam)], 4)
    assert "noisy: Pareto k̂ in [0.5, 0.7)" in table and "lower bound only" not in table
    row = summary_rows([Row("none", None, curve, 1.0, lam)])[1]
    assert row["verdict"] == "noisy" and row["lambda_ci"] == [lam.ci_low, lam.ci_high]
    assert row["khat"] == curve.khats[1] and row["lambda_khat"] == max(curve.khats)
