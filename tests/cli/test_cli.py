"""The command line as a careful user meets it: one-line errors up front, safe resume, no loss.

Most cases run in-process through ``tyche.__main__.main`` (the console script's own code
path, minus interpreter start-up); a few run the real ``python -m tyche`` to show stderr is
one line with no traceback, exit code 2, well under 5 s for a flag error. Each case records
how long it took to fail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import cli, one_line_error
from tyche.basin.result import VolumeResult

#: a flag error must be reported before anything heavy is imported or loaded
FLAG_ERROR_SECONDS = 5.0


@pytest.fixture(scope="module")
def binary_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bin") / "weights.bin"
    path.write_bytes(bytes(range(256)) * 8)
    return path


# ----------------------------------------------------------------------------- flag errors
BASIN_FLAG_ERRORS = [
    (["--cutoffs", "1e-3,abc"], r"--cutoffs: 'abc' is not a number"),
    (["--cutoffs", "1e-3,1e-3"], r"--cutoffs lists 0.001 twice"),
    (["--cutoffs", "1e-3,-1"], r"--cutoffs: -1 must be a positive"),
    (["--cutoff", "1e-3", "--cutoffs", "1e-2,1e-1"], r"--cutoff 0.001 is not among --cutoffs"),
    (["--sigma", "0"], r"--sigma must be greater than 0"),
    (["--preconditioners", "adam,adam"], r"--preconditioners lists adam twice"),
    (["--preconditioners", "magic"], r"--preconditioners: unknown 'magic'; choose from"),
    (["--n_samples", "0"], r"--n_samples must be at least 1"),
    (["--n_samples", "many"], r"--n_samples.*'many' is not an integer"),
    (["--eps", "-1"], r"--eps must be at least 0"),
    (["--exponent", "nan"], r"--exponent.*not a finite number"),
    (["--batch_size", "0"], r"--batch_size must be at least 1"),
    (["--exclude", ","], r"--exclude is empty"),
    (["--model", "zoo:nope"], r"unknown zoo model 'nope'; known: digits-mlp"),
    (["--model", "zoo:shakespeare"], r"unknown zoo model 'shakespeare'"),
    (["--data", "zoo:shakespeare"], r"--data does not apply to zoo:digits-mlp"),
    (["--n_sequences", "4"], r"--n_sequences does not apply to zoo:digits-mlp"),
    (["--resume", "--no-checkpoint"], r"--resume needs the checkpoints"),
    (["--resume"], r"--resume: no interrupted run under"),
    (["--no-such-flag"], r"unrecognized arguments: --no-such-flag"),
    (["--out", "/proc/tyche-cannot-write"], r"--out: cannot write to '/proc/tyche-cannot-write'"),
    (["--max_memory", "lots"], r"--max_memory: 'lots' is not a memory size; write e.g. 4GiB"),
    (["--max_memory", "0"], r"--max_memory: a memory size must be a finite number of bytes"),
    (["--lambda", "--cutoffs", "1e-2"], r"--lambda needs at least two --cutoffs"),
    (["--lambda", "--cutoff", "0.5"], r"--cutoff 0.5 is not among the --lambda scan"),
    (["--where", " ; "], r"--where is empty; give e.g. label=3"),
    (["--where", "colour=red"], r"--where: 'colour=red' is not a subset; write all, label="),
    (["--where", "label=x"], r"--where: label 'x' is not a class number"),
    (["--where", "label=12"], r"--where: unknown digit class '12'; known: 0, 1"),
    (["--where", "label=3;label=03"], r"--where lists label=3 twice"),
    (["--where", "label=each,3"], r"--where: label=each stands alone"),
    (["--where", "label="], r"--where: label= has no values"),
    (["--where", "play=hamlet"], r"--where play= needs the plays as data"),
    (["--where", "mask="], r"--where: mask= needs a file"),
    (["--where", "mask=nothere.safetensors"], r"--where mask=nothere.safetensors: no such file"),
    (["--model", "zoo:shakespeare-lm", "--where", "label=3"], r"--where label= is for zoo:digits"),
    (
        ["--model", "zoo:shakespeare-lm", "--data", "zoo:stdlib-docs", "--where", "play=hamlet"],
        r"--where play= needs the plays as data",
    ),
    (
        ["--model", "zoo:shakespeare-lm", "--data", "zoo:shakespeare", "--where", "play=nope"],
        r"--where: unknown play 'nope'; known: ",
    ),
]


@pytest.mark.parametrize("args,pattern", BASIN_FLAG_ERRORS, ids=lambda x: " ".join(x)[:40])
def test_basin_flag_errors(args, pattern, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = cli(capsys, "basin", *args)
    one_line_error(run, "basin", pattern)
    assert run.seconds < FLAG_ERROR_SECONDS


def test_basin_file_errors(tmp_path, capsys, lm_folder, binary_file):
    cases = [
        (["--model", str(tmp_path / "missing")], r"--model: no folder"),
        (["--model", str(tmp_path)], r"has no config.json"),
        (["--model", str(lm_folder), "--data", str(binary_file)], r"is not UTF-8 text \(byte 128"),
        (["--model", str(lm_folder), "--data", str(tmp_path / "none.txt")], r"--data: no file"),
        (["--model", str(lm_folder), "--data", "zoo:fashion-mnist"], r"image data, not text"),
        (["--out", str(binary_file)], r"exists and is not a folder"),
        (["--where", f"mask={binary_file}"], r"give a .safetensors or .npy file"),
    ]
    for args, pattern in cases:
        run = cli(capsys, "basin", *args, "--out", str(tmp_path / "o"), *args[-2:])
        one_line_error(run, "basin", pattern)
        assert run.seconds < FLAG_ERROR_SECONDS


CAUSAL_FLAG_ERRORS = [
    (["--k", "0"], r"--k must be at least 1"),
    (["--mode", "sideways"], r"argument --mode: invalid choice: 'sideways'"),
    (["--target", "tuned"], r"--target tuned needs --lens FOLDER"),
    (["--lens", "somewhere"], r"--lens is only used with --target tuned"),
    (["--target", "tuned", "--lens", "nowhere"], r"--lens: no tuned lens saved in 'nowhere'"),
    (["--n_starts", "0"], r"--n_starts must be at least 1"),
    (["--refine", "both"], r"argument --refine: invalid choice: 'both'"),
    (["--cache_gb", "-1"], r"--cache_gb must be at least 0"),
    (["--cache_gb", "lots"], r"--cache_gb.*'lots' is not a number"),
    (["--target", "model", "--no-fast"], r"--no-fast and --cache_gb apply to lens targets"),
    (["--target", "model", "--cache_gb", "8"], r"apply to lens targets, not --target model"),
    (["--tol", "0"], r"--tol must be greater than 0"),
    (["--sites", " , "], r"--sites is empty"),
    (["--model", "zoo:digits-mlp"], r"is not a language model \(it has no tokens\)"),
    (["--data", "zoo:nope"], r"unknown zoo data 'nope'"),
    (["train-lens", "--steps", "0"], r"--steps must be at least 1"),
    (["train-lens", "--lr", "-1"], r"--lr must be greater than 0"),
]


@pytest.mark.parametrize("args,pattern", CAUSAL_FLAG_ERRORS, ids=lambda x: " ".join(x)[:40])
def test_causal_flag_errors(args, pattern, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = cli(capsys, "causal", *args)
    one_line_error(run, "causal", pattern)
    assert run.seconds < FLAG_ERROR_SECONDS


def test_real_process_prints_one_line_fast(tmp_path, binary_file):
    """The console script itself: one line on stderr, no traceback, exit 2, under 5 s;
    ``--debug`` shows the traceback instead."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for args in (["basin", "--cutoffs", "1e-3,abc"],
                 ["causal", "--data", str(binary_file)]):  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "tyche", *args], capture_output=True,
                              text=True, cwd=tmp_path, env=env, timeout=60)  # fmt: skip
        seconds = time.perf_counter() - start
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert seconds < FLAG_ERROR_SECONDS, seconds
    debug = [sys.executable, "-m", "tyche", "basin", "--sigma", "0", "--debug"]
    done = subprocess.run(debug, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert done.returncode != 0 and "Traceback" in done.stderr and "CommandError" in done.stderr


# ----------------------------------------------------------------------------- model errors
def test_model_errors_come_right_after_loading(tmp_path, capsys, lm_folder, text_file):
    """Checked after the model loads and before any computation (no progress bar starts)."""
    from tyche.zoo import resolve_model

    start = time.perf_counter()
    resolve_model(str(lm_folder))
    load_seconds = time.perf_counter() - start
    common = ["--model", str(lm_folder), "--data", str(text_file)]
    causal, basin = ["--seq_len", "8"], ["--seq_len", "8"]
    cases = [
        ("causal", [*causal, "--sites", "resid_mid.*"], r"'resid_mid\.\*' matches nothing"),
        ("causal", [*causal, "--k", "1000"], r"--k 1000 is larger than the width 64"),
        ("basin", [*basin, "--exclude", "*embed*x"], r"--exclude: '\*embed\*x' matches no"),
        ("basin", [*basin, "--preconditioners", "adam"], r"has no saved optimizer state"),
    ]
    for command, args, pattern in cases:
        run = cli(capsys, command, *common, *args, "--out", str(tmp_path / command))
        one_line_error(run, command, pattern)
        assert "directions" not in run.err and "bases" not in run.err  # no work's progress bar
        # loading again costs what loading costs; tokenizing 8-token rows is milliseconds
        assert run.seconds < load_seconds + FLAG_ERROR_SECONDS, (run.seconds, load_seconds)


def test_exclude_glob_that_matches_nothing_is_an_error():
    """The README's old example, exclude=["*embed*"], matched nothing on GPT-2 (wte, wpe)."""
    from conftest import build_gpt2
    from tyche.basin import model_loss

    model = build_gpt2()
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"exclude glob '\*embed\*' matches no parameter"):
        model_loss(model, {"input_ids": ids}, exclude=["*embed*"])
    with pytest.raises(ValueError, match=r"include glob 'h\.\*' matches no parameter"):
        model_loss(model, {"input_ids": ids}, include=["h.*"])
    loss = model_loss(model, {"input_ids": ids}, exclude=["transformer.wte.*"])
    assert loss.n_params == sum(p.numel() for p in model.parameters()) - 512 * 64


# ----------------------------------------------------------------------------- basin runs
def test_basin_command_on_digits(tmp_path, capsys):
    out = tmp_path / "run"
    run = cli(capsys, "basin", "--n_samples", "6", "--cutoffs", "1e-3,1e-2", "--out", str(out))
    assert run.code == 0, run.err
    assert "preconditioner" in run.out and "adam" in run.out and "slope" in run.out
    assert "--lambda fits it with an interval" in run.out  # the table's hint, in flag words
    assert run.out.count("settings: ") == 1 and "data 1,024 digits training inputs" in run.out
    header = next(line for line in run.out.splitlines() if line.startswith("preconditioner"))
    assert "k̂" in header and "verdict" in header
    rows = [line for line in run.out.splitlines() if line.startswith(("none ", "adam "))]
    assert len(rows) == 4 and all("   inf lower bound only " in line for line in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert all(r["verdict"] == "lower bound only" and "max_weight_share" in r for r in summary)
    assert {(r["preconditioner"], r["cutoff"]) for r in summary} == {
        ("none", 1e-3), ("none", 1e-2), ("adam", 1e-3), ("adam", 1e-2),
    }  # fmt: skip
    for name in ("histogram.png", "cutoff_scan.png"):
        assert (out / name).stat().st_size > 10_000
    naive = VolumeResult.load(out / "none-cutoff0.01")
    adam = VolumeResult.load(out / "adam-cutoff0.01")
    assert naive.n_params == 4810 and naive.estimates.shape == (6,)
    assert adam.log_prob > naive.log_prob  # the paper's finding: Adam raises the estimate
    assert ((naive.deltas - 1e-2).abs() <= 1e-4).all()  # rtol 1e-2 of the cutoff
    assert not (out / "checkpoints").exists()  # a finished run drops its checkpoints
    # the histogram's cutoff defaults to the largest of --cutoffs, not an extra one
    assert not (out / "none-cutoff0.1").exists()
    # result files are readable like any new file: the umask decides, not the writer
    umask = os.umask(0o022)
    os.umask(umask)
    for file in (out / "none-cutoff0.01").iterdir():
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file


def test_basin_command_on_a_local_hf_folder_and_text_file(tmp_path, capsys, lm_folder, text_file):
    out = tmp_path / "run"
    run = cli(capsys, "basin", "--model", str(lm_folder), "--data", str(text_file),
              "--n_samples", "2", "--n_sequences", "2", "--seq_len", "16",
              "--out", str(out))  # fmt: skip
    assert run.code == 0, run.err
    assert "no saved optimizer state; skipping 'adam'" in run.out
    assert f"data {text_file}: 2 sequences × 16 tokens" in run.out
    result = VolumeResult.load(out / "none-cutoff0.01")
    assert result.n_params == 132_608 and torch.isfinite(result.estimates).all()


def test_a_failing_plot_loses_no_result(tmp_path, capsys, monkeypatch):
    from tyche.basin import plot

    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(plot, "plot_histogram", broken)
    out = tmp_path / "run"
    run = cli(capsys, "basin", "--n_samples", "3", "--preconditioners", "none,adam",
              "--out", str(out))  # fmt: skip
    assert run.code == 0
    assert "warning: could not draw the plots (RuntimeError: no display)" in run.err
    for kind in ("none", "adam"):
        assert VolumeResult.load(out / f"{kind}-cutoff0.01").estimates.shape == (3,)
    assert len(json.loads((out / "summary.json").read_text())) == 2
    assert "log P (nats)" in run.out  # the table is printed all the same


# ----------------------------------------------------------------------------- curves, λ, subsets
def _digits_curve(where=None, n: int = 8, cutoffs=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1)):
    """What `tyche basin` should compute, straight from the library (the oracle)."""
    from tyche.basin.core import estimate_basin
    from tyche.basin.loss import ModelLoss
    from tyche.basin.options import BasinOptions
    from tyche.zoo import load_digits_mlp

    mlp = load_digits_mlp()
    mask = None if where is None else where(mlp.y_train)
    loss = ModelLoss(mlp.model, mlp.x_train, where=mask)
    opts = BasinOptions(cutoffs=list(cutoffs), sigma=mlp.prior_sigma, n_samples=n)
    return estimate_basin(loss, loss.anchor, opts, progress=False)


def test_basin_lambda_and_where_on_digits(tmp_path, capsys):
    from tyche.basin import BasinCurve, LearningCoefficient, learning_coefficient

    out = tmp_path / "run"
    run = cli(capsys, "basin", "--n_samples", "8", "--lambda", "--where", "all;label=3",
              "--preconditioners", "none", "--out", str(out))  # fmt: skip
    assert run.code == 0, run.err
    # one search per direction for the whole --lambda scan, per subset
    for subset, where in (("all", None), ("label3", lambda y: y == 3)):
        curve = BasinCurve.load(out / f"none-{subset}-curve")
        expect = _digits_curve(where)
        # exact: the command runs estimate_basin on the same loss, seed and cutoffs, and a
        # direction's search does not depend on its batch (README: bit-identical for every
        # batch size); λ is then the same function of the same curve
        assert torch.equal(curve.estimates, expect.estimates)
        assert torch.equal(curve.n_evals, expect.n_evals)
        lam = LearningCoefficient.load(out / f"none-{subset}-lambda")
        assert lam.value == learning_coefficient(expect).value
        text = "all" if subset == "all" else "label=3"
        assert f"none {text}: λ = {lam.value:,.1f}" in run.out
        at = VolumeResult.load(out / f"none-{subset}-cutoff0.1")
        assert torch.equal(at.estimates, expect.estimates[:, -1])
    assert "each direction is searched once for all 5 cutoffs" in run.out
    summary = json.loads((out / "summary.json").read_text())
    assert {(r["subset"], r["cutoff"]) for r in summary} == {
        (t, c) for t in ("all", "label=3") for c in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    }
    # 8 directions are too few for k̂ (it needs 21): every log P is a lower bound only, k̂ is
    # inf (null in JSON), and λ's bootstrap numbers are a spread, not a confidence interval
    assert all(r["verdict"] == "lower bound only" and r["khat"] is None for r in summary)
    assert all(r["lambda_verdict"] == "lower bound only" for r in summary)
    assert all(r["lambda_ci"] is None and len(r["lambda_spread"]) == 2 for r in summary)
    assert "λ = " in run.out and "UNRELIABLE: lower bound only" in run.out
    assert "lower bound only (fewer than 21 directions cannot show the weights' tail)" in run.out
    assert (out / "cutoff_scan.png").stat().st_size > 10_000
    # 'all' is the run without --where, on the same directions
    plain = _digits_curve()
    assert torch.equal(BasinCurve.load(out / "none-all-curve").estimates, plain.estimates)


def test_basin_where_mask_file(tmp_path, capsys):
    import numpy as np
    from safetensors.torch import save_file

    from tyche.zoo import load_digits_mlp

    y = load_digits_mlp().y_train
    save_file({"m": y == 7}, str(tmp_path / "sevens.safetensors"))
    np.save(tmp_path / "sevens.npy", (y == 7).numpy())
    expect = _digits_curve(lambda labels: labels == 7, n=4, cutoffs=(1e-2,))
    for name in ("sevens.safetensors", "sevens.npy"):
        out = tmp_path / f"run-{name}"
        run = cli(capsys, "basin", "--n_samples", "4", "--preconditioners", "none", "--where",
                  f"mask={tmp_path / name}", "--out", str(out))  # fmt: skip
        assert run.code == 0, run.err
        got = VolumeResult.load(out / "none-mask-sevens-cutoff0.01")
        # exact: the same masked loss and seed through estimate_basin (bit-identical for every
        # batch size), the mask read back as the same booleans
        assert torch.equal(got.estimates, expect.estimates[:, 0])
    # a mask that does not fit the data is refused right after loading, in one line
    save_file({"m": torch.ones(5, dtype=torch.bool)}, str(tmp_path / "short.safetensors"))
    run = cli(capsys, "basin", "--where", f"mask={tmp_path / 'short.safetensors'}",
              "--out", str(tmp_path / "bad"))  # fmt: skip
    one_line_error(run, "basin", r"shape \(5,\) does not fit the evaluation data; it must "
                          r"be \(1024,\)")  # fmt: skip
    save_file({"a": y == 1, "b": y == 2}, str(tmp_path / "two.safetensors"))
    run = cli(capsys, "basin", "--where", f"mask={tmp_path / 'two.safetensors'}",
              "--out", str(tmp_path / "bad"))  # fmt: skip
    one_line_error(run, "basin", r"holds 2 tensors \(a, b\)")


def test_basin_max_memory_sets_the_batch_and_changes_nothing_else(tmp_path, capsys):
    args = ["basin", "--n_samples", "5", "--preconditioners", "none"]
    # a direction costs 2·D·4 bytes (draw, offset) + D·4 (θ+δ in the vmapped loss) = 57,720
    assert cli(capsys, *args, "--max_memory", "120KB", "--out", str(tmp_path / "a")).code == 0
    assert cli(capsys, *args, "--out", str(tmp_path / "b")).code == 0
    small = VolumeResult.load(tmp_path / "a" / "none-cutoff0.01")
    default = VolumeResult.load(tmp_path / "b" / "none-cutoff0.01")
    assert small.settings["batch_size"] == 2 and default.settings["batch_size"] == 5
    # exact, batches of 2 vs 5 directions: under vmap each offset gets its own matmuls of the
    # same shapes and its own per-row sums, and each ray stops on its own (README: bit-identical
    # for every batch size; measured identical under the 4 portable settings)
    assert torch.equal(small.estimates, default.estimates)
    run = cli(capsys, *args, "--max_memory", "1KB", "--out", str(tmp_path / "c"))
    one_line_error(run, "basin", r"max_memory=1,000 bytes holds not even one direction")


def test_basin_where_plays_on_a_language_model(tmp_path, capsys, lm_folder):
    out = tmp_path / "run"
    run = cli(capsys, "basin", "--model", str(lm_folder), "--data", "zoo:shakespeare",
              "--where", "play=hamlet;play=macbeth;all", "--n_sequences", "1", "--seq_len", "8",
              "--n_samples", "2", "--preconditioners", "none", "--out", str(out))  # fmt: skip
    assert run.code == 0, run.err
    assert "2 sequences × 8 tokens (1 of each of 2 plays)" in run.out
    res = {s: VolumeResult.load(out / f"none-{s}-cutoff0.01") for s in
           ("play-hamlet", "play-macbeth", "all")}  # fmt: skip
    assert torch.equal(res["all"].props, res["play-hamlet"].props)  # the same directions
    assert res["play-hamlet"].settings["where"] == "play=hamlet"
    # each play's rows make its mask (the tiny tokenizer reads Shakespeare as <unk>s, so the
    # radii themselves cannot tell the plays apart here)
    hashes = {r.settings["where_hash"] for r in res.values()}
    assert len(hashes) == 3


# ----------------------------------------------------------------------------- resume
def _interrupt_after_estimation(monkeypatch):
    """Make the run stop like Ctrl-C once every sample is checkpointed (before the report)."""
    from tyche.cli.basin import report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "finish", interrupted)


def test_resume_refuses_every_setting_that_changes_a_sample(
    tmp_path, capsys, monkeypatch, lm_folder, text_file
):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(lm_folder, model_dir)
    text = tmp_path / "text.txt"
    shutil.copy(text_file, text)
    out = tmp_path / "run"
    base = ["basin", "--model", str(model_dir), "--data", str(text), "--n_samples", "3",
            "--n_sequences", "2", "--seq_len", "8", "--preconditioners", "fisher",
            "--out", str(out)]  # fmt: skip
    with monkeypatch.context() as patch:
        _interrupt_after_estimation(patch)
        run = cli(capsys, *base)
    assert run.code == 130 and "--resume" in run.err and str(out / "checkpoints") in run.err
    assert not (out / "summary.json").exists()
    changes = [
        (["--eps", "10"], "--eps"),
        (["--exponent", "1"], "--exponent"),
        (["--sigma", "0.5"], "--sigma"),
        (["--cutoff", "0.1"], "--cutoffs"),
        (["--cutoffs", "1e-3,1e-2"], "--cutoffs"),
        (["--seed", "1"], "--seed"),
        (["--n_sequences", "3"], "--n_sequences"),
        (["--seq_len", "12"], "--seq_len"),
        (["--exclude", "gpt_neox.embed_in.*"], "--exclude"),
        (["--preconditioners", "none"], "--preconditioners"),
        (["--n_samples", "4"], "--n_samples"),
        (["--where", "all"], "--where"),
        (["--lambda"], "--cutoffs"),
    ]
    for extra, flag in changes:
        run = cli(capsys, *base, "--resume", *extra)
        one_line_error(run, "basin", rf"cannot --resume .* {flag} \(saved")
        assert run.seconds < FLAG_ERROR_SECONDS  # refused before the model is loaded
    # the case seen in the wild: two preconditioner settings at once, both named
    run = cli(capsys, *base, "--resume", "--eps", "10", "--exponent", "1")
    one_line_error(run, "basin", r"--eps \(saved 0.001, now 10\); --exponent")
    # the model's weights and the data's tokens are part of the run's identity too
    from conftest import build_neox

    original = (model_dir / "model.safetensors").read_bytes()
    build_neox(seed=1).save_pretrained(model_dir)
    run = cli(capsys, *base, "--resume")
    one_line_error(run, "basin", r"--model \(its weights changed\)")
    (model_dir / "model.safetensors").write_bytes(original)
    kept = text.read_text()
    text.write_text(kept.upper())
    run = cli(capsys, *base, "--resume")
    one_line_error(run, "basin", r"--data \(its tokens changed\)")
    text.write_text(kept)
    # with the saved settings it resumes, and equals an uninterrupted run
    run = cli(capsys, *base, "--resume")
    assert run.code == 0, run.err
    resumed = VolumeResult.load(out / "fisher-cutoff0.01")
    fresh_out = tmp_path / "fresh"
    assert cli(capsys, *base[:-1], str(fresh_out)).code == 0
    fresh = VolumeResult.load(fresh_out / "fisher-cutoff0.01")
    # exact: finished samples come back as their stored float64 bits, and whatever is
    # recomputed (Fisher draws seeded, directions seeded per index) runs the same ops in the
    # same order in this process
    assert torch.equal(resumed.estimates, fresh.estimates)  # same samples, bit for bit


def test_a_leftover_run_needs_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = ["basin", "--n_samples", "3", "--preconditioners", "none", "--out", str(out)]
    with monkeypatch.context() as patch:
        _interrupt_after_estimation(patch)
        assert cli(capsys, *args).code == 130
    run = cli(capsys, *args)
    one_line_error(run, "basin", r"holds an interrupted run: add --resume")
    assert cli(capsys, *args, "--resume").code == 0
    assert (out / "summary.json").is_file() and not (out / "checkpoints").exists()


def test_ctrl_c_says_where_the_work_is_and_how_to_resume(tmp_path):
    out = tmp_path / "run"
    args = ["basin", "--n_samples", "20000", "--batch_size", "1", "--preconditioners", "none",
            "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # A suite started as a background job (`nohup make test &`, some CI runners) inherits
    # SIGINT ignored, and so would the child, which then never sees the Ctrl-C below: any
    # handler here (not SIG_IGN) makes the child start with the default, like a terminal's.
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "tyche", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                                env=env)  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, ignored)
    first = out / "checkpoints" / "none" / "samples-rank0.safetensors"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.exists(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert f"finished directions are saved under {out / 'checkpoints'}/" in err
    assert f"tyche basin {' '.join(args[1:])} --resume" in err


# ----------------------------------------------------------------------------- help
def test_help_speaks_the_users_language(capsys):
    for argv in (["basin", "--help"], ["causal", "--help"], ["causal", "train-lens", "--help"]):
        run = cli(capsys, *argv)
        assert run.code == 0
        text = run.out
        assert "Command" not in text and "Config" not in text and "['" not in text
        assert "--noresume" not in text and "bool" not in text and "[str]" not in text
        assert text.count("(default: None)") == 0
    basin = cli(capsys, "basin", "--help").out
    assert "--resume, --no-resume" in basin and "--checkpoint, --no-checkpoint" in basin
    for flag in ("--exponent", "--seed", "--data", "--sigma"):
        line = basin.split(flag, 1)[1].split("\n--", 1)[0]
        assert len(line.split()) > 3, f"{flag} has no help text"


def test_every_flag_has_help_text():
    """A flag without a docstring cannot be registered (the parser refuses to build)."""
    from dataclasses import dataclass as dc

    from tyche.cli.basin import BasinConfig
    from tyche.cli.causal import CausalConfig, TrainLensConfig
    from tyche.cli.commandline import build_parser

    for cls in (BasinConfig, CausalConfig, TrainLensConfig):
        build_parser(cls, "tyche test")

    @dc
    class Undocumented:
        value: int = 1

    with pytest.raises(TypeError, match="has no docstring"):
        build_parser(Undocumented, "tyche test")


# ----------------------------------------------------------------------------- causal
def test_n_starts_reaches_the_extraction(tmp_path, capsys, lm_folder, text_file):
    from tyche.causal import CausalBasis

    common = ["causal", "--model", str(lm_folder), "--data", str(text_file), "--seq_len", "16",
              "--n_sequences", "6", "--k", "1", "--sites", "resid_pre.1", "--max_iter", "8",
              "--n_pca", "0", "--no-plot"]  # fmt: skip
    one = cli(capsys, *common, "--n_starts", "1", "--out", str(tmp_path / "one"))
    three = cli(capsys, *common, "--n_starts", "3", "--out", str(tmp_path / "three"))
    assert one.code == 0 and three.code == 0, three.err
    assert f"data {text_file}: 6 sequences × 16 tokens" in three.out
    single = CausalBasis.load(tmp_path / "one" / "resid_pre.1")
    multi = CausalBasis.load(tmp_path / "three" / "resid_pre.1")
    assert single.settings["n_starts"] == 1 and multi.settings["n_starts"] == 3
    summary = json.loads((tmp_path / "three" / "summary.json").read_text())
    assert summary["config"]["n_starts"] == 3
    # the best of 3 starts includes the single run's start (the best candidate), run
    # identically, so it can only be at least as high
    assert float(multi.energies[0]) >= float(single.energies[0])


def test_refine_fast_and_cache_flags_reach_the_extraction(tmp_path, capsys, lm_folder, text_file):
    from tyche.causal import CausalBasis

    common = ["causal", "--model", str(lm_folder), "--data", str(text_file), "--seq_len", "16",
              "--n_sequences", "6", "--k", "3", "--sites", "resid_pre.1", "--max_iter", "20",
              "--n_pca", "0", "--no-plot"]  # fmt: skip
    joint = cli(capsys, *common, "--refine", "joint", "--cache_gb", "0", "--out",
                str(tmp_path / "joint"))  # fmt: skip
    plain = cli(capsys, *common, "--no-fast", "--out", str(tmp_path / "plain"))
    assert joint.code == 0 and plain.code == 0, (joint.err, plain.err)
    refined = CausalBasis.load(tmp_path / "joint" / "resid_pre.1")
    assert refined.settings["refine"] == "joint" and refined.settings["fast"]
    assert refined.settings["cache_gb"] == 0 and refined.settings["cached_fraction"] == 0
    greedy = refined.greedy_subspace_energies
    assert greedy is not None and float(refined.subspace_energies[-1]) >= float(greedy[-1])
    assert "joint energy of the first i directions" in joint.out
    summary = json.loads((tmp_path / "joint" / "summary.json").read_text())
    assert summary["sites"]["resid_pre.1"]["greedy_subspace_energies"] == greedy.tolist()
    general = CausalBasis.load(tmp_path / "plain" / "resid_pre.1")
    assert not general.settings["fast"] and general.settings["refine"] == "none"
    assert general.greedy_subspace_energies is None and general.settings["cached_fraction"] == 0
    assert "joint energy of the first i" not in plain.out


# ----------------------------------------------------------------------------- torchrun
@pytest.mark.distributed
def test_basin_under_torchrun_prints_once_and_equals_one_process(tmp_path, capsys):
    from conftest import run_torchrun

    args = ["basin", "--n_samples", "5", "--batch_size", "2", "--preconditioners", "none"]
    proc = run_torchrun("-m", "tyche", *args, "--out", str(tmp_path / "two"), timeout=300)
    assert proc.stdout.count("settings: ") == 1 and proc.stdout.count("log P (nats)") == 1
    assert cli(capsys, *args, "--out", str(tmp_path / "one")).code == 0
    two = VolumeResult.load(tmp_path / "two" / "none-cutoff0.01")
    one = VolumeResult.load(tmp_path / "one" / "none-cutoff0.01")
    # directions are seeded per index and each is searched alone: ranks change nothing.
    # Exact, although rank 0's batches ([0, 1], [2]) differ from one process's ([0, 1], [2, 3],
    # [4]): under vmap each offset gets its own matmuls of the same shapes and its own per-row
    # sums, so a direction's loss does not depend on what shares its batch (measured identical
    # under 1 and 2 threads and ATEN_CPU_CAPABILITY=default)
    assert torch.equal(two.estimates, one.estimates)


# ----------------------------------------------------------------------------- the flags' words
NEGATIVE_NUMBERS = [  # argparse once took these for flags ("expected one argument")
    (["basin", "--cutoff", "-1e-2"], r"--cutoff must be greater than 0, got -0.01"),
    (["basin", "--cutoffs", "-1e-2,1e-3"], r"--cutoffs: -1e-2 must be a positive"),
    (["basin", "--sigma", "-.5"], r"--sigma must be greater than 0, got -0.5"),
    (["basin", "--cutoff", "-inf"], r"--cutoff: '-inf' is not a finite number"),
    (["causal", "train-lens", "--lr", "-1e-3"], r"--lr must be greater than 0, got -0.001"),
    (["codebook", "train", "--lr", "-1e-3"], r"--lr must be greater than 0, got -0.001"),
    (["interaction", "build", "--truncation_threshold", "-1e-3"],
     r"--truncation_threshold must be at least 0, got -0.001"),
]  # fmt: skip


@pytest.mark.parametrize("args,pattern", NEGATIVE_NUMBERS, ids=lambda x: " ".join(x)[:40])
def test_a_negative_number_is_a_value_the_command_checks(args, pattern, tmp_path, capsys):
    run = cli(capsys, *args, "--out", str(tmp_path / "out"))
    one_line_error(run, args[0], pattern)


#: (command, its data and length flags) of every command that cuts --data into sequences
TEXT_COMMANDS = [
    (["basin"], "--seq_len"),
    (["causal"], "--seq_len"),
    (["causal", "train-lens"], "--seq_len"),
    (["codebook", "train"], "--seq_len"),
    (["interaction", "build"], "--seq_len"),
]


@pytest.mark.parametrize(("command", "flag"), TEXT_COMMANDS, ids=lambda x: str(x))
def test_too_little_text_is_said_in_the_commands_flags(command, flag, tmp_path, capsys, lm_folder):
    """Fewer tokens than one sequence: the message names --data and the length flag, not the
    library's keywords (chunking=False, max_seq_len=)."""
    text = tmp_path / "short.txt"
    text.write_text("the king and the queen. " * 3)  # 18 tokens
    run = cli(capsys, *command, "--model", str(lm_folder), "--data", str(text), flag, "40",
              "--out", str(tmp_path / "out"))  # fmt: skip
    said = (rf"--data {text} has only 18 tokens \(1 document\), fewer than one sequence of "
            rf"{flag} 40; give a smaller {flag}")
    one_line_error(run, command[0], said)
    assert "chunking" not in run.err and "max_seq_len=" not in run.err


INTERACTION_SETTINGS = [
    (["--basis", "neuron"], r"cannot be centred: give --no-center"),
    (["--basis", "(1-alpha)^2"],
     r"use --integration trapezoidal or gauss-legendre with --n_intervals above 0"),
    (["--edges", "functional", "--n_stochastic_sources", "2"],
     r"drop --n_stochastic_sources or use --edges squared"),
    (["--basis", "svd", "--n_stochastic_sources_hidden", "2"],
     r"--n_stochastic_sources_hidden only applies to the jacobian basis"),
    (["--n_intervals", "2"], r"'gradient' rule .* so --n_intervals must be 0 \(got 2\)"),
]  # fmt: skip


@pytest.mark.parametrize("args,pattern", INTERACTION_SETTINGS, ids=lambda x: " ".join(x)[:40])
def test_interaction_build_says_its_settings_in_flags(args, pattern, tmp_path, capsys):
    run = cli(capsys, "interaction", "build", *args, "--out", str(tmp_path / "g"))
    one_line_error(run, "interaction", pattern)
    assert "=False" not in run.err and "integration='" not in run.err


def test_basin_eps_zero_on_a_zero_spectrum_names_the_flag(tmp_path, capsys):
    """zoo:digits-mlp's inputs have pixels that are 0 in every image: the Fisher diagonal of
    their weights is 0."""
    run = cli(capsys, "basin", "--eps", "0", "--preconditioners", "fisher", "--n_samples", "2",
              "--out", str(tmp_path / "b"))  # fmt: skip
    said = (r"--preconditioners fisher: \d+ entries of the Fisher diagonal are zero and "
            r"--eps is 0, .*; give --eps above 0")
    one_line_error(run, "basin", said)
    assert "eps=0" not in run.err


def test_a_lens_of_another_model_is_refused_in_flags(tmp_path, capsys, lm_folder, text_file):
    from conftest import build_neox, make_tiny_tokenizer

    other = tmp_path / "other"
    build_neox(seed=1).save_pretrained(other)
    make_tiny_tokenizer().save_pretrained(other)
    common = ["--data", str(text_file), "--seq_len", "16", "--n_sequences", "4"]
    lens = tmp_path / "lens"
    run = cli(capsys, "causal", "train-lens", "--model", str(lm_folder), *common, "--steps", "1",
              "--out", str(lens))  # fmt: skip
    assert run.code == 0, run.err
    run = cli(capsys, "causal", "--model", str(other), *common, "--target", "tuned", "--lens",
              str(lens), "--out", str(tmp_path / "bases"))  # fmt: skip
    said = (rf"--lens {lens} was trained on another model \(hash \w+\), not on --model {other} "
            r".*tyche causal train-lens --model")
    one_line_error(run, "causal", said)
    assert "strict=False" not in run.err


def test_an_internal_error_keeps_its_traceback_and_asks_for_a_report(capsys, monkeypatch):
    """Only errors raised on purpose about input print as one line; a ValueError from a bug
    (here planted in the zoo command) prints its traceback and asks for a bug report."""
    from tyche.cli import zoo

    def broken(argv):
        raise ValueError("an internal slip")

    monkeypatch.setattr(zoo, "main", broken)
    run = cli(capsys, "zoo", "list")
    assert run.code == 1, run
    assert "Traceback (most recent call last)" in run.err and "an internal slip" in run.err
    assert "this is a bug in tyche, not in your input: please report it" in run.err

    def bad_input(argv):
        from tyche.errors import InputError

        raise InputError("give a smaller --thing")

    monkeypatch.setattr(zoo, "main", bad_input)
    one_line_error(cli(capsys, "zoo", "list"), "zoo", r"give a smaller --thing")
