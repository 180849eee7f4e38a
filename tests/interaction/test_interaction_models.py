"""The local interaction graph on transformers (GPT-2, GPT-NeoX, Llama, the modular-addition
layout), stochastic sources, results on disk, resuming, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
from test_interaction_graph import MLP_LAYERS, TinyMLP, mlp_data

from tyche.interaction import (
    GraphOptions,
    InteractionGrams,
    InteractionGraph,
    build_interaction_graph,
)
from tyche.zoo.modadd import ModAddConfig, ModAddTransformer

RESID = ["resid_pre.0", "resid_pre.1", "unembed"]


def tiny_modadd(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """A random modular-addition transformer (p = 7, width 16) and all 49 pairs."""
    cfg = ModAddConfig(p=7, d_model=16, n_heads=2, d_mlp=32)
    model = ModAddTransformer(cfg)
    model.reset_parameters(seed)
    with torch.no_grad():  # non-zero biases, so the constant coordinate matters
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    a, b = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    x = torch.stack([a.reshape(-1), b.reshape(-1), torch.full((49,), 7)], 1)
    return model, x


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- transformers


def test_language_models_build_on_residual_sites(hf_model, token_batch) -> None:
    before = weights_of(hf_model)
    grads = {n: p.requires_grad for n, p in hf_model.named_parameters()}
    graph = build_interaction_graph(hf_model, token_batch, RESID, GraphOptions(rotate_final=True,
                                    n_stochastic_sources=2), progress=False)  # fmt: skip
    assert graph.node_layers == RESID
    assert [tuple(e.shape) for e in graph.edges] == [
        (graph.bases[1].dim, graph.bases[0].dim),
        (graph.bases[2].dim, graph.bases[1].dim),
    ]
    for e in graph.edges:
        assert torch.isfinite(e).all() and (e >= 0).all() and e.max() > 0
    # 63 unmasked of 64 positions... the mask of row 1 drops 3: counts are positions
    assert graph.n_positions[0] == token_batch["attention_mask"].sum().item()
    after = weights_of(hf_model)
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype
               for k in before)  # fmt: skip
    assert {n: p.requires_grad for n, p in hf_model.named_parameters()} == grads


def test_modadd_layout_builds_on_the_papers_node_layers() -> None:
    model, x = tiny_modadd()
    layers = ["resid_pre.0", "blocks.0.resid_mid", "unembed", "output"]
    graph = build_interaction_graph(model, x, layers, progress=False)
    assert [b.orig_dim for b in graph.bases] == [17, 17, 17, 8]
    assert graph.bases[-1].C is None
    svd = build_interaction_graph(model, x, layers, GraphOptions(basis="svd"), progress=False)
    for lib, pca in zip(graph.edges, svd.edges):
        assert lib.shape[0] <= pca.shape[0] and lib.shape[1] <= pca.shape[1]


def test_one_stochastic_source_is_exact_for_one_output_position() -> None:
    """(sum_t phi_t a_t)^2 = a^2 when there is one output position: R = 1 is exact."""
    model, x = tiny_modadd()
    layers = ["resid_pre.0", "blocks.0.resid_mid", "unembed"]
    exact = build_interaction_graph(model, x, layers, GraphOptions(rotate_final=True),
                                    progress=False)  # fmt: skip
    one = build_interaction_graph(model, x, layers, GraphOptions(rotate_final=True,
                                  n_stochastic_sources=1), progress=False)  # fmt: skip
    for a, b in zip(exact.bases[:-1], one.bases[:-1]):
        # identical products up to the sign of each cotangent: float64 rounding
        torch.testing.assert_close(a.Lambda, b.Lambda, rtol=1e-12, atol=0)
    # the edges from those products: float64 rounding, as the Lambdas
    for a, b in zip(exact.edges, one.edges):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14 * a.max())


def test_stochastic_edges_converge_to_the_exact_edges(gpt2_model, token_batch) -> None:
    layers = ["resid_pre.1", "unembed"]
    kw = dict(rotate_final=True, basis="svd")
    token_batch = {k: v[[0, 2], :8] for k, v in token_batch.items()}  # 16 positions
    exact = build_interaction_graph(gpt2_model, token_batch, layers, GraphOptions(**kw),
                                    progress=False).edges[0]  # fmt: skip
    errors = []
    for sources in (1, 4, 16):
        approx = build_interaction_graph(gpt2_model, token_batch, layers,
                                         GraphOptions(n_stochastic_sources=sources, **kw),
                                         progress=False).edges[0]  # fmt: skip
        errors.append(float((approx - exact).abs().sum() / exact.abs().sum()))
    # the error of a mean of R independent unbiased estimates falls like 1/sqrt(R): halving
    # per 4x sources; each figure aggregates thousands of edges, so the order is stable
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.7 * errors[0]


def test_stochastic_hidden_sources_approximate_the_jacobian_basis() -> None:
    model, x = TinyMLP(widths=(5, 7, 12, 3)), mlp_data()
    exact = build_interaction_graph(model, x, MLP_LAYERS, GraphOptions(edges=None), progress=False)
    lam = exact.bases[1].Lambda
    err = []
    for sources in (2, 32):
        approx = build_interaction_graph(model, x, MLP_LAYERS, GraphOptions(edges=None,
                                         n_stochastic_sources_hidden=sources),
                                         progress=False)  # fmt: skip
        other = approx.bases[1].Lambda
        k = min(len(lam), len(other))
        err.append(float(((other[:k] - lam[:k]).abs() / lam[:k]).max()))
    assert err[1] < err[0]


# ----------------------------------------------------------------------------- results


def test_graph_saves_and_loads(tmp_path) -> None:
    model, x = TinyMLP(), mlp_data()
    graph = build_interaction_graph(model, x, MLP_LAYERS, progress=False)
    graph.save(tmp_path / "g")
    loaded = InteractionGraph.load(tmp_path / "g")
    assert loaded.node_layers == graph.node_layers and loaded.settings == graph.settings
    assert loaded.model_hash == graph.model_hash
    for a, b in zip(graph.bases, loaded.bases):
        for field in ("C", "C_pinv", "Lambda", "W", "V", "eigenvalues", "mean"):
            va, vb = getattr(a, field), getattr(b, field)
            assert (va is None and vb is None) or torch.equal(va, vb)
    assert all(torch.equal(a, b) for a, b in zip(graph.edges, loaded.edges))


def test_resuming_from_grams_and_bases_gives_the_same_graph(tmp_path) -> None:
    model, x = TinyMLP(), mlp_data()
    full = build_interaction_graph(model, x, MLP_LAYERS, progress=False)
    bases_only = build_interaction_graph(model, x, MLP_LAYERS, GraphOptions(edges=None),
                                         progress=False)  # fmt: skip
    bases_only.save(tmp_path / "bases")
    grams = full_grams(model, x)
    grams.save(tmp_path / "grams")
    from_grams = build_interaction_graph(
        model, x, MLP_LAYERS, progress=False, grams=InteractionGrams.load(tmp_path / "grams")
    )
    from_bases = build_interaction_graph(
        model, x, MLP_LAYERS, progress=False, bases=InteractionGraph.load(tmp_path / "bases")
    )
    for other in (from_grams, from_bases):
        # exact: the same grams (saved bits, or the same sums on the same batches) through the
        # same eigendecompositions, or the saved bases themselves
        for a, b in zip(full.bases[:-1], other.bases[:-1]):
            assert torch.equal(a.C, b.C)
        for a, b in zip(full.edges, other.edges):
            # the same products; only the order of two sums differs between the paths
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15 * a.abs().max())
    with pytest.raises(ValueError, match=r"other settings \(center"):
        build_interaction_graph(model, x, MLP_LAYERS, GraphOptions(center=False), progress=False,
                                bases=bases_only)  # fmt: skip
    with pytest.raises(ValueError, match="n_rows"):
        build_interaction_graph(model, x[:100], MLP_LAYERS, progress=False, grams=grams)


def full_grams(model, x) -> InteractionGrams:
    """Stage 1 alone."""
    from tyche.interaction import build_grams

    return build_grams(model, x, MLP_LAYERS, progress=False)


def test_inputs_may_be_an_iterable_of_batches() -> None:
    model, x = TinyMLP(), mlp_data()
    whole = build_interaction_graph(model, x, MLP_LAYERS, progress=False)
    pieces = build_interaction_graph(model, iter(x.split(70)), MLP_LAYERS, progress=False)
    assert pieces.settings["inputs"] == whole.settings["inputs"]  # the same rows, hashed in order
    batched = build_interaction_graph(model, x, MLP_LAYERS, GraphOptions(batch_size=64),
                                      progress=False)  # fmt: skip
    for other in (pieces, batched):
        for a, b in zip(whole.edges, other.edges):
            # the same sums in other batches: float64 rounding of 300-row sums
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13 * a.abs().max())


@pytest.mark.parametrize("sources", [None, 2])
def test_blocks_of_rows_give_the_same_graph(monkeypatch, gpt2_model, token_batch, sources) -> None:
    """A batch too wide for the chunk budget is swept in blocks of rows (offsets and masks
    follow each block, so stochastic sources draw the same signs)."""
    import tyche.interaction.jacobian as jacobian

    layers = ["resid_pre.1", "unembed"]
    options = GraphOptions(rotate_final=True, n_stochastic_sources=sources)
    whole = build_interaction_graph(gpt2_model, token_batch, layers, options, progress=False)
    rows_seen: list[int] = []
    forward = jacobian.section_outputs

    def spy(runner, batch, *args, **kwargs):  # noqa: ANN001, ANN202
        rows_seen.append(batch.n)
        return forward(runner, batch, *args, **kwargs)

    monkeypatch.setattr(jacobian, "section_outputs", spy)
    monkeypatch.setattr(jacobian, "CPU_BUDGET", 2**14)  # one row per block at this width
    blocks = build_interaction_graph(gpt2_model, token_batch, layers, options, progress=False)
    assert rows_seen and max(rows_seen) == 1  # the basis and the edge sweeps, row by row
    for a, b in zip(whole.bases[:-1], blocks.bases[:-1]):
        # the same sums in another order: float64 rounding of sums over 64 positions
        torch.testing.assert_close(a.Lambda, b.Lambda, rtol=1e-9, atol=1e-13 * a.Lambda.max())
    # the edges: sums over the same 64 positions in another order, as the Lambdas
    for a, b in zip(whole.edges, blocks.edges):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13 * a.abs().max())


def test_edges_from_kept_gradients_equal_edges_computed_again(monkeypatch) -> None:
    """The jacobian basis keeps its gradients for the edges when they fit in ``cache_gb``
    (by default half the free memory); with no room the edges differentiate again."""
    import tyche.interaction.graph as graph_module

    model, x = tiny_modadd()
    layers = ["resid_pre.0", "blocks.0.resid_mid", "unembed", "output"]
    calls: list[int] = []
    again = graph_module.section_edges

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return again(*args, **kwargs)

    monkeypatch.setattr(graph_module, "section_edges", spy)
    monkeypatch.setattr(graph_module, "free_memory_share", lambda device, share: 2**30)
    kept = build_interaction_graph(model, x, layers, progress=False)
    assert calls == []
    recomputed = build_interaction_graph(model, x, layers, GraphOptions(cache_gb=0), progress=False)
    assert len(calls) == len(layers) - 1
    monkeypatch.setattr(graph_module, "free_memory_share", lambda device, share: 0)
    build_interaction_graph(model, x, layers, progress=False)
    assert len(calls) == 2 * (len(layers) - 1)
    for a, b in zip(kept.edges, recomputed.edges):
        # the same gradients summed in the same order; only the products differ in grouping
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14 * a.abs().max())
    with pytest.raises(ValueError, match="cache_gb must be >= 0"):
        build_interaction_graph(model, x, layers, GraphOptions(cache_gb=-1.0), progress=False)


# ----------------------------------------------------------------------------- errors


def test_node_layers_out_of_order(gpt2_model, token_batch) -> None:
    with pytest.raises(ValueError, match="out of order.*list them in the order"):
        build_interaction_graph(gpt2_model, token_batch, ["resid_pre.1", "resid_pre.0"],
                                progress=False)  # fmt: skip


def test_pattern_that_matches_nothing(gpt2_model, token_batch) -> None:
    with pytest.raises(ValueError, match="'resid_pre.9' matches nothing.*layers .0 to .1"):
        build_interaction_graph(gpt2_model, token_batch, ["resid_pre.0", "resid_pre.9"],
                                progress=False)  # fmt: skip


def test_output_must_be_last() -> None:
    with pytest.raises(ValueError, match="'output' is node layer 0 of 2"):
        build_interaction_graph(TinyMLP(), mlp_data(), ["output", "layers.1:input"])


def test_non_finite_activations() -> None:
    model = TinyMLP()
    with torch.no_grad():
        model.layers[0][0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'layers.1:input' has non-finite activations"):
        build_interaction_graph(model, mlp_data(), MLP_LAYERS, progress=False)


def test_inputs_that_do_not_fit_the_model() -> None:
    with pytest.raises(ValueError, match="could not run on the inputs.*TinyMLP.forward"):
        build_interaction_graph(TinyMLP(), torch.randn(10, 3), MLP_LAYERS, progress=False)
    with pytest.raises(TypeError, match="a tensor, a dict of tensors, or an iterable"):
        build_interaction_graph(TinyMLP(), 3.0, MLP_LAYERS, progress=False)
    with pytest.raises(ValueError, match="different numbers of rows"):
        build_interaction_graph(TinyMLP(), {"x": torch.randn(4, 5), "y": torch.randn(3)},
                                MLP_LAYERS, progress=False)  # fmt: skip


def test_a_node_layer_that_is_not_a_cut(gpt2_model, token_batch) -> None:
    with pytest.raises(ValueError, match="'mlp_out.0' is not a cut.*residual"):
        build_interaction_graph(gpt2_model, token_batch, ["mlp_out.0", "resid_pre.1"],
                                progress=False)  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"basis": "pca"}, "unknown basis 'pca'"),
        ({"edges": "cubed"}, "unknown edges"),
        ({"basis": "neuron"}, "cannot be centred"),
        ({"basis": "(1-alpha)^2"}, "integrates over alpha"),
        ({"integration": "gradient", "n_intervals": 2}, "n_intervals must be 0"),
        ({"n_stochastic_sources": 0}, "positive int"),
        ({"edges": "functional", "n_stochastic_sources": 2}, "functional edges are exact"),
        ({"split": "both"}, "split must be"),
    ],
)
def test_bad_settings_are_refused_before_any_work(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_interaction_graph(TinyMLP(), mlp_data(), MLP_LAYERS, GraphOptions(**kwargs),
                                progress=False)  # fmt: skip
