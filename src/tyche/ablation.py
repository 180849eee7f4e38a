"""Ablate a linear subspace of activations: zero, mean or resample.

Every mode keeps the part of ``h`` orthogonal to the subspace spanned by the columns of
``vectors`` (``V``, shape ``(d, k)``, orthonormal) and swaps the part inside it for that of
a *replacement* ``r``::

    h' = h - (h - r) V Vᵀ = (I - P) h + P r,     P = V Vᵀ

* ``zero``: ``r = 0``, so ``h' = (I - P) h`` (the orthogonal projection away from the span).
* ``mean``: ``r = μ``, the mean of ``h`` over the selected positions, so every selected row's
  coordinates along ``V`` are fixed at their mean (``x ↦ x - V Vᵀ (x - μ)``).
* ``resample``: ``r_i = h_{σ(i)}`` where ``σ`` is a uniformly random *derangement* (no row
  keeps its own value) of the selected rows, drawn from ``generator``.

All leading dimensions of ``h`` (batch, position, ...) are flattened into rows. ``mask``
(shape ``h.shape[:-1]``, bool or 0/1) selects the rows that are ablated and that supply the
mean and the resampling pool; rows outside it (padding) are returned unchanged and never
used as donors.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from tyche.errors import InputError

AblationMode = Literal["zero", "mean", "resample"]
ABLATION_MODES: tuple[str, ...] = ("zero", "mean", "resample")

__all__ = [
    "ABLATION_MODES",
    "AblationMode",
    "check_orthonormal",
    "masked_mean",
    "remove_subspace",
    "replace_subspace",
    "resample_donors",
    "sample_derangement",
]


def check_orthonormal(vectors: Tensor, d: int | None = None, *, atol: float = 1e-4) -> Tensor:
    """Return ``vectors`` as a ``(d, k)`` matrix after checking its columns are orthonormal.

    A single vector of shape ``(d,)`` becomes ``(d, 1)``. Raises ``ValueError`` if the shape
    does not fit ``d`` or if ``VᵀV`` differs from the identity by more than ``atol``.
    """
    if not isinstance(vectors, Tensor):
        raise TypeError(f"vectors must be a torch.Tensor of shape (d, k), got {type(vectors)}")
    if vectors.ndim == 1:
        vectors = vectors[:, None]
    if vectors.ndim != 2:
        raise InputError(f"vectors must have shape (d, k) or (d,), got {tuple(vectors.shape)}")
    if d is not None and vectors.shape[0] != d:
        raise InputError(
            f"vectors has {vectors.shape[0]} rows but the hidden states have d={d}; "
            "pass a (d, k) matrix whose columns are the directions"
        )
    if vectors.shape[1] > vectors.shape[0]:
        raise InputError(f"cannot have k={vectors.shape[1]} orthonormal vectors in d={d}")
    if not torch.isfinite(vectors).all():
        raise InputError("vectors contains NaN or inf")
    gram = vectors.T.double() @ vectors.double()
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    err = (gram - eye).abs().max().item() if gram.numel() else 0.0
    if err > atol:
        raise InputError(
            f"the columns of vectors are not orthonormal (max |VᵀV - I| = {err:.3g}); "
            "orthonormalise them first, e.g. torch.linalg.qr(vectors).Q"
        )
    return vectors


def _flat_mask(mask: Tensor | None, lead_shape: torch.Size, device: torch.device) -> Tensor:
    """The mask as a flat bool tensor of ``prod(lead_shape)`` rows (all True if None)."""
    n = int(torch.Size(lead_shape).numel())
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if tuple(mask.shape) != tuple(lead_shape):
        raise InputError(
            f"mask has shape {tuple(mask.shape)} but the hidden states need "
            f"{tuple(lead_shape)} (all dimensions of h except the last)"
        )
    if mask.dtype != torch.bool:
        if not ((mask == 0) | (mask == 1)).all():
            raise InputError("mask must be bool or contain only 0 and 1")
        mask = mask != 0
    return mask.reshape(n).to(device)


def masked_mean(h: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of the rows of ``h`` (..., d) selected by ``mask`` (``h.shape[:-1]``); shape (d,)."""
    flat = h.reshape(-1, h.shape[-1])
    keep = _flat_mask(mask, h.shape[:-1], h.device)
    count = int(keep.sum())
    if count == 0:
        raise InputError("mean ablation needs at least one position selected by the mask")
    return flat[keep].sum(0) / count


def sample_derangement(n: int, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random permutation of ``range(n)`` with no fixed point (LongTensor (n,)).

    Drawn by rejection (about e ≈ 2.72 permutations on average, whatever ``n``), so it is
    exactly uniform over derangements and reproducible from ``generator`` (CPU).
    """
    if n < 2:
        raise InputError(f"a derangement needs at least 2 elements, got {n}")
    arange = torch.arange(n)
    while True:
        perm = torch.randperm(n, generator=generator)
        if not (perm == arange).any():
            return perm


def resample_donors(
    lead_shape: torch.Size | tuple[int, ...],
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Donor row for each flattened row: a derangement of the masked rows, identity elsewhere.

    Returns a LongTensor of ``prod(lead_shape)`` indices on the CPU. Rows outside the mask
    are their own donors (so ``replace_subspace`` leaves them unchanged).
    """
    keep = _flat_mask(mask, torch.Size(lead_shape), torch.device("cpu"))
    rows = keep.nonzero().squeeze(1)
    if rows.numel() < 2:
        raise InputError(
            f"resample ablation needs at least 2 positions selected by the mask, got {rows.numel()}"
        )
    donors = torch.arange(keep.numel())
    donors[rows] = rows[sample_derangement(rows.numel(), generator)]
    return donors


def replace_subspace(h: Tensor, vectors: Tensor, replacement: Tensor | float) -> Tensor:
    """``h - (h - r) V Vᵀ``: swap the component of ``h`` in span(V) for that of ``r``.

    ``h`` (..., d); ``vectors`` (d, k) orthonormal (not checked: see ``check_orthonormal``);
    ``replacement`` broadcastable to ``h`` (0, a (d,) mean, or donor rows of ``h``'s shape).
    Differentiable in both ``h`` and ``vectors``. Cost O(numel(h) · k).
    """
    is_zero = isinstance(replacement, int | float) and replacement == 0
    delta = h if is_zero else h - replacement
    return h - (delta @ vectors) @ vectors.T


def remove_subspace(
    h: Tensor,
    vectors: Tensor,
    mode: AblationMode = "zero",
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    mean: Tensor | None = None,
    donors: Tensor | None = None,
) -> Tensor:
    """Ablate span(``vectors``) in ``h`` by zero, mean or resample ablation.

    Args:
        h: hidden states (..., d), floating point.
        vectors: (d, k) with orthonormal columns, or one unit vector (d,).
        mode: ``"zero"``, ``"mean"`` or ``"resample"`` (see the module docstring).
        mask: ``h.shape[:-1]`` bool/0-1; rows outside it are left unchanged and neither
            enter the mean nor donate in resampling. None selects every row.
        generator: CPU generator for the resampling derangement (reproducible runs).
        mean: (d,) replacement to use in mean mode instead of the masked mean of ``h``
            (e.g. a mean over every rank's data, computed once).
        donors: precomputed flat donor indices for resample mode (see ``resample_donors``).

    Returns:
        A tensor shaped like ``h``. Differentiable in ``h`` and ``vectors``.
    """
    if not isinstance(h, Tensor) or not h.is_floating_point():
        raise TypeError("h must be a floating-point tensor of shape (..., d)")
    if h.ndim < 1 or h.shape[-1] == 0:
        raise InputError(f"h must have shape (..., d) with d > 0, got {tuple(h.shape)}")
    vectors = check_orthonormal(vectors, h.shape[-1]).to(h.dtype)
    keep = _flat_mask(mask, h.shape[:-1], h.device)
    if mode == "zero":
        replacement: Tensor | float = 0.0
        if mask is not None:
            replacement = torch.where(keep.reshape(h.shape[:-1])[..., None], 0.0, h)
    elif mode == "mean":
        mu = masked_mean(h, mask) if mean is None else mean.to(h)
        if mu.shape != h.shape[-1:]:
            raise InputError(f"mean must have shape ({h.shape[-1]},), got {tuple(mu.shape)}")
        replacement = mu
        if mask is not None:
            replacement = torch.where(keep.reshape(h.shape[:-1])[..., None], mu, h)
    elif mode == "resample":
        if donors is None:
            donors = resample_donors(h.shape[:-1], mask, generator)
        if donors.shape != (keep.numel(),):
            raise InputError(f"donors must have shape ({keep.numel()},), got {tuple(donors.shape)}")
        flat = h.reshape(-1, h.shape[-1])
        replacement = flat[donors.to(h.device)].reshape(h.shape)
    else:
        raise InputError(f"unknown ablation mode {mode!r}; choose one of {ABLATION_MODES}")
    return replace_subspace(h, vectors, replacement)
