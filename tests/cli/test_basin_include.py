"""``tyche basin --include``: one basin per model component, through the command line.

The language-model case is a tiny GPT-NeoX in which one component is made fragile by
construction (:func:`_fragile_neox`); the digits MLP (fixed inputs, saved Adam state) checks
the restricted preconditioner bit for bit, the errors and --resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import build_neox, cli, make_tiny_tokenizer, one_line_error
from tyche.basin.result import VolumeResult
from tyche.cli.basin.include import expand_components, parse_include
from tyche.cli.commandline import CommandError

#: how far layer 1's attention is rescaled (values ×C, output projection ÷C)
C = 100.0
FRAGILE = "gpt_neox.layers.1.attention"
SUBLAYERS = ["gpt_neox.layers.0.attention", "gpt_neox.layers.0.mlp", FRAGILE,
             "gpt_neox.layers.1.mlp"]  # fmt: skip


def _fragile_neox() -> torch.nn.Module:
    """The tiny GPT-NeoX with layer 1's value rows of query_key_value (weight and bias) ×C and
    its output projection attention.dense.weight ÷C.

    Attention is linear in the values, so the model computes the same function (to float
    rounding), and with a fixed --sigma every other component's basin is exactly what it is
    on the model before rescaling. In this component the KL's curvature along the 4,096
    output-projection coordinates grows C² = 10⁴-fold (a step δ there now moves the output by
    δ·(C·values)), so its basin's radius along random directions shrinks many-fold and its
    log P falls by tens of thousands of nats (its anchor's prior density falls too, by
    (C²−1)|V|²/(2σ²) ≈ 8·10³ nats at σ = 1, the lesser part). Measured with 8 directions at
    σ = 1: −1.2e5 against −5.0e4 before rescaling, while the other three stay within
    −5.2e4 .. −5.6e4; so this component has the lowest naive log P by ~6e4 nats, far beyond
    the ~1e3-nat spread of 8 directions' estimates.
    """
    model = build_neox()
    attention = model.gpt_neox.layers[1].attention
    size = attention.head_size
    heads = attention.query_key_value.weight.shape[0] // (3 * size)
    with torch.no_grad():
        for h in range(heads):  # each head's rows are [query, key, value] blocks of `size`
            rows = slice(h * 3 * size + 2 * size, (h + 1) * 3 * size)
            attention.query_key_value.weight[rows] *= C
            attention.query_key_value.bias[rows] *= C
        attention.dense.weight /= C
    return model


@pytest.fixture(scope="module")
def fragile_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fragile")
    _fragile_neox().save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


def test_the_rescaled_model_computes_the_same_function():
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, after = build_neox()(ids).logits, _fragile_neox()(ids).logits
    # float32 rounding: x·C then ·(W/C) differs from x·W by a few ulps of logits of size ~1
    assert torch.allclose(before, after, rtol=0, atol=1e-5)


def test_one_basin_per_sublayer_finds_the_fragile_one(tmp_path, capsys, fragile_folder,
                                                      text_file):  # fmt: skip
    out = tmp_path / "run"
    run = cli(capsys, "basin", "--model", str(fragile_folder), "--data", str(text_file),
              "--n_sequences", "4", "--seq_len", "16", "--include", "sublayers",
              "--preconditioners", "none,fisher", "--n_samples", "8", "--sigma", "1",
              "--out", str(out))  # fmt: skip
    assert run.code == 0, run.err
    for label in SUBLAYERS:  # the keyword's expansion, as documented, with its globs
        assert f"component {label}: D = " in run.out and f"({label}.*)" in run.out
    rows = [line.split() for line in run.out.splitlines() if line.startswith(("none ", "fisher "))]
    assert sorted((r[0], r[1]) for r in rows) == sorted(
        (kind, label) for kind in ("none", "fisher") for label in SUBLAYERS
    )
    header = next(line for line in run.out.splitlines() if line.startswith("preconditioner"))
    assert "component" in header and "k̂" in header and "verdict" in header
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 8
    assert all({"component", "n_params", "khat", "verdict", "log_prob"} <= set(r) for r in summary)
    sizes = {r["component"]: r["n_params"] for r in summary}
    # attention: query_key_value 64·192 + 192, dense 64·64 + 64; mlp: 64·128 + 128 + 128·64 + 64
    assert sizes == {SUBLAYERS[0]: 16_640, SUBLAYERS[1]: 16_576, FRAGILE: 16_640,
                     SUBLAYERS[3]: 16_576}  # fmt: skip
    naive = {r["component"]: r["log_prob"] for r in summary if r["preconditioner"] == "none"}
    assert min(naive, key=naive.get) == FRAGILE  # see _fragile_neox: a ~6e4-nat margin
    for kind in ("none", "fisher"):
        for label in SUBLAYERS:
            res = VolumeResult.load(out / f"{kind}-{label}-cutoff0.01")
            assert res.n_params == sizes[label] and res.settings["component"] == label
            assert res.settings["include"] == [f"{label}.*"] and res.sigma == 1.0
    # the Fisher preconditioner, restricted to the component, undoes the rescaling of its
    # coordinates (p ∝ F^-1/2 shrinks the directions along the stiffened ones): measured
    # −4.2e4 against naive −1.2e5, while a p with misplaced entries would not help
    fisher = VolumeResult.load(out / f"fisher-{FRAGILE}-cutoff0.01").log_prob
    assert fisher > naive[FRAGILE] + 3e4
    assert not (out / "checkpoints").exists()


def test_keywords_and_globs_mix_and_share_the_whole_models_sigma(tmp_path, capsys, lm_folder,
                                                                 text_file):  # fmt: skip
    out = tmp_path / "run"
    run = cli(capsys, "basin", "--model", str(lm_folder), "--data", str(text_file),
              "--n_sequences", "2", "--seq_len", "8", "--n_samples", "2",
              "--preconditioners", "none", "--include", "embedding;gpt_neox.layers.0.mlp.*",
              "--where", "all", "--out", str(out))  # fmt: skip
    assert run.code == 0, run.err
    emb = VolumeResult.load(out / "none-embedding-all-cutoff0.01")
    mlp = VolumeResult.load(out / "none-gpt_neox.layers.0.mlp-all-cutoff0.01")
    assert emb.n_params == 512 * 64 and mlp.n_params == 16_576
    assert emb.settings["include"] == ["gpt_neox.embed_in.*"]  # not the unembedding embed_out
    rows = [line.split()[:4] for line in run.out.splitlines() if line.startswith("none ")]
    assert rows == [["none", "embedding", "32,768", "all"],
                    ["none", "gpt_neox.layers.0.mlp.*", "16,576", "all"]]  # fmt: skip
    model = build_neox()
    flat = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    rms = float(flat.square().mean().sqrt())
    # both components share the whole model's RMS as σ: the command sums the squares in
    # float64 per tensor, here over one concatenation, so the two differ by rounding only
    assert emb.sigma == pytest.approx(rms, rel=1e-12)
    # same path: one σ, computed once for the run and handed to every component
    assert mlp.sigma == emb.sigma


# ----------------------------------------------------------------------------- digits MLP
def test_layers_of_the_digits_mlp_with_the_restricted_adam_preconditioner(tmp_path, capsys):
    from tyche.basin.core import estimate_basin
    from tyche.basin.loss import ModelLoss
    from tyche.basin.options import BasinOptions
    from tyche.basin.preconditioners import build_preconditioner
    from tyche.zoo import load_digits_mlp

    out = tmp_path / "run"
    run = cli(capsys, "basin", "--include", "layers", "--n_samples", "4",
              "--preconditioners", "none,adam", "--out", str(out))  # fmt: skip
    assert run.code == 0, run.err
    assert "component 0: D = 4,160 parameters (0.*)" in run.out
    assert "component 2: D = 650 parameters (2.*)" in run.out
    mlp = load_digits_mlp()
    names = [n for n, _ in mlp.model.named_parameters()]  # 0.weight, 0.bias, 2.weight, 2.bias
    whole = build_preconditioner("adam", mlp.model, mlp.x_train, names=names,
                                 optimizer_state=mlp.optimizer_state)  # fmt: skip
    for label, entries in (("0", slice(0, 4160)), ("2", slice(4160, 4810))):
        loss = ModelLoss(mlp.model, mlp.x_train, include=f"{label}.*")
        options = BasinOptions(cutoffs=[1e-2], sigma=mlp.prior_sigma, n_samples=4)
        for kind, pre in (("none", None), ("adam", whole[entries])):
            expect = estimate_basin(loss, loss.anchor, options, preconditioner=pre,
                                    progress=False)  # fmt: skip
            got = VolumeResult.load(out / f"{kind}-{label}-cutoff0.01")
            # exact: the command runs estimate_basin on the same loss, seed and p entries (the
            # whole model's, sliced at the component's offsets), bit-identical by batch size
            assert torch.equal(got.estimates, expect.estimates[:, 0])


def test_include_errors_are_one_line(tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")]
    cases = [
        ([";"], r"--include is empty"),
        (["layers,0.*"], r"the keyword 'layers' is a component of its own"),
        (["0.*;0.*"], r"--include lists '0\.\*' twice"),
        (["0.*;nope.*"], r"'nope\.\*' matches no parameter of the model; its parameters are "
                         r"named like 0\.weight, 0\.bias, 2\.weight, 2\.bias"),  # fmt: skip
        (["sublayers"], r"--include sublayers: Sequential has no attention or MLP module"),
        (["embedding"], r"--include embedding: Sequential has no nn\.Embedding"),
        (["layers;2.*"], r"'2\.\*' and '2' are the same parameters"),
        (["2.*", "--exclude", "2.*"], r"every parameter of '2\.\*' is held fixed by --exclude"),
    ]
    for args, pattern in cases:
        run = cli(capsys, "basin", "--include", *args, "--n_samples", "2", *out)
        one_line_error(run, "basin", pattern)
    for value, said in (("-1", r"--adapt must be at least 0"), ("1.5", r"--adapt")):
        one_line_error(cli(capsys, "basin", "--adapt", value, *out), "basin", said)


def test_resume_refuses_a_changed_include_or_adapt(tmp_path, capsys, monkeypatch):
    from tyche.cli.basin import report

    out = tmp_path / "run"
    base = ["basin", "--include", "layers", "--n_samples", "3", "--preconditioners", "none",
            "--out", str(out)]  # fmt: skip
    def interrupted(*args, **kwargs):  # Ctrl-C once every sample is checkpointed
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(report, "finish", interrupted)
        assert cli(capsys, *base).code == 130
    run = cli(capsys, *base[:2], "0.*", *base[3:], "--resume")
    one_line_error(run, "basin", r"--include \(saved layers, now 0\.\*\)")
    run = cli(capsys, *base, "--resume", "--adapt", "1")
    one_line_error(run, "basin", r"--adapt \(saved unset, now 1\)")
    run = cli(capsys, *base, "--resume")
    assert run.code == 0, run.err
    assert {r["component"] for r in json.loads((out / "summary.json").read_text())} == {"0", "2"}


def test_adapt_is_shown_in_the_tables_heading(tmp_path, capsys):
    run = cli(capsys, "basin", "--adapt", "1", "--n_samples", "4", "--preconditioners", "none",
              "--out", str(tmp_path / "run"))  # fmt: skip
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("preconditioner"))
    assert lines[at - 1].startswith("--adapt 1: 1 round of adaptive direction sampling")


# ----------------------------------------------------------------------------- expansion
@pytest.mark.parametrize(
    ("family", "attention", "embeddings"),
    [("gpt2", "transformer.h.{}.attn", ["transformer.wte.*", "transformer.wpe.*"]),
     ("neox", "gpt_neox.layers.{}.attention", ["gpt_neox.embed_in.*"]),
     ("llama", "model.layers.{}.self_attn", ["model.embed_tokens.*"])],
)  # fmt: skip
def test_keywords_expand_on_each_family(family, attention, embeddings, request):
    model = request.getfixturevalue(f"{family}_model")
    block = attention.rsplit(".", 1)[0]
    parts = expand_components(parse_include("embedding;layers;sublayers"), model)
    got = [(c.label, c.globs) for c in parts]
    assert got == [("embedding", tuple(embeddings))] + [
        (block.format(i), (block.format(i) + ".*",)) for i in range(2)
    ] + [
        (name.format(i), (name.format(i) + ".*",))
        for i in range(2) for name in (attention, block + ".mlp")
    ]  # fmt: skip
    by_label = {c.label: c for c in parts}
    # a block holds its attention, its MLP and its norms (in neither sublayer)
    first = by_label[block.format(0)]
    subs = {*by_label[attention.format(0)].names, *by_label[block.format(0) + ".mlp"].names}
    rest = set(first.names) - subs
    assert subs < set(first.names) and all("norm" in n or ".ln_" in n for n in rest)
    # --exclude applies inside each component
    trimmed = expand_components(("layers",), model, exclude=("*norm*", "*.ln_*"))
    assert set(trimmed[0].names) == subs and trimmed[0].n_params < first.n_params


def test_parse_include_keeps_the_components_as_written():
    assert parse_include(None) is None
    assert parse_include(" a.*, b.* ; layers;") == ("a.*,b.*", "layers")
    with pytest.raises(CommandError, match="is empty"):
        parse_include(" ; ")
