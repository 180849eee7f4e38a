"""Ablations (nodes and edges, schedules) and pictures of interaction graphs."""

from __future__ import annotations

import copy

import pytest
import torch
from test_interaction_graph import MLP_LAYERS, TinyMLP

from tyche.hooks import replace_activations
from tyche.interaction import AblationOptions, GraphOptions, build_interaction_graph
from tyche.interaction.ablate import (
    AblationCurve,
    _edge_masks,
    _search,
    ablate_edges,
    ablate_nodes,
    schedule_points,
)
from tyche.interaction.plot import draw_graph, graph_segments, plot_ablation_curves, plot_graph


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """TinyMLP (5-7-6-3) trained 300 Adam steps on a synthetic 3-class task (~95% accuracy)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g)
    y = (torch.tanh(x) @ torch.randn(5, 3, generator=g)).argmax(1)
    model = TinyMLP()
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.85
    return model, x, y


def test_schedule_points() -> None:
    pts = schedule_points(40, cutoff=16, base=1.25)
    assert pts[:17] == list(range(17)) and pts[-1] == 40
    # geometric steps of 1.25, each rounded up: ratios at most 1.25 + 1 / a
    assert pts == sorted(set(pts)) and all(
        b / a <= 1.25 + 1 / a for a, b in zip(pts[16:], pts[17:])
    )
    assert schedule_points(5, 16) == [0, 1, 2, 3, 4, 5]


def test_bisect_finds_the_fewest_within_tolerance() -> None:
    calls = []

    def score(n: int) -> tuple[float, float]:
        calls.append(n)
        return (1.0 if n >= 23 else 0.5, 0.0)

    results, required = _search(100, "bisect", 0, 2.0, 0.01, 1.0, score, False, "")
    assert required == 23
    assert len(calls) <= 9  # 1 + ceil(log2(100))
    assert set(results) == set(calls)


def test_edge_masks_keep_the_largest_and_the_constant_for_free() -> None:
    E = torch.tensor([[5.0, 1.0, 3.0], [2.0, 4.0, 0.5]])
    mask = _edge_masks(E, 2, constant=True)
    assert mask.tolist() == [[True, False, True], [True, True, False]]
    assert _edge_masks(E, 0, constant=False).sum() == 0
    assert _edge_masks(E, 6, constant=False).all()


@pytest.mark.parametrize("basis", ["jacobian", "svd"])
def test_node_ablation_ends(trained, basis: str) -> None:
    model, x, y = trained
    graph = build_interaction_graph(model, x, MLP_LAYERS, GraphOptions(basis=basis), progress=False)
    curves = ablate_nodes(model, graph, x, y, AblationOptions(cutoff=3, base=2.0,
                          dtype=torch.float64), progress=False)  # fmt: skip
    assert set(curves) == {"layers.1:input", "layers.2:input"}
    for name, curve in curves.items():
        assert curve.n_kept[0] == 0 and curve.n_kept[-1] == curve.n_total
        # everything kept: the identity but for directions dropped at Lambda (or variance)
        # <= 1e-14 of the largest, which move the logits (O(10)) by <= 1e-7 relative.
        # Accuracy is correct/N from integer counts: the same counts give the same float, one
        # flipped prediction is 1/N ≥ 1e-3 off; abs 1e-12 admits only the former
        assert curve.accuracy[-1] == pytest.approx(curve.baseline_accuracy, abs=1e-12)
        # logits moved by ≲ 1e-7 relative (O(10)) move the mean cross-entropy by ≲ 1e-6
        assert curve.loss[-1] == pytest.approx(curve.baseline_loss, abs=1e-6)
        # only the constant direction kept: every feature set to its mean (mean ablation)
        acts = graph.bases[graph.node_layers.index(name)].mean
        m64 = copy.deepcopy(model).double()
        with torch.no_grad(), replace_activations(m64, {name: lambda t, a=acts: a.expand_as(t)}):
            mean_acc = (m64(x.double()).argmax(1) == y).double().mean().item()
        # integer counts / N, as above: equal unless a prediction flips (1/N ≥ 1e-3 off)
        assert curve.accuracy[1] == pytest.approx(mean_acc, abs=1e-12)
        assert curve.accuracy[1] < curve.baseline_accuracy


def test_neuron_and_final_layer_ablations(trained) -> None:
    model, x, y = trained
    neuron = build_interaction_graph(model, x, MLP_LAYERS, GraphOptions(basis="neuron",
                                     center=False), progress=False)  # fmt: skip
    curves = ablate_nodes(model, neuron, x, y, AblationOptions(schedule="bisect"),
                          layers=["layers.2:input"], progress=False)  # fmt: skip
    curve = curves["layers.2:input"]
    assert 1 <= curve.n_required <= curve.n_total
    layers = ["layers.1:input", "layers.2:input"]
    rotated = build_interaction_graph(model, x, layers, GraphOptions(rotate_final=True),
                                      progress=False)  # fmt: skip
    last = ablate_nodes(model, rotated, x, y, AblationOptions(cutoff=2, base=3.0),
                        layers=["layers.2:input"], progress=False)["layers.2:input"]  # fmt: skip
    # all kept: the same counts as the model's (integer counts / N; one flip is 1/N ≥ 1e-3)
    assert last.accuracy[-1] == pytest.approx(last.baseline_accuracy, abs=1e-12)


@pytest.mark.parametrize(("basis", "edges"), [("jacobian", "squared"), ("svd", "squared")])
def test_edge_ablation_ends(trained, basis: str, edges: str) -> None:
    model, x, y = trained
    graph = build_interaction_graph(model, x, MLP_LAYERS, GraphOptions(basis=basis, edges=edges),
                                    progress=False)  # fmt: skip
    curves = ablate_edges(model, graph, x, y, AblationOptions(schedule="thresholds",
                          thresholds=(0.5, 0.01, 0.0)), progress=False)  # fmt: skip
    assert list(curves) == ["layers.1:input -> layers.2:input", "layers.2:input -> output"]
    for curve in curves.values():
        # every edge kept rebuilds each feature from all inputs: the model itself
        assert curve.n_kept[-1] == curve.n_total
        # integer counts / N: the model's counts exactly (one flip is 1/N ≥ 1e-3 off)
        assert curve.accuracy[-1] == pytest.approx(curve.baseline_accuracy, abs=1e-12)
        assert curve.accuracy[0] <= curve.accuracy[-1]
    bisect = ablate_edges(model, graph, x, y, AblationOptions(tolerance=0.02), sections=[1],
                          progress=False)  # fmt: skip
    only = bisect["layers.2:input -> output"]
    assert only.n_required is not None and only.n_required < only.n_total
    assert only.accuracy[only.n_kept.index(only.n_required)] >= only.baseline_accuracy - 0.02


def test_ablation_curves_save_and_plot(trained, tmp_path) -> None:
    model, x, y = trained
    lib = build_interaction_graph(model, x, MLP_LAYERS, progress=False)
    pca = build_interaction_graph(model, x, MLP_LAYERS, GraphOptions(basis="svd"), progress=False)
    options = AblationOptions(cutoff=2, base=2.0)
    curves = {label: ablate_nodes(model, g, x, y, options, progress=False)
              for label, g in (("LIB", lib), ("PCA", pca))}  # fmt: skip
    curve = curves["LIB"]["layers.1:input"]
    curve.save(tmp_path / "c")
    assert AblationCurve.load(tmp_path / "c") == curve
    png = plot_ablation_curves(curves, tmp_path / "curves.png")
    assert png.stat().st_size > 5000


def test_ablation_refuses_another_model(trained) -> None:
    model, x, y = trained
    graph = build_interaction_graph(model, x, MLP_LAYERS, progress=False)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.layers[0][0].weight.add_(0.1)
    with pytest.raises(ValueError, match="built on another model"):
        ablate_nodes(other, graph, x, y, progress=False)
    with pytest.raises(ValueError, match="labels are needed"):
        ablate_nodes(model, graph, x, progress=False)


# ----------------------------------------------------------------------------- pictures


@pytest.mark.parametrize("labels", [False, True, {"layers.1:input": ["const", "a"]}])
def test_graph_png_with_and_without_labels(trained, tmp_path, labels) -> None:
    model, x, _ = trained
    graph = build_interaction_graph(model, x, MLP_LAYERS, progress=False)
    png = plot_graph(graph, tmp_path / "graph.png", labels=labels, nodes_per_layer=8)
    assert png.stat().st_size > 5000


def test_edge_colours_follow_the_drawn_edges(trained) -> None:
    """Each drawn line gets the colour of its own edge (functional edges can be negative)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    model, x, _ = trained
    graph = build_interaction_graph(model, x, MLP_LAYERS, GraphOptions(basis="(1-alpha)^2",
                                    edges="functional", integration="trapezoidal", n_intervals=3),
                                    progress=False)  # fmt: skip
    every = {"weight_share": 1.0, "max_edges": None, "threshold": 0.0, "norm": "identity"}
    segments = graph_segments(graph, **every)
    values = [s[3] for s in segments]
    assert any(v < 0 for v in values) and any(v > 0 for v in values)
    fig, ax = plt.subplots()
    lines = draw_graph(ax, graph, **every)
    colours = lines.get_colors()
    assert len(colours) == len(segments) == len(lines.get_segments())
    for (i, j, k, v), seg, colour in zip(segments, lines.get_segments(), colours):
        assert seg.tolist() == [[i, j], [i + 1, k]]
        want = to_rgba("#1f5fbf" if v > 0 else "#d62728", alpha=0.6)
        # the same hex colour and alpha 0.6 into float64 RGBA (c/255) by matplotlib, here and
        # in the LineCollection: equal to rounding; the other colour is ≥ 0.3 off in a channel
        assert tuple(colour) == pytest.approx(want, abs=1e-12)
    plt.close(fig)


def _window_weights(graph, i: int, n: int = 30) -> torch.Tensor:
    """|E| of layer pair i among the top n nodes, the constant direction's edges zeroed."""
    e = graph.edges[i].double()[:n, :n].abs().clone()
    if graph.bases[i].center:
        e[:, 0] = 0.0
    return e


@pytest.mark.parametrize("max_edges", [None, 2])
def test_graph_draws_the_fewest_strongest_edges_carrying_most_weight(trained, max_edges) -> None:
    """Per layer pair: the strongest edges, as few as carry 90% of the weight (or max_edges)."""
    model, x, _ = trained
    graph = build_interaction_graph(model, x, MLP_LAYERS, progress=False)
    segments = graph_segments(graph, max_edges=max_edges)
    for i in range(len(graph.edges)):
        weight = _window_weights(graph, i)
        drawn = sorted((float(weight[k, j]) for layer, j, k, _ in segments if layer == i),
                       reverse=True)  # fmt: skip
        total, rest = float(weight.sum()), weight.flatten().sort(descending=True).values
        assert drawn == rest[: len(drawn)].tolist()  # the strongest, strongest first
        if max_edges is not None and len(drawn) == max_edges:
            continue  # the cap bound: fewer than 90% may be drawn
        assert sum(drawn) >= 0.9 * total > sum(drawn[:-1]), (i, len(drawn), weight.numel())
    if max_edges is not None:
        assert max(sum(1 for s in segments if s[0] == i) for i in range(len(graph.edges))) == 2


def test_graph_labels_only_the_drawn_nodes_and_they_do_not_collide(trained, monkeypatch,
                                                                   tmp_path) -> None:  # fmt: skip
    from figure_checks import assert_count_axis, bboxes_overlap, capture_figures

    from tyche.interaction import plot

    model, x, _ = trained
    graph = build_interaction_graph(model, x, MLP_LAYERS, progress=False)
    figures = capture_figures(monkeypatch, plot)
    names = {name: [f"a long feature name {j}" for j in range(9)] for name in graph.node_layers}
    plot_graph(graph, tmp_path / "graph.png", labels=names, max_edges=3)
    (ax,) = figures[0].axes
    segments = graph_segments(graph, max_edges=3)
    touched = {(i, j) for i, j, _, _ in segments} | {(i + 1, k) for i, _, k, _ in segments}
    labels = [t for t in ax.texts if t.get_text().startswith("a long")]
    assert len(labels) == len(touched) < sum(min(30, b.dim) for b in graph.bases)
    assert {(round(t.get_position()[0]), t.get_position()[1]) for t in labels} == touched
    boxes = [t.get_window_extent() for t in labels]
    assert not any(bboxes_overlap(a, b) for n, a in enumerate(boxes) for b in boxes[n + 1 :])
    assert f"{len(segments)} strongest of" in ax.get_title()
    assert_count_axis(ax.yaxis)
    # the feature axis spans the rows drawn, its ticks on rows only (not -2 or past the top)
    rows = max(min(30, b.dim) for b in graph.bases)
    assert ax.get_ylim()[1] == rows - 0.5
    assert all(0 <= t <= rows - 1 for t in ax.get_yticks())


def test_graph_selection_refuses_bad_settings(trained) -> None:
    model, x, _ = trained
    graph = build_interaction_graph(model, x, MLP_LAYERS, progress=False)
    for bad, pattern in (({"weight_share": 0.0}, "weight_share"), ({"max_edges": 0}, "max_edges"),
                         ({"threshold": 2.0}, "threshold"), ({"norm": "log"}, "unknown norm")):
        with pytest.raises(ValueError, match=pattern):
            graph_segments(graph, **bad)



def test_ablation_curve_counts_start_at_zero_with_whole_ticks(trained, monkeypatch,
                                                             tmp_path) -> None:  # fmt: skip
    """The symlog axis of counts kept starts at 0: no negative or fractional ticks."""
    from figure_checks import assert_count_axis, capture_figures

    from tyche.interaction import plot

    model, x, y = trained
    graph = build_interaction_graph(model, x, MLP_LAYERS, progress=False)
    curves = ablate_nodes(model, graph, x, y, AblationOptions(cutoff=2, base=2.0), progress=False)
    figures = capture_figures(monkeypatch, plot)
    plot_ablation_curves({"LIB": curves}, tmp_path / "curves.png")
    for ax in figures[0].axes:
        if ax.axison:
            assert ax.get_xlim()[0] == 0
            assert_count_axis(ax.xaxis)
