"""The exact prior masses of `tyche.basin.calibration` against oracles that share nothing
with its contour integral: closed forms (incomplete gamma, erf), a direct quadrature over
the region, the small-ε power series of P, Monte Carlo; the slope against a finite
difference and against a/2 + b/4; the loss, the suite and the input checks.

The promise is 1e-9 relative in ln P (absolute where |ln P| < 1); the contour route is
measured at < 1e-25 against the closed forms, so the tolerances below (1e-12) leave room
only for float64 rounding of the returned values and the oracles' own precision."""

from __future__ import annotations

import math

import mpmath as mp
import pytest
import torch

from tyche.basin import calibration
from tyche.basin.calibration import SUITE, SUITE_CUTOFFS, ExactCase
from tyche.basin.lambda_fit import _slope_intercept
from tyche.errors import InputError


def _rel(got: float, want: float) -> float:
    """The error measure of the promise: relative, absolute where |want| < 1."""
    return abs(got - want) / max(1.0, abs(want))


# ----------------------------------------------------------------------------- oracles
def _gamma_log_prob(a: int, cutoff: float, sigma: float) -> float:
    with mp.workdps(40):
        x = mp.mpf(cutoff) / (2 * mp.mpf(sigma) ** 2)
        return float(mp.log(mp.gammainc(mp.mpf(a) / 2, 0, x, regularized=True)))


def _erf_log_prob(cutoff: float, sigma: float) -> float:
    return math.log(math.erf(cutoff**0.25 / (sigma * math.sqrt(2))))


def _series_log_prob(a: int, b: int, cutoff: float, sigma: float, digits: int = 50) -> float:
    """ln P from its power series in √ε, term by term from the Gaussian's Taylor series.

    Per coordinate, E[e^(−s w⁴)] = s^(−¼) m(s^(−½)) with m(y) = Σ_n (−1)^n Γ((2n+1)/4)
    y^n / (n! (2σ²)^n) / (2σ√(2π)), and (1 + 2σ²s)^(−a/2) = (2σ²s)^(−a/2) (1 + y²/(2σ²))^(−a/2):
    so L(s) = (2σ²)^(−a/2) Σ_k c_k s^(−λ−1−k/2) and P(ε) = (2σ²)^(−a/2) Σ_k c_k
    ε^(λ+k/2) / Γ(λ+1+k/2), c the coefficients of (1 + y²/(2σ²))^(−a/2) m(y)^b (the b-th
    power by J. C. P. Miller's recurrence). Convergent for every ε; used where it does not
    cancel (small ε/σ²)."""
    with mp.workdps(digits):
        eps, sig2 = mp.mpf(cutoff), mp.mpf(sigma) ** 2
        lam = mp.mpf(a) / 2 + mp.mpf(b) / 4
        f = [mp.mpf(1)]  # m's coefficients over its first
        g = [mp.mpf(1)]  # (m / m_0)^b
        q = []  # (1 + y²/(2σ²))^(−a/2)
        total, quiet, k = mp.mpf(0), 0, 0
        while quiet < 4:
            if k:
                ratio = mp.gamma(mp.mpf(2 * k + 1) / 4) / mp.gamma(mp.mpf(2 * k - 1) / 4)
                f.append(-f[-1] * ratio / (k * 2 * sig2))
                g.append(mp.fsum(((b + 1) * j - k) * f[j] * g[k - j] for j in range(1, k + 1)) / k)
            q.append(mp.binomial(-mp.mpf(a) / 2, k // 2) / (2 * sig2) ** (k // 2) if k % 2 == 0
                     else mp.mpf(0))  # fmt: skip
            c = mp.fsum(q[j] * g[k - j] for j in range(0, k + 1, 2))
            term = c * mp.sqrt(eps) ** k / mp.gamma(lam + 1 + mp.mpf(k) / 2)
            total += term
            negligible = k > 4 and abs(term) < mp.mpf(10) ** (5 - digits) * abs(total)
            quiet = quiet + 1 if negligible else 0
            k += 1
            assert k < 2000, "the series oracle did not converge"
        m0 = mp.gamma(mp.mpf(1) / 4) / (2 * mp.sqrt(sig2) * mp.sqrt(2 * mp.pi))
        return float(mp.log((2 * sig2) ** (-mp.mpf(a) / 2) * m0**b * eps**lam * total))


def test_quartic_laplace_transform_is_the_bessel_closed_form():
    # M(s) = E[exp(−s w⁴)], w ~ N(0, σ²), by quadrature of its defining integral at complex s
    with mp.workdps(30):
        for s in (mp.mpf("0.3"), mp.mpc(2, 5), mp.mpc("1e-3", "-1e-2"), mp.mpc(40, 1)):
            for sig in (mp.mpf("0.1"), mp.mpf(1), mp.mpf(3)):

                def density(x, s=s, sig=sig):
                    return mp.exp(-s * x**4 - x**2 / (2 * sig**2))

                want = 2 * mp.quad(density, [0, sig, 5 * sig, mp.inf]) / (sig * mp.sqrt(2 * mp.pi))
                got = mp.exp(calibration._log_m(s, sig**2))
                # both at 30 digits; measured 1e-27 at worst
                assert abs(got - want) <= mp.mpf("1e-20") * abs(want), (s, sig)


# ----------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("a", [1, 2, 7, 50, 1000])
def test_quadratic_cases_equal_the_incomplete_gamma(a):
    case = ExactCase(quadratic=a, flat=3)
    for cutoff in (1e-14, 1e-6, 0.3, 10.0):
        for sigma in (0.1, 1.0, 10.0):
            want = _gamma_log_prob(a, cutoff, sigma)
            # the public value (which takes the incomplete gamma) and the contour integral
            # (which is the general route, not a closed form): the promise is 1e-9, measured
            # < 1e-25; 1e-12 leaves float64 rounding only
            assert _rel(case.log_prob(cutoff, sigma), want) <= 1e-12, (cutoff, sigma)
            log_p, slope = calibration._contour(a, 0, cutoff, sigma)
            assert _rel(log_p, want) <= 1e-12, (cutoff, sigma)
            assert slope == pytest.approx(case.slope(cutoff, sigma), rel=1e-11, abs=1e-15)  # idem


def test_one_quartic_coordinate_equals_erf():
    case = ExactCase(quartic=1, flat=2)
    for cutoff in (1e-14, 1e-8, 1e-3, 0.5, 10.0):
        for sigma in (0.1, 0.5, 1.0, 10.0):
            want = _erf_log_prob(cutoff, sigma)
            # math.erf is double precision (~1e-16), the contour < 1e-25: float rounding only
            assert _rel(case.log_prob(cutoff, sigma), want) <= 1e-12
            log_p, slope = calibration._contour(0, 1, cutoff, sigma)
            assert _rel(log_p, want) <= 1e-12
            u = cutoff**0.25 / (sigma * math.sqrt(2))
            want_slope = u * math.exp(-(u**2)) / (2 * math.sqrt(math.pi) * math.erf(u))
            # the slope's closed form u e^(−u²) / (2√π erf u), u = ε^¼/(σ√2), against the
            # contour's density and the public value: 1e-11 relative for float rounding
            # (absolute 1e-15 where P ≈ 1 and the slope is below 1e-60)
            assert slope == pytest.approx(want_slope, rel=1e-11, abs=1e-15)
            # the same tolerance: the public value takes the closed form at 30 digits
            assert case.slope(cutoff, sigma) == pytest.approx(want_slope, rel=1e-11, abs=1e-15)


# ----------------------------------------------------------------------------- quadrature
def _quadrature_log_prob(a: int, b: int, cutoff: float, sigma: float) -> float:
    """ln P by mpmath.quad over the quartic coordinate y, the rest in closed form given y:
    (1, 1): P(x² < ε − y⁴) = erf(√((ε − y⁴)/(2σ²))); (0, 2): P(x⁴ < ε − y⁴) = erf((ε −
    y⁴)^¼/(σ√2)); (2, 1): P(σ²χ²₂ < ε − y⁴) = 1 − exp(−(ε − y⁴)/(2σ²))."""
    with mp.workdps(30):
        eps, sig = mp.mpf(cutoff), mp.mpf(sigma)

        def rest(y):
            left = max(eps - y**4, 0)  # the rounded edge may overshoot ε by an ulp
            if (a, b) == (1, 1):
                return mp.erf(mp.sqrt(left / (2 * sig**2)))
            if (a, b) == (0, 2):
                return mp.erf(mp.root(left, 4) / (sig * mp.sqrt(2)))
            return -mp.expm1(-left / (2 * sig**2))

        def integrand(y):
            return mp.exp(-(y**2) / (2 * sig**2)) / (sig * mp.sqrt(2 * mp.pi)) * rest(y)

        edge = mp.root(eps, 4)
        return float(mp.log(2 * mp.quad(integrand, [0, edge / 2, edge])))


@pytest.mark.parametrize("a, b", [(1, 1), (0, 2), (2, 1)])
@pytest.mark.parametrize("cutoff, sigma", [(1e-3, 1.0), (0.5, 1.0), (0.5, 0.5), (1e-3, 3.0)])
def test_small_cases_equal_a_direct_quadrature(a, b, cutoff, sigma):
    want = _quadrature_log_prob(a, b, cutoff, sigma)
    # tanh-sinh at 30 digits on the boundary's square-root singularity: measured ~1e-20 off
    # the contour; 1e-12 is float rounding plus margin (the promise is 1e-9)
    assert _rel(ExactCase(quadratic=a, quartic=b).log_prob(cutoff, sigma), want) <= 1e-12


# ----------------------------------------------------------------------------- power series
@pytest.mark.parametrize("case", [c for c in SUITE if c.quartic > 1 or c.quartic and c.quadratic],
                         ids=lambda c: c.name)  # fmt: skip
def test_suite_equals_the_power_series(case):
    a, b = case.quadratic, case.quartic
    for cutoff in (1e-14, *SUITE_CUTOFFS, 1e-3):
        want = _series_log_prob(a, b, cutoff, 1.0)
        # the series at 50 digits, no cancellation at these cutoffs: float rounding only
        assert _rel(case.log_prob(cutoff), want) <= 1e-12, cutoff


@pytest.mark.parametrize("a, b, cutoff, sigma", [
    (1000, 1000, 1e-14, 10.0), (1000, 1000, 1e-6, 1.0), (0, 1000, 1e-8, 0.1),
    (1, 1000, 1e-3, 1.0), (1000, 1, 0.1, 10.0), (3, 4, 1.0, 1.0),
])  # fmt: skip
def test_extreme_cases_equal_the_power_series(a, b, cutoff, sigma):
    # ln P down to −3.4e4 (D = 2000, the largest in the promised range): same 1e-12
    want = _series_log_prob(a, b, cutoff, sigma, digits=60)
    assert _rel(ExactCase(quadratic=a, quartic=b).log_prob(cutoff, sigma), want) <= 1e-12


@pytest.mark.parametrize("a, b, cutoff, sigma", [
    (1000, 1000, 10.0, 0.1), (1000, 10, 10.0, 0.1), (10, 1000, 1.0, 0.1), (50, 50, 0.5, 0.1),
])  # fmt: skip
def test_large_cutoffs_agree_across_contours(a, b, cutoff, sigma):
    # where the series cancels (ε/σ² up to 1000, P from 1e-5 to ≈ 1): the same integral on
    # hyperbolas of other angles (other nodes, other distances from −1/(2σ²)) agrees to the
    # trapezoid's stopping tolerance, 1e-13 (measured < 1e-25 over a grid of 1,300 cases)
    want = calibration._contour(a, b, cutoff, sigma)
    saved = calibration.ALPHA
    try:
        for alpha in (0.5, 1.1):
            calibration.ALPHA = alpha
            log_p, slope = calibration._contour(a, b, cutoff, sigma)
            assert _rel(log_p, want[0]) <= 1e-12
            assert slope == pytest.approx(want[1], rel=1e-11, abs=1e-15)  # same tolerance
    finally:
        calibration.ALPHA = saved


# ----------------------------------------------------------------------------- Monte Carlo
@pytest.mark.parametrize("case, cutoff, sigma, n", [
    (ExactCase(quadratic=2, quartic=2, flat=1), 1.0, 1.0, 1_000_000),
    (ExactCase(quadratic=50, quartic=50), 0.5, 0.1, 200_000),  # D = 100: fewer draws
])  # fmt: skip
def test_monte_carlo_agrees_at_a_large_cutoff(case, cutoff, sigma, n):
    g = torch.Generator().manual_seed(0)
    hits = 0
    for _ in range(10):
        w = sigma * torch.randn(n // 10, case.dim, generator=g, dtype=torch.float64)
        hits += int((case.loss(w) < cutoff).sum())
    p = hits / n
    se = math.sqrt(p * (1 - p) / n)
    assert 0.05 < p < 0.95  # a cutoff where the draws see the mass (and the test can fail)
    # Monte Carlo: p̂ has standard error √(p(1−p)/n); 4 of them (a chance of 6e-5 per seed)
    assert math.exp(case.log_prob(cutoff, sigma)) == pytest.approx(p, abs=4 * se)


# ----------------------------------------------------------------------------- slopes
@pytest.mark.parametrize("case", [ExactCase(3, 2, 4), ExactCase(10, 90), ExactCase(0, 5)],
                         ids=lambda c: c.name)  # fmt: skip
def test_slope_is_the_derivative_of_log_prob(case):
    h = 1e-3
    for cutoff, sigma in ((1e-8, 1.0), (1e-3, 1.0), (0.5, 2.0), (3.0, 1.0)):
        up = case.log_prob(cutoff * math.exp(h), sigma)
        down = case.log_prob(cutoff * math.exp(-h), sigma)
        central = (up - down) / (2 * h)
        # central difference: truncation h²/6 · d³ln P/d(ln ε)³ (≲ 1e-7 here) and rounding
        # 1e-16 · |ln P| / h (≲ 1e-10): 1e-6 relative
        assert case.slope(cutoff, sigma) == pytest.approx(central, rel=1e-6), (cutoff, sigma)


@pytest.mark.parametrize("a, b", [(3, 2), (1, 1), (0, 2), (2, 1), (5, 5)])
def test_slope_tends_to_the_learning_coefficient(a, b):
    case = ExactCase(quadratic=a, quartic=b)
    lam = case.asymptotic_lambda
    assert lam == a / 2 + b / 4  # same path: the definition, exact in binary
    # the first correction to the slope comes from the quartic coordinates' Gaussian factor
    # and is of order √ε (relative ≈ 3e-7 at 1e-12 for the worst of these, (0, 2); the
    # quadratic ones' is of order ε): 1e-5 relative at 1e-12, and it shrinks as √ε
    assert case.slope(1e-12) == pytest.approx(lam, rel=1e-5)
    near, far = abs(case.slope(1e-12) - lam), abs(case.slope(1e-8) - lam)
    assert 50 < far / near < 200  # √(1e4) = 100: the √ε law of the correction


def test_fitted_slope_is_the_line_learning_coefficient_fits():
    case = ExactCase(quadratic=5, quartic=5, flat=90)
    cutoffs = [1e-6, 1e-8, 1e-7, 1e-5, 1e-4]  # unsorted, more than three
    smallest = sorted(cutoffs)[:3]
    x = torch.tensor(smallest, dtype=torch.float64).log()
    y = torch.tensor([case.log_prob(c) for c in smallest], dtype=torch.float64)
    want, _ = _slope_intercept(x, y)
    # learning_coefficient's own least squares (torch, float64) on the three smallest
    # cutoffs, against ours in Python floats: summation order only, 1e-12
    assert case.fitted_slope(cutoffs) == pytest.approx(float(want), rel=1e-12)
    reordered = case.fitted_slope(SUITE_CUTOFFS)
    assert case.fitted_slope(cutoffs) == pytest.approx(reordered, rel=1e-15)  # same cutoffs
    # all five when asked: flatter than the three smallest (the slope falls as ε grows)
    assert case.fitted_slope(cutoffs, n_points=5) < case.fitted_slope(cutoffs)
    # the exact slope at the fitted cutoffs lies between the local slopes at their ends
    assert case.slope(1e-6) < case.fitted_slope(SUITE_CUTOFFS) < case.slope(1e-8)
    with pytest.raises(InputError, match="two distinct cutoffs"):
        case.fitted_slope([1e-6, 1e-6])
    with pytest.raises(InputError, match="n_points"):
        case.fitted_slope(cutoffs, n_points=1)


# ----------------------------------------------------------------------------- the loss
def test_loss_on_a_hand_made_batch():
    case = ExactCase(quadratic=2, quartic=1, flat=2)
    offsets = torch.tensor([[1.0, 2.0, 3.0, 7.0, -9.0], [0.5, 0.0, -2.0, 0.0, 0.0],
                            [0.0, 0.0, 0.0, 1e3, 1e3]], dtype=torch.float32)  # fmt: skip
    out = case.loss(offsets)
    assert out.dtype == torch.float64 and out.shape == (3,)
    # same path: small dyadic numbers, exact in float64 whatever the order of the sums
    assert out.tolist() == [1 + 4 + 81, 0.25 + 16, 0.0]
    moved = offsets.clone()
    moved[:, 3:] = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(case.loss(moved), out)  # the flat coordinates are ignored exactly
    assert torch.equal(case.anchor(torch.float32), torch.zeros(5))
    assert case.anchor().dtype == torch.float64 and case.dim == 5


def test_bad_input_raises():
    case = ExactCase(quadratic=1, quartic=1, flat=1)
    for bad in (torch.zeros(3), torch.zeros(2, 4), torch.zeros(2, 3, 1)):
        with pytest.raises(InputError, match=r"shape \(B, 3\)"):
            case.loss(bad)
    with pytest.raises(InputError, match="torch.Tensor"):
        case.loss([[0.0, 0.0, 0.0]])
    for bad in (0.0, -1.0, math.nan, math.inf, "1e-3", True):
        with pytest.raises(InputError, match="cutoff must be a positive"):
            case.log_prob(bad)
    with pytest.raises(InputError, match="sigma must be a positive"):
        case.slope(1e-3, sigma=0.0)
    with pytest.raises(InputError, match="quadratic or quartic"):
        ExactCase(flat=3)
    for kwargs in ({"quadratic": -1}, {"quartic": 1.5}, {"flat": True}):
        with pytest.raises(InputError, match="integer >= 0"):
            ExactCase(**{"quadratic": 1, **kwargs})


# ----------------------------------------------------------------------------- the suite
def test_the_suite():
    want = [(1, 0, 1), (2, 0, 8), (10, 0, 90), (50, 0, 950), (0, 1, 1), (0, 5, 5), (0, 10, 90),
            (0, 50, 950), (50, 50, 0), (10, 90, 0), (90, 10, 0), (5, 5, 90)]  # fmt: skip
    assert [(c.quadratic, c.quartic, c.flat) for c in SUITE] == want
    assert SUITE_CUTOFFS == (1e-8, 1e-7, 1e-6)
    assert len({c.name for c in SUITE}) == len(SUITE)
    assert ExactCase(2, 3, 5).name == "2 quadratic + 3 quartic + 5 flat"
    assert SUITE[0].name == "1 quadratic + 1 flat"
    # σ = 1 at 1e-8 for K = w²: ln erf(√(ε/2)); float rounding of the closed form only
    assert SUITE[0].log_prob(1e-8) == pytest.approx(math.log(math.erf(math.sqrt(5e-9))),
                                                    rel=1e-12)  # fmt: skip


def test_values_are_cached():
    case = ExactCase(quadratic=3, quartic=3)
    case.log_prob(2e-5)
    hits = calibration._exact.cache_info().hits
    case.log_prob(2e-5)
    case.slope(2e-5)
    assert calibration._exact.cache_info().hits == hits + 2
