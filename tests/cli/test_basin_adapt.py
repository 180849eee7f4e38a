"""`tyche basin --adapt N` end to end: the flag reaches the estimator and the outputs say so."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from conftest import cli, one_line_error


def test_adapt_flag_changes_the_samples_and_is_recorded(capsys, tmp_path):
    base = ["basin", "--preconditioners", "none", "--cutoffs", "1e-3,1e-2"]
    plain = cli(capsys, *base, "--n_samples", "24", "--out", str(tmp_path / "plain"))
    assert plain.code == 0, plain.err
    run = cli(capsys, *base, "--n_samples", "24", "--adapt", "2", "--out", str(tmp_path / "a"))
    assert run.code == 0, run.err
    assert "--adapt 2" in run.out
    rows = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert {r["adapt"] for r in rows} == {2}
    # every round's evaluations: three rounds of 24 directions, at least one search each
    assert all(r["loss_evals_total"] >= 3 * 24 for r in rows)
    adapted = load_file(str(next((tmp_path / "a" / "none-cutoff0.01").glob("*.safetensors"))))
    first = load_file(str(next((tmp_path / "plain" / "none-cutoff0.01").glob("*.safetensors"))))
    # the estimate is the last round's: other directions, other estimates
    assert not adapted["estimates"].equal(first["estimates"])

    again = cli(capsys, *base, "--n_samples", "24", "--adapt", "3", "--out", str(tmp_path / "a"))
    one_line_error(again, "basin", "--adapt")  # a finished run of other settings is refused
    few = cli(capsys, *base, "--n_samples", "5", "--adapt", "1", "--out", str(tmp_path / "b"))
    one_line_error(few, "basin", r"--adapt needs --n_samples >= 6")
