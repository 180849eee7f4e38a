"""Causal bases of TransformerLens and nnsight models, checked against TransformerLens itself.

The oracle of each energy Tyche reports is the definition run through TransformerLens's own
machinery: ``run_with_hooks`` mean-ablates the direction at the hook point (at the positions
the attention mask keeps, about their mean there), and the KL(clean ‖ ablated) is taken by
hand from ``log_softmax`` of the two logits, averaged over the same positions.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from interop_support import VOCAB, build_hooked, require, wrap_nnsight

from conftest import build_gpt2
from tyche.causal import CausalOptions, LogitLens, TunedLens, extract_causal_bases, train_tuned_lens
from tyche.errors import InputError

#: few iterations: the oracle checks the energies of whatever directions come back
OPTIONS = CausalOptions(max_iter=15, n_pca=0, n_starts=1)
#: float32 logits of a 2-layer model: each KL term carries ~1e-7 relative rounding of logits
#: of size ~3, so a mean KL of 0.01-0.3 nats agrees to well under 1e-6 nats (measured <= 4e-8)
KL_ABS = 1e-6
KL_REL = 1e-5


def _tokens() -> dict[str, torch.Tensor]:
    """input_ids (4, 12) and a mask with the last 4 positions of row 1 off (padding)."""
    ids = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _randomised(**kwargs) -> torch.nn.Module:
    """A HookedTransformer whose final norm and unembedding bias are not the identity/zero
    they start as (so a norm read without its gain or bias shows)."""
    model = build_hooked(**kwargs)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        norm = getattr(model, "ln_final", None)
        for name in ("w", "b"):
            param = getattr(norm, name, None)
            if param is not None:
                noise = 0.3 * torch.randn(param.shape, generator=g, dtype=torch.float64)
                param.add_(noise.to(param.dtype))
        noise = 0.5 * torch.randn(model.unembed.b_U.shape, generator=g, dtype=torch.float64)
        model.unembed.b_U.add_(noise.to(model.unembed.b_U.dtype))
    return model


def _kl(clean: torch.Tensor, ablated: torch.Tensor, keep: torch.Tensor) -> float:
    """Mean over ``keep`` of KL(softmax clean ‖ softmax ablated), in float64 (nats)."""
    logp, logq = clean.double().log_softmax(-1), ablated.double().log_softmax(-1)
    return float((logp.exp() * (logp - logq)).sum(-1)[keep].mean())


def _ablator(h: torch.Tensor, keep: torch.Tensor, vectors: torch.Tensor):
    """The hook of Tyche's mean ablation of span(vectors) (d, m) at the hook point whose clean
    activation is ``h``: ``x - ((x - mean) V) Vᵀ`` at kept positions, the mean over them;
    per-head tensors (B, T, H, d_head) are ablated with their heads concatenated."""
    mean = h.flatten(2)[keep].double().mean(0)
    v = vectors.double()

    def hook(act: torch.Tensor, hook=None) -> torch.Tensor:
        flat = act.flatten(2).double()
        delta = (flat - mean) * keep[..., None]
        return (flat - (delta @ v) @ v.T).to(act.dtype).reshape(act.shape)

    return hook


def tl_model_energy(hooked, tokens, hook_name: str, vectors: torch.Tensor) -> float:
    """Energy of ablating span(vectors) at ``hook_name`` in the whole model, by TransformerLens."""
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    keep = mask.bool()
    with torch.no_grad():
        clean, cache = hooked.run_with_cache(ids, attention_mask=mask, names_filter=hook_name)
        ablated = hooked.run_with_hooks(
            ids,
            attention_mask=mask,
            return_type="logits",
            fwd_hooks=[(hook_name, _ablator(cache[hook_name], keep, vectors))],
        )
    return _kl(clean, ablated, keep)


def tl_lens_energy(hooked, tokens, hook_name: str, vectors: torch.Tensor) -> float:
    """Energy of ablating span(vectors) at ``hook_name`` read by the logit lens: TransformerLens's
    ``ln_final`` (when it has one) and ``unembed`` on the clean and ablated activations."""
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    keep = mask.bool()

    def lens(h: torch.Tensor) -> torch.Tensor:
        norm = getattr(hooked, "ln_final", None)
        return hooked.unembed(h if norm is None else norm(h))

    with torch.no_grad():
        _, cache = hooked.run_with_cache(ids, attention_mask=mask, names_filter=hook_name)
        h = cache[hook_name]
        ablated = _ablator(h, keep, vectors)(h)
        return _kl(lens(h), lens(ablated), keep)


def _check_energies(basis, energy_of) -> None:
    """Every direction's energy and the whole basis's match the oracle ``energy_of``."""
    assert basis.k >= 1
    for j in range(basis.k):
        want = energy_of(basis.vectors[:, j : j + 1])
        # float32 logits against a float64 oracle: see KL_ABS
        assert basis.energies[j].item() == pytest.approx(want, rel=KL_REL, abs=KL_ABS)
    want = energy_of(basis.vectors)
    # float32 logits against a float64 oracle: see KL_ABS
    assert basis.subspace_energies[-1].item() == pytest.approx(want, rel=KL_REL, abs=KL_ABS)


# ----------------------------------------------------------------------------- the oracle
@pytest.mark.parametrize("hook_name", ["blocks.1.hook_resid_pre", "blocks.0.attn.hook_z"])
def test_model_target_energies_match_run_with_hooks(hook_name: str) -> None:
    hooked = _randomised()
    tokens = _tokens()
    bases = extract_causal_bases(hooked, tokens, 2, hook_name, OPTIONS, target="model",
                                 progress=False)  # fmt: skip
    assert list(bases) == [hook_name]
    basis = bases[hook_name]
    width = 64  # d_model, and H · d_head = 4 · 16 for hook_z (heads concatenated)
    assert basis.vectors.shape == (width, 2) and basis.n_positions == 44
    _check_energies(basis, lambda v: tl_model_energy(hooked, tokens, hook_name, v))


@pytest.mark.parametrize("target", ["model", "logit"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_energies_in_other_dtypes(dtype: torch.dtype, target: str) -> None:
    hooked = _randomised(dtype=dtype)
    tokens = _tokens()
    site = "blocks.1.hook_resid_pre"
    oracle = tl_model_energy if target == "model" else tl_lens_energy
    basis = extract_causal_bases(hooked, tokens, 1, site, OPTIONS, target=target,
                                 progress=False)[site]  # fmt: skip
    want = oracle(hooked, tokens, site, basis.vectors)
    if dtype == torch.float64:
        # activations are read in float32 (read_site_activations) and the lens algebra runs
        # in float32; the model in float64: ~1e-7 relative of the energy (measured 6e-9 nats)
        assert basis.energies[0].item() == pytest.approx(want, rel=1e-6, abs=1e-7)
    else:
        # bfloat16 (8-bit mantissa): TransformerLens's lens rounds its norm and logits to
        # bfloat16, the lens algebra works in float32, and an ablated activation may round
        # one bfloat16 ulp apart: measured 2e-4 nats of ~0.08 (logit), 7e-8 (model)
        assert basis.energies[0].item() == pytest.approx(want, rel=1e-2, abs=1e-3)


def test_per_head_alias_is_the_hook_z_site() -> None:
    hooked = build_hooked()
    tokens = _tokens()
    options = CausalOptions(max_iter=5, n_pca=0, n_starts=1)
    alias = extract_causal_bases(hooked, tokens, 1, "attn_heads.0", options, target="model",
                                 progress=False)["attn_heads.0"]  # fmt: skip
    hook = extract_causal_bases(hooked, tokens, 1, "blocks.0.attn.hook_z", options,
                                target="model", progress=False)["blocks.0.attn.hook_z"]  # fmt: skip
    # same path: one hook point, one tensor, the same objective and search (bitwise equal)
    torch.testing.assert_close(alias.vectors, hook.vectors, rtol=0, atol=0)
    torch.testing.assert_close(alias.energies, hook.energies, rtol=0, atol=0)  # as above


@pytest.mark.parametrize("norm", ["LN", "LNPre", "RMS", "RMSPre", None])
def test_logit_lens_energies_match_transformer_lens(norm: str | None) -> None:
    hooked = _randomised(normalization_type=norm)
    tokens = _tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the exact algebra must reproduce the lens: no fallback
        bases = extract_causal_bases(hooked, tokens, 2, "blocks.1.hook_resid_pre", OPTIONS,
                                     target="logit", progress=False)  # fmt: skip
    basis = bases["blocks.1.hook_resid_pre"]
    assert basis.settings["fast"] is True  # the lens algebra recognised ln_final and W_U
    _check_energies(basis, lambda v: tl_lens_energy(hooked, tokens, "blocks.1.hook_resid_pre", v))


@pytest.mark.parametrize("norm", ["LN", "LNPre", "RMS", "RMSPre", None])
def test_logit_lens_of_the_last_layer_is_the_models_output(norm: str | None) -> None:
    hooked = _randomised(normalization_type=norm)
    ids = _tokens()["input_ids"]
    with torch.no_grad():
        logits, cache = hooked.run_with_cache(ids, names_filter="blocks.1.hook_resid_post")
        lens = LogitLens.from_model(hooked)
        got = lens(cache["blocks.1.hook_resid_post"])
        factors = lens.lens_factors()
        assert factors is not None
        algebra = factors.logits(cache["blocks.1.hook_resid_post"])
    # same path: TransformerLens's own ln_final and unembed run on the same tensor
    torch.testing.assert_close(got, logits, rtol=0, atol=0)
    # float32: the factors' norm and matmul round differently, ~1e-6 of logits of size ~3
    torch.testing.assert_close(algebra, logits, rtol=1e-5, atol=1e-5)


def test_logit_lens_applies_the_models_soft_cap() -> None:
    tl = require("transformer_lens")
    cfg = tl.HookedTransformerConfig(
        n_layers=1, d_model=32, n_ctx=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=VOCAB,
        act_fn="gelu_new", normalization_type="LN", output_logits_soft_cap=2.0, seed=0,
        device="cpu",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hooked = tl.HookedTransformer(cfg).eval()
    with torch.no_grad():
        hooked.unembed.W_U.mul_(4)  # logits beyond the cap, where tanh bends them
        ids = _tokens()["input_ids"]
        logits, cache = hooked.run_with_cache(ids, names_filter="blocks.0.hook_resid_post")
        lens = LogitLens.from_model(hooked)
        got = lens(cache["blocks.0.hook_resid_post"])
        raw = lens.unembed(lens.norm(cache["blocks.0.hook_resid_post"]))
    assert float(raw.abs().max()) > 4.0 and float(logits.abs().max()) <= 2.0
    assert lens.soft_cap == 2.0 and lens.lens_factors() is None  # tanh is not affine
    # ln_final, unembed, then cap · tanh(z / cap): TransformerLens's ops in its order, bitwise
    torch.testing.assert_close(got, logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------- tuned lens
def test_tuned_lens_trains_and_extracts_on_hook_names(tmp_path) -> None:
    hooked = _randomised()
    tokens = _tokens()
    sites = "blocks.*.hook_resid_pre"
    lens = train_tuned_lens(hooked, tokens, sites, steps=30, lr=1e-2, batch_size=4,
                            progress=False)  # fmt: skip
    assert lens.sites == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    assert all(t < lg for t, lg in zip(lens.stats["kl_tuned_lens"], lens.stats["kl_logit_lens"]))
    loaded = TunedLens.load(lens.save(tmp_path / "lens"), hooked)  # the same model's hash
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bases = extract_causal_bases(hooked, tokens, 1, "blocks.1.hook_resid_pre", OPTIONS,
                                     target="tuned", lens=loaded, progress=False)  # fmt: skip
    assert bases["blocks.1.hook_resid_pre"].settings["fast"] is True


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("site", ["attn_heads.0", "blocks.0.attn.hook_z"])
def test_lenses_refuse_per_head_sites(site: str) -> None:
    hooked = build_hooked()
    with pytest.raises(InputError, match="per head.*target='model'"):
        extract_causal_bases(hooked, _tokens(), 1, site, OPTIONS, target="logit", progress=False)
    with pytest.raises(InputError, match="a tuned lens reads the residual stream"):
        TunedLens(hooked, site)


def test_lens_refuses_a_site_of_another_width() -> None:
    with pytest.raises(InputError, match=r"blocks.0.mlp.hook_post is 256 wide.*width 64"):
        extract_causal_bases(build_hooked(), _tokens(), 1, "blocks.0.mlp.hook_post", OPTIONS,
                             target="logit", progress=False)  # fmt: skip


def test_site_that_is_not_per_position_is_refused() -> None:
    with pytest.raises(InputError, match=r"hook_pattern holds a tensor of shape \(4, 4, 12, 12\)"):
        extract_causal_bases(build_hooked(), _tokens(), 1, "blocks.0.attn.hook_pattern",
                             OPTIONS, target="model", progress=False)  # fmt: skip


def test_hf_per_head_site_is_its_projection_input() -> None:
    model = build_gpt2()
    tokens = _tokens()
    options = CausalOptions(max_iter=5, n_pca=0, n_starts=1)
    heads = extract_causal_bases(model, tokens, 1, "attn_heads.1", options, target="model",
                                 progress=False)["attn_heads.1"]  # fmt: skip
    flat = extract_causal_bases(model, tokens, 1, "transformer.h.1.attn.c_proj:input", options,
                                target="model", progress=False)  # fmt: skip
    flat = flat["transformer.h.1.attn.c_proj:input"]
    # same path: the heads' view is c_proj's input, (H, d_head) concatenated back; same search
    torch.testing.assert_close(heads.vectors, flat.vectors, rtol=0, atol=0)
    torch.testing.assert_close(heads.energies, flat.energies, rtol=0, atol=0)  # as above


# ----------------------------------------------------------------------------- nnsight
@pytest.mark.parametrize("target", ["logit", "model"])
def test_nnsight_wrapper_gives_the_hf_models_basis(target: str) -> None:
    model = build_gpt2()
    wrapped = wrap_nnsight(model)
    tokens = _tokens()
    hf = extract_causal_bases(model, tokens, 2, "resid_pre.1", OPTIONS, target=target,
                              progress=False)["resid_pre.1"]  # fmt: skip
    nn_ = extract_causal_bases(wrapped, tokens, 2, "resid_pre.1", OPTIONS, target=target,
                               progress=False)["resid_pre.1"]  # fmt: skip
    # the wrapper is measured as the module it wraps: the same ops on the same weights
    torch.testing.assert_close(nn_.vectors, hf.vectors, rtol=0, atol=0)
    torch.testing.assert_close(nn_.energies, hf.energies, rtol=0, atol=0)  # as above
    assert nn_.model_hash == hf.model_hash


def test_nnsight_envoys_and_paths_name_sites() -> None:
    model = build_gpt2()
    wrapped = wrap_nnsight(model)
    tokens = _tokens()
    options = CausalOptions(max_iter=5, n_pca=0, n_starts=1)
    want = extract_causal_bases(model, tokens, 1, "transformer.h.1", options, target="model",
                                progress=False)["transformer.h.1"]  # fmt: skip
    for site in (wrapped.transformer.h[1], "transformer.h[1]", "model.transformer.h[1]"):
        got = extract_causal_bases(wrapped, tokens, 1, site, options, target="model",
                                   progress=False)  # fmt: skip
        assert list(got) == ["transformer.h.1"]
        # the same module's output, the same search: bitwise equal
        torch.testing.assert_close(got["transformer.h.1"].vectors, want.vectors, rtol=0, atol=0)
