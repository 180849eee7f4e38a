"""The local interaction graph on TransformerLens and nnsight models, against oracles.

* A HookedTransformer with random biases and its GPT-2 twin (the same weights in an HF
  ``GPT2LMHeadModel``) give the same graph at the same tensors, named by TransformerLens hook
  names on one and by aliases on the other: an independent implementation of the same
  function, with every bias folded by other modules (HF ``Conv1D``/``LayerNorm`` biases
  against TransformerLens' ``b_Q``/``b_K``/``b_V``/``b_O``/``b_in``/``b_out``/``b``).
* Squared edges in the neuron basis equal a direct computation: the Jacobian of a function
  built with TransformerLens' own hooks (``hooked.hooks``), by ``torch.autograd.functional``,
  and the derivative with respect to a factor multiplying every bias parameter.
* An nnsight-wrapped model gives the graph of the module it wraps.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from interop_support import VOCAB, build_hooked, require, wrap_nnsight
from torch.func import functional_call

from tyche.errors import InputError
from tyche.frameworks import as_module
from tyche.interaction import (
    AblationOptions,
    GraphOptions,
    ablate_nodes,
    build_grams,
    build_interaction_graph,
)
from tyche.interaction.fold import bias_points
from tyche.interaction.sections import resolve_node_layers

TL_LAYERS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "output"]
HF_LAYERS = ["resid_post.0", "resid_post.1", "output"]


def _is_bias(name: str) -> bool:
    """TransformerLens names biases ``b``, ``b_Q``, ``_b_K``, ... (weights ``w``, ``W_*``)."""
    return name.rsplit(".", 1)[-1].lstrip("_").split("_")[0] == "b"


def randomised(hooked: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``hooked`` with every bias and norm weight drawn at random (TransformerLens starts them at
    0 and 1, where a bias left unscaled would go unnoticed); ``b_U`` stays 0 (GPT-2's
    ``lm_head`` has none)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hooked.named_parameters():
            if _is_bias(name) and not name.endswith("b_U"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".w"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return hooked


def gpt2_twin(hooked: torch.nn.Module) -> torch.nn.Module:
    """An HF GPT-2 computing the same function as the GPT-2-like ``build_hooked`` model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = hooked.cfg
    cfg = GPT2Config(vocab_size=c.d_vocab, n_positions=c.n_ctx, n_embd=c.d_model,
                     n_layer=c.n_layers, n_head=c.n_heads, n_inner=c.d_mlp,
                     activation_function="gelu_new", layer_norm_epsilon=c.eps, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)  # fmt: skip
    hf = GPT2LMHeadModel(cfg).eval()
    t, d = hf.transformer, c.d_model
    with torch.no_grad():
        t.wte.weight.copy_(hooked.embed.W_E)
        t.wpe.weight.copy_(hooked.pos_embed.W_pos)
        for block, ours in zip(hooked.blocks, t.h):
            a, mlp = block.attn, block.mlp
            for norm, theirs in ((block.ln1, ours.ln_1), (block.ln2, ours.ln_2)):
                theirs.weight.copy_(norm.w)
                theirs.bias.copy_(norm.b)
            qkv = [w.permute(1, 0, 2).reshape(d, -1) for w in (a.W_Q, a.W_K, a.W_V)]
            ours.attn.c_attn.weight.copy_(torch.cat(qkv, 1))
            ours.attn.c_attn.bias.copy_(torch.cat([b.reshape(-1) for b in (a.b_Q, a.b_K, a.b_V)]))
            ours.attn.c_proj.weight.copy_(a.W_O.reshape(-1, d))
            ours.attn.c_proj.bias.copy_(a.b_O)
            ours.mlp.c_fc.weight.copy_(mlp.W_in)
            ours.mlp.c_fc.bias.copy_(mlp.b_in)
            ours.mlp.c_proj.weight.copy_(mlp.W_out)
            ours.mlp.c_proj.bias.copy_(mlp.b_out)
        t.ln_f.weight.copy_(hooked.ln_final.w)
        t.ln_f.bias.copy_(hooked.ln_final.b)
        hf.lm_head.weight.copy_(hooked.unembed.W_U.T)
    return hf


def llama_like() -> torch.nn.Module:
    """A random TransformerLens model with grouped-query attention, a gated MLP, RMS norms and
    rotary positions (2 layers, width 64, 4 query and 2 key-value heads)."""
    tl = require("transformer_lens")
    cfg = tl.HookedTransformerConfig(
        n_layers=2, d_model=64, n_ctx=128, d_head=16, n_heads=4, n_key_value_heads=2, d_mlp=128,
        d_vocab=VOCAB, act_fn="silu", gated_mlp=True, normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=16, seed=0, device="cpu",
    )  # fmt: skip
    with warnings.catch_warnings():  # HookedTransformer's deprecation notice
        warnings.simplefilter("ignore")
        return tl.HookedTransformer(cfg).eval()


def tokens(n: int = 6, t: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the twin


@pytest.mark.parametrize(
    ("basis", "edges", "rule", "n"),
    [("jacobian", "squared", "gradient", 0), ("(1-alpha)^2", "functional", "gauss-legendre", 2)],
)
def test_graph_at_hook_names_equals_the_graph_of_the_gpt2_twin(basis, edges, rule, n) -> None:
    hooked = randomised(build_hooked())
    twin = gpt2_twin(hooked)
    x = tokens()
    # float32 kernels of two implementations of the same function
    torch.testing.assert_close(hooked(x), twin(x).logits, rtol=0, atol=1e-4)
    options = GraphOptions(basis=basis, edges=edges, integration=rule, n_intervals=n)
    ours = build_interaction_graph(hooked, x, TL_LAYERS, options, progress=False)
    theirs = build_interaction_graph(twin, x, HF_LAYERS, options, progress=False)
    assert ours.node_layers == TL_LAYERS and hooked.cfg.dtype == torch.float32
    for a, b in zip(ours.bases[:-1], theirs.bases[:-1]):
        assert a.C.shape == b.C.shape
        # float64 through two implementations and an eigendecomposition: 2e-15 (jacobian) and
        # 1.2e-11 ((1-alpha)^2: differences F(f) - F(alpha f)) of the largest, measured; a
        # norm cast to float32 (cfg.dtype) gives 1.8e-9, a bias left out or spread over the
        # wrong positions 1e-2
        torch.testing.assert_close(a.Lambda, b.Lambda, rtol=0, atol=1e-9 * float(b.Lambda.max()))
        # eigenvectors, as above (2e-14 and 3.5e-11 measured, 1.5e-7 with the float32 cast)
        torch.testing.assert_close(a.C, b.C, rtol=0, atol=1e-8 * float(b.C.abs().max()))
    for a, b in zip(ours.edges, theirs.edges):
        # float64 sums of squares of the same Jacobians: 4e-15 and 2e-12 of the largest
        # measured (1.7e-8 with the float32 cast)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9 * float(b.abs().max()))


def test_node_ablations_on_the_hooked_model_equal_those_of_the_twin() -> None:
    hooked = randomised(build_hooked(), seed=1)
    twin = gpt2_twin(hooked)
    x = tokens(4, 8, seed=2)
    options = GraphOptions(edges=None)
    ours = build_interaction_graph(hooked, x, TL_LAYERS, options, progress=False)
    theirs = build_interaction_graph(twin, x, HF_LAYERS, options, progress=False)
    abl = AblationOptions(schedule="exponential", dtype=torch.float64)
    mine = ablate_nodes(hooked, ours, {"input_ids": x}, options=abl, progress=False)
    other = ablate_nodes(twin, theirs, {"input_ids": x}, options=abl, progress=False)
    assert list(mine) == TL_LAYERS[:2]
    for a, b in zip(mine.values(), other.values()):
        assert a.n_kept == b.n_kept
        # float64 forward passes of the two implementations: 1e-14 nats measured
        torch.testing.assert_close(torch.tensor(a.loss), torch.tensor(b.loss), rtol=1e-9, atol=0)
        assert a.accuracy == b.accuracy


# ----------------------------------------------------------------------------- the oracle


def _section(hooked, row: torch.Tensor, start: str, end: str, h: torch.Tensor,
             c: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The activation at ``end`` (the logits for ``"output"``) of one row ``(1, T)`` with the
    one at ``start`` replaced by ``h`` ``(T, d)`` and every bias parameter multiplied by ``c``
    (TransformerLens' own hooks; parameters swapped with ``functional_call``)."""
    seen: dict[str, torch.Tensor] = {}

    def put(act, hook):  # noqa: ANN001, ANN202
        return h.unsqueeze(0)

    def grab(act, hook):  # noqa: ANN001, ANN202
        seen["y"] = act[0]

    params = dict(hooked.named_parameters())
    if c is not None:
        params = {n: p * c if _is_bias(n) else p for n, p in params.items()}
    hooks = [(start, put)] + ([] if end == "output" else [(end, grab)])
    with hooked.hooks(fwd_hooks=hooks):
        logits = functional_call(hooked, params, (row,))
    return logits[0] if end == "output" else seen["y"]


def direct_squared_edges(hooked, x: torch.Tensor, start: str, end: str) -> torch.Tensor:
    """Squared edges ``(d', d + 1)`` in the neuron basis, at alpha = 1 (spec 1.11):
    ``E_ij = mean over rows and output positions t of (sum_s dF_ti/dh_sj h_sj)^2``, with
    ``j = d`` the constant, whose gradient summed over input positions is the derivative
    with respect to one factor on every bias."""
    _, cache = hooked.run_with_cache(x)
    total = torch.zeros((), dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian
    for r in range(x.shape[0]):
        h, row = cache[start][r], x[r : r + 1]

        def of_h(v, row=row):  # noqa: ANN001, ANN202
            return _section(hooked, row, start, end, v)

        def of_c(c, row=row, h=h):  # noqa: ANN001, ANN202
            return _section(hooked, row, start, end, h, c)

        J = jacobian(of_h, h, vectorize=True)  # (T, d', T, d)
        a_f = torch.einsum("tisj,sj->tij", J, h)  # (T, d', d)
        a_c = jacobian(of_c, one)  # (T, d')
        total = total + (torch.cat([a_f, a_c.unsqueeze(-1)], -1) ** 2).sum(0)
    return total / x.numel()


@pytest.mark.parametrize("build", [build_hooked, llama_like], ids=["gpt2-like", "llama-like"])
def test_neuron_edges_equal_a_direct_autograd_computation(build) -> None:
    hooked = randomised(build()).to(torch.float64)
    x = tokens(3, 5)
    layers = ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post", "output"]
    options = GraphOptions(basis="neuron", center=False, edges="squared")
    graph = build_interaction_graph(hooked, x, layers, options, progress=False)
    for i, edges in enumerate(graph.edges):
        direct = direct_squared_edges(hooked, x, layers[i], layers[i + 1])
        if i == 0:  # the next layer's constant (last feature) is the constant carried on
            assert torch.equal(edges[-1], torch.eye(65, dtype=torch.float64)[-1])
            edges = edges[:-1]
        # float64 Jacobians by two autograd routes: 1e-16 of the largest measured; a bias
        # left unscaled changes them by ~0.3 of it
        torch.testing.assert_close(edges, direct, rtol=0, atol=1e-10 * float(direct.max()))


def test_grams_at_hook_names_are_the_activations_statistics() -> None:
    hooked = randomised(build_hooked()).to(torch.float64)
    x = tokens()
    grams = build_grams(hooked, x, TL_LAYERS, GraphOptions(rotate_final=True), progress=False)
    with torch.no_grad():
        logits, cache = hooked.run_with_cache(x)
    acts = [cache[name] for name in TL_LAYERS[:2]] + [logits]
    for a, mean, cov in zip(acts, grams.means, grams.covariances):
        a = a.reshape(-1, a.shape[-1])
        # float64 streaming sums over 48 rows against torch's mean and cov: ~1e-15 relative
        # (a run in float32 would be ~1e-7 off)
        torch.testing.assert_close(mean, a.mean(0), rtol=0, atol=1e-12 * float(a.abs().max()))
        scale = float(a.abs().max()) ** 2
        # as for the means: float64 sums of 48 products each
        torch.testing.assert_close(cov, torch.cov(a.T, correction=0), rtol=0, atol=1e-12 * scale)
    assert grams.counts == [48.0, 48.0, 48.0]


# ----------------------------------------------------------------------------- nnsight


def test_nnsight_model_gives_the_graph_of_the_module_it_wraps(gpt2_pair) -> None:
    plain, wrapped = gpt2_pair
    x = tokens(4, 6)
    ours = build_interaction_graph(plain, x, ["transformer.h.0", "transformer.h.1", "output"],
                                   progress=False)  # fmt: skip
    model = wrap_nnsight(wrapped)
    envoys = [model.transformer.h[0], model.transformer.h[1], "output"]  # nnsight's own names
    theirs = build_interaction_graph(model, x, envoys, progress=False)
    assert ours.model_hash == theirs.model_hash and ours.node_layers == theirs.node_layers
    for a, b in zip(ours.bases, theirs.bases):
        for key in ("C", "Lambda"):
            if getattr(a, key) is not None:
                # the same module and inputs through the same kernels, one process: bitwise
                torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=0, atol=0)
    for a, b in zip(ours.edges, theirs.edges):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # bitwise, as above


@pytest.fixture
def gpt2_pair():
    from conftest import build_gpt2

    return build_gpt2(0), build_gpt2(0)


# ----------------------------------------------------------------------------- refusals


def test_unembed_and_the_unembed_module_are_one_node_layer_each(hooked) -> None:
    """On TransformerLens ``unembed`` is both an alias and the name of the unembedding module
    (whose output is the logits): the alias wins, once."""
    layers = resolve_node_layers(as_module(hooked), ["resid_post.1", "unembed", "output"])
    assert [n.name for n in layers] == ["resid_post.1", "unembed", "output"]
    assert layers[1].site.module_name != "unembed"


def test_a_transformer_lens_bias_of_unknown_place_is_refused() -> None:
    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b_X = torch.nn.Parameter(torch.zeros(3))

    Head.__module__ = "transformer_lens.components.head"
    with pytest.raises(InputError, match=r"cannot fold the bias head\.b_X of the TransformerLens"):
        bias_points(torch.nn.ModuleDict({"head": Head()}))
    model = llama_like()
    points = {p.name: p.module for p in bias_points(as_module(model))}
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    assert points["blocks.0.attn._b_K"] is attn.hook_k and points["blocks.0.attn.b_O"] is attn
    assert points["blocks.0.mlp.b_in"] is mlp.hook_post and points["blocks.0.mlp.b_out"] is mlp
