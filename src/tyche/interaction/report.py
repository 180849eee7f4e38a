"""Text and JSON summaries of an interaction graph (what ``tyche interaction build`` prints)."""

from __future__ import annotations

from typing import Any

from tyche.interaction.result import InteractionGraph

__all__ = ["graph_summary", "summary_table"]


def graph_summary(graph: InteractionGraph) -> dict[str, Any]:
    """Per node layer: width, kept directions, top Lambda; per section: edge concentration."""
    layers = []
    for basis in graph.bases:
        imp = basis.importance
        layers.append({"node_layer": basis.node_layer, "orig_dim": basis.orig_dim,
                       "kept": basis.dim, "top_importance": None if imp is None else
                       imp[: min(8, len(imp))].tolist()})  # fmt: skip
    sections = [{"edges": list(e.shape), "edges_for_90pct": graph.edge_weight_concentration(i),
                 "edges_for_99pct": graph.edge_weight_concentration(i, 0.99)}
                for i, e in enumerate(graph.edges)]  # fmt: skip
    return {"layers": layers, "sections": sections, "stage_seconds": graph.seconds}


def summary_table(graph: InteractionGraph, seconds: float) -> str:
    """A text table of the graph: kept directions per layer, edge concentration per section."""
    lines = [f"{'node layer':<24} {'width':>6} {'kept':>6}  top importance"]
    for basis in graph.bases:
        imp = basis.importance
        top = "-" if imp is None else " ".join(f"{v:.3g}" for v in imp[:4].tolist())
        lines.append(f"{basis.node_layer:<24} {basis.orig_dim:>6} {basis.dim:>6}  {top}")
    for i, e in enumerate(graph.edges):
        lines.append(f"edges {graph.node_layers[i]} -> {graph.node_layers[i + 1]}: "
                     f"{e.numel()} edges, 90% of the weight in "
                     f"{graph.edge_weight_concentration(i)}, 99% in "
                     f"{graph.edge_weight_concentration(i, 0.99)}")  # fmt: skip
    lines.append(
        f"({graph.settings.get('basis')} basis, {seconds:.1f} s; stages "
        + ", ".join(f"{k} {v:.1f} s" for k, v in graph.seconds.items())
        + ")"
    )
    return "\n".join(lines)
