"""Models and site names from TransformerLens and nnsight: tyche.frameworks, tyche.hook_names."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from interop_support import VOCAB, build_hooked, require, wrap_nnsight

from conftest import build_gpt2, build_llama, build_neox
from tyche.errors import InputError
from tyche.frameworks import HookedLM, as_module, framework_of
from tyche.hook_names import TRANSFORMER_LENS, alias_of_hook, hook_name, translations
from tyche.hooks import read_activations, replace_activations
from tyche.sites import alias_sites, resolve_sites

TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- names
def test_hook_names_translate_both_ways_with_globs() -> None:
    assert alias_of_hook("blocks.3.hook_mlp_out") == "mlp_out.3"
    assert alias_of_hook("blocks.*.attn.hook_z") == "attn_heads.*"
    assert alias_of_hook("blocks.[0-1].hook_resid_pre") == "resid_pre.[0-1]"
    assert alias_of_hook("unembed.hook_in") == "unembed"
    assert alias_of_hook("ln_final.hook_normalized") is None  # before the norm's gain and bias
    assert alias_of_hook("blocks.0.hook_resid_mid") is None
    for hook, alias in TRANSFORMER_LENS.items():
        assert hook_name(alias.replace("{i}", "7")) == hook.replace("{i}", "7")
        assert alias_of_hook(hook.replace("{i}", "7")) == alias.replace("{i}", "7")


def test_nnsight_paths_translate() -> None:
    assert translations("model.transformer.h[0].mlp") == [
        "model.transformer.h.0.mlp",
        "transformer.h.0.mlp",
    ]
    assert translations("transformer.h[1].attn.c_proj:input") == [
        "transformer.h.1.attn.c_proj:input"
    ]


@pytest.mark.parametrize("build", [build_gpt2, build_neox, build_llama])
def test_hook_names_on_hf_models_name_the_alias_sites(build) -> None:
    model = build()
    aliases = alias_sites(model)
    for hook, alias in TRANSFORMER_LENS.items():
        for i in (0, 1):
            want = aliases.get(alias.replace("{i}", str(i)))
            if want is None:  # e.g. a family without that alias
                continue
            (got,) = resolve_sites(model, hook.replace("{i}", str(i)))
            assert (got.module_name, got.where, got.n_heads) == (
                want.module_name,
                want.where,
                want.n_heads,
            )


def test_unknown_hook_name_still_fails_with_close_matches() -> None:
    with pytest.raises(InputError, match="matches nothing"):
        resolve_sites(build_gpt2(), "blocks.9.hook_mlp_out")


# ----------------------------------------------------------------------------- TransformerLens
def test_aliases_on_a_hooked_transformer_are_its_hook_points(hooked) -> None:
    model = as_module(hooked)
    assert isinstance(model, HookedLM) and framework_of(hooked) == "transformer_lens"
    sites = alias_sites(model)
    assert sites["resid_pre.1"].module_name == "blocks.1.hook_resid_pre"
    assert sites["attn_heads.0"].module_name == "blocks.0.attn.hook_z"
    assert sites["attn_heads.0"].heads_native and sites["attn_heads.0"].n_heads == 4
    assert sites["unembed"].module_name == "unembed.hook_in"
    names = list(TRANSFORMER_LENS)
    patterns = [n.replace("{i}", "*") for n in names]
    _, cache = hooked.run_with_cache(TOKENS)
    with torch.no_grad(), read_activations(model, patterns) as acts:
        model(input_ids=TOKENS)
    assert len(acts) == 2 * 5 + 2
    for name, tensor in acts.items():
        # same path: the hook point's own output, recorded twice in one kind of forward pass
        assert torch.equal(tensor, cache[name]), name


def test_sites_come_in_forward_order_on_a_hooked_transformer(hooked) -> None:
    model = as_module(hooked)
    fired: list[str] = []
    handles = [
        module.register_forward_hook(lambda *_, n=name: fired.append(n))
        for name, module in model.named_modules()
        if name.rpartition(".")[2].startswith("hook_")
    ]
    try:
        with torch.no_grad():
            model(input_ids=TOKENS)
    finally:
        for h in handles:
            h.remove()
    resolved = [s.module_name for s in resolve_sites(model, ["**.hook_*", "hook_*"])]
    fired = list(dict.fromkeys(fired))  # hooks of disabled features (hook_attn_in) never fire
    assert [n for n in resolved if n in fired] == [n for n in fired if n in resolved]
    assert len(fired) == 40  # the hook points that fire in this 2-block model: all were compared
    assert resolved.index("blocks.0.hook_resid_pre") < resolved.index("blocks.0.attn.hook_z")


def test_hooked_lm_is_the_transformer_lens_model(hooked) -> None:
    model = as_module(hooked)
    assert dict(model.named_parameters()).keys() == dict(hooked.named_parameters()).keys()
    assert all(a is b for a, b in zip(model.parameters(), hooked.parameters()))
    with torch.no_grad():
        out = model(input_ids=TOKENS, labels=TOKENS)
        # same path: HookedLM calls the TransformerLens forward on the same tokens
        assert torch.equal(out.logits, hooked(TOKENS))
        # cross-entropy over the same 22 next-token terms, float32 sums in two orders
        assert out.loss.item() == pytest.approx(hooked(TOKENS, return_type="loss").item(), rel=1e-6)
    assert model.config.n_positions == 128 and model.config.num_attention_heads == 4
    zero = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n == "unembed.W_U"}
    logits = torch.func.functional_call(model, zero, (), {"input_ids": TOKENS}).logits
    assert torch.equal(logits, hooked.unembed.b_U.expand_as(logits))  # same path: b_U alone


def test_replacing_hook_z_equals_run_with_hooks(hooked) -> None:
    model = as_module(hooked)
    scale = torch.linspace(0, 1, 4).view(4, 1)
    with torch.no_grad(), replace_activations(model, {"blocks.1.attn.hook_z": lambda z: z * scale}):
        ours = model(input_ids=TOKENS).logits
    theirs = hooked.run_with_hooks(
        TOKENS, fwd_hooks=[("blocks.1.attn.hook_z", lambda z, hook: z * scale)]
    )
    assert torch.equal(ours, theirs)  # same path: one multiplication at the same hook point


def test_generate_greedy_continues_with_the_argmax(hooked) -> None:
    model = as_module(hooked)
    out = model.generate(TOKENS[:, :4], max_new_tokens=3)
    assert out.shape == (2, 7) and torch.equal(out[:, :4], TOKENS[:, :4])
    with torch.no_grad():
        first = hooked(TOKENS[:, :4])[:, -1].argmax(-1)
    assert torch.equal(out[:, 4], first)  # same path: the same forward pass, then argmax


def test_hooked_from_hf_gives_the_hf_logits(lm_folder) -> None:
    require("transformer_lens")
    from transformers import AutoModelForCausalLM

    from tyche.frameworks import hooked_from_hf

    hf = AutoModelForCausalLM.from_pretrained(lm_folder).eval()
    torch.manual_seed(0)  # norms that are not the identity, so their gain and bias show
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    hooked = hooked_from_hf(str(lm_folder), hf)
    with torch.no_grad(), read_activations(hf, ["resid_pre.1", "unembed", "mlp_out.0"]) as hf_acts:
        hf_logits = hf(input_ids=TOKENS).logits
    _, cache = hooked.run_with_cache(TOKENS)
    # the same weights in TransformerLens's einsum layout: float32 rounding of width-64 sums
    for alias, hook in [("resid_pre.1", "blocks.1.hook_resid_pre"), ("unembed", "unembed.hook_in"),
                        ("mlp_out.0", "blocks.0.hook_mlp_out")]:  # fmt: skip
        torch.testing.assert_close(cache[hook], hf_acts[alias], rtol=1e-5, atol=1e-5)  # as above
    torch.testing.assert_close(hooked(TOKENS), hf_logits, rtol=1e-4, atol=1e-4)  # same reason


# ----------------------------------------------------------------------------- nnsight
def test_nnsight_model_is_measured_as_the_module_it_wraps() -> None:
    model = build_gpt2()
    wrapped = wrap_nnsight(model)
    assert framework_of(wrapped) == "nnsight" and as_module(wrapped) is model
    sites = resolve_sites(model, [wrapped.transformer.h[1].mlp, "model.transformer.h[0].mlp"])
    assert [s.module_name for s in sites] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]


def test_as_module_refuses_what_is_not_a_model() -> None:
    with pytest.raises(InputError, match="expected a torch nn.Module"):
        as_module("gpt2")


def test_hooked_lm_builds_with_a_small_config() -> None:
    hooked = build_hooked(n_layers=1, d_model=32, n_heads=2, normalization_type=None)
    sites = alias_sites(as_module(hooked))
    assert sites["unembed"].module_name == "unembed.hook_in"  # no final norm: the same hook


# ----------------------------------------------------------------------------- isolation
def test_import_tyche_imports_no_framework() -> None:
    code = (
        "import sys, json, tyche, tyche.basin, tyche.causal, tyche.codebook, tyche.interaction, "
        "tyche.sites, tyche.hooks, tyche.frameworks, tyche.hook_names\n"
        "from tyche import methods\n"
        "print(json.dumps(sorted(m for m in ('transformer_lens', 'nnsight', 'sae_lens', "
        "'sparsify') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_transformer_bridge_is_measured_as_its_hf_model(lm_folder) -> None:
    bridge_module = require("transformer_lens.model_bridge")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(lm_folder).eval()
    bridge = bridge_module.TransformerBridge.boot_transformers(
        str(lm_folder), hf_model=hf, device="cpu"
    )
    assert framework_of(bridge) == "transformer_lens" and as_module(bridge) is hf
    _, cache = bridge.run_with_cache(TOKENS)
    with (
        torch.no_grad(),
        read_activations(hf, ["blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out"]) as acts,
    ):
        hf(input_ids=TOKENS)
    # the bridge runs the HF modules themselves; its hook values are the same tensors
    assert torch.equal(acts["resid_pre.1"], cache["blocks.1.hook_resid_pre"])  # same path
    assert torch.equal(acts["mlp_out.0"], cache["blocks.0.hook_mlp_out"])  # same path
