"""Codebooks on TransformerLens and nnsight models.

* nnsight: the wrapper is measured as the module it wraps, so codebooks attached through it,
  trained with the same seed, choose the same codes as on the plain HF model.
* TransformerLens: codebooks at hook names (``blocks.0.attn.hook_z``, one codebook per head,
  and ``blocks.1.hook_mlp_out``) replace the activations in the model's own forward pass
  (``hooked(tokens)``, ``run_with_cache``), and forcing a code changes the logits exactly as
  the same replacement written by hand with ``hooked.run_with_hooks``; ``generate`` follows
  the same replacement token by token. Saving keeps the codebooks, not the model, and says
  what reloading needs.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from interop_support import VOCAB, build_hooked, wrap_nnsight

from tyche.codebook import (
    FSM,
    CodebookModel,
    GroupedCodebookLayer,
    Intervention,
    TrainConfig,
    attach,
    build_cache,
    evaluate_lm,
    generate,
    intervene,
    row_sampler,
    train_codebooks,
)
from tyche.codebook.tokfsm import next_state_probs
from tyche.errors import InputError
from tyche.frameworks import as_module

HEADS, MLP = "blocks.0.attn.hook_z", "blocks.1.hook_mlp_out"
STEPS = TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=0, log_every=1, seed=3)


def tokens(n: int = 8, t: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- nnsight


def test_nnsight_codebooks_train_and_choose_as_on_the_hf_model() -> None:
    from conftest import build_gpt2

    x = tokens()
    sites = ["attn_heads.0", "transformer.h[1].mlp"]  # an alias and an nnsight path
    models = []
    for model in (build_gpt2(0), wrap_nnsight(build_gpt2(0))):
        cb = attach(model, sites, num_codes=16, seed=0)
        train_codebooks(cb, row_sampler(x, 4, seed=1), STEPS, progress=False)
        models.append(cb.eval())
    hf, nn = models
    assert hf.sites == nn.sites == ["attn_heads.0", "transformer.h.1.mlp"]
    for a, b in zip(hf.state_dict().values(), nn.state_dict().values()):
        assert torch.equal(a, b)  # the same module trained by the same steps: bitwise
    with torch.no_grad():
        logits = [m(input_ids=x).logits for m in models]
    assert torch.equal(*logits)  # as above
    for site in hf.sites:
        assert torch.equal(hf.codebook(site).last_ids, nn.codebook(site).last_ids)


# ----------------------------------------------------------------------------- TransformerLens


def _perturbed(cb: CodebookModel) -> CodebookModel:
    """Layer-norm affines away from 1 and 0, so the hand computation must apply them."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in cb.codebooks.values():
            layer.ln_weight.add_(0.3 * torch.randn(layer.ln_weight.shape, generator=g))
            layer.ln_bias.add_(0.3 * torch.randn(layer.ln_bias.shape, generator=g))
    return cb.eval()


@pytest.fixture
def tl_codebooks():
    hooked = build_hooked()
    return hooked, _perturbed(attach(hooked, [HEADS, MLP], num_codes=16, seed=0))


def snapped(x: torch.Tensor, layer: GroupedCodebookLayer) -> torch.Tensor:
    """The codebook's output for ``x`` ``(..., G, d)`` by hand: layer norm with the layer's
    affine, the code of largest ``<x̂, c> / |c|`` per group, that code's vector."""
    xhat = F.layer_norm(x, x.shape[-1:], eps=1e-5) * layer.ln_weight + layer.ln_bias
    codes = layer.codebook  # (G, N, d)
    scores = torch.einsum("...gd,gnd->...gn", xhat, codes) / codes.norm(dim=-1)
    ids = scores.argmax(-1)  # (..., G)
    return torch.stack([codes[g][ids[..., g]] for g in range(codes.shape[0])], -2)


def by_hand(hooked, cb: CodebookModel, x: torch.Tensor, forced: tuple[int, int] | None = None):
    """Logits of ``hooked`` with both codebooks' replacements written as TransformerLens hooks
    (Tyche's own codebooks passing through); ``forced = (position, code)`` at the MLP."""

    def heads(z, hook):  # noqa: ANN001, ANN202  z: (B, T, H, d_head), TransformerLens' own view
        return snapped(z, cb.codebook(HEADS))

    def mlp(a, hook):  # noqa: ANN001, ANN202
        layer = cb.codebook(MLP)
        out = snapped(a.unsqueeze(-2), layer).squeeze(-2)
        if forced is not None:
            out[:, forced[0]] = layer.codebook[0, forced[1]]
        return out

    with torch.no_grad(), cb.snapping(False):
        return hooked.run_with_hooks(x, fwd_hooks=[(HEADS, heads), (MLP, mlp)])


def test_hook_names_get_one_codebook_per_head_and_replace_the_activations(tl_codebooks) -> None:
    hooked, cb = tl_codebooks
    layer = cb.codebook(HEADS)
    assert cb.sites == [HEADS, MLP]
    assert type(layer) is GroupedCodebookLayer and (layer.n_groups, layer.dim) == (4, 16)
    assert cb.codebook(MLP).n_groups == 1 and cb.codebook(MLP).dim == 64
    x = tokens()
    with torch.no_grad():
        ours = cb(input_ids=x).logits
        plain = hooked(x)  # the TransformerLens forward pass, the same hooked modules
        _, cache = hooked.run_with_cache(x)
        with cb.snapping(False):
            without = hooked(x)
    assert torch.equal(ours, plain)  # same path: one forward of the same modules and hooks
    assert (ours - without).abs().max() > 1e-2
    ids = cb.codebook(MLP).last_ids[..., 0]  # (B, T), from the run_with_cache pass
    assert torch.equal(cache[MLP], cb.codebook(MLP).codebook[0, ids])
    heads = cb.codebook(HEADS).last_ids[..., 0]  # (B, T, H)
    per_head = torch.stack([layer.codebook[h][heads[..., h]] for h in range(4)], -2)
    assert torch.equal(cache[HEADS], per_head)  # code vectors, copied: exact
    # float32: the hand formula and the layer's batched matmul choose the same codes, so the
    # logits agree to a few float32 roundings of the hand layer norm (1e-6 measured)
    torch.testing.assert_close(by_hand(hooked, cb, x), ours, rtol=0, atol=1e-4)


def test_forcing_a_code_equals_the_replacement_by_hand(tl_codebooks) -> None:
    hooked, cb = tl_codebooks
    x = tokens(4, 8, seed=1)
    with torch.no_grad():
        clean = hooked(x)
        with intervene(cb, [Intervention(MLP, 5, positions=(2,))]):
            forced = hooked(x)
    assert torch.equal(forced[:, :2], clean[:, :2])  # same path: causal, the first 2 unchanged
    assert (forced[:, 2:] - clean[:, 2:]).abs().max() > 1e-2
    # float32 as in the test above: the same codes chosen, logits a few roundings apart
    torch.testing.assert_close(by_hand(hooked, cb, x, (2, 5)), forced, rtol=0, atol=1e-4)


def test_generate_follows_the_replacement_token_by_token(tl_codebooks) -> None:
    hooked, cb = tl_codebooks
    prompt = tokens(1, 4, seed=2)
    ivs = [Intervention(MLP, 5, positions=(1,))]
    out = generate(cb, prompt, ivs, max_new_tokens=5)
    assert out.shape == (1, 9) and torch.equal(out[:, :4], prompt)
    expected = prompt
    for _ in range(5):
        logits = by_hand(hooked, cb, expected, (1, 5))[:, -1]
        expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, expected)
    sampled = [generate(cb, prompt, (), max_new_tokens=3, do_sample=True, seed=5) for _ in "ab"]
    assert torch.equal(*sampled) and sampled[0].shape == (1, 7)


def test_training_on_a_hooked_transformer_trains_its_own_weights() -> None:
    hooked = build_hooked()
    before = hooked.blocks[0].mlp.W_in.detach().clone()
    cb = attach(hooked, ["blocks.*.attn.hook_z"], num_codes=8, seed=0)
    cfg = replace(STEPS, kmeans_init=True, kmeans_tokens=64)
    result = train_codebooks(cb, row_sampler(tokens(), 4), cfg, progress=False)
    assert len(result.history) == 2 and all(torch.isfinite(torch.tensor(r["loss"]))
                                           for r in result.history)  # fmt: skip
    assert cb.sites == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    assert not torch.equal(hooked.blocks[0].mlp.W_in, before)  # the TransformerLens model's own
    scores = evaluate_lm(hooked, tokens(4, 6))  # a raw HookedTransformer, with the codebooks
    assert scores["n_tokens"] == 20 and 0 < scores["loss"] < 20


def test_saving_keeps_the_codebooks_and_reloading_needs_the_same_model(tmp_path) -> None:
    hooked = build_hooked()
    cb = attach(hooked, [HEADS, MLP], num_codes=16, seed=0).eval()
    cb.save_pretrained(tmp_path / "cb")
    saved = json.loads((tmp_path / "cb" / "codebooks.json").read_text())
    assert saved["base_model"]["framework"] == "transformer_lens"
    assert not (tmp_path / "cb" / "model.safetensors").exists()
    with pytest.raises(InputError, match="holds the codebooks of a TransformerLens .* base_model="):
        CodebookModel.from_pretrained(tmp_path / "cb")
    with pytest.raises(InputError, match="base_model is not the model the codebooks"):
        CodebookModel.from_pretrained(tmp_path / "cb", base_model=build_hooked(seed=1))
    again = CodebookModel.from_pretrained(tmp_path / "cb", base_model=build_hooked())
    x = tokens(2, 6)
    with torch.no_grad():
        assert torch.equal(again(input_ids=x).logits, cb(input_ids=x).logits)  # same weights
    with pytest.raises(InputError, match="copy_model=True .* TransformerLens model"):
        build_cache(cb, x, tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()  # refused before anything ran
    cache = build_cache(cb, x, tmp_path / "cache", copy_model=False, progress=False)
    assert cache.sites == [HEADS, MLP]


def test_fsm_metrics_take_a_hooked_transformer() -> None:
    hooked = build_hooked()
    fsm = FSM.random(n_states=4, n_edges=2, base=4, seed=0)
    prefixes = fsm.encode(fsm.walks(3, 2, torch.Generator().manual_seed(0)))
    probs = next_state_probs(hooked, fsm, prefixes)
    # same path: both run the same HookedLM view of the same model
    assert torch.equal(probs, next_state_probs(as_module(hooked), fsm, prefixes))
    assert probs.shape == (3, 4)
