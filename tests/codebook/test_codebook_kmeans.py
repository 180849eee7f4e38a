"""k-means initialisation: cosine assignment, layer-norm calibration, site-by-site order."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from tyche.codebook.kmeans import calibrate_affine, kmeans
from tyche.codebook.layer import CodebookLayer
from tyche.codebook.model import attach


def test_cosine_kmeans_groups_by_direction() -> None:
    """Points along 3 directions at very different lengths: cosine assignment finds the
    directions (each centre is the mean of its points), euclidean splits by length instead."""
    g = torch.Generator().manual_seed(0)
    dirs = torch.eye(3)
    lengths = torch.tensor([1.0, 10.0]).repeat(60)  # every direction at length 1 and 10
    x = dirs.repeat_interleave(40, 0) * lengths[:, None]
    x = x + 0.01 * torch.randn(x.shape, generator=g)
    found = kmeans(x, 3, assign="cosine", generator=g)
    cos = F.cosine_similarity(found[:, None], dirs[None], dim=-1)
    assert (cos.max(0).values > 0.999).all()  # one centre per direction
    # each centre is the mean of 40 points at length 1 and 40 at 10 (5.5) plus noise 0.01:
    # measured 8e-4 off, 65x inside 0.05; a centre of one length only would be ≥ 4.5 off
    assert torch.allclose(found.norm(dim=-1), torch.full((3,), 5.5), atol=0.05)  # mean length


def test_calibrated_affine_recovers_scale_and_offset() -> None:
    """Rows with one mean and one spread: the layer norm divides them out exactly, so the
    least-squares affine is that spread and mean (closed form)."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(500, 8, generator=g)
    z = F.layer_norm(z, (8,), eps=0.0)  # zero mean, unit variance per row
    x = 3.0 * z + 0.5
    gamma, beta = calibrate_affine(x, F.layer_norm(x, (8,), eps=0.0))
    # least squares over 500 float32 rows: sums of 500 terms, ≲ 500·2^-24 ≈ 3e-5 relative at
    # worst (beta ≈ 0.5: the same bound on values of |x| ≲ 4, absolute); a wrong fit is O(0.1)
    torch.testing.assert_close(gamma, torch.full((8,), 3.0), rtol=1e-4, atol=0)
    torch.testing.assert_close(beta, torch.full((8,), 0.5), atol=2e-4, rtol=0)  # as above


def test_calibrated_codes_output_at_the_input_scale() -> None:
    """Inputs of norm ~40: a calibrated codebook outputs vectors of about that size and
    reconstructs them far better; without calibration its codes have the layer norm's scale
    (norm sqrt(d) = 4)."""
    g = torch.Generator().manual_seed(2)
    centres = 10.0 * torch.randn(6, 16, generator=g)
    x = centres.repeat_interleave(50, 0) + 0.1 * torch.randn(300, 16, generator=g)
    plain, calibrated = CodebookLayer(16, 6), CodebookLayer(16, 6)
    plain.init_codes(x, seed=0)
    calibrated.init_codes(x, seed=0, calibrate=True)
    with torch.no_grad():
        y_plain, y_cal = plain(x), calibrated(x)
    norm = x.norm(dim=-1).mean()
    assert y_plain.norm(dim=-1).mean() < 0.15 * norm
    assert 0.8 * norm < y_cal.norm(dim=-1).mean() < 1.2 * norm
    err_plain, err_cal = (y_plain - x).norm(dim=-1).mean(), (y_cal - x).norm(dim=-1).mean()
    # a fixed affine cannot undo each row's own mean and spread, so some error stays
    assert err_cal < 0.4 * err_plain


def test_sequential_kmeans_clusters_what_each_codebook_sees(gpt2_model) -> None:
    """Site by site: the second codebook's codes are k-means centres of its inputs with the
    first codebook already snapping (computed directly, with the same seeds)."""
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(3))
    cb = attach(copy.deepcopy(gpt2_model), ["mlp_out.0", "mlp_out.1"], num_codes=8, seed=0)
    ref = copy.deepcopy(cb).eval()
    cb.kmeans_init([ids], max_tokens=64, seed=5, sequential=True)
    first, second = ref.codebook("mlp_out.0"), ref.codebook("mlp_out.1")
    with torch.no_grad():
        first.collected, second.snap = [], False
        ref(input_ids=ids)
        first.init_codes(torch.cat(first.collected), seed=5)
        first.collected, second.collected = None, []
        ref(input_ids=ids)  # the first codebook snaps now
        second.init_codes(torch.cat(second.collected), seed=6)
    # same path: kmeans_init and the steps above run the same forward passes (one batch of
    # 4 x 16 tokens, the same weights) and the same init_codes (same seed) on the same data
    torch.testing.assert_close(cb.codebook("mlp_out.0").codebook, first.codebook)
    # same path: as above, for the second codebook
    torch.testing.assert_close(cb.codebook("mlp_out.1").codebook, second.codebook)
    assert all(cb.codebook(s).snap for s in cb.sites)  # snap states restored
    together = copy.deepcopy(ref)
    together.kmeans_init([ids], max_tokens=64, seed=5, sequential=False)
    second_codes, together_codes = second.codebook, together.codebook("mlp_out.1").codebook
    # one pass clusters mlp_out.1's inputs without the first codebook snapping: other inputs,
    # codes O(1) apart (measured up to 3.2), far beyond rounding
    assert not torch.allclose(together_codes, second_codes, rtol=1e-5, atol=1e-3)


def test_restore_scale_inverts_the_layer_norm() -> None:
    """A code equal to a token's normalised input gives back the input itself (the token's
    own mean and spread restored); a plain layer outputs the normalised vector."""
    g = torch.Generator().manual_seed(4)
    x = 7.0 * torch.randn(5, 12, generator=g) + 3.0
    plain, restoring = CodebookLayer(12, 5), CodebookLayer(12, 5, restore_scale=True)
    z = F.layer_norm(x, (12,), eps=1e-5)
    with torch.no_grad():
        plain.codebook.copy_(z[None])
        restoring.codebook.copy_(z[None])
        # exact: each token chooses its own code (k = 1) and the output is that stored vector
        torch.testing.assert_close(plain(x), z, rtol=0, atol=0)
        # float32 round trip of a normalisation: errors of a few ulps of |x| ~ 20
        torch.testing.assert_close(restoring(x), x, rtol=1e-5, atol=1e-4)
    assert restoring.settings()["restore_scale"] and not plain.settings()["restore_scale"]
    restoring.init_codes(x, seed=0, calibrate=True)  # no calibration: the scale is restored
    assert torch.equal(restoring.ln_weight, torch.ones(1, 12))
    assert torch.equal(restoring.ln_bias, torch.zeros(1, 12))
