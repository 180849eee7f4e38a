"""Tests of tyche.basin.radial against mpmath, closed forms, probability oracles and invariances."""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
import torch
from scipy import special, stats

from tyche.basin.radial import (
    log_gaussian_ray_mass,
    log_radial_integral,
    log_uniform_ray_volume,
    log_unit_ball_volume,
    log_unit_sphere_area,
)

INF = math.inf


def spec_tolerance(value: float) -> float:
    """The accuracy contract: 1e-12 relative, 1e-9 absolute where |value| < 1e3."""
    return max(1e-12 * abs(value), 1e-9)


def mp_log_radial(n_dim: float, a: float, b: float, upper: float, dps: int = 30) -> mp.mpf:
    """Reference log ∫_0^upper r^(D-1) exp(-a r²/2 + b r) dr with mpmath (independent of the
    implementation: tanh-sinh in r itself, split at the r-space maximum m and at m ± w 2^k for
    the local scale w, stopping once the log-concave integrand has dropped by 90 nats)."""
    with mp.workdps(dps):
        d, a, b = mp.mpf(n_dim), mp.mpf(a), mp.mpf(b)
        unbounded = upper == INF
        big_r = mp.inf if unbounded else mp.mpf(upper)
        n = d - 1

        def g(r):
            return (n * mp.log(r) if n else mp.mpf(0)) - a * r * r / 2 + b * r

        peak = (b + mp.sqrt(b * b + 4 * a * n)) / (2 * a) if n else max(b / a, mp.mpf(0))
        m = peak if unbounded or peak < big_r else big_r
        gm = g(m) if m > 0 else mp.mpf(0)
        w = 1 / mp.sqrt(a + (n / m**2 if n and m > 0 else 0))
        if m < peak:  # maximum on the boundary: the decay length is 1/slope
            w = min(w, 1 / ((n / m if n else 0) - a * m + b))
        points = [m]
        for sign in (-1, 1):
            step = w / 2
            while True:
                p = m + sign * step
                if p <= 0:
                    points.append(mp.mpf(0))
                    break
                if not unbounded and p >= big_r:
                    points.append(big_r)
                    break
                points.append(p)
                if g(p) - gm < -90:
                    break
                step *= 2
        points = sorted(set(points))

        def f(r):
            if r > 0:
                return mp.exp(g(r) - gm)
            return mp.exp(-gm) if n == 0 else mp.mpf(0)

        return gm + mp.log(mp.quad(f, points))


def r_space_peak(n_dim: float, a: float, b: float) -> float:
    """The maximiser of r^(D-1) exp(-a r²/2 + b r) (a scale 1/max(|b|, sqrt(a)) if it is 0)."""
    n = n_dim - 1
    peak = (b + math.sqrt(b * b + 4 * a * n)) / (2 * a) if n else max(b / a, 0.0)
    return peak if peak > 0 else 1.0 / max(abs(b), math.sqrt(a))


# The implementation's error is the rounding of the terms D log r, a r²/2, b r: at most 1/98
# of the contract on the grids here (measured alike under 1/2 threads and the generic
# kernels). Asserting 1/5 of the contract keeps 20× over that and still flags a loss of
# accuracy long before the contract is broken. (1/50 kept only 2×.)
MARGIN = 5.0


def assert_matches(ours: torch.Tensor, refs: list, label: str) -> None:
    for i, (o, r) in enumerate(zip(ours.tolist(), refs)):
        err = float(abs(mp.mpf(o) - r))
        tol = spec_tolerance(float(r)) / MARGIN
        assert err <= tol, f"{label}[{i}]: ours {o!r}, mpmath {r}, error {err} > {tol}"


# --------------------------------------------------------------------------------------------
# accuracy against mpmath


@pytest.mark.parametrize("n_dim", [1, 1.5, 2, 3, 10, 1e3, 1e6, 1e9])
def test_matches_mpmath_over_peak_shift_and_radius(n_dim):
    """b = β sqrt(aD) moves the peak far in both directions; R from far inside the peak
    (steep boundary layer) to beyond it and to infinity."""
    a = 1.0
    cases = []
    for beta in (-300.0, -3.0, 0.0, 3.0, 300.0):
        b = beta * math.sqrt(a * n_dim)
        peak = r_space_peak(n_dim, a, b)
        for factor in (1e-3, 0.5, 1.0, 2.0, INF):
            cases.append((b, peak * factor))
    bs = torch.tensor([c[0] for c in cases], dtype=torch.float64)
    rs = torch.tensor([c[1] for c in cases], dtype=torch.float64)
    ours = log_radial_integral(n_dim, a, bs, 0.0, rs)
    assert ours.shape == (len(cases),) and ours.dtype == torch.float64
    assert_matches(ours, [mp_log_radial(n_dim, a, b, r) for b, r in cases], f"D={n_dim}")


@pytest.mark.parametrize("a", [1e-8, 1e-2, 1e4, 1e9])
def test_matches_mpmath_over_curvature_decades(a):
    cases = []
    for n_dim in (2, 1e4):
        for beta in (-30.0, 30.0):
            b = beta * math.sqrt(a * n_dim)
            peak = r_space_peak(n_dim, a, b)
            for factor in (0.1, 1.3, INF):
                cases.append((n_dim, b, peak * factor))
    t = lambda k: torch.tensor([c[k] for c in cases], dtype=torch.float64)  # noqa: E731
    ours = log_radial_integral(t(0), a, t(1), 0.0, t(2))
    assert_matches(ours, [mp_log_radial(d, a, b, r) for d, b, r in cases], f"a={a}")


def test_matches_mpmath_across_the_peak_switch():
    """Radii on both sides of r* (where the quadrature switches from a boundary maximum to an
    interior one) and a peak near 0 (b ≪ 0, small D)."""
    cases = []
    for n_dim, b in ((1, 2.0), (2, -40.0), (7, 0.3), (5e5, -2e3)):
        r_star = (b + math.sqrt(b * b + 4 * n_dim)) / 2  # maximiser of r^D exp(-r²/2 + b r)
        for factor in (1 - 1e-9, 1.0, 1 + 1e-9, 1 - 1e-3, 1 + 1e-3):
            cases.append((n_dim, b, r_star * factor))
    t = lambda k: torch.tensor([c[k] for c in cases], dtype=torch.float64)  # noqa: E731
    ours = log_radial_integral(t(0), 1.0, t(1), 0.0, t(2))
    assert_matches(ours, [mp_log_radial(d, 1.0, b, r) for d, b, r in cases], "switch")


def test_basin_use_case_matches_mpmath():
    """a = 1/σ², b = -(v̂·θ)/σ², c = -|θ|²/(2σ²) with |θ| = σ sqrt(D) (σ = RMS of θ)."""
    sigma = 0.03
    cases = []
    for n_dim in (1e4, 1e6, 3e7):
        theta_sq = n_dim * sigma**2
        shell = sigma * math.sqrt(n_dim)
        for dot in (-3 * sigma, 3 * sigma, 0.5 * math.sqrt(theta_sq)):
            for radius in (0.01 * shell, 0.7 * shell, INF):
                cases.append((n_dim, dot, theta_sq, radius))
    t = lambda k: torch.tensor([c[k] for c in cases], dtype=torch.float64)  # noqa: E731
    a = 1 / sigma**2
    ours = log_radial_integral(t(0), a, -t(1) * a, -t(2) * a / 2, t(3))
    refs = [mp_log_radial(d, a, -dot * a, r) - mp.mpf(sq) * a / 2 for d, dot, sq, r in cases]
    assert_matches(ours, refs, "basin")


def test_reference_helper_agrees_with_closed_forms():
    """The mpmath helper itself against the incomplete gamma (b = 0) and parabolic cylinder
    (R = ∞) closed forms, so that the grids above test against a trusted oracle."""
    with mp.workdps(30):
        for n_dim, a, upper in ((1, 2.0, 0.3), (2.5, 0.5, 4.0), (40, 3.0, 2.0), (1e3, 1.0, 25.0)):
            d = mp.mpf(n_dim)
            exact = (
                mp.log(mp.mpf(1) / 2)
                + d / 2 * mp.log(2 / mp.mpf(a))
                + mp.log(mp.gammainc(d / 2, 0, mp.mpf(a) * mp.mpf(upper) ** 2 / 2))
            )
            # 30-digit arithmetic on both sides (no float64): 1e-20 is far above tanh-sinh's
            # error at 30 digits and 1e4× below the float64 accuracy the oracle must have
            assert abs(mp_log_radial(n_dim, a, 0.0, upper) - exact) < 1e-20 * (1 + abs(exact))
        for n_dim, a, b in ((1, 1.0, -2.0), (3, 2.0, 5.0), (20, 0.5, -3.0)):
            d, a_, b_ = mp.mpf(n_dim), mp.mpf(a), mp.mpf(b)
            exact = mp.log(
                a_ ** (-d / 2)
                * mp.gamma(d)
                * mp.exp(b_**2 / (4 * a_))
                * mp.pcfd(-d, -b_ / mp.sqrt(a_))
            )
            assert abs(mp_log_radial(n_dim, a, b, INF) - exact) < 1e-20 * (1 + abs(exact))  # same


# --------------------------------------------------------------------------------------------
# closed forms (no quadrature)


def test_b_zero_closed_forms():
    """b = 0: R = ∞ gives ½ (2/a)^(D/2) Γ(D/2); finite R the lower incomplete gamma."""
    dims = torch.tensor([1, 1.5, 2, 3, 10, 1e3, 1e5, 1e7, 1e9], dtype=torch.float64)
    for a in (1e-6, 1.0, 1e6):
        ours = log_radial_integral(dims, a, 0.0, 0.0, INF)
        exact = math.log(0.5) + dims / 2 * math.log(2 / a) + torch.lgamma(dims / 2)
        # float64 sums of 3 terms up to ~1e10 (D = 1e9): a few eps of the largest term, ≤ 1e-14
        # relative; measured within 1/15 of this tolerance (1/2 threads, generic kernels)
        torch.testing.assert_close(ours, exact, rtol=1e-14, atol=1e-12)
    with mp.workdps(30):
        for n_dim in (1, 2, 3.5, 50, 1e3):
            for x in (1e-4, 0.3, 1.0, 3.0):  # R = x · sqrt((D-1)/a) or x/sqrt(a)
                a = 7.0
                upper = x * math.sqrt(max(n_dim - 1, 1) / a)
                d = mp.mpf(n_dim)
                exact = (
                    mp.log(mp.mpf(1) / 2)
                    + d / 2 * mp.log(2 / mp.mpf(a))
                    + mp.log(mp.gammainc(d / 2, 0, mp.mpf(a) * mp.mpf(upper) ** 2 / 2))
                )
                ours = float(log_radial_integral(n_dim, a, 0.0, 0.0, upper))
                # the accuracy contract against 30 digits; measured within 1/4000 of it
                assert abs(ours - float(exact)) <= spec_tolerance(float(exact))


def test_one_dimension_is_a_gaussian_cdf():
    """D = 1: ∫_0^R exp(-a r²/2 + b r) dr = sqrt(π/(2a)) e^{b²/(2a)} [erf(.) - erf(.)]."""
    rng = np.random.default_rng(0)
    a = 10 ** rng.uniform(-3, 3, 64)
    b = rng.choice([-1, 1], 64) * 10 ** rng.uniform(-2, 1.5, 64) * np.sqrt(a)
    upper = 10 ** rng.uniform(-2, 2, 64) / np.sqrt(a)
    ours = log_radial_integral(1, torch.tensor(a), torch.tensor(b), 0.0, torch.tensor(upper))
    with mp.workdps(40):
        for i in range(64):
            ai, bi, ri = mp.mpf(a[i]), mp.mpf(b[i]), mp.mpf(upper[i])
            s = mp.sqrt(ai / 2)
            lo, hi = -s * bi / ai, s * (ri - bi / ai)
            if lo > 0:  # both ends in the right tail: no cancellation with erfc
                diff = mp.erfc(lo) - mp.erfc(hi)
            elif hi < 0:
                diff = mp.erfc(-hi) - mp.erfc(-lo)
            else:
                diff = mp.erf(hi) - mp.erf(lo)
            exact = mp.log(diff * mp.sqrt(mp.pi / (2 * ai))) + bi**2 / (2 * ai)
            # the accuracy contract against 40 digits; measured within 1/30000 of it
            assert abs(float(ours[i]) - float(exact)) <= spec_tolerance(float(exact))


# --------------------------------------------------------------------------------------------
# invariances and properties


def random_parameters(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)  # noqa: E731
    n_dim = torch.where(u(0, 1) < 0.3, torch.ones(n, dtype=torch.float64), 10 ** u(0, 9)).round()
    a = 10 ** u(-6, 6)
    b = torch.sign(u(-1, 1)) * 10 ** u(-3, 3) * torch.sqrt(a * n_dim)
    upper = 10 ** u(-3, 2) * torch.sqrt(n_dim / a)
    return n_dim, a, b, upper


def test_c_shifts_the_result():
    n_dim, a, b, upper = random_parameters(200)
    c = torch.linspace(-1e6, 1e6, 200, dtype=torch.float64)
    base = log_radial_integral(n_dim, a, b, 0.0, upper)
    # c (|c| ≤ 1e6) is added inside and subtracted here: each rounding at that scale costs up
    # to ulp(1e6)/2 ≈ 6e-11; measured 4.7e-10 (4 ulps, generic kernels), 5.8e-11 (AVX2).
    # atol 1e-8 ≈ 45 eps·max|c| keeps 20×; a c that is dropped or doubled is off by up to 1e6
    torch.testing.assert_close(
        log_radial_integral(n_dim, a, b, c, upper) - c, base, rtol=1e-15, atol=1e-8
    )


def test_scaling_identity():
    """r = s t: I(a, b, R) = s^D I(a s², b s, R/s)."""
    n_dim, a, b, upper = random_parameters(300, seed=1)
    s = 10 ** (torch.linspace(-3, 3, 300, dtype=torch.float64))
    lhs = log_radial_integral(n_dim, a, b, 0.0, upper)
    rhs = n_dim * torch.log(s) + log_radial_integral(n_dim, a * s * s, b * s, 0.0, upper / s)
    # rounding of the terms of size D |log r| and D |log s| is the only allowed difference:
    # 1e-13 ≈ 450 eps of them; measured within 1/160 of these bounds (every setting)
    scale = lhs.abs() + (n_dim * torch.log(s)).abs()
    assert torch.all((lhs - rhs).abs() <= 1e-13 * scale + 1e-10)
    lhs_inf = log_radial_integral(n_dim, a, b, 0.0, INF)
    rhs_inf = n_dim * torch.log(s) + log_radial_integral(n_dim, a * s * s, b * s, 0.0, INF)
    assert torch.all((lhs_inf - rhs_inf).abs() <= 1e-13 * (lhs_inf.abs() + scale) + 1e-10)


@pytest.mark.parametrize("n_dim,b", [(1, -5.0), (1, 5.0), (2, -50.0), (100, 3.0), (1e8, -1e4)])
def test_monotone_in_radius_and_converges_to_infinite_radius(n_dim, b):
    peak = r_space_peak(n_dim, 1.0, b)
    radii = peak * torch.logspace(-4, 3, 400, dtype=torch.float64)
    values = log_radial_integral(n_dim, 1.0, b, 0.0, radii)
    assert torch.all(torch.isfinite(values))
    # non-decreasing up to rounding: 1e-15 relative ≈ 4.5 eps allows the last few bits of
    # neighbours that agree to float64 precision; measured: no decrease at all
    assert torch.all(torch.diff(values) >= -1e-15 * values.abs()[1:])
    assert torch.all(torch.diff(values[:100]) > 0)  # strictly increasing far inside the peak
    full = log_radial_integral(n_dim, 1.0, b, 0.0, INF)
    assert float(values.max()) <= float(full) + 1e-15 * abs(float(full))  # same 4.5 eps
    assert abs(float(values[-1]) - float(full)) <= spec_tolerance(float(full))


def test_finite_for_extreme_valid_inputs():
    g = torch.Generator().manual_seed(3)
    n = 20000
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)  # noqa: E731
    n_dim = 10 ** u(0, 12)
    n_dim[: n // 4] = 1.0
    a = 10 ** u(-30, 30)
    b = torch.sign(u(-1, 1)) * 10 ** u(-30, 30)
    upper = 10 ** u(-30, 30)
    upper[::7] = INF
    values = log_radial_integral(n_dim, a, b, 0.0, upper)
    assert torch.all(torch.isfinite(values))


def test_broadcasting_device_and_dtype():
    upper = torch.tensor([[0.5], [1.0], [INF]], dtype=torch.float32)
    b = torch.tensor([-1.0, 0.0, 2.0])
    out = log_radial_integral(3, 2.0, b, 0.0, upper)
    assert out.shape == (3, 3) and out.dtype == torch.float64 and out.device == upper.device
    alone = float(log_radial_integral(3, 2.0, 2.0, 0.0, 1.0))
    # the same element through a broadcast or alone: elementwise ops, measured identical;
    # 1e-15 (4.5 eps) would still flag a broadcast that pairs the wrong b and R
    assert float(out[1, 2]) == pytest.approx(alone, rel=1e-15)
    assert log_radial_integral(2, 1.0, 0.0, 0.0, 1.0).shape == ()
    assert log_radial_integral(2, 1.0, torch.empty(0), 0.0, 1.0).shape == (0,)
    bs = torch.linspace(-5, 5, 2500, dtype=torch.float64)
    many = log_radial_integral(50, 1.0, bs, 0.0, 3.0)  # more than one chunk
    one = log_radial_integral(50, 1.0, float(bs[1234]), 0.0, 3.0)
    # chunks are elementwise work, so the value should not move (measured identical); 1e-15
    # (4.5 eps) would still flag a chunk that sees another element's parameters
    assert float(many[1234]) == pytest.approx(float(one), rel=1e-15)


def _rays(n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """n rays (b, R): peaks moved both ways, radii far inside to far outside the peak, +inf."""
    b = torch.linspace(-300.0, 300.0, n, dtype=torch.float64)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    upper = torch.logspace(-1.5, 1.5, n, dtype=torch.float64)[order]
    upper[::4] = INF
    return b, upper


def newton_stops(monkeypatch, compute) -> list[torch.Tensor]:
    """Per call of the level-point search made by ``compute()``: the Newton iteration at which
    each (ray, level) element stops, (rays, levels), found by rerunning the search with fewer
    iterations (an element keeps its value from the iteration it stops at)."""
    import tyche.basin.radial as radial

    calls, search = [], radial._level_points
    monkeypatch.setattr(radial, "_level_points", lambda *args: calls.append(args) or search(*args))
    compute()
    monkeypatch.undo()
    steps = []
    for args in calls:
        final = search(*args)
        stop = torch.full(final.shape, radial._MAX_NEWTON_ITERS)
        for n in range(radial._MAX_NEWTON_ITERS - 1, 0, -1):
            monkeypatch.setattr(radial, "_MAX_NEWTON_ITERS", n)
            stop[search(*args) == final] = n
        monkeypatch.undo()
        steps.append(stop)
    return steps


@pytest.mark.parametrize(("n_dim", "a"), [(40.0, 25.0), (1e4, 0.3), (3.0, 1e3), (2.5e5, 1e-2)])
def test_each_ray_is_computed_as_if_alone(monkeypatch, n_dim, a):
    """Rays whose Newton searches stop at different iterations, all at once and one at a
    time: bit-identical (each element stops on its own; the quadrature sum has a fixed order;
    no operation whose vectorised and scalar code round differently). Measured identical,
    batch against alone, for 7,500 random rays (D 1-1e7, a 1e-4-1e4, |b| up to 3√(aD),
    R 0.01-100 r* and +inf; 29 batches of 1-920 rays and single calls of 2,500 and 5,000)
    with native AVX2 and ATEN_CPU_CAPABILITY=default kernels, 1 and 2 threads (AVX-512 not
    measured); the same rays differed in 49 of 2,000 (up to 1.4e-14) before. Here the
    batch-wide stop alone differed by up to 4.4e-16, with the matrix-vector quadrature sum
    and torch.hypot by up to 1.8e-15."""
    b, upper = _rays()
    stops = newton_stops(monkeypatch, lambda: log_radial_integral(n_dim, a, b, 0.0, upper))
    left = stops[0].amax(-1)  # per ray, (20,)
    assert len(set(left.tolist())) > 1, left  # the rays converge at different iterations
    batch = log_radial_integral(n_dim, a, b, 0.0, upper)
    alone = torch.cat([log_radial_integral(n_dim, a, b[i : i + 1], 0.0, upper[i : i + 1])
                       for i in range(len(b))])  # fmt: skip
    assert torch.equal(batch, alone)
    perm = torch.randperm(len(b), generator=torch.Generator().manual_seed(1))
    assert torch.equal(log_radial_integral(n_dim, a, b[perm], 0.0, upper[perm]), batch[perm])


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"a": 0.0}, "a"),
        ({"a": -1.0}, "a"),
        ({"a": math.nan}, "a"),
        ({"a": INF}, "a"),
        ({"upper": 0.0}, "upper"),
        ({"upper": -2.0}, "upper"),
        ({"upper": math.nan}, "upper"),
        ({"n_dim": 0.5}, "n_dim"),
        ({"n_dim": INF}, "n_dim"),
        ({"b": INF}, "b"),
        ({"c": math.nan}, "c"),
        ({"a": torch.tensor([1.0, -1.0])}, "a"),
    ],
)
def test_bad_input_raises_naming_the_argument(kwargs, name):
    args = {"n_dim": 3, "a": 1.0, "b": 0.5, "c": 0.0, "upper": 2.0} | kwargs
    with pytest.raises(ValueError, match=name):
        log_radial_integral(**args)


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="a must be"):
        log_radial_integral(3, "one", 0.0, 0.0, 1.0)
    with pytest.raises(TypeError, match="upper must be"):
        log_radial_integral(3, 1.0, 0.0, 0.0, torch.tensor([True]))


# --------------------------------------------------------------------------------------------
# ball and sphere constants


def test_unit_ball_and_sphere_constants():
    # float64 formulas of 2-3 roundings (log, lgamma, a sum) against math: rel 1e-15 (4.5 eps);
    # measured ≤ 1.6e-16
    assert float(log_unit_ball_volume(2)) == pytest.approx(math.log(math.pi), rel=1e-15)
    # 2-3 roundings, as above
    assert float(log_unit_ball_volume(3)) == pytest.approx(math.log(4 * math.pi / 3), rel=1e-15)
    # 2-3 roundings, as above
    assert float(log_unit_sphere_area(2)) == pytest.approx(math.log(2 * math.pi), rel=1e-15)
    # 2-3 roundings, as above
    assert float(log_unit_sphere_area(3)) == pytest.approx(math.log(4 * math.pi), rel=1e-15)
    assert float(log_unit_sphere_area(1)) == pytest.approx(math.log(2), rel=1e-15)  # as above
    dims = [1, 2, 3, 7.5, 100, 1e4, 1e6, 3e7, 1e9]
    ball = log_unit_ball_volume(torch.tensor(dims, dtype=torch.float64))
    sphere = log_unit_sphere_area(torch.tensor(dims, dtype=torch.float64))
    with mp.workdps(40):
        for i, d in enumerate(dims):
            dm = mp.mpf(d)
            v = dm / 2 * mp.log(mp.pi) - mp.loggamma(dm / 2 + 1)
            # against 40-digit mpmath: D/2 log π - lgamma(D/2 + 1) cancels a little, so the error
            # is a few eps of the larger term; measured ≤ 2.7e-16·(|v| + 1) (generic kernels).
            # 1e-14 (45 eps) keeps ≥ 35×; 2e-15 kept only 7.5×. A wrong term is off by ≳ 1
            assert abs(float(ball[i]) - float(v)) <= 1e-14 * (abs(float(v)) + 1)
            assert abs(float(sphere[i]) - float(v + mp.log(dm))) <= 1e-14 * (abs(float(v)) + 1)
    with pytest.raises(ValueError, match="n_dim"):
        log_unit_ball_volume(0)


# --------------------------------------------------------------------------------------------
# per-direction masses: probability oracles


def sphere_average(n_dim: int, values_of_t, n_nodes: int = 64) -> float:
    """E over v̂ uniform on S^(D-1) of f(t), t = v̂·e (density ∝ (1-t²)^((D-3)/2)), by
    Gauss–Jacobi; ``values_of_t`` maps the nodes (tensor) to log f."""
    alpha = (n_dim - 3) / 2
    t, w = special.roots_jacobi(n_nodes, alpha, alpha)
    logf = values_of_t(torch.tensor(t, dtype=torch.float64))
    return float(torch.logsumexp(logf + torch.log(torch.tensor(w / w.sum())), dim=0))


def test_gaussian_ray_mass_matches_definition():
    n_dim = torch.tensor([1, 2, 10, 1e4, 1e6], dtype=torch.float64)
    sigma, dot, radius = 0.07, 0.01, 2.0
    sq = torch.tensor([0.02, 0.05, 0.3, 40.0, 5000.0], dtype=torch.float64)
    ours = log_gaussian_ray_mass(n_dim, sigma, dot, sq, radius)
    a = 1 / sigma**2
    direct = (
        log_unit_sphere_area(n_dim)
        - n_dim / 2 * math.log(2 * math.pi * sigma**2)
        + log_radial_integral(n_dim, a, -dot * a, -sq * a / 2, radius)
    )
    scale = (n_dim / 2 * math.log(2 * math.pi * sigma**2)).abs() + log_unit_sphere_area(n_dim).abs()
    # the same terms grouped differently: rounding of terms of size `scale` (1e-13 ≈ 450 eps);
    # measured within 1/870 of this bound
    assert torch.all((ours - direct).abs() <= 1e-13 * (scale + direct.abs()) + 1e-12)


def test_gaussian_ray_mass_one_dimension():
    """D = 1: the sphere is {±1}; the average over both directions is P(|X - θ| < R)."""
    sigma, theta = 0.8, 1.3
    for radius in (0.2, 1.0, 4.0, INF):
        dots = torch.tensor([theta, -theta], dtype=torch.float64)
        prob = float(torch.exp(log_gaussian_ray_mass(1, sigma, dots, theta**2, radius)).mean())
        cdf = stats.norm.cdf
        exact = cdf((theta + radius) / sigma) - cdf((theta - radius) / sigma)
        # the radial integral's contract (1e-12 relative); measured 2e-15
        assert prob == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("n_dim", [2, 3, 5, 12])
def test_gaussian_ray_mass_ball_around_anchor(n_dim):
    """Constant R = ρ: the region is the ball of radius ρ around θ, P = noncentral χ² CDF."""
    sigma, norm_theta = 0.6, 1.1
    for rho in (0.3, 1.2, 3.0):
        avg = sphere_average(
            n_dim,
            lambda t, rho=rho: log_gaussian_ray_mass(
                n_dim, sigma, norm_theta * t, norm_theta**2, rho
            ),
        )
        exact = stats.ncx2.cdf(rho**2 / sigma**2, n_dim, norm_theta**2 / sigma**2)
        # 64-node Gauss-Jacobi on a smooth integrand and scipy's ncx2 series: 1e-9 covers both
        # (measured 8e-15 overall)
        assert math.exp(avg) == pytest.approx(exact, rel=1e-9)
    total = sphere_average(
        n_dim, lambda t: log_gaussian_ray_mass(n_dim, sigma, norm_theta * t, norm_theta**2, INF)
    )
    assert total == pytest.approx(0.0, abs=1e-12)  # contract 1e-12; measured 8e-15


def test_gaussian_ray_mass_on_a_circle_grid():
    """D = 2 with explicit directions (cos φ, sin φ) on a fine grid of angles."""
    sigma, theta, rho = 1.0, torch.tensor([0.7, -0.4], dtype=torch.float64), 1.5
    phi = torch.arange(512, dtype=torch.float64) * (2 * math.pi / 512)
    dirs = torch.stack([torch.cos(phi), torch.sin(phi)], dim=1)
    sq = float(theta @ theta)
    for radius, exact in ((rho, stats.ncx2.cdf(rho**2 / sigma**2, 2, sq / sigma**2)), (INF, 1.0)):
        prob = torch.exp(log_gaussian_ray_mass(2, sigma, dirs @ theta, sq, radius)).mean()
        # the trapezoid rule on a periodic analytic integrand converges geometrically: 512 nodes
        # are exact to rounding (512-term mean: ≲ 512·eps ≈ 1e-13); measured 2e-16
        assert float(prob) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("n_dim", [2, 3, 6])
def test_ray_functions_on_a_ball_around_the_origin(n_dim):
    """Star-shaped region with a direction-dependent radius: the ball |x| < ρ seen from an
    interior anchor θ, R(t) = -t|θ| + sqrt(t²|θ|² + ρ² - |θ|²). Gaussian: P = χ²_D CDF;
    uniform: Vol = V_D ρ^D."""
    sigma, norm_theta, rho = 0.9, 0.8, 1.7

    def radius(t):
        return -t * norm_theta + torch.sqrt(t * t * norm_theta**2 + rho**2 - norm_theta**2)

    avg = sphere_average(
        n_dim,
        lambda t: log_gaussian_ray_mass(n_dim, sigma, norm_theta * t, norm_theta**2, radius(t)),
        n_nodes=96,
    )
    # 96-node Gauss-Jacobi on a smooth integrand: measured 1.3e-15 and 1.8e-15 against the
    # 1e-10 and 1e-11 allowed for the quadrature (the radial contract alone is 1e-12)
    assert math.exp(avg) == pytest.approx(stats.chi2.cdf(rho**2 / sigma**2, n_dim), rel=1e-10)
    vol = sphere_average(n_dim, lambda t: log_uniform_ray_volume(n_dim, radius(t)), n_nodes=96)
    exact_log_volume = float(log_unit_ball_volume(n_dim)) + n_dim * math.log(rho)
    assert vol == pytest.approx(exact_log_volume, abs=1e-11)  # the quadrature's 1e-11 (above)


def test_uniform_ray_volume_values_and_errors():
    out = log_uniform_ray_volume(torch.tensor([1.0, 3.0, 1e6]), torch.tensor([2.0, 0.5, 1e-3]))
    expected = [math.log(2 * 2.0), math.log(4 * math.pi / 3 * 0.125)]
    # two formulas of 2-3 roundings each: ≲ 6 eps ≈ 1.3e-15; measured 5e-16
    assert out[:2].tolist() == pytest.approx(expected, rel=1e-14)
    assert float(log_uniform_ray_volume(4, INF)) == INF
    with pytest.raises(ValueError, match="radius"):
        log_uniform_ray_volume(3, 0.0)
    with pytest.raises(ValueError, match="n_dim"):
        log_uniform_ray_volume(0.0, 1.0)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": math.nan}, "sigma"),
        ({"anchor_sq_norm": -1.0}, "anchor_sq_norm"),
        ({"anchor_dot_dir": 3.0}, "anchor_dot_dir"),  # larger than |θ| = 2: not a unit v̂
        ({"anchor_dot_dir": torch.tensor([0.5, -3.0])}, "anchor_dot_dir"),  # broadcast check
        ({"radius": 0.0}, "radius"),
        ({"n_dim": 0}, "n_dim"),
    ],
)
def test_gaussian_ray_mass_bad_input(kwargs, name):
    args = {"n_dim": 3, "sigma": 1.0, "anchor_dot_dir": 0.5, "anchor_sq_norm": 4.0, "radius": 1.0}
    with pytest.raises(ValueError, match=name):
        log_gaussian_ray_mass(**(args | kwargs))
