"""`tyche basin`: the main job on the digits MLP, end to end (table, results, plots, resume)."""

from __future__ import annotations

import json

import pytest
import torch

from tyche.__main__ import main
from tyche.basin.result import VolumeResult


def test_basin_command_on_digits(tmp_path, capsys):
    out = tmp_path / "run"
    main(["basin", "--n_samples", "6", "--cutoffs", "1e-3,1e-2", "--out", str(out)])
    text = capsys.readouterr().out
    assert "preconditioner" in text and "adam" in text and "slope" in text
    summary = json.loads((out / "summary.json").read_text())
    assert {(r["preconditioner"], r["cutoff"]) for r in summary} == {
        ("none", 1e-3),
        ("none", 1e-2),
        ("adam", 1e-3),
        ("adam", 1e-2),
    }
    for name in ("histogram.png", "cutoff_scan.png"):
        assert (out / name).stat().st_size > 10_000
    naive = VolumeResult.load(out / "none-cutoff0.01")
    adam = VolumeResult.load(out / "adam-cutoff0.01")
    assert naive.n_params == 4810 and naive.estimates.shape == (6,)
    assert adam.log_prob > naive.log_prob  # the paper's finding: Adam raises the estimate
    # the search's acceptance band rtol·cutoff (default rtol 1e-2), checked on the very float64
    # values it accepted: no rounding between the two
    assert ((naive.deltas - 1e-2).abs() <= 1e-4).all()
    assert not (out / "checkpoints" / "none-0.01").exists()  # finished runs drop checkpoints
    row = next(r for r in summary if r["preconditioner"] == "none" and r["cutoff"] == 1e-2)
    assert row["log_prob"] == naive.log_prob  # the same float64, through JSON's exact repr


def test_basin_command_resume_and_bad_options(tmp_path):
    out = tmp_path / "run"
    args = ["basin", "--n_samples", "4", "--preconditioners", "none", "--out", str(out)]
    main(args)
    first = VolumeResult.load(out / "none-cutoff0.01")
    # a leftover checkpoint of an interrupted run is refused without --resume ...
    (out / "checkpoints" / "none-0.01").mkdir(parents=True)
    (out / "checkpoints" / "none-0.01" / "samples-rank0.safetensors").touch()
    with pytest.raises(ValueError, match="--resume"):
        main(args)
    with pytest.raises(ValueError, match="unknown preconditioner"):
        main([*args[:-2], "--preconditioners", "magic", "--out", str(tmp_path / "x")])
    # exact: the refused runs must not have rewritten the finished result
    assert torch.equal(VolumeResult.load(out / "none-cutoff0.01").estimates, first.estimates)


def test_basin_command_on_a_local_hf_folder_and_text_file(
    tmp_path, capsys, tiny_tokenizer, tiny_texts
):
    from conftest import build_neox

    folder = tmp_path / "model"
    build_neox().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(tiny_texts * 4))
    out = tmp_path / "run"
    main(
        [
            "basin",
            "--model",
            str(folder),
            "--data",
            str(text),
            "--n_samples",
            "2",
            "--val_size",
            "2",
            "--max_seq_len",
            "16",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "no saved optimizer state; skipping 'adam'" in printed
    result = VolumeResult.load(out / "none-cutoff0.01")
    assert result.n_params == 132_608 and torch.isfinite(result.estimates).all()
