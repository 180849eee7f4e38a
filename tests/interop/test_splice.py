"""Spliced faithfulness (tyche.splice, ``tyche splice``): oracles, invariances and the flags.

Oracles: an identity bottleneck loses nothing (KL 0, CE recovered 1); a bottleneck that is
the ablation recovers nothing (0); KL, CE and accuracy equal a direct computation with
``replace_activations`` and ``log_softmax``; a full-rank projection is the identity; the LIB
dual projection reproduces ``h`` in the full basis and keeps the first k LIB features. The
command line is run in-process on a tiny model folder, each flag checked for what it changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from figure_checks import capture_figures, tick_labels
from interop_support import require, wrap_nnsight

import tyche.plotting
from conftest import build_gpt2, build_neox, cli, one_line_error, run_torchrun
from tyche.cli.splice import merge_repeated, plot_kl
from tyche.hooks import read_activations, replace_activations
from tyche.splice import (
    Bottleneck,
    FromSite,
    SpliceOptions,
    SpliceResult,
    pca_directions,
    projection,
    site_moments,
    splice_faithfulness,
)

SITE = "resid_pre.1"


@pytest.fixture(scope="module")
def gpt2() -> torch.nn.Module:
    return build_gpt2().eval()


@pytest.fixture(scope="module")
def tokens() -> dict[str, torch.Tensor]:
    """input_ids (6, 12), row 1's last 3 positions masked (padding)."""
    ids = torch.randint(3, 512, (6, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def run(model, tokens, *bottlenecks, **options) -> SpliceResult:
    return splice_faithfulness(model, tokens, list(bottlenecks), SpliceOptions(**options),
                               progress=False)  # fmt: skip


# ----------------------------------------------------------------------------- oracles
def test_an_identity_bottleneck_loses_nothing(gpt2, tokens) -> None:
    ident = Bottleneck("id", {SITE: lambda h: h, "mlp_out.0": lambda h: h.clone()})
    result = run(gpt2, tokens, ident, batch_size=4)
    assert result.sites == [["mlp_out.0", SITE], ["mlp_out.0"], [SITE]]  # all, then each
    # the spliced logits are the clean ones bit for bit, and both sides are log-softmaxed alike
    assert result.kl.tolist() == [0.0, 0.0, 0.0]
    assert result.ce.tolist() == [result.ce_clean] * 3
    assert result.ce_recovered.tolist() == [1.0, 1.0, 1.0]
    assert result.accuracy.tolist() == [result.accuracy_clean] * 3


def test_the_ablation_itself_recovers_nothing(gpt2, tokens) -> None:
    mean = site_moments(gpt2, tokens, [SITE])[SITE].mean
    k0 = Bottleneck("k0", {SITE: projection(mean, torch.zeros(64, 0))}, "pca", 0)
    zero = Bottleneck("zero", {SITE: torch.zeros_like})
    as_mean = run(gpt2, tokens, k0, zero)
    assert as_mean.ce_recovered[0].item() == 0.0  # k = 0 keeps the mean: mean ablation
    assert as_mean.ce[0].item() == as_mean.ce_ablated[0].item()
    assert as_mean.kl[0].item() > 0
    as_zero = run(gpt2, tokens, k0, zero, ablation="zero")
    assert as_zero.ce_recovered[1].item() == 0.0  # returning zeros is zero ablation
    assert as_zero.ce_ablated[0].item() != as_mean.ce_ablated[0].item()


def by_hand(model, tokens, mapping) -> tuple[float, float, float]:
    """KL (nats/token over unmasked positions), next-token CE and accuracy, in float64."""
    ids, mask = tokens["input_ids"], tokens["attention_mask"].bool()
    with torch.no_grad():
        clean = model(**tokens).logits.double().log_softmax(-1)
        with replace_activations(model, mapping):
            spliced = model(**tokens).logits.double().log_softmax(-1)
    kl = (clean.exp() * (clean - spliced)).sum(-1)[mask].mean()
    keep = mask[:, :-1] & mask[:, 1:]
    picked = spliced[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    right = spliced[:, :-1].argmax(-1) == ids[:, 1:]
    return float(kl), float(-picked[keep].mean()), float(right[keep].double().mean())


def test_kl_ce_and_accuracy_equal_a_direct_computation(gpt2, tokens) -> None:
    fn = lambda h: 0.7 * h + 0.1  # noqa: E731
    result = run(gpt2, tokens, Bottleneck("affine", {SITE: fn}), batch_size=4)
    kl, ce, acc = by_hand(gpt2, tokens, {SITE: fn})
    with read_activations(gpt2, [SITE]) as acts, torch.no_grad():
        gpt2(**tokens)
    mean = acts[SITE][tokens["attention_mask"].bool()].double().mean(0)
    _, ce_ablated, _ = by_hand(gpt2, tokens, {SITE: mean})
    _, ce_clean, acc_clean = by_hand(gpt2, tokens, {SITE: lambda h: h})
    # float32 logits of batches of 4 rows against 6, log-softmax in float32 against float64
    assert result.kl[0].item() == pytest.approx(kl, rel=1e-4, abs=1e-7)
    # the same: CE of a few nats to ~1e-6 relative
    assert result.ce[0].item() == pytest.approx(ce, rel=1e-5)
    assert result.ce_ablated[0].item() == pytest.approx(ce_ablated, rel=1e-5)  # same reason
    assert result.ce_clean == pytest.approx(ce_clean, rel=1e-5)  # same reason
    n = result.n_ce_positions
    assert n == 5 * 11 + 8 and result.n_kl_positions == 6 * 12 - 3
    # accuracy: at most one near-tied argmax may flip under the rounding above
    assert result.accuracy[0].item() == pytest.approx(acc, abs=1.01 / n)
    assert result.accuracy_clean == pytest.approx(acc_clean, abs=1.01 / n)  # same reason
    expected = (ce_ablated - ce) / (ce_ablated - ce_clean)
    # a ratio of CE differences of ~1e-2 nats, each side rounded as above (~1e-5 · 6 nats)
    assert result.ce_recovered[0].item() == pytest.approx(expected, abs=2e-2)


def test_site_moments_equal_a_direct_computation(gpt2, tokens) -> None:
    moments = site_moments(gpt2, tokens, [SITE, "attn_heads.0"], covariance=[SITE],
                           batch_size=4)  # fmt: skip
    with read_activations(gpt2, [SITE, "attn_heads.0"]) as acts, torch.no_grad():
        gpt2(**tokens)
    keep = tokens["attention_mask"].bool()
    h = acts[SITE][keep].double()
    assert moments[SITE].count == int(keep.sum())
    # float32 activations of batches of 4 rows against 6, sums in float64
    torch.testing.assert_close(moments[SITE].mean, h.mean(0), rtol=1e-5, atol=1e-6)
    cov = torch.cov(h.T, correction=0)
    torch.testing.assert_close(moments[SITE].covariance, cov, rtol=1e-5, atol=1e-6)  # same
    heads = moments["attn_heads.0"]
    assert heads.mean.shape == (4, 16) and heads.covariance is None
    # the same reason as above
    torch.testing.assert_close(heads.mean, acts["attn_heads.0"][keep].double().mean(0),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_a_full_rank_projection_is_the_identity(gpt2, tokens) -> None:
    g = torch.Generator().manual_seed(1)
    mean, h = torch.randn(64, generator=g), torch.randn(5, 7, 64, generator=g).double()
    Q = torch.linalg.qr(torch.randn(64, 64, generator=g).double()).Q
    # float64 products of an orthonormal basis: ~1e-15 relative per entry
    torch.testing.assert_close(projection(mean, Q)(h), h, rtol=0, atol=1e-12)
    moments = site_moments(gpt2, tokens, [SITE], covariance=[SITE])
    V = pca_directions(moments[SITE])
    full = Bottleneck("pca k=64", {SITE: projection(moments[SITE].mean, V)}, "pca", 64)
    result = run(gpt2, tokens, full)
    # h through float64 with an orthonormal V: float32 rounding of h at most
    assert result.kl[0].item() == pytest.approx(0.0, abs=1e-9)
    assert result.ce_recovered[0].item() == pytest.approx(1.0, abs=1e-6)  # same reason


def test_a_projection_keeps_the_mean_and_is_idempotent() -> None:
    g = torch.Generator().manual_seed(2)
    mean, h = torch.randn(3, 4, generator=g).double(), torch.randn(6, 3, 4, generator=g).double()
    V = torch.linalg.qr(torch.randn(12, 5, generator=g).double()).Q
    P = projection(mean, V)
    out = P(h)
    assert out.shape == h.shape
    # float64 products of (12 x 5) orthonormal columns: ~1e-15 relative
    torch.testing.assert_close(P(out), out, rtol=0, atol=1e-12)
    torch.testing.assert_close(P(mean[None]), mean[None], rtol=0, atol=1e-12)  # same reason
    assert torch.equal(projection(mean, V[:, :0])(h), mean.expand_as(h))


def lib_basis_of(x: torch.Tensor, seed: int = 0):
    """A centred LIB basis (jacobian formula) of the rows ``x`` (n, d), with a random PSD M."""
    from tyche.interaction.basis import lib_basis, pca

    mean, cov = x.double().mean(0), torch.cov(x.double().T, correction=0)
    p = pca(mean, cov, center=True, threshold=1e-12)
    a = torch.randn(p.D.shape[0], p.D.shape[0], generator=torch.Generator().manual_seed(seed))
    return lib_basis(SITE, p, (a @ a.T).double(), None, "jacobian", 1e-12)


def test_the_lib_dual_projection_reproduces_h_and_keeps_the_first_features() -> None:
    from tyche.cli.splice_bottlenecks import lib_directions
    from tyche.interaction.fold import append_constant

    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(3)).double() * 2 + 1
    basis = lib_basis_of(x)
    V, D = lib_directions(basis)
    assert V.shape == (6, 6) and D.shape == (6, 6)
    eye = torch.eye(6, dtype=torch.float64)
    # float64 eigendecompositions of a well-conditioned 6 x 6 problem: ~1e-13
    torch.testing.assert_close(D @ V, eye, rtol=0, atol=1e-10)
    assert (V.T @ V - eye).abs().max() > 0.1  # the LIB directions are not orthonormal
    h = torch.randn(40, 6, generator=torch.Generator().manual_seed(4)).double()
    torch.testing.assert_close(projection(basis.mean, V, D)(h), h, rtol=0, atol=1e-10)  # same
    features = lambda f: (append_constant(f) @ basis.C)[:, 1:]  # noqa: E731
    out = projection(basis.mean, V[:, :2], D[:2])(h)
    # the same reason: the first two LIB features of h are kept, the others set to 0 (their
    # value at the mean)
    torch.testing.assert_close(features(out)[:, :2], features(h)[:, :2], rtol=0, atol=1e-10)
    zeros = torch.zeros(40, 4, dtype=torch.float64)
    torch.testing.assert_close(features(out)[:, 2:], zeros, rtol=0, atol=1e-10)  # same reason


def test_an_uncentred_lib_basis_is_refused() -> None:
    from dataclasses import replace

    from tyche.cli.commandline import CommandError
    from tyche.cli.splice_bottlenecks import lib_directions

    basis = replace(lib_basis_of(torch.randn(50, 4, generator=torch.Generator())), center=False)
    with pytest.raises(CommandError, match="not centred"):
        lib_directions(basis, SITE)


def test_a_transcoder_writes_its_output_from_its_input(gpt2, tokens) -> None:
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(5)) * 0.05
    fn = lambda x: x @ weight  # noqa: E731
    result = run(gpt2, tokens, Bottleneck("tc", {"mlp_out.0": FromSite("transformer.h.0.mlp:input",
                                                                       fn)}))  # fmt: skip
    with read_activations(gpt2, ["transformer.h.0.mlp:input"]) as acts:
        kl, _, _ = by_hand(gpt2, tokens, {"mlp_out.0": lambda h: fn(acts[
            "transformer.h.0.mlp:input"])})  # fmt: skip
    # float32 log-softmax against float64 (one batch of 6 rows on both sides)
    assert result.kl[0].item() == pytest.approx(kl, rel=1e-4, abs=1e-7)


# ----------------------------------------------------------------------------- frameworks
def test_a_transformer_lens_model_and_an_nnsight_wrapper(gpt2, tokens, hooked) -> None:
    cut = Bottleneck("cut", {"blocks.0.hook_mlp_out": torch.zeros_like})
    same = Bottleneck("cut", {"mlp_out.0": torch.zeros_like})
    by_name, by_alias = run(hooked, tokens, cut, ablation="zero"), run(hooked, tokens, same,
                                                                       ablation="zero")  # fmt: skip
    assert by_name.sites == [["blocks.0.hook_mlp_out"]]  # the alias names this hook point
    assert by_name.kl[0].item() > 0 and by_name.ce_recovered[0].item() == 0.0
    assert torch.equal(by_name.kl, by_alias.kl)  # one hook point, one code path
    require("nnsight")
    wrapped = run(wrap_nnsight(gpt2), tokens, same)
    plain = run(gpt2, tokens, same)
    assert torch.equal(wrapped.kl, plain.kl) and torch.equal(wrapped.ce, plain.ce)  # one module
    assert wrapped.model_hash == plain.model_hash


# ----------------------------------------------------------------------------- the command
ROWS = ["--n_sequences", "8", "--seq_len", "16"]


def args(lm_folder: Path, text_file: Path, out: Path, *more: str) -> list[str]:
    return ["splice", "--model", str(lm_folder), "--data", str(text_file), *ROWS, "--out",
            str(out), *more]  # fmt: skip


@pytest.fixture(scope="module")
def lm(lm_folder, text_file) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model and rows the command reads with the flags of :func:`args`."""
    from tyche.cli.inputs import ModelSource, TextRows

    zoo = ModelSource(model=str(lm_folder)).load(16)
    rows = TextRows(data=str(text_file), n_sequences=8, seq_len=16).load(zoo.tokenizer)
    return zoo.model, rows.tokens


def random_dictionary(d_in: int = 64, d_out: int = 64, seed: int = 0, **kwargs):
    from tyche.dictionaries import Dictionary

    g = torch.Generator().manual_seed(seed)
    return Dictionary(torch.randn(d_in, 96, generator=g) * 0.2, torch.zeros(96) - 0.1,
                      torch.randn(96, d_out, generator=g) * 0.2, torch.zeros(d_out),
                      **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory, lm) -> dict[str, Path]:
    """Bottleneck folders on the tiny model: codebooks, SAEs, a transcoder, causal and LIB
    bases, and some that must be refused."""
    from conftest import make_tiny_tokenizer
    from tyche.causal.result import CausalBasis
    from tyche.codebook.model import attach
    from tyche.dictionaries import save_saelens
    from tyche.interaction.basis import unrotated_basis
    from tyche.interaction.result import InteractionGraph
    from tyche.io import model_hash

    model, tokens = lm
    root = tmp_path_factory.mktemp("bottlenecks")
    out = {name: root / name for name in ("cb", "sae", "bare", "tc", "narrow", "causal",
                                          "alien", "lib", "empty")}  # fmt: skip
    out["empty"].mkdir()
    codebooks = attach(build_neox(), SITE, num_codes=16, seed=0)
    codebooks.save_pretrained(out["cb"], make_tiny_tokenizer())
    save_saelens(random_dictionary(hook_name="blocks.1.hook_resid_pre"), out["sae"])
    save_saelens(random_dictionary(seed=1), out["bare"])
    save_saelens(random_dictionary(seed=2, transcoder=True, hook_name="gpt_neox.layers.0.mlp:input",
                                   hook_name_out="mlp_out.0"), out["tc"])  # fmt: skip
    save_saelens(random_dictionary(32, 32, hook_name=SITE), out["narrow"])
    Q = torch.linalg.qr(torch.randn(64, 8, generator=torch.Generator().manual_seed(6))).Q
    basis = dict(vectors=Q, energies=torch.zeros(8), subspace_energies=torch.zeros(8), site=SITE)
    CausalBasis(**basis, model_hash=model_hash(model)).save(out["causal"] / SITE)
    CausalBasis(**basis, model_hash="0" * 16).save(out["alien"] / SITE)
    with read_activations(model, [SITE]) as acts, torch.no_grad():
        model(**tokens)
    lib = lib_basis_of(acts[SITE].flatten(0, 1))
    InteractionGraph([SITE, "output"], [lib, unrotated_basis("output", 64, None)],
                     model_hash=model_hash(model)).save(out["lib"] / "graph")  # fmt: skip
    return out


def saved(out: Path) -> SpliceResult:
    return SpliceResult.load(out / "result")


def library(lm, *bottlenecks, covariance=(), **options) -> SpliceResult:
    """What the command computes, called as it calls it: the sites' moments in one pass, then
    every bottleneck."""
    model, tokens = lm
    sites = list(dict.fromkeys(s for b in bottlenecks for s in b.replacements))
    moments = site_moments(model, tokens, sites, covariance=covariance)
    return splice_faithfulness(model, tokens, list(bottlenecks), SpliceOptions(**options),
                               moments=moments, progress=False)  # fmt: skip


def test_pca_projections_through_the_command(tmp_path, capsys, lm_folder, text_file, lm) -> None:
    from tyche.data import token_ids_sha256
    from tyche.io import model_hash

    out = tmp_path / "pca"
    run_ = cli(capsys, *args(lm_folder, text_file, out, "--basis", "pca", "--sites", SITE, "--k",
                             "0,2,64"))  # fmt: skip
    assert run_.code == 0, run_.err
    result = saved(out)
    assert result.names == ["pca k=0", "pca k=2", "pca k=64"] and result.ks == [0, 2, 64]
    assert result.index("pca k=2") == 1 and len(result) == 3
    model, tokens = lm
    moments = site_moments(model, tokens, [SITE], covariance=[SITE])
    V = pca_directions(moments[SITE])
    mine = library(lm, *(Bottleneck(f"pca k={k}", {SITE: projection(moments[SITE].mean, V[:, :k])},
                                    "pca", k) for k in (0, 2, 64)), covariance=[SITE])  # fmt: skip
    assert torch.equal(result.kl, mine.kl) and torch.equal(result.ce, mine.ce)  # same path
    assert result.ce_recovered[0].item() == 0.0  # k = 0: the mean ablation
    assert result.kl[2].item() == pytest.approx(0.0, abs=1e-9)  # full rank: float32 rounding
    assert "pca k=2" in run_.out and "CE recov" in run_.out
    assert (out / "kl.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input_ids_sha256"] == token_ids_sha256(tokens["input_ids"])
    assert summary["model_hash"] == model_hash(model) == result.model_hash
    assert [r["bottleneck"] for r in summary["rows"]] == result.names


def test_codebooks_and_dictionaries_through_the_command(tmp_path, capsys, lm_folder, text_file,
                                                        lm, folders) -> None:  # fmt: skip
    from tyche.codebook.model import CodebookModel
    from tyche.dictionaries import load_dictionary

    out = tmp_path / "all"
    flags = ["--codebooks", str(folders["cb"]), "--sae", str(folders["sae"]), "--sae",
             str(folders["tc"])]  # fmt: skip
    run_ = cli(capsys, *args(lm_folder, text_file, out, *flags))
    assert run_.code == 0, run_.err
    assert "note:" not in run_.out  # the codebooks' base is --model
    result = saved(out)
    assert result.names == ["codebooks", "sae sae", "sae tc"]
    assert result.sites == [[SITE], [SITE], ["mlp_out.0"]]
    layers = CodebookModel.from_pretrained(folders["cb"]).eval().layers()
    sae, tc = load_dictionary(folders["sae"]), load_dictionary(folders["tc"])
    mine = library(
        lm,
        Bottleneck("codebooks", {SITE: layers[SITE]}),
        Bottleneck("sae sae", {SITE: sae.reconstruct}),
        Bottleneck("sae tc", {"mlp_out.0": FromSite(tc.hook_name, tc.reconstruct)}),
    )
    assert torch.equal(result.kl, mine.kl)  # same path: the same layers on the same rows
    assert torch.equal(result.ce_recovered.nan_to_num(), mine.ce_recovered.nan_to_num())  # same
    joined = tmp_path / "joined"
    assert cli(capsys, *args(lm_folder, text_file, joined, "--sae",
                             f"{folders['sae']},{folders['tc']}")).code == 0  # fmt: skip
    assert torch.equal(saved(joined).kl, result.kl[1:])  # same path: a comma list = a repeat
    moved = tmp_path / "moved"
    assert cli(capsys, *args(lm_folder, text_file, moved, "--sae", f"{folders['bare']},"
                             f"{folders['tc']}", "--sites", "resid_pre.0")).code == 0  # fmt: skip
    assert saved(moved).sites == [["resid_pre.0"], ["mlp_out.0"]]  # a transcoder keeps its own


def test_causal_and_lib_bases_through_the_command(tmp_path, capsys, monkeypatch, lm_folder,
                                                  text_file, lm, folders) -> None:  # fmt: skip
    from tyche.causal.result import CausalBasis
    from tyche.cli.splice_bottlenecks import lib_directions
    from tyche.interaction.result import InteractionGraph

    out = tmp_path / "bases"
    run_ = cli(capsys, *args(lm_folder, text_file, out, "--basis", f"causal:{folders['causal']}",
                             "--basis", f"lib:{folders['lib']},pca", "--k", "1,4"))  # fmt: skip
    assert run_.code == 0, run_.err
    result = saved(out)
    assert result.families == ["causal"] * 2 + ["lib"] * 2 + ["pca"] * 2
    model, tokens = lm
    mean = site_moments(model, tokens, [SITE])[SITE].mean
    Q = CausalBasis.load(folders["causal"] / SITE).vectors.double()
    V, D = lib_directions(InteractionGraph.load(folders["lib"] / "graph").bases[0])
    mine = library(lm, *(Bottleneck(f"causal k={k}", {SITE: projection(mean, Q[:, :k])}) for k in
                         (1, 4)), *(Bottleneck(f"lib k={k}", {SITE: projection(mean, V[:, :k],
                                                                               D[:k])})
                                    for k in (1, 4)))  # fmt: skip
    assert torch.equal(result.kl[:4], mine.kl)  # same path: the same projections of the same h
    assert (out / "kl.png").is_file()
    figures = capture_figures(monkeypatch, tyche.plotting)
    plot_kl(result, tmp_path / "kl.png")
    ax = figures[0].axes[0]
    lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert lines == {f: result.kl[2 * i : 2 * i + 2].tolist() for i, f in
                     enumerate(["causal", "lib", "pca"])}  # fmt: skip
    assert tick_labels(ax.xaxis) == ["1", "4"] and ax.get_yscale() == "log"
    capped = tmp_path / "capped"
    assert cli(capsys, *args(lm_folder, text_file, capped, "--basis",
                             f"causal:{folders['causal']},pca")).code == 0  # fmt: skip
    # without --k, the default ranks up to each basis's directions: 8 causal, 64 PCA
    assert saved(capped).ks == [1, 2, 4, 8] + [1, 2, 4, 8, 16, 32]


def test_every_flag_changes_what_it_should(tmp_path, capsys, lm_folder, text_file) -> None:
    base = ["--basis", "pca", "--sites", "resid_pre.0,resid_pre.1", "--k", "0,4"]

    def splice(name: str, *more: str) -> tuple[SpliceResult, dict]:
        flags = dict(zip(base[::2], base[1::2]))
        flags.update(dict(zip(more[::2], more[1::2])))
        line = [x for item in flags.items() for x in item if x != ""]
        run_ = cli(capsys, *args(lm_folder, text_file, tmp_path / name, *line))
        assert run_.code == 0, run_.err
        return saved(tmp_path / name), json.loads((tmp_path / name / "summary.json").read_text())

    ref, ref_summary = splice("ref")
    assert len(ref) == 6 and ref.sites[:3] == [["resid_pre.0", SITE], ["resid_pre.0"], [SITE]]
    zero, _ = splice("zero", "--ablation", "zero")
    assert zero.ablation == "zero" and not torch.equal(zero.ce_ablated, ref.ce_ablated)
    assert torch.equal(zero.kl, ref.kl)  # same path: the ablation is only CE recovered's baseline
    alone, _ = splice("alone", "--no-each_site", "")
    assert alone.sites == [["resid_pre.0", SITE]] * 2
    batched, _ = splice("batched", "--batch_size", "3")
    # float32 logits of batches of 3 rows against 8: rounding only
    torch.testing.assert_close(batched.kl, ref.kl, rtol=1e-4, atol=1e-7)
    seeded, seeded_summary = splice("seeded", "--seed", "1")
    assert seeded_summary["input_ids_sha256"] != ref_summary["input_ids_sha256"]
    fewer, _ = splice("fewer", "--n_sequences", "4")
    shorter, _ = splice("shorter", "--seq_len", "8")
    assert (ref.n_kl_positions, fewer.n_kl_positions, shorter.n_kl_positions) == (128, 64, 64)
    one, _ = splice("one", "--sites", "resid_pre.0", "--k", "1")
    assert one.sites == [["resid_pre.0"]] and one.names == ["pca k=1"]
    text = tmp_path / "other.txt"
    text.write_text("the king and the queen speak of love and death. " * 40)
    other, other_summary = splice("other", "--data", str(text))
    assert other_summary["data"] == str(text) and other_summary["input_ids_sha256"] != \
        ref_summary["input_ids_sha256"]  # fmt: skip
    bare, _ = splice("bare", "--no-plot", "")
    assert (tmp_path / "ref" / "kl.png").is_file() and not (tmp_path / "bare" / "kl.png").exists()
    refused = cli(capsys, *args(lm_folder, text_file, tmp_path / "ref", *base[:4], "--k", "4"))
    one_line_error(refused, "splice", r"--k")  # another run's folder
    assert cli(capsys, *args(lm_folder, text_file, tmp_path / "ref", *base[:4], "--k", "4",
                             "--overwrite")).code == 0  # fmt: skip
    assert saved(tmp_path / "ref").names == ["pca k=4"] * 3  # both sites, then each alone


BAD = [
    ([], r"give a bottleneck to splice"),
    (["--codebooks", "{empty}"], r"--codebooks: no codebook model in"),
    (["--sae", "/no/such/sae"], r"--sae: no folder '/no/such/sae'"),
    (["--sae", "{empty}"], r"--sae .*empty: .* is not a dictionary folder"),
    (["--sae", "{bare}"], r"does not say which site it was trained on; give --sites"),
    (["--sae", "{sae},{tc},{bare}", "--sites", "a,b,c"], r"--sites lists 3 sites for 2 --sae"),
    (["--sae", "{narrow}"], r"--sae .*narrow maps width 32 to 32, but resid_pre.1 has width 64"),
    (["--sae", "{sae}", "--k", "1"], r"--k sets the ranks of --basis projections"),
    (["--basis", "pca", "--sites", SITE, "--k", "1,x"], r"--k: 'x' is not a whole number"),
    (["--basis", "pca", "--sites", SITE, "--k", "2,2"], r"--k lists 2 twice"),
    (["--basis", "pca", "--sites", SITE, "--k", "65"], r"--k 65 is more than the 64 directions"),
    (["--basis", "pca"], r"--basis pca needs a site: give --sites"),
    (["--basis", "nope"], r"--basis: 'nope' is not causal:RUN_DIR, lib:RUN_DIR or pca"),
    (["--basis", "pca,pca", "--sites", SITE], r"--basis lists one basis twice"),
    (["--basis", "causal:/no/such"], r"--basis causal:/no/such: no such folder"),
    (["--basis", "causal:{empty}"], r"no causal basis in it"),
    (["--basis", "lib:{empty}"], r"no interaction basis in it"),
    (["--basis", "causal:{causal}", "--k", "16"], r"--k 16 is more than the 8 directions of the "
                                                  r"causal basis at resid_pre.1"),
    (["--basis", "causal:{alien}", "--k", "1"], r"was made on another model than --model"),
    (["--basis", "causal:{causal}", "--sites", "resid_pre.0"], r"none of them in --sites"),
    (["--basis", "pca", "--sites", "resid_pre.9"], r"--sites: .*resid_pre.9"),
    (["--sae", "{sae}", "--batch_size", "0"], r"--batch_size must be at least 1, got 0"),
]  # fmt: skip


@pytest.mark.parametrize(("flags", "pattern"), BAD, ids=lambda x: " ".join(x)[:40])
def test_bad_flags_are_one_line_errors(flags, pattern, tmp_path, capsys, lm_folder, text_file,
                                       folders) -> None:  # fmt: skip
    flags = [f.format(**{k: str(v) for k, v in folders.items()}) for f in flags]
    run_ = cli(capsys, *args(lm_folder, text_file, tmp_path / "out", *flags))
    one_line_error(run_, "splice", pattern)
    assert not (tmp_path / "out" / "result").exists()


def test_repeated_flags_are_joined() -> None:
    assert merge_repeated(
        ["--sae", "a", "--k", "1", "--sae=b", "--basis", "pca", "--basis", "lib:x"]
    ) == ["--sae", "a,b", "--k", "1", "--basis", "pca,lib:x"]


@pytest.mark.distributed
def test_two_ranks_give_the_numbers_of_one_process(tmp_path, capsys, lm_folder, text_file) -> None:
    flags = [
        "--basis",
        "pca",
        "--sites",
        "resid_pre.0,resid_pre.1",
        "--k",
        "0,4,64",
        "--n_sequences",
        "7",
        "--batch_size",
        "2",
    ]  # 4 and 3 rows: an uneven split
    two = args(lm_folder, text_file, tmp_path / "two", *flags)
    proc = run_torchrun("-m", "tyche", *two, timeout=300)
    assert proc.stdout.count("spliced faithfulness on") == 1
    assert cli(capsys, *args(lm_folder, text_file, tmp_path / "one", *flags)).code == 0
    a, b = saved(tmp_path / "two"), saved(tmp_path / "one")
    assert a.names == b.names and a.n_kl_positions == b.n_kl_positions == 7 * 16
    # the same batches of 2 rows on both sides; only the order of the float64 sums differs
    torch.testing.assert_close(a.kl, b.kl, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a.ce, b.ce, rtol=1e-9, atol=1e-12)  # same reason
    torch.testing.assert_close(a.ce_ablated, b.ce_ablated, rtol=1e-9, atol=1e-12)  # same reason
    assert torch.equal(a.accuracy, b.accuracy)  # counts of whole positions
