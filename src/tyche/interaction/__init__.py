"""The local interaction basis (LIB): the relevant directions of every layer and how they interact.

``build_interaction_graph(model, inputs, node_layers, GraphOptions(...))`` gives each node
layer a basis whose directions are the right singular vectors of the (integrated) Jacobian
into the next layer, whitened and scaled by their importance ``Lambda``, and the graph of
interaction strengths (edges) between consecutive layers. PCA (``basis="svd"``) and neuron
bases come from the same code path as baselines. Ablations (:mod:`tyche.interaction.ablate`,
settings in :class:`AblationOptions`) keep the top directions or edges and measure accuracy
and loss; :mod:`tyche.interaction.plot` draws graphs and curves.
Names are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tyche._lazy import lazy_exports

__all__ = [
    "BASES",
    "AblationCurve",
    "AblationOptions",
    "EDGE_FORMULAS",
    "GraphOptions",
    "RULES",
    "InteractionBasis",
    "InteractionGraph",
    "InteractionGrams",
    "ablate_edges",
    "ablate_nodes",
    "build_grams",
    "build_interaction_graph",
    "collect_grams",
    "integration_points",
]

if TYPE_CHECKING:  # lazy names, for IDEs and type checkers
    from tyche.interaction.ablate import AblationCurve, ablate_edges, ablate_nodes
    from tyche.interaction.basis import BASES, InteractionBasis
    from tyche.interaction.edges import EDGE_FORMULAS
    from tyche.interaction.graph import build_grams, build_interaction_graph, collect_grams
    from tyche.interaction.integrate import RULES, integration_points
    from tyche.interaction.options import AblationOptions, GraphOptions
    from tyche.interaction.result import InteractionGrams, InteractionGraph

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "AblationCurve": "tyche.interaction.ablate",
        "ablate_edges": "tyche.interaction.ablate",
        "ablate_nodes": "tyche.interaction.ablate",
        "BASES": "tyche.interaction.basis",
        "InteractionBasis": "tyche.interaction.basis",
        "EDGE_FORMULAS": "tyche.interaction.edges",
        "build_grams": "tyche.interaction.graph",
        "build_interaction_graph": "tyche.interaction.graph",
        "collect_grams": "tyche.interaction.graph",
        "RULES": "tyche.interaction.integrate",
        "integration_points": "tyche.interaction.integrate",
        "AblationOptions": "tyche.interaction.options",
        "GraphOptions": "tyche.interaction.options",
        "InteractionGraph": "tyche.interaction.result",
        "InteractionGrams": "tyche.interaction.result",
    },
)
