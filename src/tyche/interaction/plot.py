"""Pictures of local interaction graphs and of ablation curves (PNG, matplotlib Agg).

:func:`plot_graph` draws one column per node layer with its top ``nodes_per_layer`` features
(most important at the bottom), each a dot whose area grows with ``Lambda`` (the variance for
PCA bases), and a line per edge between consecutive columns whose width grows with the edge's
strength (after ``norm``: ``sqrt`` undoes the squaring of ``squared`` edges). Edges below
``threshold`` times the largest of their layer pair are left out. Colours come from each drawn
edge's own sign (blue positive, red negative), and node labels work with or without names
given: the two plotting bugs of the original (misaligned colours, a crash when labels are shown
without a labels file) cannot happen here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tyche.errors import InputError
from tyche.interaction.result import InteractionGraph
from tyche.plotting import pyplot, save_figure

__all__ = ["draw_graph", "plot_ablation_curves", "plot_graph"]

POSITIVE, NEGATIVE = "#1f5fbf", "#d62728"


def _norm(e: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "sqrt":
        return e.sign() * e.abs().sqrt()
    if norm == "identity":
        return e
    raise InputError(f"unknown norm {norm!r}; choose 'sqrt' or 'identity'")


def graph_segments(graph: InteractionGraph, *, nodes_per_layer: int = 30,
                   threshold: float = 0.02, norm: str = "sqrt",
                   hide_constant: bool = True) -> list[tuple[int, int, int, float]]:  # fmt: skip
    """The edges to draw: ``(layer i, node j of i, node k of i + 1, normalised strength)``.

    Strengths are normalised by the largest ``|strength|`` of their layer pair, so they lie in
    ``[-1, 1]``; those below ``threshold`` in magnitude are left out.
    """
    if not graph.has_edges:
        raise InputError("the graph has no edges to draw; build it with edges='squared'")
    out = []
    for i, e in enumerate(graph.edges):
        e = _norm(e.double(), norm)
        if hide_constant and graph.bases[i].center:
            e = e.clone()
            e[:, 0] = 0.0
        e = e[:nodes_per_layer, :nodes_per_layer]
        top = e.abs().max()
        if top == 0:
            continue
        e = e / top
        for k, j in (e.abs() >= threshold).nonzero().tolist():
            out.append((i, j, k, float(e[k, j])))
    return out


def draw_graph(ax: Any, graph: InteractionGraph, *, nodes_per_layer: int = 30,
               threshold: float = 0.02, norm: str = "sqrt", hide_constant: bool = True,
               labels: bool | Mapping[str, Sequence[str]] = False,
               line_width: float = 4.0) -> Any:  # fmt: skip
    """Draw ``graph`` on the matplotlib axes ``ax``; returns the edges' LineCollection.

    ``labels``: False (none), True (``f0, f1, ...``) or a dict from node-layer name to one
    label per feature (missing names or entries fall back to ``f<index>``).
    """
    from matplotlib.collections import LineCollection

    segments = graph_segments(graph, nodes_per_layer=nodes_per_layer, threshold=threshold,
                              norm=norm, hide_constant=hide_constant)  # fmt: skip
    lines = [((s[0], s[1]), (s[0] + 1, s[2])) for s in segments]
    strengths = [s[3] for s in segments]
    collection = LineCollection(
        lines,
        linewidths=[line_width * abs(v) for v in strengths],
        colors=[POSITIVE if v > 0 else NEGATIVE for v in strengths],
        alpha=0.6,
        zorder=1,
    )
    ax.add_collection(collection)
    for col, (name, basis) in enumerate(zip(graph.node_layers, graph.bases)):
        n = min(nodes_per_layer, basis.dim)
        imp = basis.importance
        if imp is not None:
            size = (imp[:n].abs() / imp[:n].abs().max().clamp_min(1e-300)).sqrt() * 120 + 6
        else:
            size = torch.full((n,), 20.0)
        ax.scatter([col] * n, range(n), s=size.tolist(), color="black", zorder=2)
        ax.text(col, -1.2, name, ha="center", va="top", fontsize=8, rotation=20)
        if labels:
            given = labels.get(name, []) if isinstance(labels, Mapping) else []
            for j in range(n):
                text = given[j] if j < len(given) else f"f{j}"
                ax.text(col + 0.06, j, text, fontsize=6, va="center", zorder=3)
    ax.set_xlim(-0.5, len(graph.node_layers) - 0.5)
    ax.set_ylim(-2.5, nodes_per_layer + 0.5)
    ax.set_xticks([])
    ax.set_ylabel("feature (by importance)")
    return collection


def plot_graph(graph: InteractionGraph, path: str | Path, *, nodes_per_layer: int = 30,
               threshold: float = 0.02, norm: str = "sqrt", hide_constant: bool = True,
               labels: bool | Mapping[str, Sequence[str]] = False,
               title: str | None = None) -> Path:  # fmt: skip
    """The interaction graph as a PNG (see :func:`draw_graph`); returns the path."""
    plt = pyplot()
    n_layers = len(graph.node_layers)
    fig, ax = plt.subplots(figsize=(1.8 * n_layers + 1, 1.5 + nodes_per_layer * 0.22))
    draw_graph(ax, graph, nodes_per_layer=nodes_per_layer, threshold=threshold, norm=norm,
               hide_constant=hide_constant, labels=labels)  # fmt: skip
    basis = graph.settings.get("basis", "")
    ax.set_title(title or f"interaction graph ({basis}, {graph.settings.get('edges', '')} "
                 f"edges, {norm} norm, >= {threshold:g} of max)", fontsize=9)  # fmt: skip
    return save_figure(fig, path, dpi=110)


def plot_ablation_curves(curves: Mapping[str, Mapping[str, Any]], path: str | Path, *,
                         metric: str = "accuracy") -> Path:  # fmt: skip
    """One panel per node layer (or section), one line per label: ``metric`` against kept.

    ``curves``: ``{label: {where: AblationCurve}}`` (e.g. ``{"LIB": ..., "PCA": ...}``). The
    unablated model's value is a dashed line.
    """
    plt = pyplot()
    wheres = list(dict.fromkeys(w for by in curves.values() for w in by))
    if not wheres:
        raise InputError("no ablation curves to plot")
    cols = min(len(wheres), 3)
    rows = -(-len(wheres) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, where in zip(axes.ravel(), wheres):
        baseline = None
        for i, (label, by) in enumerate(curves.items()):
            curve = by.get(where)
            if curve is None:
                continue
            ax.plot(curve.n_kept, getattr(curve, metric), "o-", ms=3, color=f"C{i}", label=label)
            baseline = getattr(curve, f"baseline_{metric}")
        if baseline is not None:
            ax.axhline(baseline, color="grey", linestyle="--", linewidth=1)
        kind = next(by[where].kind for by in curves.values() if where in by)
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel(f"{'directions' if kind == 'nodes' else 'edges'} kept")
        ax.set_ylabel(metric)
        ax.set_title(where, fontsize=9)
        ax.legend(fontsize=8)
    for ax in axes.ravel()[len(wheres) :]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
