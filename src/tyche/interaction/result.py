"""Frozen results of a build: :class:`InteractionGrams` (stage 1) and :class:`InteractionGraph`.

Both save to a folder (safetensors + JSON, :mod:`tyche.io`) and load back. A graph without
edges (``edges == []``) is the result of the basis stage; the builder takes either result to
resume from (``grams=`` / ``bases=``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from tyche.errors import InputError
from tyche.interaction.basis import InteractionBasis
from tyche.io import ResultIO

__all__ = ["InteractionGraph", "InteractionGrams"]


@dataclass(frozen=True)
class InteractionGrams(ResultIO):
    """Per node layer: the number of positions, the mean ``(d,)`` and covariance ``(d, d)``.

    ``settings`` are the build settings these statistics depend on (data, dtype, node
    layers); ``model_hash`` is ``tyche.io.model_hash`` of the model.
    """

    UNITS: ClassVar[dict[str, str]] = {"counts": "positions (rows x positions, unmasked)"}

    node_layers: list[str]
    counts: list[float]
    means: list[Tensor]
    covariances: list[Tensor]
    settings: dict = field(default_factory=dict)
    model_hash: str | None = None
    seconds: float = 0.0


def _basis(value: Any) -> InteractionBasis:
    if isinstance(value, InteractionBasis):
        return value
    if isinstance(value, dict):
        return InteractionBasis(**value)
    raise TypeError(f"a basis must be an InteractionBasis, got {type(value).__name__}")


@dataclass(frozen=True)
class InteractionGraph(ResultIO):
    """The local interaction graph of a model on some data.

    Attributes:
        node_layers: the resolved node-layer names, in order.
        bases: one :class:`InteractionBasis` per node layer (``C``, ``C_pinv``, ``Lambda``...).
        edges: ``edges[i]`` ``(k_{i+1}, k_i)`` between node layers ``i`` and ``i + 1``
            (empty when only the bases were computed).
        settings: the build settings (basis, edges, integration, dtype, center, ...).
        model_hash: ``tyche.io.model_hash`` of the model.
        n_positions: positions (rows x positions) the statistics average over, per layer.
        seconds: wall time of each stage (``grams``, ``bases``, ``edges``).
    """

    UNITS: ClassVar[dict[str, str]] = {
        "Lambda": "squared output units per position (second moment of the feature)",
        "edges": "squared output units per position",
        "seconds": "s",
    }

    node_layers: list[str]
    bases: list[InteractionBasis]
    edges: list[Tensor] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    model_hash: str | None = None
    n_positions: list[float] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bases", [_basis(b) for b in self.bases])
        if len(self.bases) != len(self.node_layers):
            raise InputError(f"{len(self.bases)} bases for {len(self.node_layers)} node layers")
        if self.edges and len(self.edges) != len(self.node_layers) - 1:
            raise InputError(f"{len(self.edges)} edge matrices for {len(self.node_layers)} layers")
        for i, e in enumerate(self.edges):
            want = (self.bases[i + 1].dim, self.bases[i].dim)
            if tuple(e.shape) != want:
                raise InputError(f"edges[{i}] has shape {tuple(e.shape)}, expected {want}")

    @property
    def has_edges(self) -> bool:
        return bool(self.edges)

    def without_edges(self) -> InteractionGraph:
        """The same graph with the edges dropped (the basis stage's result)."""
        return dataclasses.replace(self, edges=[])

    def activations(self, acts: Tensor, index: int) -> Tensor:
        """Features ``[f, 1] @ C`` of node layer ``index`` for activations ``(..., d)``."""
        from tyche.interaction.fold import append_constant

        basis = self.bases[index]
        if basis.C is None:
            return acts.double()
        return append_constant(acts.double()) @ basis.C

    def edge_weight_concentration(self, index: int, fraction: float = 0.9) -> int:
        """Fewest edges of ``edges[index]`` that hold ``fraction`` of its total weight."""
        e = self.edges[index].abs().flatten().sort(descending=True).values
        total = e.sum()
        if total == 0:
            return 0
        return int(torch.searchsorted(e.cumsum(0), fraction * total).item()) + 1
