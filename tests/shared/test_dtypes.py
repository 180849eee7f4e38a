"""Every method's Python API on a model in float32, float64 and bfloat16.

The tiny GPT-2 of conftest is cast to each dtype. None of the methods refuses one of these
dtypes: each computes where its maths needs it (float64 for LIB and the radial integral,
at least float32 for a tuned lens's translators and the causal objective) and leaves the
model in its own dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import build_gpt2

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param


@pytest.fixture()
def model(dtype: torch.dtype) -> torch.nn.Module:
    return build_gpt2().to(dtype)


@pytest.fixture()
def tokens() -> dict[str, torch.Tensor]:
    """input_ids (4, 12) and an attention mask with row 1's last 3 positions off."""
    ids = torch.randint(3, 512, (4, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """Every tensor of ``model`` still has its dtype and its bits."""
    now = model.state_dict()
    return all(now[k].dtype == v.dtype and torch.equal(now[k], v) for k, v in before.items())


@pytest.mark.filterwarnings("ignore:effective sample size")  # 2 samples: a bound, as expected
def test_basin_estimate(model, tokens, dtype) -> None:
    from tyche.basin.core import estimate_basin
    from tyche.basin.loss import ModelLoss
    from tyche.basin.options import BasinOptions

    before = _state(model)
    loss = ModelLoss(model, tokens)
    assert loss.anchor.dtype == dtype  # directions and offsets are made in the model's dtype
    opts = BasinOptions(cutoff=1e-2, n_samples=2, seed=0)
    res = estimate_basin(loss, loss.anchor, opts, progress=False)
    assert res.estimates.dtype == torch.float64 and torch.isfinite(res.estimates).all()
    assert (res.radii > 0).all() and torch.isfinite(res.radii).all()
    assert _unchanged(model, before)


def test_causal_tuned_lens_and_basis(model, tokens, dtype, tmp_path) -> None:
    from tyche.causal import CausalOptions, TunedLens, extract_causal_bases, train_tuned_lens
    from tyche.causal.lens_algebra import check_factors
    from tyche.causal.train_lens import evaluate_lens
    from tyche.hooks import read_activations

    lens = train_tuned_lens(model, tokens, steps=3, batch_size=2, progress=False)
    # a bfloat16 lens would round most of Adam's ~1e-3 steps away: its translators are float32
    assert lens.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert all(t.weight.abs().max() > 0 for t in lens.translators)  # Adam moved them
    kl = evaluate_lens(lens, tokens, batch_size=3)
    assert len(kl) == 2 and all(k >= 0 and k == k for k in kl)
    lens.save(tmp_path / "lens")
    loaded = TunedLens.load(tmp_path / "lens", model)
    assert loaded.dtype == lens.dtype
    for a, b in zip(loaded.translators, lens.translators):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)  # safetensors bits
    at_site = lens.for_site("resid_pre.1")
    readout = at_site.readout_matrix()
    assert readout.shape == (512, 64) and readout.dtype == lens.dtype
    assert torch.isfinite(readout).all()
    with read_activations(model, "resid_pre.1") as acts:
        model(**tokens)
    hiddens = acts["resid_pre.1"].reshape(-1, 64)[:16]
    assert check_factors(at_site.lens_factors(), at_site, hiddens)  # the fast path holds
    for target in ("tuned", "logit", "model"):
        basis = extract_causal_bases(
            model,
            tokens,
            1,
            "resid_pre.1",
            CausalOptions(max_iter=5, n_pca=0, batch_size=2),
            target=target,
            lens=lens if target == "tuned" else None,
            progress=False,
        )["resid_pre.1"]
        assert torch.isfinite(basis.vectors).all(), target
        assert torch.isfinite(basis.energies).all() and (basis.energies > 0).all(), target


def test_codebook_training_codes_and_intervention(model, dtype) -> None:
    from tyche.codebook.interventions import Intervention, intervene
    from tyche.codebook.model import attach
    from tyche.codebook.train import TrainConfig, row_sampler, train_codebooks

    ids = torch.randint(3, 512, (8, 10), generator=torch.Generator().manual_seed(2))
    cb = attach(copy.deepcopy(model), ["attn_heads.1", "mlp_out.0"], num_codes=16, seed=0)
    layer = cb.codebook("mlp_out.0")
    assert layer.codebook.dtype == dtype
    cfg = TrainConfig(steps=2, batch_size=4, log_every=1, warmup_steps=0, replace_dead_every=1)
    result = train_codebooks(cb, row_sampler(ids, 4), cfg, progress=False)
    assert all(h["loss"] == h["loss"] and h["mse"] >= 0 for h in result.history)
    cb.eval()
    with torch.no_grad():
        logits = cb(input_ids=ids[:2]).logits
        assert logits.dtype == dtype and torch.isfinite(logits).all()
        clean = layer.last_ids.clone()
        assert clean.shape == (2, 10, 1) and ((clean >= 0) & (clean < 16)).all()
        with intervene(cb, [Intervention("mlp_out.0", 3, positions=(2,))]):
            patched = cb(input_ids=ids[:2]).logits
    assert torch.isfinite(patched).all()
    assert (layer.last_ids[:, 2] == 3).all()
    # a causal model: the positions before the forced one see the same ops on the same values
    assert torch.equal(patched[:, :2], logits[:, :2])


def test_interaction_graph(model, tokens, dtype) -> None:
    from tyche.interaction import GraphOptions, build_interaction_graph

    before = _state(model)
    layers = ["resid_pre.0", "resid_pre.1", "unembed"]
    graph = build_interaction_graph(
        model,
        tokens,
        layers,
        GraphOptions(rotate_final=True, n_stochastic_sources=2),
        progress=False,
    )
    assert graph.settings["dtype"] == "torch.float64"  # LIB itself runs in float64
    for edges in graph.edges:
        assert edges.dtype == torch.float64 and torch.isfinite(edges).all()
    assert all(torch.isfinite(b.C).all() for b in graph.bases if b.C is not None)
    assert _unchanged(model, before)  # given back in its own dtype, with its own bits
    assert all(p.requires_grad for p in model.parameters())
