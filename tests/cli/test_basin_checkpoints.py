"""``tyche basin --checkpoints``: one basin per training checkpoint, sorted by step.

Tiny checkpoints are trained here (one epoch of the digits recipe: steps 1, 2, 4, 8, 16; a
two-step tiny LM), measured through the command line with few directions, and checked
against the library run on the same checkpoint (the oracle: the same directions, the
checkpoint's own Adam state).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from conftest import cli, one_line_error
from tyche.basin.result import VolumeResult
from tyche.zoo.digits import DigitsMLPConfig, load_digits_folder, train_digits_mlp
from tyche.zoo.shakespeare_lm import ShakespeareLMConfig, train_shakespeare_lm

STEPS = [1, 2, 4, 8, 16]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits MLP trained one epoch, its checkpoints in ``ROOT/checkpoints/``."""
    root = tmp_path_factory.mktemp("digits-run")
    train_digits_mlp(DigitsMLPConfig(epochs=1), checkpoint_root=root)
    return root


def _library_result(folder: Path, kind: str, n: int) -> VolumeResult:
    """What `tyche basin` should give for one checkpoint: the library on its model, inputs,
    prior and own optimizer state (seed 0, cutoff 1e-2)."""
    from tyche.basin.core import estimate_basin
    from tyche.basin.loss import ModelLoss
    from tyche.basin.options import BasinOptions
    from tyche.basin.params import select_parameters
    from tyche.basin.preconditioners import build_preconditioner

    mlp = load_digits_folder(folder)
    loss = ModelLoss(mlp.model, mlp.x_train)
    names = [name for name, _ in select_parameters(mlp.model, "*", None)]
    pre = build_preconditioner(kind, mlp.model, mlp.x_train, names=names,
                               optimizer_state=mlp.optimizer_state)  # fmt: skip
    opts = BasinOptions(cutoffs=[1e-2], sigma=mlp.prior_sigma, n_samples=n)
    with warnings.catch_warnings():  # few directions: a lower bound, as the test knows
        warnings.filterwarnings("ignore", message="effective sample size")
        curve = estimate_basin(loss, loss.anchor, opts, preconditioner=pre, progress=False)
    return curve.results[0]


def test_checkpoints_on_digits(tmp_path, capsys, digits_run):
    out = tmp_path / "run"
    run = cli(capsys, "basin", "--checkpoints", str(digits_run / "checkpoints" / "checkpoint-*"),
              "--n_samples", "3", "--out", str(out))  # fmt: skip
    assert run.code == 0, run.err
    # the table: one line per step in the order of the steps (1, 2, 4, 8, 16, not 1, 16, 2)
    table = run.out[run.out.index("by training step"):]
    header = table.splitlines()[1]
    assert header.split()[:2] == ["step", "D"] and "log P none (nats)" in header
    assert "log P adam (nats)" in header and header.count("verdict") == 2
    lines = [line.split() for line in table.splitlines()[3:3 + len(STEPS)]]
    assert [int(line[0]) for line in lines] == STEPS and all(ln[1] == "4,810" for ln in lines)
    assert "none: log P " in table and "adam: log P " in table  # first step to last
    assert "lower bound only" in table  # 3 directions: every estimate is a bound, and says so
    # summary.json: a row per step and preconditioner, with the step, the folder and D
    rows = json.loads((out / "summary.json").read_text())
    assert [(r["step"], r["preconditioner"]) for r in rows] == [
        (s, k) for s in STEPS for k in ("none", "adam")]  # fmt: skip
    for row in rows:
        assert row["n_params"] == 4810 and row["verdict"] == "lower bound only"
        assert "khat" in row and row["checkpoint"].endswith(f"checkpoint-{row['step']}")
    assert (out / "log_p_by_step.png").stat().st_size > 10_000
    assert not (out / "checkpoints").exists()  # a finished run drops its resume record
    # oracle: each checkpoint's folder holds what the library gives on it, Adam from its own
    # optimizer state (same path: the same directions through the same code)
    for step, kind in ((2, "none"), (2, "adam"), (16, "adam")):
        got = VolumeResult.load(out / f"checkpoint-{step}" / f"{kind}-cutoff0.01")
        expect = _library_result(digits_run / "checkpoints" / f"checkpoint-{step}", kind, 3)
        assert torch.equal(got.estimates, expect.estimates), (step, kind)
    row = next(r for r in rows if (r["step"], r["preconditioner"]) == (16, "adam"))
    assert row["log_prob"] == expect.log_prob  # same path: the summary of that result
    # a folder of checkpoint-* folders stands for them: the same table
    again = cli(capsys, "basin", "--checkpoints", str(digits_run / "checkpoints"),
                "--n_samples", "3", "--out", str(tmp_path / "again"))  # fmt: skip
    assert again.code == 0, again.err
    assert run.out[run.out.index("by training step"):].splitlines()[3:8] == \
        again.out[again.out.index("by training step"):].splitlines()[3:8]  # fmt: skip


def test_checkpoints_resume_keeps_finished_checkpoints(tmp_path, capsys, digits_run,
                                                        monkeypatch):  # fmt: skip
    import tyche.cli.basin as basin_cli

    glob = ",".join(str(digits_run / "checkpoints" / f"checkpoint-{s}") for s in (1, 4, 16))
    args = ["basin", "--checkpoints", glob, "--n_samples", "3", "--preconditioners", "none"]
    fresh = cli(capsys, *args, "--out", str(tmp_path / "fresh"))
    assert fresh.code == 0, fresh.err
    real, calls = basin_cli._run, []

    def interrupted(cmd, plan, argv):
        calls.append(cmd.source.model)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cmd, plan, argv)

    out = tmp_path / "run"
    monkeypatch.setattr(basin_cli, "_run", interrupted)
    stopped = cli(capsys, *args, "--out", str(out))
    assert stopped.code == 130 and (out / "checkpoints" / "run.json").is_file()
    one_line_error(cli(capsys, *args, "--out", str(out)), "basin", "holds an interrupted run")
    changed = cli(capsys, *args, "--out", str(out), "--n_samples", "4", "--resume")
    one_line_error(changed, "basin", r"--n_samples \(saved 3, now 4\)")
    monkeypatch.setattr(basin_cli, "_run", real)
    resumed = cli(capsys, *args, "--out", str(out), "--resume")
    assert resumed.code == 0, resumed.err
    assert resumed.out.count("finished before") == 1  # step 1 kept, steps 4 and 16 run
    keys = ("step", "log_prob", "khat", "verdict")
    assert [{k: r[k] for k in keys} for r in json.loads((out / "summary.json").read_text())] \
        == [{k: r[k] for k in keys} for r in json.loads((tmp_path / "fresh" / "summary.json")
                                                           .read_text())]  # fmt: skip
    # --overwrite clears the checkpoints' folders of an earlier run of other settings
    few = cli(capsys, "basin", "--checkpoints", str(digits_run / "checkpoints" / "checkpoint-2"),
              "--n_samples", "3", "--preconditioners", "none", "--out", str(out), "--overwrite")
    assert few.code == 0, few.err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_checkpoints_on_language_model_folders(tmp_path, capsys, text_file):
    lm = ShakespeareLMConfig(vocab_size=300, n_layers=1, hidden=32, n_heads=4, seq_len=32,
                             batch_size=4, steps=2, warmup_steps=1, eval_windows=8,
                             max_chars_per_play=3000, checkpoint_factor=2)  # fmt: skip
    metrics = train_shakespeare_lm(tmp_path / "lm", lm, progress=False)
    out = tmp_path / "run"
    run = cli(capsys, "basin", "--checkpoints", str(tmp_path / "lm" / "checkpoints" / "*"),
              "--data", str(text_file), "--n_sequences", "2", "--seq_len", "16",
              "--n_samples", "2", "--out", str(out))  # fmt: skip
    assert run.code == 0, run.err
    rows = json.loads((out / "summary.json").read_text())
    assert [(r["step"], r["preconditioner"]) for r in rows] == [
        (1, "none"), (1, "adam"), (2, "none"), (2, "adam")]  # fmt: skip
    assert all(r["n_params"] == metrics["n_params"] for r in rows)
    assert f"data {text_file}: 2 sequences × 16 tokens" in run.out
    # two checkpoints of different weights and moments: different basins
    assert rows[1]["log_prob"] != rows[3]["log_prob"]


def test_checkpoints_errors(tmp_path, capsys, digits_run, lm_folder, monkeypatch):
    run = cli(capsys, "basin", "--checkpoints", str(tmp_path / "none-*"))
    one_line_error(run, "basin", r"--checkpoints: '.*none-\*' matches no folder; give a glob")
    (tmp_path / "checkpoint-3").mkdir()
    run = cli(capsys, "basin", "--checkpoints", str(tmp_path / "checkpoint-*"))
    one_line_error(run, "basin", r"checkpoint-3 is not a model folder")
    mixed = f"{digits_run / 'checkpoints' / 'checkpoint-1'},{lm_folder}"
    one_line_error(cli(capsys, "basin", "--checkpoints", mixed), "basin",
                   r"is a language model but the others are digits MLPs")  # fmt: skip
    one_line_error(cli(capsys, "basin", "--checkpoints", str(lm_folder)), "basin",
                   r"cannot tell the training step of .*: name the folder checkpoint-<step>")
    one_line_error(cli(capsys, "basin", "--checkpoints", "zoo:digits-mlp", "--model",
                       "zoo:shakespeare-lm"), "basin", r"drop --model")  # fmt: skip
    one_line_error(cli(capsys, "basin", "--checkpoints", "zoo:digits-mlp", "--data",
                       "zoo:shakespeare"), "basin", r"--data does not apply")  # fmt: skip
    one_line_error(cli(capsys, "basin", "--checkpoints", "zoo:modadd"), "basin",
                   r"zoo:modadd saves no training checkpoints")
    # a zoo entry cached before checkpoints were saved: the retrain that gets them
    monkeypatch.setenv("TYCHE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "shakespeare-lm").mkdir(parents=True)
    (tmp_path / "cache" / "shakespeare-lm" / "zoo.json").write_text("{}")
    one_line_error(cli(capsys, "basin", "--checkpoints", "zoo:shakespeare-lm"), "basin",
                   r"cached without training checkpoints; `tyche zoo train shakespeare-lm "
                   r"--force` retrains it")  # fmt: skip


def test_poisoned_digits_through_the_command(tmp_path, capsys):
    out = tmp_path / "run"
    run = cli(capsys, "basin", "--model", "zoo:digits-mlp-poisoned", "--n_samples", "2",
              "--preconditioners", "none", "--out", str(out))  # fmt: skip
    assert run.code == 0, run.err
    assert "model zoo:digits-mlp-poisoned: D = 4,810" in run.out
    assert "data 1,024 digits training inputs" in run.out  # the clean inputs, as digits-mlp
    result = VolumeResult.load(out / "none-cutoff0.01")
    assert result.n_params == 4810
    # the clean recipe's prior: 1 / sqrt(l2_reg * 1,024), not that of the 5,120 examples
    assert round(result.sigma, 4) == 1.3975
    one_line_error(cli(capsys, "basin", "--model", "zoo:digits-mlp-poisoned", "--seq_len", "8"),
                   "basin", r"--seq_len does not apply to zoo:digits-mlp-poisoned")
