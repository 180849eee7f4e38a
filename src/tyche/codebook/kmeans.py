"""k-means for codebook initialisation, and the layer-norm calibration that goes with it.

:func:`kmeans` clusters ``(n, d)`` points into ``n_clusters`` centres by k-means++ seeding and
Lloyd steps. Points are assigned to the nearest centre (``assign="euclidean"``) or to the centre
of largest cosine similarity (``assign="cosine"``, the ranking of the ``inner_product`` and
``cosine`` codebooks); either way a centre is the mean of its points, so a code both ranks
and outputs like the inputs it stands for.

:func:`calibrate_affine` fits the per-feature affine ``γ z + β`` of a layer norm so that the
normalised inputs ``x̂`` match the raw inputs ``x`` in least squares. Codes learned on such
``x̂`` output vectors of the input's own scale: a codebook dropped into a trained model (a
frozen one in particular) replaces an activation by something of the size the next layers
expect, instead of a unit-variance vector.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from tyche.errors import InputError

__all__ = ["calibrate_affine", "kmeans"]

Assign = Literal["euclidean", "cosine"]


def _assignments(x: torch.Tensor, centres: torch.Tensor, assign: Assign) -> torch.Tensor:
    if assign == "cosine":
        unit = centres / centres.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return (x @ unit.T).argmax(-1)
    sq = (centres * centres).sum(-1)
    return (sq[None, :] - 2 * x @ centres.T).argmin(-1)


def kmeans(
    x: torch.Tensor,
    n_clusters: int,
    *,
    iters: int = 25,
    assign: Assign = "euclidean",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Centres ``(n_clusters, d)`` of ``x`` ``(n, d)`` by k-means++ seeding and Lloyd steps.

    Runs in float32 on ``x``'s device. With fewer points than clusters, points are reused
    with small noise. Empty clusters are re-seeded at the points worst served by their centre
    (farthest, or least similar for ``assign="cosine"``).
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise InputError(f"kmeans needs a non-empty (n, d) tensor, got shape {tuple(x.shape)}")
    if assign not in ("euclidean", "cosine"):
        raise InputError(f"assign must be 'euclidean' or 'cosine', got {assign!r}")
    x = x.detach().float()
    n = x.shape[0]
    g = generator
    if n < n_clusters:
        reps = x[torch.randint(n, (n_clusters - n,), generator=g, device="cpu").to(x.device)]
        scale = 1e-3 * x.std().clamp_min(1e-6)
        noise = torch.randn(reps.shape, generator=g, device="cpu").to(x.device)
        x = torch.cat([x, reps + scale * noise])
        n = x.shape[0]
    seeds = F.normalize(x, dim=-1) if assign == "cosine" else x
    sq = (seeds * seeds).sum(-1)
    first = int(torch.randint(n, (1,), generator=g))
    centres = x.new_empty(n_clusters, x.shape[1])
    centres[0] = x[first]
    dist = (sq - 2 * seeds @ seeds[first] + sq[first]).clamp_min(0)
    for j in range(1, n_clusters):  # k-means++: draw proportional to the squared distance
        total = dist.sum()
        probs = dist / total if total > 0 else torch.full_like(dist, 1.0 / n)
        pick = int(torch.multinomial(probs.cpu(), 1, generator=g))
        centres[j] = x[pick]
        dist = torch.minimum(dist, (sq - 2 * seeds @ seeds[pick] + sq[pick]).clamp_min(0))
    for _ in range(iters):
        labels = _assignments(x, centres, assign)
        counts = torch.bincount(labels, minlength=n_clusters).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        empty = counts == 0
        centres = torch.where(empty[:, None], centres, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            own = centres[labels]
            if assign == "cosine":
                badness = -F.cosine_similarity(x, own, dim=-1)
            else:
                badness = (x - own).pow(2).sum(-1)
            centres[empty] = x[badness.topk(int(empty.sum())).indices]
    return centres


def calibrate_affine(
    x: torch.Tensor, z: torch.Tensor, eps: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature least-squares fit ``x ≈ γ z + β`` over the rows of ``x`` and ``z`` ``(n, d)``.

    ``z`` is the layer norm of ``x`` without affine. Returns ``(γ, β)``, each ``(d,)``. A
    feature whose ``z`` is constant gets ``γ = 1`` and ``β`` = its mean offset.
    """
    if x.shape != z.shape or x.dim() != 2 or x.shape[0] < 2:
        raise InputError(
            f"calibrate_affine needs two (n >= 2, d) tensors, got {tuple(x.shape)}, "
            f"{tuple(z.shape)}"
        )
    x, z = x.double(), z.double()
    zc = z - z.mean(0)
    var = (zc * zc).mean(0)
    cov = (zc * (x - x.mean(0))).mean(0)
    gamma = torch.where(var > eps, cov / var.clamp_min(eps), torch.ones_like(var))
    beta = x.mean(0) - gamma * z.mean(0)
    return gamma.float(), beta.float()
