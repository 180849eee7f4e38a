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
    segments = graph_segments(graph, threshold=0.0, norm="identity")
    values = [s[3] for s in segments]
    assert any(v < 0 for v in values) and any(v > 0 for v in values)
    fig, ax = plt.subplots()
    lines = draw_graph(ax, graph, threshold=0.0, norm="identity")
    colours = lines.get_colors()
    assert len(colours) == len(segments) == len(lines.get_segments())
    for (i, j, k, v), seg, colour in zip(segments, lines.get_segments(), colours):
        assert seg.tolist() == [[i, j], [i + 1, k]]
        want = to_rgba("#1f5fbf" if v > 0 else "#d62728", alpha=0.6)
        # the same hex colour and alpha 0.6 into float64 RGBA (c/255) by matplotlib, here and
        # in the LineCollection: equal to rounding; the other colour is ≥ 0.3 off in a channel
        assert tuple(colour) == pytest.approx(want, abs=1e-12)
    plt.close(fig)
