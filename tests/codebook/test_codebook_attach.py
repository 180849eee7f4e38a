"""Codebooks inserted into GPT-2, GPT-NeoX and Llama by site hooks; save/load; errors."""

from __future__ import annotations

import copy

import pytest
import torch

from tyche.codebook.model import CodebookModel, attach
from tyche.codebook.train import TrainConfig, row_sampler, train_codebooks
from tyche.hooks import read_activations

SITES = ["attn_heads.*", "mlp_out.*", "resid_post.1"]


@pytest.fixture()
def cb_model(hf_model: torch.nn.Module) -> CodebookModel:
    return attach(copy.deepcopy(hf_model), SITES, num_codes=24, k=2, seed=0)


def test_sites_and_layouts(cb_model: CodebookModel) -> None:
    assert cb_model.sites == [
        "attn_heads.0",
        "mlp_out.0",
        "attn_heads.1",
        "mlp_out.1",
        "resid_post.1",
    ]
    heads = cb_model.codebook("attn_heads.0")
    assert (heads.n_groups, heads.dim, heads.num_codes, heads.k) == (4, 16, 24, 2)
    mlp = cb_model.codebook("mlp_out.1")
    assert (mlp.n_groups, mlp.dim) == (1, 64)


def test_snapped_sites_carry_code_vectors(cb_model: CodebookModel, token_batch) -> None:
    """Downstream of a codebook, the model sees the mean of the chosen codes, per head."""
    ids = token_batch["input_ids"]
    with read_activations(cb_model.base, ["attn_heads.0", "mlp_out.1"]) as acts:
        cb_model(input_ids=ids)
    heads = cb_model.codebook("attn_heads.0")
    chosen = heads.last_ids  # (B, T, H, k)
    want = torch.stack([heads.codebook[h][chosen[..., h, :]].mean(-2) for h in range(4)], -2)
    # the mean of the same k = 2 float32 codes either way ((a + b) / 2: one rounding, in any
    # order; measured 0 over the 4 portable settings): rtol 1e-6 is a few ulps, while a wrong
    # code or head is O(1) off
    torch.testing.assert_close(acts["attn_heads.0"], want, rtol=1e-6, atol=1e-6)
    mlp = cb_model.codebook("mlp_out.1")
    want = mlp.codebook[0][mlp.last_ids].mean(-2)
    torch.testing.assert_close(acts["mlp_out.1"], want, rtol=1e-6, atol=1e-6)  # as above


def test_snap_off_is_the_base_model(hf_model, cb_model: CodebookModel, token_batch) -> None:
    ref = hf_model(**token_batch).logits
    with cb_model.snapping(False):
        # exact: with snap off the codebook layers return their inputs, so the same base ops
        # run on the same weights (a deep copy) and the same batch: bit-identical
        torch.testing.assert_close(cb_model(**token_batch).logits, ref, rtol=0, atol=0)
    # snapping replaces activations by codes: logits move by O(1) (measured up to 1.25), far
    # beyond rounding
    assert not torch.allclose(cb_model(**token_batch).logits, ref, rtol=1e-5, atol=1e-3)
    cb_model.set_snap(False, "attn_heads.*")
    assert [cb_model.codebook(s).snap for s in cb_model.sites] == [False, True, False, True, True]
    base = cb_model.detach()
    # exact: the detached base is the deep copy's own modules, hooks removed: the same ops on
    # the same weights and batch as ``ref``
    torch.testing.assert_close(base(**token_batch).logits, ref, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="detached"):
        cb_model(**token_batch)


def test_save_and_load_round_trip(
    cb_model: CodebookModel, token_batch, tmp_path, tiny_tokenizer
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cb_model.codebook("mlp_out.0").snap = False
    cb_model.save_pretrained(tmp_path, tokenizer=tiny_tokenizer)
    loaded = CodebookModel.from_pretrained(tmp_path)
    assert loaded.sites == cb_model.sites
    assert loaded.fingerprint() == cb_model.fingerprint()
    assert loaded.codebook("mlp_out.0").snap is False
    # exact: the weights are saved and loaded bit for bit (safetensors), and the same model
    # class (same attention implementation) runs the same batch
    torch.testing.assert_close(
        loaded(**token_batch).logits, cb_model(**token_batch).logits, rtol=0, atol=0
    )
    assert loaded.tokenizer is not None and len(loaded.tokenizer) == len(tiny_tokenizer)
    # the folder is a plain transformers model too: the base without codebooks
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    with cb_model.snapping(False):
        want = cb_model(**token_batch).logits
    # exact, as above: the base's own weights bit for bit, the same class and batch
    torch.testing.assert_close(plain(**token_batch).logits, want, rtol=0, atol=0)
    AutoTokenizer.from_pretrained(tmp_path)


def test_bad_input_raises(gpt2_model, tmp_path) -> None:
    with pytest.raises(ValueError, match="k=30 > num_codes=20"):
        attach(copy.deepcopy(gpt2_model), "mlp_out.*", num_codes=20, k=30)
    with pytest.raises(ValueError, match="matches nothing"):
        attach(copy.deepcopy(gpt2_model), "mlp_outt.*", num_codes=20)
    cb = attach(copy.deepcopy(gpt2_model), "mlp_out.0", num_codes=20)
    with pytest.raises(ValueError, match="already have codebooks"):
        attach(cb, "mlp_out.*", num_codes=20)
    with pytest.raises(ValueError, match="no codebook at site"):
        cb.codebook("mlp_out.1")
    with pytest.raises(FileNotFoundError, match="holds no codebooks"):
        CodebookModel.from_pretrained(tmp_path)


def test_more_codebooks_can_be_added(gpt2_model, token_batch) -> None:
    cb = attach(copy.deepcopy(gpt2_model), "mlp_out.1", num_codes=20)
    cb = attach(cb, "attn_heads.0", num_codes=8, k=3)
    assert cb.sites == ["attn_heads.0", "mlp_out.1"]
    cb(**token_batch)
    assert cb.codebook("attn_heads.0").last_ids.shape == (4, 16, 4, 3)


def test_every_trainable_parameter_changes_after_one_step(hf_model, token_batch) -> None:
    """The original built its optimiser before replacing attention modules, so attention
    never trained; here the optimiser is built from the codebook model after attaching."""
    cb = attach(copy.deepcopy(hf_model), ["attn_heads.*", "mlp_out.*"], num_codes=16)
    before = {n: p.detach().clone() for n, p in cb.named_parameters()}
    cfg = TrainConfig(steps=1, batch_size=4, lr=1e-3, warmup_steps=0, log_every=1)
    train_codebooks(cb, row_sampler(token_batch["input_ids"], 4), cfg, progress=False)
    unchanged = [n for n, p in cb.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"parameters that did not train: {unchanged}"
    attention = [n for n in before if "attn" in n or "attention" in n]
    assert any("base." in n for n in attention)  # attention weights were among those checked


def test_kmeans_init_uses_site_activations(gpt2_model, token_batch) -> None:
    cb = attach(copy.deepcopy(gpt2_model), ["attn_heads.1", "mlp_out.0"], num_codes=8)
    with cb.snapping(False), read_activations(cb.base, ["mlp_out.0"]) as acts:
        cb(**token_batch)
    used = cb.kmeans_init([token_batch], max_tokens=1000)
    assert used == {"attn_heads.1": 64, "mlp_out.0": 64}
    layer = cb.codebook("mlp_out.0")
    xhat = layer.normalise(acts["mlp_out.0"]).reshape(-1, 64).detach()
    # every code is the mean of the activations assigned to it: close to some activations
    nearest = torch.cdist(layer.codebook[0].detach(), xhat).min(-1).values
    assert (nearest < xhat.norm(dim=-1).mean()).all()
    assert cb.codebook("attn_heads.1").collected is None


def test_deepcopy_runs_its_own_codebooks(gpt2_model, token_batch) -> None:
    cb = attach(copy.deepcopy(gpt2_model), "mlp_out.0", num_codes=8)
    twin = copy.deepcopy(cb)
    with torch.no_grad():
        twin.codebook("mlp_out.0").codebook.mul_(2.0)
    twin(**token_batch)
    assert twin.codebook("mlp_out.0").last_ids is not None
    assert cb.codebook("mlp_out.0").last_ids is None  # the original's layer did not run
    twin_logits, own_logits = twin(**token_batch).logits, cb(**token_batch).logits
    # doubled codes move the logits by O(0.01) (measured 0.02, 5e5 x this tolerance); a twin
    # sharing the original's codebook would give identical logits
    assert not torch.allclose(twin_logits, own_logits, rtol=1e-5, atol=1e-8)


def test_package_exports_are_the_functions() -> None:
    """Submodule names must not shadow the exported functions (attach, search, intervene)."""
    import tyche.codebook.code_search
    import tyche.codebook.interventions
    import tyche.codebook.model  # noqa: F401
    from tyche.codebook import attach as attach_fn
    from tyche.codebook import intervene, search

    assert callable(attach_fn) and callable(search) and callable(intervene)
