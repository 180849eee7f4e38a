"""The cutoff curve from one search per direction, and the learning coefficient λ fitted to it."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from tyche.basin import BasinCurve, learning_coefficient
from tyche.basin.core import estimate_basin
from tyche.basin.options import BasinOptions
from tyche.basin.result import VolumeResult

CUTOFFS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]  # 5 cutoffs over 4 decades
RTOL = 1e-2


def mixed_loss(dim: int, seed: int = 0):
    """½ Σ k_i δ_i² + Σ q_i δ_i⁴ (+ a cubic), curvatures spread over decades: log-log slopes
    of Δ along a ray between 2 and 4, changing with the radius."""
    g = torch.Generator().manual_seed(seed)
    k = torch.logspace(-1, 1, dim, dtype=torch.float64)[torch.randperm(dim, generator=g)]
    q = torch.rand(dim, generator=g, dtype=torch.float64)

    def loss(off: torch.Tensor) -> torch.Tensor:
        x = off.double()
        return 0.5 * (k * x * x).sum(-1) + (q * x**4).sum(-1) + 0.05 * (k * x**3).sum(-1).abs()

    return loss


def poly_loss(a: int, b: int):
    """Σ_{i<a} δ_i² + Σ_{i≥a} δ_i⁴: the volume of {L < ε} scales exactly as ε^(a/2 + b/4)."""

    def loss(off: torch.Tensor) -> torch.Tensor:
        x = off.double()
        return (x[:, :a] ** 2).sum(-1) + (x[:, a:] ** 4).sum(-1)

    return loss


def test_curve_matches_separate_single_cutoff_runs_and_costs_less():
    dim, n = 40, 24
    loss, anchor = mixed_loss(dim), torch.zeros(dim, dtype=torch.float64)
    kw = dict(n_samples=n, prior="uniform", rtol=RTOL, seed=1)
    curve = estimate_basin(loss, anchor, BasinOptions(cutoffs=CUTOFFS, **kw), progress=False)
    assert isinstance(curve, BasinCurve) and len(curve) == 5
    # Δ within ±rtol of c in both runs and a log-log slope ≥ 2 between them put the two
    # radii within ((1+rtol)/(1−rtol))^(1/2) of each other, the estimates within D times
    # the log of that (uniform prior: est = log V_D + D log R)
    radius_bound = math.sqrt((1 + RTOL) / (1 - RTOL))
    single_evals = 0
    for k, c in enumerate(CUTOFFS):
        single = estimate_basin(loss, anchor, BasinOptions(cutoff=c, **kw), progress=False)
        single_evals += int(single.n_evals.sum())
        res = curve[k]
        assert res.cutoff == c and isinstance(res, VolumeResult)
        assert ((res.deltas - c).abs() <= RTOL * c).all()
        assert ((single.deltas - c).abs() <= RTOL * c).all()
        ratio = res.radii / single.radii
        assert ((ratio <= radius_bound) & (ratio >= 1 / radius_bound)).all(), ratio
        assert abs(res.log_prob - single.log_prob) <= dim * math.log(radius_bound)
        # exact: the same seeded directions through the same row-wise ops in both runs
        assert torch.equal(res.props, single.props)
    curve_evals = int(curve.n_evals.sum())
    print(f"\n5 cutoffs: {curve_evals / n:.2f} evaluations/direction; 5 separate searches: "
          f"{single_evals / n:.2f} ({single_evals / 5 / n:.2f} each)")  # fmt: skip
    assert curve_evals < single_evals
    # radii grow with the cutoff along every direction
    assert (curve.radii[:, 1:] > curve.radii[:, :-1]).all()


@pytest.mark.parametrize("a,b", [(30, 0), (0, 30)])
def test_power_law_rays_cost_one_evaluation_per_cutoff(a, b):
    """Along every ray of a pure quadratic or quartic, Δ is a power law; after the first
    cutoff the guide puts each next radius exactly on its band."""
    curve = estimate_basin(poly_loss(a, b), torch.zeros(a + b, dtype=torch.float64),
                           BasinOptions(cutoffs=CUTOFFS, n_samples=16),
                           progress=False)  # fmt: skip
    assert (curve.n_evals <= len(CUTOFFS) + 1).all(), curve.n_evals


def test_curve_is_batch_invariant_and_resumes(tmp_path):
    dim = 30
    loss, anchor = mixed_loss(dim, seed=3), torch.linspace(-1, 1, dim, dtype=torch.float64)
    opts = BasinOptions(cutoffs=[1e-3, 1e-2, 1e-1], n_samples=9, seed=4)
    kw = dict(progress=False)
    one = estimate_basin(loss, anchor, replace(opts, batch_size=1), **kw)
    five = estimate_basin(loss, anchor, replace(opts, batch_size=5), **kw)
    # exact: as in test_basin_core's batch-size test, every direction's search sees only its
    # own rows, the loss is row-wise (elementwise ops and per-row 30-term sums whose order does
    # not depend on the number of rows) and each radial integral is computed as if alone
    for field in ("estimates", "radii", "deltas", "props", "n_evals"):
        assert torch.equal(getattr(one, field), getattr(five, field)), field
    calls = []

    def flaky(off):
        calls.append(1)
        if len(calls) > 15:
            raise KeyboardInterrupt
        return loss(off)

    with pytest.raises(KeyboardInterrupt):
        estimate_basin(flaky, anchor, replace(opts, batch_size=2), checkpoint=tmp_path / "ck",
                       **kw)  # fmt: skip
    with pytest.raises(ValueError, match=r"cutoffs: saved \[0.001, 0.01, 0.1\], now \[0.01"):
        estimate_basin(loss, anchor, replace(opts, batch_size=2, cutoffs=[1e-2, 1e-1]),
                       checkpoint=tmp_path / "ck", resume=True, **kw)  # fmt: skip
    resumed = estimate_basin(loss, anchor, replace(opts, batch_size=2),
                             checkpoint=tmp_path / "ck", resume=True, **kw)  # fmt: skip
    # exact: saved float64 samples, the rest recomputed row-wise as above (batch 2 vs 1)
    assert torch.equal(resumed.estimates, one.estimates)
    assert torch.equal(resumed.n_evals, one.n_evals)


def test_basin_curve_saves_loads_and_indexes(tmp_path):
    curve = estimate_basin(poly_loss(6, 4), torch.zeros(10, dtype=torch.float64),
                           BasinOptions(cutoffs=[1e-1, 1e-3, 1e-2], n_samples=5),
                           progress=False)  # fmt: skip
    assert curve.cutoffs.tolist() == [1e-3, 1e-2, 1e-1]  # sorted
    back = BasinCurve.load(curve.save(tmp_path / "curve"))
    for field in ("cutoffs", "estimates", "radii", "deltas", "props", "logabsint", "n_evals"):
        assert torch.equal(getattr(back, field), getattr(curve, field))
    assert back.settings == curve.settings and back.n_params == 10
    assert curve.at(1e-2).cutoff == 1e-2 and torch.equal(curve.at(1e-2).radii, curve.radii[:, 1])
    # logsumexp over dim 0 of the (5, K) table vs each column alone: the reduction order may
    # differ; float64, 5 terms of |x| ≲ 10: ≲ 5·eps·10 ≈ 1e-14
    torch.testing.assert_close(
        curve.log_probs, torch.tensor([r.log_prob for r in curve.results], dtype=torch.float64),
        rtol=1e-12, atol=1e-12,
    )  # fmt: skip
    assert curve[-1].cutoff == 0.1 and curve[1].settings["cutoff"] == 1e-2
    res = VolumeResult.load(curve[0].save(tmp_path / "one"))
    assert torch.equal(res.estimates, curve.estimates[:, 0])
    with pytest.raises(KeyError, match="0.5 is not among"):
        curve.at(0.5)
    with pytest.raises(IndexError):
        curve[3]
    with pytest.raises(ValueError, match="either cutoff= .* or cutoffs="):
        BasinOptions(n_samples=2)
    with pytest.raises(ValueError, match="distinct"):
        BasinOptions(cutoffs=[0.1, 0.1], n_samples=2)
    with pytest.raises(ValueError, match="positive finite"):
        BasinOptions(cutoffs=[0.1, -1.0], n_samples=2)


# ----------------------------------------------------------------------------- λ
LAMBDA_CUTOFFS = [1e-8, 1e-7, 1e-6, 1e-5, 1e-4]


@pytest.mark.parametrize("a,b", [(100, 0), (0, 100)])
@pytest.mark.parametrize("prior", ["uniform", "gaussian"])
def test_learning_coefficient_of_exact_cases(a, b, prior):
    """Pure quadratic (λ = D/2) and pure quartic (λ = D/4): every ray scales the same way,
    so the sampled estimate is exact; the fit must land within 5% (it lands within rtol)."""
    truth = a / 2 + b / 4
    curve = estimate_basin(poly_loss(a, b), torch.zeros(a + b, dtype=torch.float64),
                           BasinOptions(cutoffs=LAMBDA_CUTOFFS, n_samples=64, prior=prior,
                                        sigma=1.0), progress=False)  # fmt: skip
    lam = learning_coefficient(curve)
    print(f"\n({a}, {b}) {prior}: {lam.describe()}")
    assert lam.value == pytest.approx(truth, rel=0.05)  # the 5% the docstring claims
    # radii are accurate to ±rtol/slope, so the fitted slope is within about 1%
    assert lam.value == pytest.approx(truth, rel=0.01)
    assert lam.ci_low <= lam.value <= lam.ci_high and lam.straight is True
    assert lam.cutoffs == tuple(LAMBDA_CUTOFFS[:3])
    # value / (D/2): the value's 1%
    assert lam.ratio_to_half_dimension == pytest.approx(truth / 50, rel=0.01)


def test_degenerate_minimum_is_the_known_limit_of_ray_sampling():
    """(a, b) = (50, 50): λ = 37.5. Along almost every ray the quadratic part dominates at
    small cutoffs, so naive sampling sees D/2 = 50. A Hessian-diagonal preconditioner
    stretches the quartic coordinates; its rays see the quartic part at large cutoffs and
    the quadratic part at small ones, so the local slope sweeps from D/4 towards D/2 and is
    37.5 only near the crossover, which the straightness check reports."""
    a = b = 50
    loss, anchor = poly_loss(a, b), torch.zeros(a + b, dtype=torch.float64)
    kw = dict(n_samples=128, prior="uniform")
    naive = learning_coefficient(
        estimate_basin(loss, anchor, BasinOptions(cutoffs=LAMBDA_CUTOFFS, **kw), progress=False)
    )
    # the radii's ±rtol/slope (default rtol 1e-2) as in the exact cases: within about 1%
    assert naive.value == pytest.approx(50.0, rel=0.01) and naive.straight
    hess = torch.cat([torch.full((a,), 2.0), torch.zeros(b)]).double()
    pre = 1.0 / (hess.sqrt() + 1e-2)  # diag_preconditioner(H, eps=1e-2, exponent=½)
    wide = [10.0**k for k in range(-14, -1, 2)]
    curve = estimate_basin(loss, anchor, BasinOptions(cutoffs=wide, **kw), preconditioner=pre,
                           progress=False)  # fmt: skip
    slopes = learning_coefficient(curve, n_points=len(wide)).local_slopes
    print("\nlocal slopes, 1e-14 → 1e-2:", " ".join(f"{s:.1f}" for s in slopes))
    assert slopes[0] == pytest.approx(50.0, rel=0.02)  # smallest cutoffs: quadratic again
    # largest cutoffs: the stretched quartic, D/4 = 25 (measured 24.80, a seeded sample); 10%
    # still tells it from λ = 37.5 and D/2 = 50
    assert slopes[-1] == pytest.approx(25.0, rel=0.1)
    mid = learning_coefficient(curve, n_points=3)
    assert mid.straight is True  # at 1e-14..1e-10 the quadratic has taken over
    across = learning_coefficient(
        estimate_basin(loss, anchor, BasinOptions(cutoffs=[1e-10, 1e-8, 1e-6], **kw),
                       preconditioner=pre, progress=False)  # fmt: skip
    )
    assert across.straight is False and "NOT YET STRAIGHT" in across.note


def _synthetic_curve(log_probs: list[list[float]], cutoffs: list[float]) -> BasinCurve:
    est = torch.tensor(log_probs, dtype=torch.float64)  # (n, K)
    n, k = est.shape
    ones = torch.ones(n, k, dtype=torch.float64)
    return BasinCurve(cutoffs=torch.tensor(cutoffs, dtype=torch.float64), estimates=est,
                      radii=ones, deltas=ones, props=torch.ones(n, dtype=torch.float64),
                      logabsint=est, n_evals=torch.ones(n, dtype=torch.long), sigma=1.0,
                      n_params=10, prior="uniform")  # fmt: skip


def test_straightness_and_the_fit_against_hand_computed_lines():
    cut = [1e-3, 1e-2, 1e-1]
    x = [math.log(c) for c in cut]
    straight = _synthetic_curve([[5 * v + 1 for v in x]] * 4, cut)
    lam = learning_coefficient(straight)
    # float64 least squares through 3 exact points (|x| ≤ 7, |y| ≤ 35): ≲ 10·eps·35 ≈ 1e-13
    assert lam.value == pytest.approx(5.0, rel=1e-12)
    assert lam.intercept == pytest.approx(1.0, rel=1e-12)  # float64, as the slope
    # every bootstrap row is the same exact line: its quantiles are the slope to float64
    assert lam.straight is True and lam.ci_low == pytest.approx(5.0, rel=1e-12)
    y1 = 5 * x[0] + 5 * (x[1] - x[0])
    bent = _synthetic_curve([[5 * x[0], y1, y1 + 3 * (x[2] - x[1])]] * 4, cut)
    lam = learning_coefficient(bent)
    # one float64 difference quotient each (|y| ≤ 35, Δx ≈ 2.3): ≲ 4·eps·35/2.3 ≈ 1e-14
    assert lam.local_slopes == pytest.approx((5.0, 3.0), rel=1e-12) and lam.straight is False
    # least squares through three points, by hand: slope = Σ(x−x̄)(y−ȳ)/Σ(x−x̄)²
    ys = bent.log_probs.tolist()
    xm, ym = sum(x) / 3, sum(ys) / 3
    slope = sum((a - xm) * (b - ym) for a, b in zip(x, ys)) / sum((a - xm) ** 2 for a in x)
    # torch's sums vs Python's of the same 3 points, float64: ≲ 10·eps·35 ≈ 1e-13
    assert lam.value == pytest.approx(slope, rel=1e-12)
    two = learning_coefficient(_synthetic_curve([[1.0, 2.0]] * 3, cut[:2]))
    assert two.straight is None and "untested" in two.note
    with pytest.raises(ValueError, match="at least two cutoffs"):
        learning_coefficient(_synthetic_curve([[1.0]] * 3, cut[:1]))
    with pytest.raises(ValueError, match="n_points"):
        learning_coefficient(straight, n_points=1)
    with pytest.raises(TypeError, match="BasinCurve"):
        learning_coefficient(straight[0])
