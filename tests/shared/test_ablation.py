"""Tests for tyche.ablation.remove_subspace: identities of the three modes, masks, errors.

Tolerances: the tests work in float64 (unless a test says otherwise) and compare two formulas
for the same quantity, so they differ only by rounding: a d-term dot product of values
|h| ≲ 15 is off by ≲ d·eps·Σ|h_i v_i| ≈ 64 · 1.1e-16 · 100 ≈ 1e-12 at most (measured ≤ 2e-14
under 1 and 2 threads and ATEN_CPU_CAPABILITY=default). assert_close's float64 default
(rtol = atol = 1e-7) is far above that and far below the O(1) error of a wrong ablation.
"""

from __future__ import annotations

import math

import pytest
import torch

from tyche.ablation import (
    remove_subspace,
    replace_subspace,
    resample_donors,
    sample_derangement,
)


def _frame(d: int, k: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=dtype)).Q


def _hiddens(shape, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * 3 + 1.5


@pytest.mark.parametrize("d,k", [(1, 1), (5, 2), (33, 7), (64, 64)])
def test_zero_is_the_orthogonal_projection(d, k):
    h = _hiddens((3, 4, d))
    v = _frame(d, k)
    out = remove_subspace(h, v, "zero")
    # oracle: the explicit projector I - V (VᵀV)^-1 Vᵀ built with a linear solve
    proj = torch.eye(d, dtype=h.dtype) - v @ torch.linalg.solve(v.T @ v, v.T)
    # float64, two formulas: rounding ≲ 1e-12 (module docstring) vs an O(1) wrong ablation
    torch.testing.assert_close(out, h @ proj.T, rtol=1e-7, atol=1e-7)
    # the rounding bound in the module docstring (≈ 1e-12); measured ≤ 1.3e-14
    torch.testing.assert_close(out @ v, torch.zeros(3, 4, k, dtype=h.dtype), atol=1e-12, rtol=0)
    # idempotent, and the orthogonal complement is untouched; float64 rounding ≲ 1e-12
    torch.testing.assert_close(remove_subspace(out, v, "zero"), out, rtol=1e-7, atol=1e-7)


def test_mean_fixes_coordinates_at_their_mean_and_keeps_the_mean():
    d, k = 24, 3
    h = _hiddens((5, 6, d))
    v = _frame(d, k)
    out = remove_subspace(h, v, "mean")
    mu = h.reshape(-1, d).mean(0)
    coords = out.reshape(-1, d) @ v
    # float64, two formulas for each quantity: rounding ≲ 1e-12 (module docstring)
    torch.testing.assert_close(coords, (mu @ v).expand_as(coords), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(out.reshape(-1, d).mean(0), mu, rtol=1e-7, atol=1e-7)  # as above
    # the orthogonal part is untouched (float64 rounding ≲ 1e-12, as above)
    torch.testing.assert_close(
        remove_subspace(out, v, "zero"), remove_subspace(h, v, "zero"), rtol=1e-7, atol=1e-7
    )
    # the single-vector form is the affine map x -> x - v vᵀ (x - μ)
    u = v[:, 0]
    expected = h - torch.outer((h - mu).reshape(-1, d) @ u, u).reshape(h.shape)
    # float64, outer product vs matmul: rounding ≲ 1e-12 (module docstring)
    torch.testing.assert_close(remove_subspace(h, u, "mean"), expected, rtol=1e-7, atol=1e-7)


def test_resample_uses_a_derangement_of_rows():
    d, k = 10, 2
    h = _hiddens((4, 5, d))
    v = _frame(d, k)
    donors = resample_donors(h.shape[:-1], generator=torch.Generator().manual_seed(3))
    assert sorted(donors.tolist()) == list(range(20))
    assert (donors != torch.arange(20)).all()
    out = remove_subspace(h, v, "resample", donors=donors)
    flat_h, flat_out = h.reshape(-1, d), out.reshape(-1, d)
    # float64, two formulas for each quantity: rounding ≲ 1e-12 (module docstring)
    torch.testing.assert_close(flat_out @ v, flat_h[donors] @ v, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(  # as above
        remove_subspace(out, v, "zero"), remove_subspace(h, v, "zero"), rtol=1e-7, atol=1e-7
    )
    # every row's new coordinates come from a different row (so none keeps its own)
    # rows' coordinates differ by O(1) (|h| ~ 3), the donor's by rounding only (~1e-15), so
    # allclose's rtol 1e-5 separates the one match from the rest
    for i in range(20):
        matches = [
            j for j in range(20) if torch.allclose(flat_out[i] @ v, flat_h[j] @ v, 1e-5, 1e-8)
        ]
        assert matches == [int(donors[i])] and matches[0] != i


def test_resample_is_reproducible_from_a_generator():
    h = _hiddens((3, 7, 8))
    v = _frame(8, 2)
    a = remove_subspace(h, v, "resample", generator=torch.Generator().manual_seed(5))
    b = remove_subspace(h, v, "resample", generator=torch.Generator().manual_seed(5))
    c = remove_subspace(h, v, "resample", generator=torch.Generator().manual_seed(6))
    # exact: the same derangement drawn from the same seed, then the same ops in the same order
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # another derangement moves coordinates by O(1), far outside allclose's 1e-5 / 1e-8
    assert not torch.allclose(a, c, rtol=1e-5, atol=1e-8)


def test_derangements_are_uniform():
    # n = 4 has 9 derangements; each should appear with frequency 1/9
    g = torch.Generator().manual_seed(0)
    counts: dict[tuple[int, ...], int] = {}
    n_draws = 4500
    for _ in range(n_draws):
        perm = tuple(sample_derangement(4, g).tolist())
        assert all(p != i for i, p in enumerate(perm))
        counts[perm] = counts.get(perm, 0) + 1
    assert len(counts) == 9
    expected = n_draws / 9
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 26.1  # chi-square, 8 dof, p = 0.001


@pytest.mark.parametrize("mode", ["zero", "mean", "resample"])
def test_masks_are_respected(mode):
    d, k = 12, 2
    h = _hiddens((3, 6, d))
    v = _frame(d, k)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 0] = False
    g = torch.Generator().manual_seed(0)
    out = remove_subspace(h, v, mode, mask=mask, generator=g)
    # rows outside the mask are unchanged, exactly: their replacement is h itself, so the
    # update (h - h) V Vᵀ is exactly 0
    torch.testing.assert_close(out[~mask], h[~mask], rtol=0, atol=0)
    # changing the masked-out rows changes nothing inside the mask
    h2 = h.clone()
    h2[~mask] = 1e3
    out2 = remove_subspace(h2, v, mode, mask=mask, generator=torch.Generator().manual_seed(0))
    # same path: h - replacement is exactly 0 on the masked-out rows in both runs, so the
    # matmuls see identical inputs of identical shape; a leak of 1e3 would be O(1e3)
    torch.testing.assert_close(out2[mask], out[mask])
    if mode == "mean":
        mu = h[mask].mean(0)
        expected = (mu @ v).expand(int(mask.sum()), k)
        # float64, two formulas for each quantity: rounding ≲ 1e-12 (module docstring)
        torch.testing.assert_close(out[mask] @ v, expected, rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(out[mask].mean(0), mu, rtol=1e-7, atol=1e-7)  # as above
    if mode == "resample":
        donors = resample_donors(h.shape[:-1], mask, torch.Generator().manual_seed(0))
        keep = mask.reshape(-1)
        assert keep[donors[keep]].all()  # donors come from inside the mask
        assert (donors[keep] != torch.arange(18)[keep]).all()
    # a 0/1 integer mask means the same as the bool mask
    out_int = remove_subspace(
        h, v, mode, mask=mask.long(), generator=torch.Generator().manual_seed(0)
    )
    # same path: the 0/1 mask becomes the same bool mask, then the same ops run
    torch.testing.assert_close(out_int, out)


def test_gradients_flow_to_hiddens_and_vectors():
    h = _hiddens((2, 3, 6)).requires_grad_()
    v = _frame(6, 1).requires_grad_()
    remove_subspace(h, v, "mean").pow(2).sum().backward()
    assert h.grad is not None and v.grad is not None
    assert torch.isfinite(h.grad).all() and v.grad.abs().sum() > 0


def test_replace_subspace_matches_the_projector_formula():
    d = 9
    h = _hiddens((7, d))
    r = _hiddens((7, d), seed=4)
    v = _frame(d, 3)
    p = v @ v.T
    expected = h @ (torch.eye(d) - p).double() + r @ p
    # float64, projector vs the module's h - (h - r) V Vᵀ: rounding ≲ 1e-12 (module docstring)
    torch.testing.assert_close(replace_subspace(h, v, r), expected, rtol=1e-7, atol=1e-7)


def test_float32_works_and_keeps_dtype():
    h = _hiddens((4, 8), dtype=torch.float32)
    v = _frame(8, 2, dtype=torch.float32)
    out = remove_subspace(h, v, "mean")
    assert out.dtype == torch.float32
    # float32: every row's coordinate μ·v is recomputed from x - V Vᵀ(x - μ), 8 terms of size
    # ≲ 5, so rows scatter by ~ eps32 · 5 ≈ 6e-7; measured std ≤ 8.3e-7 (1 and 2 threads,
    # ATEN_CPU_CAPABILITY=default). 1e-5 keeps 12×; a failed ablation scatters by ~3.
    assert math.isclose(float((out @ v).std(0).max()), 0.0, abs_tol=1e-5)


def test_bad_input_raises_clear_errors():
    h = _hiddens((4, 8))
    v = _frame(8, 2)
    with pytest.raises(ValueError, match="unknown ablation mode"):
        remove_subspace(h, v, "median")
    with pytest.raises(ValueError, match="not orthonormal"):
        remove_subspace(h, v * 2, "zero")
    with pytest.raises(ValueError, match="rows but the hidden states have d=8"):
        remove_subspace(h, _frame(7, 2), "zero")
    with pytest.raises(ValueError, match="mask has shape"):
        remove_subspace(h, v, "mean", mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 2 positions"):
        remove_subspace(h, v, "resample", mask=torch.tensor([True, False, False, False]))
    with pytest.raises(ValueError, match="at least one position"):
        remove_subspace(h, v, "mean", mask=torch.zeros(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="floating-point"):
        remove_subspace(torch.ones(4, 8, dtype=torch.long), v, "zero")
    with pytest.raises(ValueError, match="NaN or inf"):
        remove_subspace(h, torch.full((8, 1), float("nan")), "zero")
