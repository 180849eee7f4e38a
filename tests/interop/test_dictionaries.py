"""SAELens and sparsify dictionaries: tyche.dictionaries against each library's own loader."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from interop_support import require

from conftest import build_gpt2, make_tiny_tokenizer, tiny_text_list
from tyche.dictionaries import (
    Dictionary,
    hookpoints,
    load_dictionary,
    save_saelens,
    save_sparsify,
)
from tyche.errors import InputError
from tyche.hooks import read_activations


def site_activations(*sites: str, seq_len: int = 16) -> dict[str, torch.Tensor]:
    """Activations (N, d) of the tiny GPT-2 on the tiny texts at ``sites``."""
    ids = make_tiny_tokenizer()(tiny_text_list())["input_ids"]
    flat = torch.tensor([t for row in ids for t in row])
    tokens = flat[: flat.numel() // seq_len * seq_len].reshape(-1, seq_len)
    model = build_gpt2()
    with torch.no_grad(), read_activations(model, list(sites)) as acts:
        model(input_ids=tokens)
    return {s: acts[s].flatten(0, 1) for s in sites}


def train_dictionary(x: torch.Tensor, y: torch.Tensor | None = None, n: int = 128,
                     activation: str = "relu", k: int | None = None, steps: int = 300,
                     transcoder: bool = False, skip: bool = False) -> Dictionary:  # fmt: skip
    """A few hundred Adam steps of MSE (+ L1 for relu) from ``x`` (N, d_in) to ``y`` (x)."""
    y = x if y is None else y
    g = torch.Generator().manual_seed(0)
    dec = torch.randn(n, y.shape[1], generator=g)
    dec = (dec / dec.norm(dim=1, keepdim=True)).requires_grad_()
    enc = (torch.randn(x.shape[1], n, generator=g) / x.shape[1] ** 0.5).requires_grad_()
    b_enc, b_dec = torch.zeros(n, requires_grad=True), y.mean(0).clone().requires_grad_()
    w_skip = torch.zeros(y.shape[1], x.shape[1], requires_grad=True) if skip else None
    params = [p for p in (enc, dec, b_enc, b_dec, w_skip) if p is not None]
    opt = torch.optim.Adam(params, lr=3e-3)
    for _ in range(steps):
        d = Dictionary(enc, b_enc, dec, b_dec, activation, k=k, W_skip=w_skip,
                       apply_b_dec_to_input=not transcoder, transcoder=transcoder)  # fmt: skip
        sparsity = 1e-3 * d.encode(x).sum(-1).mean() if activation == "relu" else 0.0
        loss = (d.reconstruct(x) - y).pow(2).sum(-1).mean() + sparsity
        opt.zero_grad()
        loss.backward()
        opt.step()
    return replace(d.to(), **{f: getattr(d, f).detach().clone() for f in
                              ("W_enc", "b_enc", "W_dec", "b_dec")},
                   W_skip=None if w_skip is None else w_skip.detach().clone())  # fmt: skip


@pytest.fixture(scope="module")
def acts() -> dict[str, torch.Tensor]:
    return site_activations("resid_pre.1", "transformer.h.1.mlp:input", "transformer.h.1.mlp")


@pytest.fixture(scope="module")
def relu_sae(acts) -> Dictionary:
    return replace(train_dictionary(acts["resid_pre.1"]), hook_name="blocks.1.hook_resid_pre")


@pytest.fixture(scope="module")
def topk_sae(acts) -> Dictionary:
    trained = train_dictionary(acts["resid_pre.1"], activation="topk", k=8)
    return replace(trained, hook_name="transformer.h.0")


def dense_sparsify(coder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsify's own encoding of ``x`` as dense (N, n) activations, and its decoding."""
    out = coder.encode(x)
    dense = torch.zeros(x.shape[0], coder.num_latents).scatter_(-1, out.top_indices, out.top_acts)
    return dense, coder.decode(out.top_acts, out.top_indices)


# ----------------------------------------------------------------------------- SAELens
def test_saelens_relu_and_jumprelu_match_saelens(tmp_path, acts, relu_sae) -> None:
    sae_lens = require("sae_lens")
    x = acts["resid_pre.1"]
    threshold = relu_sae.pre_activations(x).clamp_min(0).quantile(0.7, dim=0)
    jump = replace(relu_sae, activation="jumprelu", threshold=threshold)
    for ours, arch in ((relu_sae, "standard"), (jump, "jumprelu")):
        folder = save_saelens(ours, tmp_path / arch)
        theirs = sae_lens.SAE.load_from_disk(folder)
        loaded = load_dictionary(folder)
        assert type(theirs).__name__ == {"standard": "StandardSAE", "jumprelu": "JumpReLUSAE"}[arch]
        assert loaded.hook_name == theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
        with torch.no_grad():
            a_theirs = theirs.encode(x)
            # float32: one 64-term matmul each, possibly through different BLAS kernels
            torch.testing.assert_close(loaded.encode(x), a_theirs, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(
                loaded.decode(a_theirs), theirs.decode(a_theirs), rtol=1e-5, atol=1e-5
            )  # float32: 128-term sums
        fired = (a_theirs > 0).float().mean()
        assert 0.01 < fired < 0.9  # the test data make latents fire, but sparsely


def test_saelens_topk_with_decoder_norm_rescaling_is_folded(tmp_path, acts, topk_sae) -> None:
    sae_lens = require("sae_lens")
    x = acts["resid_pre.1"]
    scaled = replace(topk_sae, W_dec=topk_sae.W_dec * torch.linspace(0.5, 2.0, 128)[:, None])
    folder = save_saelens(scaled, tmp_path / "topk")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "rescale_acts_by_decoder_norm": True}))
    theirs, loaded = sae_lens.SAE.load_from_disk(folder), load_dictionary(folder)
    assert theirs.cfg.rescale_acts_by_decoder_norm and loaded.activation == "topk"
    with torch.no_grad():
        a_theirs = theirs.encode(x)
        # float32: the decoder norms are folded into the encoder here, multiplied after it there
        torch.testing.assert_close(loaded.encode(x), a_theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            loaded.decode(a_theirs), theirs.decode(a_theirs), rtol=1e-5, atol=1e-5
        )  # float32: the same folding
    assert int((a_theirs > 0).sum(-1).max()) <= 8


def test_folders_saelens_writes_are_read(tmp_path, acts, relu_sae) -> None:
    sae_lens = require("sae_lens")
    x = acts["resid_pre.1"]
    theirs = sae_lens.SAE.load_from_disk(save_saelens(relu_sae, tmp_path / "ours"))
    theirs.save_model(tmp_path / "theirs")
    loaded = load_dictionary(tmp_path / "theirs")
    with torch.no_grad():
        # float32: one 64-term matmul each, possibly through different BLAS kernels
        torch.testing.assert_close(loaded.reconstruct(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_saelens_skip_transcoder_matches_saelens(tmp_path, acts) -> None:
    sae_lens = require("sae_lens")
    x, y = acts["resid_pre.1"], acts["transformer.h.1.mlp"]
    trained = train_dictionary(x, y, transcoder=True, skip=True, steps=200)
    ours = replace(
        trained, hook_name="blocks.1.hook_resid_pre", hook_name_out="blocks.1.hook_mlp_out"
    )
    folder = save_saelens(ours, tmp_path / "skip")
    theirs, loaded = sae_lens.SAE.load_from_disk(folder), load_dictionary(folder)
    assert type(theirs).__name__ == "SkipTranscoder" and loaded.transcoder
    assert loaded.output_site == "blocks.1.hook_mlp_out"
    with torch.no_grad():
        # float32: 64- and 128-term sums, possibly through different BLAS kernels
        torch.testing.assert_close(loaded.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-5)
        # float32: the same sums, plus the 64-term skip matmul
        torch.testing.assert_close(loaded.reconstruct(x), theirs(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- sparsify
def test_sparsify_topk_sae_matches_sparsify(tmp_path, acts, topk_sae) -> None:
    sparsify = require("sparsify")
    x = acts["resid_pre.1"]
    folder = save_sparsify(topk_sae, tmp_path / "transformer.h.0")
    theirs, loaded = sparsify.SparseCoder.load_from_disk(folder), load_dictionary(folder)
    assert loaded.apply_b_dec_to_input and loaded.hook_name is None  # no run folder: no site
    with torch.no_grad():
        dense, decoded = dense_sparsify(theirs, x)
        # float32: F.linear there, x @ W_enc here; the decoder is an embedding_bag there
        torch.testing.assert_close(loaded.encode(x), dense, rtol=1e-5, atol=1e-5)
        # float32: a 128-term matmul here, an embedding_bag sum of the k terms there
        torch.testing.assert_close(loaded.decode(dense), decoded, rtol=1e-5, atol=1e-5)
    # an SAE without the input bias is written with the bias folded into the encoder's
    unbiased = replace(topk_sae, apply_b_dec_to_input=False)
    back = load_dictionary(save_sparsify(unbiased, tmp_path / "folded"))
    # float32: b_enc absorbs b_dec @ W_enc, a 64-term sum
    torch.testing.assert_close(back.encode(x), unbiased.encode(x), rtol=1e-4, atol=1e-5)


def test_sparsify_transcoder_run_folder(tmp_path, acts) -> None:
    sparsify = require("sparsify")
    x, y = acts["transformer.h.1.mlp:input"], acts["transformer.h.1.mlp"]
    coder = train_dictionary(x, y, activation="topk", k=8, transcoder=True, skip=True, steps=200)
    run = tmp_path / "run"
    for name in ("transformer.h.1.mlp", "transformer.h.0.mlp"):
        save_sparsify(replace(coder, hook_name=None), run / name)
    (run / "config.json").write_text("{}")
    assert hookpoints(run) == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    with pytest.raises(InputError, match="several hookpoints"):
        load_dictionary(run)
    loaded = load_dictionary(run, hookpoint="transformer.h.1.mlp")
    assert loaded.transcoder and not loaded.apply_b_dec_to_input
    assert (loaded.hook_name, loaded.output_site) == ("transformer.h.1.mlp:input",
                                                      "transformer.h.1.mlp")  # fmt: skip
    theirs = sparsify.SparseCoder.load_many(str(run), local=True)["transformer.h.1.mlp"]
    assert theirs.cfg.transcode and theirs.W_skip is not None
    with torch.no_grad():
        dense, _ = dense_sparsify(theirs, x)
        # float32: F.linear there, x @ W_enc here; the decoder is an embedding_bag there
        torch.testing.assert_close(loaded.encode(x), dense, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            loaded.reconstruct(x), theirs(x).sae_out, rtol=1e-5, atol=1e-5
        )  # float32: as above, plus the skip matmul
    theirs.save_to_disk(tmp_path / "resaved")  # sparsify's own writer
    again = load_dictionary(tmp_path / "resaved")
    torch.testing.assert_close(again.W_enc, loaded.W_enc)  # same path: the same stored tensor


def test_groupmax_matches_sparsify(tmp_path, acts, topk_sae) -> None:
    sparsify = require("sparsify")
    x = acts["resid_pre.1"]
    grouped = replace(topk_sae, activation="groupmax", k=16)
    theirs = sparsify.SparseCoder.load_from_disk(save_sparsify(grouped, tmp_path / "g"))
    with torch.no_grad():
        dense, _ = dense_sparsify(theirs, x)
    # float32: F.linear there, x @ W_enc here
    torch.testing.assert_close(grouped.encode(x), dense, rtol=1e-5, atol=1e-5)
    assert int((dense > 0).sum(-1).max()) <= 16


# ----------------------------------------------------------------------------- refusals
def test_folders_that_are_not_dictionaries_are_refused(tmp_path, relu_sae) -> None:
    with pytest.raises(InputError, match="no dictionary folder"):
        load_dictionary(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        InputError,
        match=r"expected cfg\.json with sae_weights\.safetensors "
        r"\(SAELens\) or with sae\.safetensors \(sparsify\)",
    ):
        load_dictionary(tmp_path / "empty")
    folder = save_saelens(relu_sae, tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    for change, said in (
        ({"normalize_activations": "layer_norm"}, "normalize_activations"),
        ({"architecture": "gated"}, "architecture 'gated' is not supported"),
        ({"d_sae": 7}, "d_sae=7 but W_enc is"),
        ({"metadata": {"hook_head_index": 3}}, "one attention head"),
    ):
        (folder / "cfg.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(InputError, match=said):
            load_dictionary(folder)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read the dictionary"):
        load_dictionary(folder)
    with pytest.raises(InputError, match="SAELens has no architecture with the groupmax"):
        save_saelens(replace(relu_sae, activation="groupmax", k=8), tmp_path / "x")
    with pytest.raises(InputError, match="sparsify stores topk or groupmax"):
        save_sparsify(relu_sae, tmp_path / "y")
    with pytest.raises(InputError, match="d_in=64 must equal d_out=3"):
        Dictionary(relu_sae.W_enc, relu_sae.b_enc, relu_sae.W_dec[:, :3], relu_sae.b_dec[:3])


def test_reading_imports_neither_library(tmp_path, relu_sae, topk_sae) -> None:
    save_saelens(relu_sae, tmp_path / "a")
    save_sparsify(topk_sae, tmp_path / "b")
    code = (
        "import sys; from tyche.dictionaries import load_dictionary as load; "
        f"load({str(tmp_path / 'a')!r}); load({str(tmp_path / 'b')!r}); "
        "bad = [m for m in ('sae_lens', 'sparsify', 'transformer_lens') if m in sys.modules]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------- codebooks
def layer_normed(rows: torch.Tensor) -> torch.Tensor:
    """The rows as a layer norm (no affine, no eps) sees them: centred, scaled to √dim."""
    return torch.nn.functional.layer_norm(rows, rows.shape[-1:], eps=0.0)


def test_codebook_codes_are_the_chosen_decoder_rows(relu_sae) -> None:
    from tyche.codebook import attach
    from tyche.codebook.dictionary_init import energy_scores, init_from_dictionary

    d = replace(relu_sae, hook_name="blocks.1.hook_mlp_out")  # an HF model's mlp_out.1
    model = attach(build_gpt2(), ["mlp_out.1", "mlp_out.0"], num_codes=16, seed=0)
    ids = init_from_dictionary(model, d)
    layer = model.codebook("mlp_out.1")
    top = d.W_dec.norm(dim=-1).argsort(descending=True)[:16]
    assert ids.tolist() == [top.tolist()]
    # float32: a mean, a norm and a division of 64 features on each side
    torch.testing.assert_close(layer.codebook[0], layer_normed(d.W_dec[top]), rtol=1e-5, atol=1e-6)
    # an activation along a chosen row snaps to that row's code (Cauchy-Schwarz)
    assert layer.codes(d.W_dec[top] + 0.3).flatten().tolist() == list(range(16))
    assert not torch.equal(model.codebook("mlp_out.0").codebook[0, 0], layer.codebook[0, 0])

    energies = torch.linspace(1.0, 0.1, 10, dtype=torch.float64)
    scores = energy_scores(torch.arange(40, 50), energies, d.n_latents)
    by_energy = init_from_dictionary(model, d, scores=scores)
    never_fired = [i for i in top.tolist() if i not in range(40, 50)][:6]
    assert by_energy.tolist() == [list(range(40, 50)) + never_fired]  # then by norm


def test_per_head_codebooks_take_each_head_slice(relu_sae) -> None:
    from tyche.codebook import attach
    from tyche.codebook.dictionary_init import init_from_dictionary

    model = attach(build_gpt2(), "attn_heads.1", num_codes=8, seed=0)
    d = replace(relu_sae, hook_name="attn_heads.1")
    ids = init_from_dictionary(model, d)
    heads = d.W_dec.reshape(-1, 4, 16)
    for g in range(4):
        top = heads[:, g].norm(dim=-1).argsort(descending=True)[:8]
        assert ids[g].tolist() == top.tolist()
        torch.testing.assert_close(
            model.codebook("attn_heads.1").codebook[g],
            layer_normed(heads[top, g]),
            rtol=1e-5,
            atol=1e-6,
        )  # float32: a mean, a norm, a division
    with pytest.raises(InputError, match="writes mlp_out.0 .*where there is no codebook"):
        init_from_dictionary(model, replace(d, hook_name="mlp_out.0"))
    too_few = replace(d, W_enc=d.W_enc[:, :4], b_enc=d.b_enc[:4], W_dec=d.W_dec[:4])
    with pytest.raises(InputError, match="4 latents, fewer than num_codes=8"):
        init_from_dictionary(model, too_few)


def test_codebook_train_starts_from_the_dictionary(tmp_path, capsys, relu_sae, lm_folder,
                                                   text_file) -> None:  # fmt: skip
    from conftest import cli, one_line_error
    from tyche.causal.features import LatentEnergies
    from tyche.codebook import CodebookModel

    folder = save_saelens(replace(relu_sae, hook_name="blocks.1.hook_mlp_out"), tmp_path / "sae")
    LatentEnergies(
        latents=torch.tensor([7, 3, 5]),
        energies=torch.tensor([3.0, 2.0, 1.0]),
        fires=torch.ones(3, dtype=torch.long),
        firing_energies=torch.ones(3),
        n_positions=4,
        n_latents=128,
        dictionary={"hook_name": "blocks.1.hook_mlp_out"},
    ).save(tmp_path / "energies")
    common = ["codebook", "train", "--model", str(lm_folder), "--data", str(text_file),
              "--seq_len", "16", "--sites", "mlp_out.1", "--num_codes", "4", "--steps", "1",
              "--snap_after", "1", "--batch_size", "2", "--eval_sequences", "2"]  # fmt: skip
    # codes are left alone while --snap_after keeps the codebook passing its inputs through
    run = cli(capsys, *common, "--init_dictionary", str(folder), "--init_dictionary_energies",
              str(tmp_path / "energies"), "--out", str(tmp_path / "out"))  # fmt: skip
    assert run.code == 0, run.err
    assert "codes initialised from 4 decoder rows" in run.out and "causal energy" in run.out
    codes = CodebookModel.from_pretrained(tmp_path / "out").codebook("mlp_out.1").codebook[0]
    rest = [i for i in relu_sae.W_dec.norm(dim=-1).argsort(descending=True).tolist()
            if i not in (7, 3, 5)][:1]  # fmt: skip
    # float32: a mean, a norm and a division of 64 features on each side
    torch.testing.assert_close(codes, layer_normed(relu_sae.W_dec[[7, 3, 5, *rest]]),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    (tmp_path / "empty").mkdir()
    for extra, said in (
        (["--init_dictionary", str(tmp_path / "empty")], r"--init_dictionary: .*empty is not a "
                                                          r"dictionary folder"),
        (["--init_dictionary", str(folder), "--kmeans_init"],
         r"--init_dictionary and --kmeans_init both set the codes"),
        (["--init_dictionary", str(folder), "--init_dictionary_energies", str(tmp_path)],
         r"--init_dictionary_energies: .*features/ folder"),
    ):  # fmt: skip
        run = cli(capsys, *common, *extra, "--out", str(tmp_path / "refused"))
        one_line_error(run, "codebook", said)
