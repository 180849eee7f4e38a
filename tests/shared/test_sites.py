"""Tests for tyche.sites: alias resolution, globs, read/replace hooks, hook hygiene.

Tolerances: a hook reads the very tensor a module returns, so reads compare exactly
(rtol = atol = 0). Where a test recomputes a value (a module applied to a read tensor, a rerun
after a replacement) the float32 ops are the same as the model's on the same values, and they
measure identical; assert_close's float32 default (rtol 1.3e-6, atol 1e-5) only leaves room for
a reduction evaluated in another order (64-128-term sums of |x| ≲ 5: ≲ 128·2^-24·5 ≈ 4e-5 at
worst, ~1e-7 in practice) and is far below the O(1) change of a wrong site or a lost patch.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tyche.hooks import read_activations, replace_activations
from tyche.sites import (
    Site,
    alias_sites,
    blocks,
    embedding,
    final_norm,
    n_layers,
    resolve_sites,
    unembedding,
)

# blocks, attention, mlp, attention output projection (relative to a block), embedding, norm
LAYOUT = {
    "GPT2LMHeadModel": ("transformer.h", "attn", "mlp", "attn.c_proj", "transformer.wte",
                        "transformer.ln_f"),
    "GPTNeoXForCausalLM": ("gpt_neox.layers", "attention", "mlp", "attention.dense",
                           "gpt_neox.embed_in", "gpt_neox.final_layer_norm"),
    "LlamaForCausalLM": ("model.layers", "self_attn", "mlp", "self_attn.o_proj",
                         "model.embed_tokens", "model.norm"),
}  # fmt: skip
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def layout(model: nn.Module) -> tuple[str, ...]:
    return LAYOUT[type(model).__name__]


def hook_snapshot(model: nn.Module) -> dict[str, tuple]:
    """The ids of every hook on every module (HF installs its own capture hooks lazily)."""
    return {
        name: tuple(tuple(getattr(module, d, {})) for d in HOOK_DICTS)
        for name, module in model.named_modules()
    }


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_alias_module_names_and_helpers(hf_model):
    blocks_path, attn, mlp, out_proj, embed_name, norm_name = layout(hf_model)
    sites = alias_sites(hf_model)
    expected = {"embed": (embed_name, "output"), "unembed": ("lm_head", "input")}
    for i in range(2):
        block = f"{blocks_path}.{i}"
        expected |= {
            f"resid_pre.{i}": (block, "input"),
            f"attn_heads.{i}": (f"{block}.{out_proj}", "input"),
            f"attn_out.{i}": (f"{block}.{attn}", "output"),
            f"mlp_out.{i}": (f"{block}.{mlp}", "output"),
            f"resid_post.{i}": (block, "output"),
        }
    assert {k: (s.module_name, s.where) for k, s in sites.items()} == expected
    for site in sites.values():
        assert site.module is hf_model.get_submodule(site.module_name)
        assert site.n_heads == (4 if site.name.startswith("attn_heads") else None)
    assert blocks(hf_model) is hf_model.get_submodule(blocks_path)
    assert n_layers(hf_model) == 2
    assert embedding(hf_model) is hf_model.get_submodule(embed_name)
    assert final_norm(hf_model) is hf_model.get_submodule(norm_name)
    assert unembedding(hf_model) is hf_model.lm_head


def test_residual_stream_matches_output_hidden_states(hf_model, token_batch):
    sites = ["resid_pre.*", "resid_post.*", "unembed"]
    with read_activations(hf_model, sites) as acts, torch.no_grad():
        out = hf_model(**token_batch, output_hidden_states=True)
    hidden = out.hidden_states
    assert len(hidden) == 3
    # exact: the hooks see the tensors HF returns as hidden states
    torch.testing.assert_close(acts["resid_pre.0"], hidden[0], rtol=0, atol=0)
    torch.testing.assert_close(acts["resid_post.0"], hidden[1], rtol=0, atol=0)  # as above
    # exact: one tensor
    torch.testing.assert_close(acts["resid_pre.1"], acts["resid_post.0"], rtol=0, atol=0)
    # HF replaces the last hidden state with the final norm's output, so resid_post.{L-1}
    # differs from hidden_states[L]; the final norm maps one to the other, and that is unembed
    last = acts["resid_post.1"]
    assert not torch.allclose(last, hidden[2], atol=1e-3)  # a LayerNorm apart: O(1)
    with torch.no_grad():
        # same path: the final norm on the very tensor HF gives it
        torch.testing.assert_close(final_norm(hf_model)(last), hidden[2])
        torch.testing.assert_close(acts["unembed"], hidden[2], rtol=0, atol=0)  # one tensor
        # same path: the unembedding on the very tensor HF gives it
        torch.testing.assert_close(unembedding(hf_model)(acts["unembed"]), out.logits)


def test_block_decomposes_into_attention_and_mlp(hf_model, token_batch):
    out_proj = layout(hf_model)[3]
    with read_activations(hf_model, ["resid_*.*", "attn_*.*", "mlp_out.*", "embed"]) as acts:
        logits(hf_model, token_batch)
    for i in range(2):
        summed = acts[f"resid_pre.{i}"] + acts[f"attn_out.{i}"] + acts[f"mlp_out.{i}"]
        # the block may add in another order (NeoX's parallel residual): two float32 additions
        # of |x| ≲ 5 differ by ≲ 2·2^-24·5 ≈ 6e-7; measured 1.5e-8 (every setting). The float32
        # default (atol 1e-5, rtol 1.3e-6) keeps 16× over the bound; a lost branch is O(0.1)
        torch.testing.assert_close(acts[f"resid_post.{i}"], summed, rtol=1.3e-6, atol=1e-5)
        heads = acts[f"attn_heads.{i}"]
        assert heads.shape == (4, 16, 4, 16)
        projection = hf_model.get_submodule(f"{layout(hf_model)[0]}.{i}.{out_proj}")
        with torch.no_grad():
            # same path: the output projection on the very tensor the attention gives it
            torch.testing.assert_close(projection(heads.flatten(-2)), acts[f"attn_out.{i}"])
    with torch.no_grad():
        token_embedding = embedding(hf_model)(token_batch["input_ids"])
    torch.testing.assert_close(acts["embed"], token_embedding, rtol=0, atol=0)  # a lookup: exact
    if hasattr(hf_model, "transformer"):  # GPT-2 adds learned positions to the token embedding
        with torch.no_grad():
            positions = hf_model.transformer.wpe(torch.arange(16))
        # same path: GPT-2's own elementwise add of the same two tensors
        torch.testing.assert_close(acts["resid_pre.0"], acts["embed"] + positions)
    else:  # exact: the first block gets the embedding itself (dropout is off in eval)
        torch.testing.assert_close(acts["resid_pre.0"], acts["embed"], rtol=0, atol=0)  # exact


def test_identity_replacement_leaves_logits_unchanged(hf_model, token_batch):
    calls = []

    def identity(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape)
        return t.clone()

    patterns = ["embed", "resid_pre.*", "attn_heads.*", "attn_out.*", "mlp_out.*"]
    mapping = {p: identity for p in patterns + ["resid_post.*", "unembed"]}
    before = logits(hf_model, token_batch)
    with replace_activations(hf_model, mapping) as sites:
        after = logits(hf_model, token_batch)
    assert len(sites) == len(calls) == 12
    assert (4, 16, 4, 16) in calls  # the heads view
    # exact: clones of the same values go through the same ops
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_zeroing_a_head_equals_zeroing_its_projection_columns(hf_model, token_batch):
    layer, head, d_head = 1, 2, 16

    def ablate(heads: torch.Tensor) -> torch.Tensor:
        heads = heads.clone()
        heads[..., head, :] = 0
        return heads

    before = logits(hf_model, token_batch)
    with replace_activations(hf_model, {f"attn_heads.{layer}": ablate}):
        ablated = logits(hf_model, token_batch)

    edited = copy.deepcopy(hf_model)
    projection = edited.get_submodule(f"{layout(edited)[0]}.{layer}.{layout(edited)[3]}")
    cols = slice(head * d_head, (head + 1) * d_head)
    with torch.no_grad():
        if isinstance(projection, nn.Linear):  # weight (out, in)
            projection.weight[:, cols] = 0
        else:  # GPT-2's Conv1D stores (in, out)
            projection.weight[cols, :] = 0
    # zero inputs or zero weights give the same products (0) in the same sums: measured
    # identical (every setting). The float32 default (atol 1e-5) allows a reordered sum; the
    # head moves the logits by ≥ 0.1
    torch.testing.assert_close(ablated, logits(edited, token_batch), rtol=1.3e-6, atol=1e-5)
    assert (ablated - before).abs().max() > 1e-4  # and the head mattered (measured ≥ 0.1)


def test_tensor_substitute_patches_in_another_run(hf_model, token_batch):
    other = dict(token_batch, input_ids=token_batch["input_ids"].flip(-1))
    with read_activations(hf_model, "resid_pre.1") as acts:
        target = logits(hf_model, other)
    with replace_activations(hf_model, {"resid_pre.1": acts["resid_pre.1"]}):
        patched = logits(hf_model, token_batch)
    torch.testing.assert_close(patched, target)  # same path: the same tensor onwards, same ops
    # another input: logits ≥ 0.3 apart (measured), a lost patch would be 0
    assert not torch.allclose(patched, logits(hf_model, token_batch), rtol=0, atol=1e-3)
    # a broadcast float64 substitute is cast to the activation's dtype
    with replace_activations(hf_model, {"mlp_out.0": torch.zeros(64, dtype=torch.float64)}):
        by_tensor = logits(hf_model, token_batch)
    with replace_activations(hf_model, {"mlp_out.0": torch.zeros_like}):
        by_function = logits(hf_model, token_batch)
    assert by_tensor.dtype == torch.float32
    # zeroed: logits ≥ 0.5 apart (measured), a lost patch would be 0
    assert not torch.allclose(by_tensor, logits(hf_model, token_batch), rtol=0, atol=1e-3)
    # exact: zeros either way, then the same ops
    torch.testing.assert_close(by_tensor, by_function, rtol=0, atol=0)


def test_output_replacement_of_tuple_and_tensor_outputs(hf_model, token_batch):
    other = dict(token_batch, input_ids=token_batch["input_ids"].roll(1, dims=-1))
    with read_activations(hf_model, "resid_post.0") as acts:
        target = logits(hf_model, other)
    with replace_activations(hf_model, {"resid_post.0": acts["resid_post.0"]}):
        # same path: the same tensor onwards, same ops
        torch.testing.assert_close(logits(hf_model, token_batch), target)
    # the attention returns a tuple: its first element is replaced, the block sees zeros
    reads = read_activations(hf_model, ["resid_pre.1", "mlp_out.1", "resid_post.1", "attn_out.1"])
    with replace_activations(hf_model, {"attn_out.1": torch.zeros_like}), reads as acts:
        logits(hf_model, token_batch)
    assert acts["attn_out.1"].abs().max() == 0  # reads opened inside see the replaced value
    summed = acts["resid_pre.1"] + acts["mlp_out.1"]
    # as in test_block_decomposes_into_attention_and_mlp: ≲ 6e-7, float32 default keeps 16×
    torch.testing.assert_close(acts["resid_post.1"], summed, rtol=1.3e-6, atol=1e-5)


def test_detach_false_keeps_the_graph(hf_model, token_batch):
    with read_activations(hf_model, "resid_pre.1") as detached:
        hf_model(**token_batch)
    assert not detached["resid_pre.1"].requires_grad
    with read_activations(hf_model, ["resid_pre.1", "attn_heads.0"], detach=False) as acts:
        out = hf_model(**token_batch).logits
    grads = torch.autograd.grad(out[:, -1].sum(), [acts["resid_pre.1"], acts["attn_heads.0"]])
    assert grads[0].shape == (4, 16, 64) and grads[0].abs().sum() > 0
    assert grads[1].shape == (4, 16, 4, 16) and grads[1].abs().sum() > 0


def test_glob_patterns_and_order(hf_model, token_batch):
    blocks_path, _, mlp, out_proj = layout(hf_model)[:4]

    def names(patterns):
        return [s.name for s in resolve_sites(hf_model, patterns)]

    assert names("resid_pre.*") == ["resid_pre.0", "resid_pre.1"]
    assert names("mlp_out.[0-1]") == ["mlp_out.0", "mlp_out.1"]
    assert names("mlp_out.[!0]") == ["mlp_out.1"]
    assert names("?mbed") == ["embed"]
    assert names(["unembed", "resid_post.1", "embed", "resid_pre.0", "attn_out.0"]) == [
        "embed", "resid_pre.0", "attn_out.0", "resid_post.1", "unembed"]  # fmt: skip
    assert names(f"{blocks_path}.*") == [f"{blocks_path}.0", f"{blocks_path}.1"]
    assert names(f"**.{mlp}") == [f"{blocks_path}.0.{mlp}", f"{blocks_path}.1.{mlp}"]
    raw_heads = f"{blocks_path}.0.{out_proj}:input"
    assert names(raw_heads) == [raw_heads]
    with read_activations(hf_model, [f"{blocks_path}.*.{mlp}", "mlp_out.*", raw_heads]) as acts:
        logits(hf_model, token_batch)
    for i in range(2):
        # same path: two names of one module's output in one forward pass
        torch.testing.assert_close(acts[f"{blocks_path}.{i}.{mlp}"], acts[f"mlp_out.{i}"])
    with read_activations(hf_model, resolve_sites(hf_model, "attn_heads.0")) as heads:
        logits(hf_model, token_batch)
    # same path: one module's input, read raw and as heads, in two runs of one forward pass
    torch.testing.assert_close(acts[raw_heads], heads["attn_heads.0"].flatten(-2))


def test_no_match_lists_close_matches(hf_model):
    blocks_path, _, mlp = layout(hf_model)[:3]
    with pytest.raises(ValueError, match=r"resid_post\.0"):
        resolve_sites(hf_model, "resid_pst.0")
    with pytest.raises(ValueError, match=f"{blocks_path}.0.{mlp}'"):
        resolve_sites(hf_model, f"{blocks_path}.0.{mlp}x")
    with pytest.raises(ValueError, match=r"'\*\*' crosses dots"):
        resolve_sites(hf_model, f"*.{mlp}")  # '*' does not cross dots
    with pytest.raises(ValueError, match="no site patterns"):
        resolve_sites(hf_model, [])


def test_hooks_removed_on_exit_and_on_error(hf_model, token_batch):
    clean = hook_snapshot(hf_model)
    with read_activations(hf_model, "*"), replace_activations(hf_model, {"attn_heads.*": abs}):
        assert hook_snapshot(hf_model) != clean
    assert hook_snapshot(hf_model) == clean

    with (
        pytest.raises(KeyError, match="no activation recorded"),
        read_activations(hf_model, ["resid_*.*", "attn_heads.*"]) as acts,
    ):
        logits(hf_model, token_batch)
        acts["not a site"]
    assert hook_snapshot(hf_model) == clean

    def explode(t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    explosive = replace_activations(hf_model, {"resid_post.0": explode, "embed": abs})
    reads = read_activations(hf_model, "resid_pre.*")
    with pytest.raises(RuntimeError, match="boom"), reads, explosive:
        logits(hf_model, token_batch)
    assert hook_snapshot(hf_model) == clean

    with (
        pytest.raises(ValueError, match="expected"),
        replace_activations(hf_model, {"attn_heads.0": lambda t: t.flatten(-2)}),
    ):
        logits(hf_model, token_batch)
    with (
        pytest.raises(TypeError, match="not a Tensor"),
        replace_activations(hf_model, {"resid_pre.0": lambda t: None}),
    ):
        logits(hf_model, token_batch)
    with (
        pytest.raises(ValueError, match="broadcast"),
        replace_activations(hf_model, {"mlp_out.0": torch.zeros(3)}),
    ):
        logits(hf_model, token_batch)
    assert hook_snapshot(hf_model) == clean


def test_bad_arguments(hf_model, neox_model):
    foreign = resolve_sites(neox_model, "resid_pre.0")[0]
    if hf_model is not neox_model:
        with pytest.raises(ValueError, match="another model"):
            resolve_sites(hf_model, foreign)
    with pytest.raises(ValueError, match="where"):
        Site("x", "lm_head", hf_model.lm_head, "middle")
    with (
        pytest.raises(TypeError, match="callable or a Tensor"),
        replace_activations(hf_model, {"embed": 3.0}),
    ):
        pass
    with (
        pytest.raises(ValueError, match="two keys"),
        replace_activations(hf_model, {"mlp_out.*": abs, "mlp_out.0": abs}),
    ):
        pass
    with pytest.raises(TypeError, match="str or Site"):
        resolve_sites(hf_model, ["embed", 3])


def test_plain_sequential_with_raw_globs():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(5, 8)
    assert [s.name for s in resolve_sites(mlp, ["2", "0:input", "1"])] == ["0:input", "1", "2"]
    with read_activations(mlp, ["*", "0:input"]) as acts:
        y = mlp(x)
    hidden = mlp[0](x)
    torch.testing.assert_close(acts["0:input"], x, rtol=0, atol=0)  # the input itself: exact
    # same path: each module on the same input as in the forward pass
    torch.testing.assert_close(acts["0"], hidden)
    torch.testing.assert_close(acts["1"], hidden.relu())  # same path, as above
    torch.testing.assert_close(acts["2"], y)  # same path: the output itself
    with replace_activations(mlp, {"1": torch.zeros_like}):
        # zero inputs: the products are 0 and the output is the bias, exactly
        torch.testing.assert_close(mlp(x), mlp[2].bias.expand(5, 3), rtol=0, atol=0)
    assert all(not getattr(m, d) for m in mlp.modules() for d in HOOK_DICTS if hasattr(m, d))
    assert alias_sites(mlp) == {}
    for helper in (blocks, n_layers, final_norm, embedding, unembedding):
        with pytest.raises(ValueError, match="named_modules"):
            helper(mlp)
    with pytest.raises(ValueError, match="no aliases"):
        resolve_sites(mlp, "resid_pre.0")


class ToyAttention(nn.Module):
    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.value = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.out_proj(torch.tanh(self.value(x))), None


class ToyBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = ToyAttention(width, num_heads=2)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(hidden_states)[0]
        return hidden_states + self.mlp(hidden_states)


class ToyLM(nn.Module):
    """A made-up architecture: blocks at ``blocks``, called with a keyword argument."""

    def __init__(self, vocab: int = 32, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList([ToyBlock(width) for _ in range(3)])
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        for block in self.blocks:
            hidden = block(hidden_states=hidden)
        return self.lm_head(self.norm(hidden))


def test_unknown_architecture_found_by_structure():
    torch.manual_seed(0)
    toy, ids = ToyLM(), torch.randint(32, (2, 5))
    assert (blocks(toy), embedding(toy), final_norm(toy)) == (toy.blocks, toy.embed, toy.norm)
    assert unembedding(toy) is toy.lm_head
    assert alias_sites(toy)["attn_heads.2"].n_heads == 2
    with read_activations(toy, "*.[0-2]") as acts:
        out = toy(ids)
    kinds = ("resid_pre", "attn_heads", "attn_out", "mlp_out", "resid_post")
    assert set(acts) == {f"{k}.{i}" for k in kinds for i in range(3)} | {
        "blocks.0",
        "blocks.1",
        "blocks.2",
    }
    for i in range(3):
        summed = acts[f"resid_pre.{i}"] + acts[f"attn_out.{i}"] + acts[f"mlp_out.{i}"]
        # same path: the block's own two adds, in its order
        torch.testing.assert_close(acts[f"resid_post.{i}"], summed)
    assert acts["attn_heads.0"].shape == (2, 5, 2, 4)
    zeros = torch.zeros(2, 5, 8)
    with replace_activations(toy, {"resid_pre.1": zeros}), torch.no_grad():
        patched = toy(ids)  # the block gets hidden_states as a keyword: replaced there
    with torch.no_grad():
        expected = toy.lm_head(toy.norm(toy.blocks[2](toy.blocks[1](zeros))))
    torch.testing.assert_close(patched, expected)  # same path: the same modules on zeros
    assert not torch.allclose(patched, out, rtol=0, atol=1e-3)  # replaced: ≥ 0.1 apart
