"""estimate_basin against closed forms: balls, ellipsoids, noncentral chi-square masses."""

from __future__ import annotations

import math
from dataclasses import fields, replace

import pytest
import torch
from scipy import stats

from tyche.basin.core import estimate_basin
from tyche.basin.options import BasinOptions
from tyche.basin.radial import log_unit_ball_volume


def quadratic(curv: torch.Tensor, rot: torch.Tensor | None = None, calls: list | None = None):
    """Δ(δ) = ½ Σ_i k_i (Rᵀδ)_i²: the region under cutoff c is an ellipsoid."""

    def loss(offsets: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(offsets.shape[0])
        x = offsets.double() if rot is None else offsets.double() @ rot
        return 0.5 * (x**2 * curv).sum(-1)

    return loss


def log_ellipsoid_volume(curv: torch.Tensor, cutoff: float) -> float:
    d = curv.numel()
    return float(log_unit_ball_volume(d)) + float(0.5 * torch.log(2 * cutoff / curv).sum())


def standard_error(res) -> float:
    """Delta-method standard error (nats) of the log-mean-exp of ``res.estimates``."""
    w = (res.estimates - res.estimates.max()).exp()
    return float(w.std() / (w.mean() * math.sqrt(w.numel())))


# Solver tolerance: the search accepts |Δ - c| ≤ rtol·c, so on a quadratic R is within rtol/2
# of the true radius and each per-direction estimate D log R within D·rtol/2.


def test_ball_volume_uniform_prior_is_exact_per_sample():
    d, c = 7, 0.3
    curv = torch.full((d,), 2.0, dtype=torch.float64)
    res = estimate_basin(
        quadratic(curv),
        torch.zeros(d, dtype=torch.float64),
        BasinOptions(cutoff=c, n_samples=5, prior="uniform", rtol=1e-8),
        progress=False,
    )
    expect = log_ellipsoid_volume(curv, c)
    # D·rtol/2 = 3.5e-8 nats (solver) + float64 rounding; measured 1.8e-15. 1e-6 is 28× the bound
    assert torch.allclose(res.estimates, torch.full((5,), expect, dtype=torch.float64), atol=1e-6)
    assert abs(res.log_prob - expect) < 1e-6


def test_matched_diagonal_preconditioner_gives_ellipsoid_volume_with_zero_variance():
    d, c = 12, 1e-2
    curv = torch.logspace(-2, 3, d, dtype=torch.float64)
    pre = curv**-0.5  # maps the sphere onto the ellipsoid's shape
    res = estimate_basin(
        quadratic(curv),
        torch.zeros(d, dtype=torch.float64),
        BasinOptions(cutoff=c, n_samples=6, prior="uniform", rtol=1e-9),
        preconditioner=pre,
        progress=False,
    )
    expect = log_ellipsoid_volume(curv, c)
    # D·rtol/2 = 6e-9 nats (solver) + float64 rounding of terms ≲ 100: ≪ 1e-6
    assert res.estimates.std() < 1e-6
    assert abs(res.log_prob - expect) < 1e-6
    # ESS = n/(1 + var(w)/mean(w)²): weights equal to D·rtol/2 = 6e-9 give ESS = 6 to ~1e-16
    assert res.ess == pytest.approx(6.0, rel=1e-9)


def test_matrix_preconditioner_acts_in_parameter_space():
    d, c = 6, 0.5
    g = torch.Generator().manual_seed(3)
    rot, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    curv = torch.logspace(-1, 2, d, dtype=torch.float64)
    hess = rot @ torch.diag(curv) @ rot.T
    pre = rot @ torch.diag(curv**-0.5) @ rot.T  # H^{-1/2}, not its eigen-coordinates
    res = estimate_basin(
        quadratic(curv, rot),
        torch.zeros(d, dtype=torch.float64),
        BasinOptions(cutoff=c, n_samples=4, prior="uniform", rtol=1e-9),
        preconditioner=pre,
        progress=False,
    )
    # symmetric up to float64 rounding: 6-term sums of entries ≤ 100, ≲ 6·100·eps ≈ 1.3e-13
    assert torch.allclose(hess, hess.T, rtol=0, atol=1e-11)
    # D·rtol/2 = 3e-9 nats (solver) + float64 rounding: ≪ 1e-6
    assert res.estimates.std() < 1e-6
    assert abs(res.log_prob - log_ellipsoid_volume(curv, c)) < 1e-6


def test_naive_monte_carlo_converges_to_ellipsoid_volume():
    d, c = 3, 0.2
    curv = torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64)
    res = estimate_basin(
        quadratic(curv),
        torch.zeros(d, dtype=torch.float64),
        BasinOptions(cutoff=c, n_samples=400, prior="uniform", batch_size=64),
        progress=False,
    )
    lo, hi = res.interval(level=0.999)
    expect = log_ellipsoid_volume(curv, c)
    # 0.02 nats: the solver's bias, D·rtol/2 = 0.015 nats at the default rtol 1e-2
    assert lo - 0.02 < expect < hi + 0.02
    # a seeded sample (reduction order moves it by ~1e-15): 4 standard errors (~0.26 nats)
    assert abs(res.log_prob - expect) < 4 * standard_error(res) + 0.02


@pytest.mark.parametrize("d", [1, 2, 5])
def test_gaussian_prior_ball_matches_noncentral_chi_square(d):
    """P(|X − θ| < ρ) for X ~ N(0, σ²I) is a noncentral χ² CDF."""
    sigma, rho = 0.7, 0.9
    g = torch.Generator().manual_seed(d)
    theta = torch.randn(d, generator=g, dtype=torch.float64)
    curv = torch.full((d,), 1.0, dtype=torch.float64)
    c = 0.5 * rho**2
    res = estimate_basin(
        quadratic(curv),
        theta,
        BasinOptions(cutoff=c, sigma=sigma, n_samples=600, batch_size=200, rtol=1e-6),
        progress=False,
    )
    lam = float(theta @ theta) / sigma**2
    expect = math.log(stats.ncx2.cdf(rho**2 / sigma**2, d, lam))
    lo, hi = res.interval(level=0.999)
    # 1e-3 nats: the solver's bias (≲ D·rtol/2 = 2.5e-6) plus scipy's ncx2 accuracy
    assert lo - 1e-3 < expect < hi + 1e-3
    assert abs(res.log_prob - expect) < 4 * standard_error(res)  # seeded sample: 4 SE
    assert res.sigma == sigma


def test_default_sigma_is_anchor_rms_and_recorded():
    theta = torch.tensor([3.0, -4.0], dtype=torch.float64)
    res = estimate_basin(
        quadratic(torch.ones(2, dtype=torch.float64)),
        theta,
        BasinOptions(cutoff=0.1, n_samples=2),
        progress=False,
    )
    # float64 sqrt(|θ|²/D) of the exact 25/2: correctly rounded, ≤ 1 ulp (2.2e-16) from math's
    assert res.sigma == pytest.approx(math.sqrt(25 / 2), rel=1e-15)
    assert res.settings["sigma"] == res.sigma


def test_deltas_within_rtol_and_radii_reproduce_them():
    d, c = 50, 1e-2
    curv = torch.logspace(-1, 1, d, dtype=torch.float64)

    def loss(off):  # smooth but not quadratic
        x = off.double()
        return 0.5 * (x**2 * curv).sum(-1) + (x**4).sum(-1) + 0.1 * (x**3 * curv).sum(-1)

    anchor = torch.zeros(d, dtype=torch.float64)
    res = estimate_basin(
        loss, anchor, BasinOptions(cutoff=c, n_samples=40, batch_size=7), progress=False
    )
    # the acceptance band rtol·cutoff (default rtol 1e-2), on the values the search accepted
    assert ((res.deltas - c).abs() <= 1e-2 * c).all()
    # independent recomputation of each delta at the returned radius
    from tyche.basin.sampling import unit_directions

    u = unit_directions(0, list(range(40)), d, dtype=torch.float64)
    again = loss(res.radii[:, None] * u) - loss(torch.zeros(1, d))
    # float64, 50-term sums (and v̂ = u/|u| rounded once more in the estimator): relative error
    # ≲ 50·eps·(Σ|terms|/Δ ≲ 10) ≈ 1e-13; measured 7e-16. rtol 1e-9 still catches a radius
    # that is off by one search step (≥ 1e-3)
    assert torch.allclose(again, res.deltas, rtol=1e-9, atol=0)
    assert res.evals_per_direction <= 5.0


@pytest.mark.parametrize(
    ("low", "cutoff", "anchor"),
    [(-1.0, 0.05, "linspace"), (-3.0, 0.5, "randn")],
    ids=["same-newton-stops", "different-newton-stops"],
)
def test_results_do_not_depend_on_batch_size(monkeypatch, low, cutoff, anchor):
    from test_basin_radial import newton_stops

    d = 20
    curv = torch.logspace(low, 1, d, dtype=torch.float64)
    if anchor == "linspace":
        theta = torch.linspace(-1, 1, d, dtype=torch.float64)
    else:
        theta = torch.randn(d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def run(b: int):
        return estimate_basin(
            quadratic(curv), theta,
            BasinOptions(cutoff=cutoff, n_samples=20, batch_size=b, seed=11), progress=False,
        )  # fmt: skip

    if anchor == "randn":
        # the directions' radial integrals converge at different Newton iterations (left of
        # the peak: 3 or 4): a batch-wide stop gives one direction the iterations of another
        # (the estimates moved by up to 3.6e-15 between batch sizes; with the linspace case,
        # a matrix-vector quadrature sum moved them by 1.4e-14)
        stops = [s.amax(-1) for s in newton_stops(monkeypatch, lambda: run(20)) if len(s) == 20]
        assert any(len(set(s.tolist())) > 1 for s in stops), stops
    runs = [run(b) for b in (1, 3, 4, 9, 20)]
    # exact: each direction's search only ever sees its own rows, the loss is row-wise
    # (elementwise ops and a per-row 20-term sum whose order does not depend on the number of
    # rows), each radial integral is computed as if alone (tests/basin/test_basin_radial.py), and
    # the pilot is the same for every batch size
    for r in runs[1:]:
        assert torch.equal(r.estimates, runs[0].estimates)
        assert torch.equal(r.radii, runs[0].radii)


def test_resume_after_interrupted_run_loses_nothing(tmp_path):
    d = 10
    curv = torch.logspace(-1, 1, d, dtype=torch.float64)
    theta = torch.ones(d, dtype=torch.float64)
    opts = BasinOptions(cutoff=0.05, n_samples=12, batch_size=3, seed=5)
    kw = dict(progress=False)
    full = estimate_basin(quadratic(curv), theta, opts, **kw)

    calls: list[int] = []
    inner = quadratic(curv, calls=calls)

    def flaky(off):
        if len(calls) > 6:  # dies part-way through the run
            raise KeyboardInterrupt
        return inner(off)

    with pytest.raises(KeyboardInterrupt):
        estimate_basin(flaky, theta, opts, checkpoint=tmp_path / "ck", **kw)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "ck" / "samples-rank0.safetensors"))
    n_done = saved["index"].numel()
    assert 0 < n_done < 12
    with pytest.raises(ValueError, match="resume"):
        estimate_basin(quadratic(curv), theta, opts, checkpoint=tmp_path / "ck", **kw)
    with pytest.raises(ValueError, match=r"other settings \(cutoff: saved 0.05, now 0.1\)"):
        estimate_basin(
            quadratic(curv), theta, replace(opts, cutoff=0.1), checkpoint=tmp_path / "ck",
            resume=True, **kw,
        )  # fmt: skip
    calls.clear()
    resumed = estimate_basin(
        quadratic(curv, calls=calls), theta, opts, checkpoint=tmp_path / "ck", resume=True, **kw
    )
    # exact: resumed samples are the saved float64 values, the rest recomputed by the same
    # row-wise ops (each direction's search sees only its own rows; see the batch-size test)
    assert torch.equal(resumed.estimates, full.estimates)
    assert torch.equal(resumed.n_evals, full.n_evals)
    # only the unfinished directions (plus the anchor and the pilot) were evaluated again
    unfinished = torch.ones(12, dtype=torch.bool)
    unfinished[saved["index"]] = False
    expect = 1 + resumed.settings["pilot_evals"] + int(full.n_evals[unfinished].sum())
    assert sum(calls) == expect


def test_lower_bound_warning_when_one_sample_dominates():
    d = 200
    curv = torch.logspace(-4, 4, d, dtype=torch.float64)
    with pytest.warns(UserWarning, match="lower bound"):
        res = estimate_basin(
            quadratic(curv),
            torch.zeros(d, dtype=torch.float64),
            BasinOptions(cutoff=1e-2, n_samples=20, prior="uniform"),
            progress=False,
        )
    assert res.ess < 1.5 and res.is_lower_bound


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cutoff": 0.0}, "cutoff"),
        ({"cutoff": -1.0}, "cutoff"),
        ({"cutoff": float("nan")}, "cutoff"),
        ({"n_samples": 0}, "n_samples"),
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -2.0}, "sigma"),
        ({"prior": "laplace"}, "prior"),
        ({"batch_size": 0}, "batch_size"),
        ({"resume": True}, "checkpoint"),
        ({"preconditioner": torch.ones(3)}, "3"),
        ({"preconditioner": -torch.ones(4)}, "positive"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    args = {"cutoff": 0.1, "n_samples": 2, "progress": False, **kwargs}
    names = {f.name for f in fields(BasinOptions)}
    with pytest.raises(ValueError, match=message):
        opts = BasinOptions(**{k: v for k, v in args.items() if k in names})
        estimate_basin(quadratic(torch.ones(4, dtype=torch.float64)), torch.zeros(4), opts,
                       **{k: v for k, v in args.items() if k not in names})  # fmt: skip


def test_bad_loss_functions_raise():
    theta = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="one loss per row"):
        estimate_basin(lambda off: off.sum(), theta, BasinOptions(cutoff=0.1, n_samples=2),
                       progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="anchor"):
        estimate_basin(
            lambda off: torch.full((off.shape[0],), float("nan")),
            theta,
            BasinOptions(cutoff=0.1, n_samples=2),
            progress=False,
        )
    with pytest.raises(ValueError, match="1-D"):
        estimate_basin(quadratic(torch.ones(4)), torch.zeros(2, 2),
                       BasinOptions(cutoff=0.1, n_samples=2))  # fmt: skip

    def nan_before_crossing(off):
        r = off.double().norm(dim=-1)
        out = 0.5 * r**2
        out[r > 0.1] = float("nan")  # NaN long before the cutoff radius 1.0
        return out

    with pytest.raises(ValueError, match="NaN|nan"):
        estimate_basin(nan_before_crossing, theta, BasinOptions(cutoff=0.5, n_samples=2),
                       progress=False)  # fmt: skip

    def nan_along_sample_5(off):  # only direction 5 meets a NaN before its crossing
        from tyche.basin.sampling import unit_directions

        u5 = unit_directions(0, [5], 4, dtype=torch.float64)[0]
        r = off.double().norm(dim=-1)
        out = 0.5 * r**2
        along = (off.double() @ u5).abs() > 0.999 * r
        out[along & (r > 0.1)] = float("nan")
        return out

    with pytest.raises(ValueError, match=r"r=[0-9.e-]+ along direction 5\b"):
        estimate_basin(
            nan_along_sample_5, theta, BasinOptions(cutoff=0.5, n_samples=8, batch_size=3),
            progress=False,
        )

    with pytest.raises(ValueError, match="max_radius|boundary"):
        estimate_basin(
            lambda off: torch.zeros(off.shape[0]) + 1e-3 * off.double().norm(dim=-1),
            theta,
            BasinOptions(cutoff=0.5, n_samples=2, max_radius=10.0),
            progress=False,
        )
