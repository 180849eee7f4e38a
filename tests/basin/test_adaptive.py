"""Adaptive direction sampling (`estimate_basin(..., BasinOptions(adapt=R))`).

The oracle is the exact prior mass of losses whose answer is known in closed form: the
issue's K(w) = w₂² in D = 2 (w₁ exactly flat), P = erf(√(ε/2)), λ = 1/2.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from tyche.basin import BasinOptions, estimate_basin, learning_coefficient
from tyche.basin.adaptive import default_groups
from tyche.errors import InputError

CUTOFFS = [1e-10, 1e-9, 1e-8, 1e-7, 1e-6]


def w2_squared(offsets: torch.Tensor) -> torch.Tensor:
    return offsets[:, 1].double() ** 2


def _curve(adapt: int, n: int, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the verdicts are what is checked
        return estimate_basin(
            w2_squared,
            torch.zeros(2, dtype=torch.float64),
            BasinOptions(cutoffs=CUTOFFS, sigma=1.0, n_samples=n, adapt=adapt),
            progress=False,
            **kw,
        )


def test_flat_direction_lambda_with_and_without_adaptation():
    exact = torch.tensor(
        [math.log(math.erf(math.sqrt(c / 2))) for c in CUTOFFS], dtype=torch.float64
    )
    naive = _curve(0, 1000)
    lam = learning_coefficient(naive)
    assert lam.verdict == "lower bound only"
    assert lam.interval is None  # no interval is offered for an unreliable λ
    assert (naive.log_probs < exact - 0.3).all()  # the naive curve misses the volume

    adapted = _curve(3, 250)  # the same 1,000 directions in all
    lam = learning_coefficient(adapted)
    assert set(adapted.verdicts) == {"estimate"}
    assert lam.value == pytest.approx(0.5, rel=0.1)  # the acceptance: within 10%
    # importance sampling with k̂ < 0.5 and 250 directions: a few percent, 5% is the target
    assert torch.allclose(adapted.log_probs, exact, rtol=0.05, atol=0)
    rounds = adapted.settings["adapt_rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert adapted.settings["adapt_loss_evals"] > int(adapted.n_evals.sum())
    # round 0 is the plain estimate of the first 250 directions
    first = _curve(0, 250)
    # same path: round 0 runs the same directions through the same search
    assert rounds[0]["log_probs"] == first.log_probs.tolist()


def test_adaptive_estimate_is_unbiased_where_every_direction_is_exact():
    # K = |w|² around 0: every ray has the same radius, so any proposal's weights average to
    # the exact mass only if the mixture density is right; P = P(χ²_3 < 2ε)
    eps = 0.5
    res = estimate_basin(
        lambda d: (d.double() ** 2).sum(1) / 2,
        torch.zeros(3, dtype=torch.float64),
        BasinOptions(cutoff=eps, sigma=1.0, n_samples=400, adapt=2, rtol=1e-4),
        progress=False,
    )
    x = 2 * eps  # χ²_3 CDF at 2ε: erf(√(x/2)) − √(2x/π) e^(−x/2)
    exact = math.log(math.erf(math.sqrt(x / 2)) - math.sqrt(2 * x / math.pi) * math.exp(-x / 2))
    # rtol 1e-4 on the radius moves log P by ≲ 3·1e-4·(d log P/d log ε ≈ 1.3); the weights'
    # noise at 400 directions of a near-isotropic mixture is ~1e-2: 4 standard errors
    se = float(res.estimates.exp().std() / res.estimates.exp().mean()) / math.sqrt(400)
    assert res.log_prob == pytest.approx(exact, abs=4 * se + 1e-3)  # Monte Carlo: 4 s.e.


def test_adapt_refuses_what_it_cannot_do():
    anchor = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(InputError, match="diagonal preconditioner"):
        estimate_basin(
            w2_squared,
            anchor,
            BasinOptions(cutoff=1e-2, n_samples=20, adapt=1),
            preconditioner=torch.eye(2, dtype=torch.float64),
            progress=False,
        )
    with pytest.raises(InputError, match="n_samples >= 12"):
        estimate_basin(
            w2_squared,
            anchor,
            BasinOptions(cutoffs=CUTOFFS, n_samples=10, adapt=1),
            progress=False,
        )
    with pytest.raises(InputError, match="groups must be"):
        estimate_basin(
            w2_squared,
            anchor,
            BasinOptions(cutoff=1e-2, n_samples=20, adapt=1),
            groups=torch.zeros(3, dtype=torch.long),
            progress=False,
        )
    with pytest.raises(InputError, match="needs options.adapt"):
        estimate_basin(
            w2_squared,
            anchor,
            BasinOptions(cutoff=1e-2, n_samples=20),
            groups=torch.zeros(2, dtype=torch.long),
            progress=False,
        )
    with pytest.raises(InputError, match="adapt must be"):
        BasinOptions(cutoff=1e-2, n_samples=20, adapt=-1)


def test_default_groups():
    assert default_groups(None, 5).tolist() == [0, 1, 2, 3, 4]

    class Layout:
        shapes = (torch.Size([40, 30]), torch.Size([30]))

    class Loss:
        layout = Layout()

    groups = default_groups(Loss(), 1230)
    assert groups[:1200].eq(0).all() and groups[1200:].eq(1).all()
    with pytest.warns(UserWarning, match="single scale"):
        assert default_groups(None, 2000).eq(0).all()


def test_adaptive_run_resumes_from_its_checkpoints(tmp_path):
    first = _curve(2, 60, checkpoint=tmp_path / "run")
    subs = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert subs[0] == "round0-base" and any(s.startswith("round2-fit") for s in subs)
    again = _curve(2, 60, checkpoint=tmp_path / "run", resume=True)
    # same path: every direction is loaded back from the checkpoints, none searched again
    assert torch.equal(first.estimates, again.estimates)
