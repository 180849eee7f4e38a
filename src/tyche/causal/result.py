"""``CausalBasis``: the frozen result of a causal basis extraction at one site."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from tyche.ablation import AblationMode, remove_subspace
from tyche.errors import InputError
from tyche.io import ResultIO

__all__ = ["CausalBasis"]


@dataclass(frozen=True)
class CausalBasis(ResultIO):
    """An ordered orthonormal basis of the directions whose ablation changes the output most.

    Attributes:
        vectors: (d, k) orthonormal columns, sorted by decreasing ``energies`` (greedy
            basis), or by marginal contribution to the joint energy (``refine="joint"``).
        energies: (k,) energy of ablating each column *alone*: the mean over positions of
            KL(clean ‖ ablated) in nats (``objective="kl"``), or the mean increase of the
            next-token cross-entropy in nats (``objective="ce"``).
        subspace_energies: (k,) energy of ablating the first ``i + 1`` columns *jointly*
            (greedy deflation does not make these the best i-dimensional subspaces).
        greedy_subspace_energies: with ``refine="joint"``, the ``subspace_energies`` the
            greedy basis had before the refinement (its last entry is the greedy joint
            energy of all k); None otherwise.
        site: where the hidden states came from (e.g. ``"resid_pre.3"``), or None.
        mode: the ablation used, ``"zero"``, ``"mean"`` or ``"resample"``.
        objective: ``"kl"`` or ``"ce"``.
        n_positions: number of positions (over every rank) the energies average over.
        n_evals: evaluation-equivalents spent on each column, in the order of ``vectors``:
            passes of the objective over all the data, a pass over the screening subsample
            counting its fraction of the positions, forward-only passes (screening) counted
            like forward + backward ones; with ``refine="joint"`` the refinement's passes are
            shared equally among the columns.
        seconds: wall-clock seconds spent on each column, in the order of ``vectors``.
        pca_energies: (m,) energies of the top-m principal directions of the same hidden
            states under the same ablation (a baseline), or None if not computed.
        model_hash: ``tyche.io.model_hash`` of the model the target came from, or None.
        settings: the remaining extraction settings (max_iter, min_energy, tol, ...).
    """

    UNITS: ClassVar[dict[str, str]] = {
        "energies": "nats",
        "subspace_energies": "nats",
        "greedy_subspace_energies": "nats",
        "pca_energies": "nats",
        "seconds": "s",
    }

    vectors: Tensor
    energies: Tensor
    subspace_energies: Tensor
    greedy_subspace_energies: Tensor | None = None
    site: str | None = None
    mode: str = "mean"
    objective: str = "kl"
    n_positions: int = 0
    n_evals: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    pca_energies: Tensor | None = None
    model_hash: str | None = None
    settings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2:
            raise InputError(f"vectors must be (d, k), got {tuple(self.vectors.shape)}")
        k = self.vectors.shape[1]
        for name in ("energies", "subspace_energies"):
            if tuple(getattr(self, name).shape) != (k,):
                raise InputError(f"{name} must have shape ({k},) to match vectors (d, {k})")

    @property
    def basis(self) -> Tensor:
        """Alias of ``vectors`` (the name used in the original gist)."""
        return self.vectors

    @property
    def k(self) -> int:
        """Number of directions."""
        return self.vectors.shape[1]

    @property
    def d(self) -> int:
        """Dimension of the hidden states."""
        return self.vectors.shape[0]

    @property
    def units(self) -> str:
        """Unit of ``energies`` and ``subspace_energies`` (natural log: nats)."""
        return self.UNITS["energies"]

    def energies_in_bits(self) -> Tensor:
        """``energies`` converted to bits (the unit of the tuned-lens paper)."""
        return self.energies / torch.log(torch.tensor(2.0, dtype=self.energies.dtype))

    def ablate(
        self,
        h: Tensor,
        n: int | None = None,
        mode: AblationMode | None = None,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Remove the first ``n`` directions (all if None) from ``h`` (..., d).

        Uses this basis's ``mode`` unless another is given (see ``tyche.ablation``).
        """
        n = self.k if n is None else n
        if not 0 < n <= self.k:
            raise InputError(f"n must be in 1..{self.k}, got {n}")
        vectors = self.vectors[:, :n].to(device=h.device, dtype=h.dtype)
        return remove_subspace(h, vectors, mode or self.mode, mask, generator)  # type: ignore[arg-type]

    def summary(self) -> str:
        """One line: site, mode, the leading energies."""
        head = ", ".join(f"{e:.4g}" for e in self.energies[:4].tolist())
        more = ", ..." if self.k > 4 else ""
        return f"{self.site or '?'} [{self.mode}/{self.objective}] k={self.k}: {head}{more} nats"
