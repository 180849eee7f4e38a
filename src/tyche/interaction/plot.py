"""Pictures of local interaction graphs and of ablation curves (PNG, matplotlib Agg).

:func:`plot_graph` draws one column per node layer with its top ``nodes_per_layer`` features
(most important at the bottom), each a dot whose area grows with ``Lambda`` (the variance for
PCA bases), and a line per edge between consecutive columns whose width grows with the edge's
strength (after ``norm``: ``sqrt`` undoes the squaring of ``squared`` edges). Not every edge
is drawn: per layer pair, the fewest strongest edges that carry ``weight_share`` (90%) of its
weight, at most ``max_edges`` (40), so the picture shows where the weight is, not a hairball;
``threshold`` (a fraction of the pair's largest strength, 0 by default) can drop more. Only
nodes with a drawn edge are labelled, and labels are cut short. Colours come from each drawn
edge's own sign (blue positive, red negative), and node labels work with or without names
given: the two plotting bugs of the original (misaligned colours, a crash when labels are shown
without a labels file) cannot happen here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tyche.errors import InputError
from tyche.interaction.result import InteractionGraph
from tyche.plotting import integer_ticks, log_count_ticks, pyplot, save_figure

__all__ = ["EdgeSelection", "draw_graph", "plot_ablation_curves", "plot_graph", "select_edges"]

POSITIVE, NEGATIVE = "#1f5fbf", "#d62728"
#: node labels longer than this are cut (with an ellipsis) so they stay clear of the next column
LABEL_CHARS = 16
LABEL_BOX = {"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 0.5}


#: edges drawn per layer pair: the fewest strongest carrying this share of its weight, capped
WEIGHT_SHARE, MAX_EDGES = 0.9, 40


@dataclass(frozen=True)
class EdgeSelection:
    """The edges drawn between node layers ``layer`` and ``layer + 1``.

    ``edges``: ``(node j of layer, node k of layer + 1, strength)`` strongest first, strength
    after ``norm`` divided by the largest ``|strength|`` of the pair (in ``[-1, 1]``);
    ``share``: the fraction of the pair's weight (``|E|`` among the drawn nodes, as built)
    that they carry; ``n_nonzero``: how many edges of the pair have any weight.
    """

    layer: int
    edges: list[tuple[int, int, float]]
    share: float
    n_nonzero: int


def _norm(e: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "sqrt":
        return e.sign() * e.abs().sqrt()
    if norm == "identity":
        return e
    raise InputError(f"unknown norm {norm!r}; choose 'sqrt' or 'identity'")


def _check_selection(weight_share: float, max_edges: int | None, threshold: float,
                     norm: str) -> None:  # fmt: skip
    _norm(torch.zeros(1), norm)
    if not 0 < weight_share <= 1:
        raise InputError(f"weight_share is a fraction of the weight in (0, 1], got {weight_share}")
    if max_edges is not None and max_edges < 1:
        raise InputError(f"max_edges must be at least 1 (or None: no cap), got {max_edges}")
    if not 0 <= threshold <= 1:
        raise InputError(f"threshold is a fraction of the largest edge in [0, 1], got {threshold}")


def _select_pair(e: torch.Tensor, norm: str, weight_share: float, max_edges: int | None,
                 threshold: float) -> tuple[list[tuple[int, int, float]], float, int]:  # fmt: skip
    """``e``: (n_next, n) edges as built, float64. The strongest that carry ``weight_share``."""
    weight = e.abs().flatten()
    total = float(weight.sum())
    n_nonzero = int((weight > 0).sum())
    if total == 0:
        return [], 0.0, 0
    order = weight.argsort(descending=True, stable=True)
    cumulative = weight[order].cumsum(0)
    need = int(torch.searchsorted(cumulative, weight_share * total * (1 - 1e-12)).item()) + 1
    n = min(need, n_nonzero, max_edges or n_nonzero)
    strength = _norm(e, norm).flatten()
    strength = strength / strength.abs().max()
    kept = [int(f) for f in order[:n] if abs(float(strength[f])) >= threshold]
    cols = e.shape[1]
    edges = [(f % cols, f // cols, float(strength[f])) for f in kept]
    return edges, float(weight[kept].sum()) / total, n_nonzero


def select_edges(graph: InteractionGraph, *, nodes_per_layer: int = 30,
                 weight_share: float = WEIGHT_SHARE, max_edges: int | None = MAX_EDGES,
                 threshold: float = 0.0, norm: str = "sqrt",
                 hide_constant: bool = True) -> list[EdgeSelection]:  # fmt: skip
    """Per layer pair, the edges worth drawing: among the top ``nodes_per_layer`` nodes of each
    layer (the constant direction's edges left out with ``hide_constant``), the fewest
    strongest edges that carry ``weight_share`` of the pair's weight ``|E|``, at most
    ``max_edges`` (None: no cap), less any below ``threshold`` times the pair's largest
    strength after ``norm``. ``weight_share=1, max_edges=None`` keeps every nonzero edge.
    """
    if not graph.has_edges:
        raise InputError("the graph has no edges to draw; build it with edges='squared'")
    _check_selection(weight_share, max_edges, threshold, norm)
    out = []
    for i, e in enumerate(graph.edges):
        e = e.double()[:nodes_per_layer, :nodes_per_layer].clone()
        if hide_constant and graph.bases[i].center:
            e[:, 0] = 0.0
        edges, share, n_nonzero = _select_pair(e, norm, weight_share, max_edges, threshold)
        out.append(EdgeSelection(i, edges, share, n_nonzero))
    return out


def graph_segments(graph: InteractionGraph, **selection: Any) -> list[tuple[int, int, int, float]]:
    """The edges to draw: ``(layer i, node j of i, node k of i + 1, normalised strength)``,
    chosen by :func:`select_edges` (same keywords)."""
    return [(s.layer, j, k, v) for s in select_edges(graph, **selection) for j, k, v in s.edges]


def draw_graph(ax: Any, graph: InteractionGraph, *, nodes_per_layer: int = 30,
               weight_share: float = WEIGHT_SHARE, max_edges: int | None = MAX_EDGES,
               threshold: float = 0.0, norm: str = "sqrt", hide_constant: bool = True,
               labels: bool | Mapping[str, Sequence[str]] = False,
               line_width: float = 4.0) -> Any:  # fmt: skip
    """Draw ``graph`` on the matplotlib axes ``ax``; returns the edges' LineCollection.

    Edges as :func:`select_edges` picks them, line width ``0.3 + line_width * |strength|``.
    Nodes without a drawn edge are grey. ``labels``: False (none), True (``f0, f1, ...``) or a
    dict from node-layer name to one label per feature (missing names or entries fall back to
    ``f<index>``); only nodes with a drawn edge are labelled, one row apart, on a white box.
    """
    from matplotlib.collections import LineCollection

    segments = graph_segments(graph, nodes_per_layer=nodes_per_layer, weight_share=weight_share,
                              max_edges=max_edges, threshold=threshold, norm=norm,
                              hide_constant=hide_constant)  # fmt: skip
    lines = [((s[0], s[1]), (s[0] + 1, s[2])) for s in segments]
    strengths = [s[3] for s in segments]
    collection = LineCollection(
        lines,
        linewidths=[0.3 + line_width * abs(v) for v in strengths],
        colors=[POSITIVE if v > 0 else NEGATIVE for v in strengths],
        alpha=0.6,
        zorder=1,
    )
    ax.add_collection(collection)
    touched = {(i, j) for i, j, _, _ in segments} | {(i + 1, k) for i, _, k, _ in segments}
    for col, (name, basis) in enumerate(zip(graph.node_layers, graph.bases)):
        _draw_nodes(ax, col, name, basis, min(nodes_per_layer, basis.dim), touched, labels)
    ax.set_xlim(-0.5, len(graph.node_layers) - (0.2 if labels else 0.5))  # room for labels
    shown = max(min(nodes_per_layer, basis.dim) for basis in graph.bases)
    ax.set_ylim(-2.5, shown - 0.5)  # the layer names sit below row 0
    ax.set_xticks([])
    integer_ticks(ax.yaxis)
    ax.set_yticks([t for t in ax.get_yticks() if 0 <= t <= shown - 1])  # the rows only
    ax.set_ylabel("feature (by importance)")
    return collection


def _draw_nodes(ax: Any, col: int, name: str, basis: Any, n: int, touched: set,
                labels: bool | Mapping[str, Sequence[str]]) -> None:  # fmt: skip
    """One column: ``n`` dots (area by importance), the layer's name below, the labels."""
    imp = basis.importance
    if imp is not None:
        size = (imp[:n].abs() / imp[:n].abs().max().clamp_min(1e-300)).sqrt() * 120 + 6
    else:
        size = torch.full((n,), 20.0)
    colours = ["black" if (col, j) in touched else "#b0b0b0" for j in range(n)]
    ax.scatter([col] * n, range(n), s=size.tolist(), c=colours, zorder=2)
    ax.text(col, -1.2, name, ha="center", va="top", fontsize=8, rotation=20)
    if not labels:
        return
    given = labels.get(name, []) if isinstance(labels, Mapping) else []
    for j in range(n):
        if (col, j) not in touched:
            continue
        text = str(given[j]) if j < len(given) else f"f{j}"
        text = text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"
        ax.text(col + 0.09, j, text, fontsize=6, va="center", zorder=3, bbox=LABEL_BOX)


def plot_graph(graph: InteractionGraph, path: str | Path, *, nodes_per_layer: int = 30,
               weight_share: float = WEIGHT_SHARE, max_edges: int | None = MAX_EDGES,
               threshold: float = 0.0, norm: str = "sqrt", hide_constant: bool = True,
               labels: bool | Mapping[str, Sequence[str]] = False,
               title: str | None = None) -> Path:  # fmt: skip
    """The interaction graph as a PNG (see :func:`draw_graph`); returns the path.

    The default title says how many edges are drawn and the least share of a layer pair's
    weight they carry (edges: the fewest strongest carrying ``weight_share`` of each pair's
    weight, at most ``max_edges``; ``threshold`` is an extra floor, a fraction of the pair's
    largest strength, 0 by default).
    """
    plt = pyplot()
    n_layers = len(graph.node_layers)
    fig, ax = plt.subplots(figsize=(1.8 * n_layers + 1, 1.5 + nodes_per_layer * 0.22))
    keys = {"nodes_per_layer": nodes_per_layer, "weight_share": weight_share,
            "max_edges": max_edges, "threshold": threshold, "norm": norm,
            "hide_constant": hide_constant}  # fmt: skip
    draw_graph(ax, graph, labels=labels, **keys)
    if title is None:
        chosen = select_edges(graph, **keys)
        drawn = sum(len(s.edges) for s in chosen)
        share = min((s.share for s in chosen if s.n_nonzero), default=0.0)
        title = (f"interaction graph ({graph.settings.get('basis', '')} basis, "
                 f"{graph.settings.get('edges', '')} edges, {norm} widths)\n"
                 f"{drawn} strongest of {sum(s.n_nonzero for s in chosen)} edges, "
                 f"≥ {share:.0%} of each layer pair's weight")  # fmt: skip
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path, dpi=110)


def plot_ablation_curves(curves: Mapping[str, Mapping[str, Any]], path: str | Path, *,
                         metric: str = "accuracy") -> Path:  # fmt: skip
    """One panel per node layer (or section), one line per label: ``metric`` against kept.

    ``curves``: ``{label: {where: AblationCurve}}`` (e.g. ``{"LIB": ..., "PCA": ...}``). The
    unablated model's value is a dashed line. The count kept is on a symlog axis from 0
    (linear to 1, log beyond) with whole-number ticks only.
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
        top = max(max(by[where].n_kept, default=1) for by in curves.values() if where in by)
        ax.set_xscale("symlog", linthresh=1, linscale=0.5)  # 0 kept, then log steps
        ax.set_xlim(0, max(top, 1) * 1.15)
        log_count_ticks(ax.xaxis, top, zero=True)
        ax.set_xlabel(f"{'directions' if kind == 'nodes' else 'edges'} kept")
        ax.set_ylabel(metric)
        ax.set_title(where, fontsize=9)
        ax.legend(fontsize=8)
    for ax in axes.ravel()[len(wheres) :]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
