"""`--model tl:...`: every command on the TransformerLens conversion of a model folder, with
TransformerLens hook names as sites, against the same command on the HF folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from interop_support import require

from conftest import cli, one_line_error


@pytest.fixture(scope="module", autouse=True)
def _transformer_lens() -> None:
    require("transformer_lens")


def _rows(text_file: Path) -> list[str]:
    return ["--data", str(text_file), "--n_sequences", "4", "--seq_len", "16", "--seed", "3"]


def _ok(capsys, *argv: str) -> str:
    run = cli(capsys, *argv)
    assert run.code == 0, run.err[-2000:]
    return run.out


def _summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def test_causal_on_tl_hook_names_equals_causal_on_the_hf_aliases(
    lm_folder: Path, text_file: Path, tmp_path: Path, capsys
) -> None:
    common = [*_rows(text_file), "--k", "2", "--max_iter", "5", "--n_pca", "0", "--no-plot"]
    _ok(capsys, "causal", "--model", f"tl:{lm_folder}", "--sites", "blocks.1.hook_resid_pre",
        *common, "--out", str(tmp_path / "tl"))  # fmt: skip
    _ok(capsys, "causal", "--model", str(lm_folder), "--sites", "resid_pre.1", *common,
        "--out", str(tmp_path / "hf"))  # fmt: skip
    tl, hf = _summary(tmp_path / "tl"), _summary(tmp_path / "hf")
    assert tl["config"]["model"] == f"tl:{lm_folder}"
    assert tl["inputs"]["input_ids_sha256"] == hf["inputs"]["input_ids_sha256"]
    ours = tl["sites"]["blocks.1.hook_resid_pre"]["energies"]
    theirs = hf["sites"]["resid_pre.1"]["energies"]
    # the same weights in TransformerLens's einsums against HF's linears: float32 rounding
    # of the activations (~1e-6 relative) moves where a search that stops at --tol 1e-2 ends
    assert ours == pytest.approx(theirs, rel=1e-2)


def test_interaction_build_on_tl_hook_names_equals_the_hf_aliases(
    lm_folder: Path, text_file: Path, tmp_path: Path, capsys
) -> None:
    for model, layers, name in ((f"tl:{lm_folder}", "blocks.1.hook_resid_pre,unembed", "tl"),
                                (str(lm_folder), "resid_pre.1,unembed", "hf")):  # fmt: skip
        _ok(capsys, "interaction", "build", "--model", model, *_rows(text_file),
            "--node_layers", layers, "--no-plot", "--out", str(tmp_path / name))  # fmt: skip
    tl, hf = (_summary(tmp_path / n)["layers"][0] for n in ("tl", "hf"))
    assert tl["node_layer"] == "blocks.1.hook_resid_pre" and tl["kept"] == hf["kept"]
    # float64 Jacobians of float32-converted weights: the conversion's rounding only
    assert tl["top_importance"] == pytest.approx(hf["top_importance"], rel=1e-5)


def test_basin_runs_on_the_transformer_lens_parameters(
    lm_folder: Path, text_file: Path, tmp_path: Path, capsys
) -> None:
    sizes = {}
    for model, name in ((f"tl:{lm_folder}", "tl"), (str(lm_folder), "hf")):
        out = _ok(capsys, "basin", "--model", model, *_rows(text_file), "--n_samples", "1",
                  "--preconditioners", "none", "--out", str(tmp_path / name))  # fmt: skip
        assert f"model {model}: D = " in out and "log P" in out
        sizes[name] = int(re.search(r"D = ([\d,]+) parameters", out)[1].replace(",", ""))
    # TransformerLens gives the GPT-NeoX unembedding a bias b_U (d_vocab = 512 zeros) that the
    # HF model has not: its parameter vector is longer by exactly that
    assert sizes["tl"] - sizes["hf"] == 512


def test_codebooks_on_a_tl_base_train_save_and_steer(
    lm_folder: Path, text_file: Path, tmp_path: Path, capsys
) -> None:
    train = ["codebook", "train", "--model", f"tl:{lm_folder}", *_rows(text_file), "--sites",
             "blocks.0.attn.hook_z,blocks.1.hook_mlp_out", "--num_codes", "8", "--steps", "2",
             "--batch_size", "2", "--eval_sequences", "2", "--warmup_steps", "0"]  # fmt: skip
    one_line_error(cli(capsys, *train, "--out", str(tmp_path / "no")), "codebook",
                   r"a TransformerLens base is not saved .* add --freeze_base")  # fmt: skip
    _ok(capsys, *train, "--freeze_base", "--out", str(tmp_path / "cb"))
    saved = json.loads((tmp_path / "cb" / "codebooks.json").read_text())
    assert saved["base_model"]["spec"] == f"tl:{Path(lm_folder).resolve()}"
    assert [c["site"] for c in saved["codebooks"]] == ["blocks.0.attn.hook_z",
                                                       "blocks.1.hook_mlp_out"]  # fmt: skip
    assert saved["codebooks"][0]["n_groups"] == 4  # one codebook per head of hook_z
    out = _ok(capsys, "codebook", "intervene", "--model", str(tmp_path / "cb"), "--prompt",
              "the king", "--force", "blocks.1.hook_mlp_out:3", "--n_samples", "1",
              "--max_new_tokens", "3")  # fmt: skip
    assert "with the intervention" in out


def test_a_classifier_cannot_be_a_tl_model(capsys) -> None:
    one_line_error(cli(capsys, "causal", "--model", "tl:zoo:digits-mlp"), "causal",
                   r"TransformerLens models are language models")  # fmt: skip
