"""Unit tests of the local interaction basis's pieces: integration rules, bias folding, Gram
accumulation, stochastic sources and the bases' linear algebra."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tyche.interaction.basis import eigh_desc, lib_basis, neuron_basis, pca, svd_basis
from tyche.interaction.fold import append_constant, centering_matrix, scaled_biases
from tyche.interaction.gram import GramAccumulator, folded_gram
from tyche.interaction.integrate import IntegrationRule, integration_points, rule_for_layers
from tyche.interaction.jacobian import rademacher

# ----------------------------------------------------------------------------- integration


def test_gradient_rule_is_alpha_one() -> None:
    assert integration_points("gradient", 0) == ([1.0], [1.0])
    with pytest.raises(ValueError, match="n_intervals must be 0"):
        IntegrationRule("gradient", 3)


@pytest.mark.parametrize("rule", ["trapezoidal", "gauss-legendre"])
def test_zero_intervals_is_the_midpoint(rule: str) -> None:
    assert integration_points(rule, 0) == ([0.5], [1.0])


def test_trapezoid_points_and_weights() -> None:
    alphas, weights = integration_points("trapezoidal", 4)
    eps = 1e-3 / 5
    # np.linspace returns its ends as given: the same float64 expressions, ≤ 1 ulp apart
    assert alphas[0] == pytest.approx(eps, rel=1e-15)
    assert alphas[-1] == pytest.approx(1 - eps, rel=1e-15)  # as the first
    steps = torch.tensor(alphas).diff()
    # float32 alphas (torch.tensor's default) ≤ 1, each off by ≤ 3e-8: steps of 0.25 agree to
    # ≤ 4 · 3e-8 / 0.25 ≈ 5e-7 relative; uneven spacing would be O(1e-3) or more off
    assert torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-5, atol=0)
    # 1/4 and 1/8: exact in float64
    assert weights == pytest.approx([0.125, 0.25, 0.25, 0.25, 0.125], rel=1e-15)


def test_gauss_legendre_integrates_polynomials_exactly() -> None:
    # n_intervals + 1 = 3 nodes are exact up to degree 5; the error is float rounding
    alphas, weights = integration_points("gauss-legendre", 2)
    for degree in range(6):
        value = sum(w * a**degree for a, w in zip(alphas, weights))
        assert value == pytest.approx(1 / (degree + 1), rel=1e-14)  # 3 float64 terms ≤ 1
    assert sum(weights) == pytest.approx(1.0, rel=1e-15)  # 3 float64 weights: ≲ 2 eps


def test_rules_for_layers_by_prefix() -> None:
    names = ["layers.0:input", "layers.1:input", "output"]
    rules = rule_for_layers({"layers.0": "trapezoidal", "layers": "gauss-legendre"}, 3, names)
    assert [r.name for r in rules[:2]] == ["trapezoidal", "gauss-legendre"]
    assert rules[0].n_intervals == 3
    with pytest.raises(ValueError, match="match no node layer"):
        rule_for_layers({"nope": "gradient"}, 0, names)
    with pytest.raises(ValueError, match="names no rule for node layer 'layers.1:input'"):
        rule_for_layers({"layers.0": "gradient"}, 0, names)
    with pytest.raises(ValueError, match="unknown integration rule"):
        rule_for_layers("simpson", 0, names)


# ----------------------------------------------------------------------------- folding


def test_centering_matrix_shifts_by_the_mean() -> None:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(7, 4, generator=g, dtype=torch.float64)
    mu = f.mean(0)
    y, y_inv = centering_matrix(mu), centering_matrix(mu, inverse=True)
    # exact on any CPU: Y's entries are 0, 1 and -mu, so every product is exact and each sum
    # has one rounding (f_j - mu_j, as the subtraction), the rest adds exact zeros
    assert torch.equal(append_constant(f) @ y, append_constant(f - mu))
    # exact for the same reason: the only non-trivial sums are -mu_j + mu_j = 0
    torch.testing.assert_close(y @ y_inv, torch.eye(5, dtype=torch.float64), rtol=0, atol=0)


def test_bias_scaler_makes_a_folded_linear_map() -> None:
    """With biases scaled by c, F([x, c]) = x W^T + c b: linear in [x, c]."""
    lin = nn.Linear(3, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    c = torch.full((5,), 0.25, dtype=torch.float64)
    with scaled_biases(lin) as scaler:
        scaler.activate(c)
        y = lin(x)
    # float64 3-term dots plus a bias, fused (addmm) or not: ≲ 4·eps·Σ|terms| (≲ 5) ≈ 2e-15;
    # a bias left unscaled is 0.75·|b| ≈ 0.1 off
    torch.testing.assert_close(y, x @ lin.weight.T + 0.25 * lin.bias, rtol=1e-14, atol=1e-14)
    # the hook is gone: the whole bias again (addmm vs matmul + add, as above)
    torch.testing.assert_close(lin(x), x @ lin.weight.T + lin.bias, rtol=1e-14, atol=1e-14)


# ----------------------------------------------------------------------------- grams


def test_streaming_gram_equals_direct_statistics() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64) * 3 + 1e4  # a large mean
    w = (torch.rand(300, generator=g) > 0.2).double()
    acc = GramAccumulator(5)
    for chunk, wc in zip(x.split(37), w.split(37)):
        acc.update(chunk, wc)
    kept = x[w.bool()]
    mean = kept.mean(0)
    cov = (kept - mean).T @ (kept - mean) / len(kept)
    assert float(acc.n) == len(kept)
    # a two-pass float64 covariance of O(10) values at a mean of 1e4: rounding ~1e-16 * 1e4^2
    # / spread^2 would show if E[xx^T] - mu mu^T were used; the update keeps ~1e-12
    torch.testing.assert_close(acc.mean, mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(acc.covariance, cov, rtol=1e-11, atol=1e-11)  # the ~1e-12 above


def test_folded_gram_blocks() -> None:
    mu = torch.tensor([1.0, -2.0], dtype=torch.float64)
    cov = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    centred = folded_gram(mu, cov, center=True)
    # exact: small dyadic numbers, every product and sum exact in float64
    assert torch.equal(centred[:2, :2], cov) and centred[2, 2] == 1 and not centred[:2, 2].any()
    plain = folded_gram(mu, cov, center=False)
    # exact, as above (cov + mu muᵀ of small dyadic numbers)
    assert torch.equal(plain[:2, :2], cov + torch.outer(mu, mu)) and torch.equal(plain[:2, 2], mu)


# ----------------------------------------------------------------------------- bases


def _stats(seed: int = 0, n: int = 400, d: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(
        d, d, generator=g, dtype=torch.float64
    ) + torch.arange(d, dtype=torch.float64)
    mean = x.mean(0)
    return mean, (x - mean).T @ (x - mean) / n


def test_eigh_desc_is_sorted_and_signed() -> None:
    _, cov = _stats()
    values, vectors = eigh_desc(cov)
    assert (values.diff() <= 0).all()
    # float64 eigh of a 5×5 matrix: backward error ≲ 5·eps·|cov| (LAPACK's bound, any CPU)
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, cov,
                               rtol=0, atol=1e-12 * float(cov.abs().max()))  # fmt: skip
    top = vectors.gather(0, vectors.abs().argmax(0, keepdim=True))
    assert (top > 0).all()


def test_pca_whitens_and_puts_the_constant_first() -> None:
    mean, cov = _stats()
    p = pca(mean, cov, center=True, threshold=1e-12)
    g = folded_gram(mean, cov, center=False)
    white = p.R.T @ g @ p.R
    # R^T G R = I: float64 eigendecomposition of a 6x6 matrix, condition number ~1e2
    torch.testing.assert_close(white, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(p.U[:, 0], torch.eye(6, dtype=torch.float64)[:, 5])
    basis = svd_basis("x", p)
    assert torch.equal(basis.C, basis.W) and torch.equal(basis.C_pinv, basis.W_pinv)
    with pytest.raises(ValueError, match="cannot be centred"):
        neuron_basis("x", p)


def test_lib_basis_scales_and_inverts() -> None:
    mean, cov = _stats()
    p = pca(mean, cov, center=True, threshold=1e-12)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    basis = lib_basis("x", p, a @ a.T, None, "jacobian", 1e-12)
    gram = folded_gram(mean, cov, center=False)
    # C^T G C = diag(Lambda) and C+ C = I up to float64 rounding of 6x6 products
    torch.testing.assert_close(basis.C.T @ gram @ basis.C, torch.diag(basis.Lambda),
                               rtol=1e-10, atol=1e-12)  # fmt: skip
    # C+ C = I, as above
    torch.testing.assert_close(basis.C_pinv @ basis.C, torch.eye(6, dtype=torch.float64),
                               rtol=0, atol=1e-12)  # fmt: skip
    assert (basis.Lambda[1:].diff() <= 0).all()


def test_rank_deficient_directions_are_truncated() -> None:
    mean, cov = _stats(d=4)
    x = torch.randn(50, 3, dtype=torch.float64)
    x = torch.cat([x, x[:, :1] + x[:, 1:2]], dim=1)  # rank 3
    cov = torch.cov(x.T, correction=0)
    p = pca(x.mean(0), cov, center=True, threshold=1e-12)
    assert p.D.shape[0] == 1 + 3


# ----------------------------------------------------------------------------- sources


def test_rademacher_signs_are_balanced_and_reproducible() -> None:
    rows = torch.arange(1000, 1400)
    a = rademacher(0, 3, rows, 8, 50)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(a, rademacher(0, 3, rows, 8, 50))
    # the same rows drawn in another split give the same signs
    assert torch.equal(a[:, 100:], rademacher(0, 3, rows[100:], 8, 50))
    assert not torch.equal(a, rademacher(1, 3, rows, 8, 50))
    # 160,000 fair signs: mean within 4 standard deviations (1/sqrt(n) = 0.0025) of 0
    assert abs(float(a.mean())) < 4 / math.sqrt(a.numel())
    # pairwise products of different sources are uncorrelated as well
    assert abs(float((a[0] * a[1]).mean())) < 4 / math.sqrt(a[0].numel())
