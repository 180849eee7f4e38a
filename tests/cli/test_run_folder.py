"""Output folders a run owns: a lock on --out, no silent overwrite, resumes that never mix runs.

Everything goes through the command line the user meets (``tyche ...`` in-process, or the
real ``python -m tyche`` where a Ctrl-C is needed), on the tiny models and zoo entries the
other CLI tests use.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli, one_line_error
from tyche.cli.run_folder import LOCK_FILE, RECORD_FILE
from tyche.errors import InputError

#: a refusal that comes before any model loads is this fast in-process
AT_ONCE_SECONDS = 1.0


def _train_args(lm_folder: Path, text_file: Path, out: Path) -> list[str]:
    """A codebook training run of two steps on the tiny model (k = 2 of 8 codes)."""
    return ["codebook", "train", "--model", str(lm_folder), "--data", str(text_file),
            "--seq_len", "16", "--sites", "mlp_out.0", "--num_codes", "8", "--k", "2",
            "--steps", "2", "--batch_size", "2", "--eval_sequences", "2",
            "--out", str(out)]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory, lm_folder, text_file) -> tuple[list[str], Path]:
    """The arguments and --out of a finished two-step codebook training run."""
    from tyche.__main__ import main

    out = tmp_path_factory.mktemp("cb") / "run"
    args = _train_args(lm_folder, text_file, out)
    main(args)
    return args, out


def _no_loading(monkeypatch: pytest.MonkeyPatch, *targets: str) -> None:
    def loaded(*_a, **_k):
        raise AssertionError("a model was loaded")

    for target in targets:
        monkeypatch.setattr(target, loaded)


# ----------------------------------------------------------------------------- the lock
#: (command line, the function that loads its model); each is refused before it is called
LOCKED = {
    "basin": (["basin"], "tyche.cli.basin._setup"),
    "causal": (["causal"], "tyche.cli.causal._load"),
    "causal train-lens": (["causal", "train-lens"], "tyche.cli.causal._load"),
    "codebook train": (["codebook", "train"], "tyche.cli.codebook.train.load_model"),
    "codebook cache": (["codebook", "cache"], "tyche.cli.codebook.tools.load_model"),
    "interaction build": (["interaction", "build"], "tyche.cli.interaction.load_source"),
}


def _lock_of(pid: int, command: str, process_start: str | None = None) -> str:
    from tyche.cli.run_folder import _process_start

    start = _process_start(pid) if process_start is None else process_start
    return json.dumps({"pid": pid, "hostname": socket.gethostname(), "process_start": start,
                       "command": command, "started": "2025-01-02 03:04:05"})  # fmt: skip


@pytest.fixture()
def live_process():
    """A process that stays alive for the test (its PID owns a lock)."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("name", list(LOCKED))
def test_a_second_run_into_a_locked_folder_is_refused_at_once(
    name, tmp_path, capsys, monkeypatch, live_process
) -> None:
    argv, loader = LOCKED[name]
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(_lock_of(live_process.pid, "tyche basin --n_samples 64"))
    _no_loading(monkeypatch, loader)
    run = cli(capsys, *argv, "--out", str(out))
    command = argv[0]
    line = one_line_error(run, command, rf"--out {re.escape(str(out))} is in use by another run")
    assert f"PID {live_process.pid} (tyche basin --n_samples 64)" in line
    assert "started 2025-01-02 03:04:05" in line
    assert line.endswith("wait for it to finish, or choose another --out")
    assert run.seconds < AT_ONCE_SECONDS
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == live_process.pid  # untouched


def test_a_stale_lock_is_taken_over_and_released_after_an_error(
    tmp_path, capsys, monkeypatch, live_process
) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()  # its PID names no process now
    out = tmp_path / "out"
    seen = []

    def loader(*_a, **_k):  # the lock is this process's while the run works
        seen.append(json.loads((out / LOCK_FILE).read_text())["pid"])
        raise InputError("stopped after the lock")  # an input error: one line, exit 2

    monkeypatch.setattr("tyche.cli.basin._setup", loader)
    cases = [
        (gone.pid, None),
        (live_process.pid, "1"),  # a live PID that started after the lock: a reused PID
    ]
    for pid, start in cases:
        out.mkdir(exist_ok=True)
        (out / LOCK_FILE).write_text(_lock_of(pid, "tyche basin --seed 1", start))
        run = cli(capsys, "basin", "--out", str(out))
        assert run.code == 2, run.err
        note, error = run.err.strip().splitlines()
        assert note == (
            f"tyche basin: note: took over the lock of {out} left by PID {pid} (tyche basin "
            "--seed 1), started 2025-01-02 03:04:05, which is no longer running"
        )
        assert error == "tyche basin: error: stopped after the lock"
        assert not (out / LOCK_FILE).exists()  # released after the error
        assert not (out / RECORD_FILE).exists()  # nothing was written: no record either
    assert seen == [os.getpid(), os.getpid()]


def test_the_lock_is_held_during_a_run_and_released_after_it(tmp_path, capsys, monkeypatch):
    from tyche.cli.basin import report

    out = tmp_path / "out"
    finish = report.finish
    held = []

    def finishing(*args, **kwargs):
        held.append(json.loads((out / LOCK_FILE).read_text()))
        return finish(*args, **kwargs)

    monkeypatch.setattr(report, "finish", finishing)
    run = cli(capsys, "basin", "--n_samples", "2", "--preconditioners", "none", "--out", str(out))
    assert run.code == 0, run.err
    assert held[0]["pid"] == os.getpid() and held[0]["hostname"] == socket.gethostname()
    assert set(held[0]) >= {"process_start", "command", "started"}
    assert not (out / LOCK_FILE).exists()
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["finished"] and record["command"] == "tyche basin"
    assert record["settings"]["--n_samples"] == 2


def test_only_rank_0_locks_and_records(tmp_path, monkeypatch, live_process) -> None:
    from tyche.cli.commandline import CommandError
    from tyche.cli.run_folder import Owned, claim_folder

    monkeypatch.setenv("RANK", "1")
    with claim_folder(tmp_path / "out", "tyche basin", {"--seed": 0}, Owned()):
        assert not (tmp_path / "out" / LOCK_FILE).exists()
    assert not (tmp_path / "out" / RECORD_FILE).exists()
    monkeypatch.setenv("RANK", "0")
    with claim_folder(tmp_path / "out", "tyche basin", {"--seed": 0}, Owned()):
        assert (tmp_path / "out" / LOCK_FILE).exists()
    assert not (tmp_path / "out" / LOCK_FILE).exists()
    assert json.loads((tmp_path / "out" / RECORD_FILE).read_text())["finished"]
    # taking the lock itself (not only the early check) refuses a live holder
    (tmp_path / "out" / LOCK_FILE).write_text(_lock_of(live_process.pid, "tyche basin"))
    held = rf"in use by another run: PID {live_process.pid} "
    with (
        pytest.raises(CommandError, match=held),
        claim_folder(tmp_path / "out", "tyche basin", {"--seed": 0}, Owned()),
    ):
        pass


# ----------------------------------------------------------------------------- no overwrite
def test_basin_refuses_a_finished_run_of_other_settings(tmp_path, capsys, monkeypatch) -> None:
    from tyche.basin.result import VolumeResult

    out = tmp_path / "basin"
    first = ["basin", "--n_samples", "3", "--preconditioners", "none,adam", "--out", str(out)]
    assert cli(capsys, *first).code == 0
    (out / "notes.txt").write_text("the user's own file")
    second = ["basin", "--n_samples", "2", "--preconditioners", "none", "--out", str(out)]
    with monkeypatch.context() as patch:
        _no_loading(patch, "tyche.cli.basin._setup")
        run = cli(capsys, *second)
    line = one_line_error(run, "basin", "holds a finished run of other settings")
    assert line.endswith(
        f"--out {out} holds a finished run of other settings: --preconditioners (saved "
        "none,adam, now none); --n_samples (saved 3, now 2); choose another --out, or pass "
        "--overwrite to replace it"
    )
    assert VolumeResult.load(out / "adam-cutoff0.01").estimates.shape == (3,)  # kept
    assert cli(capsys, *second, "--overwrite").code == 0
    assert not (out / "adam-cutoff0.01").exists()  # the old run's result is gone
    assert VolumeResult.load(out / "none-cutoff0.01").estimates.shape == (2,)
    assert [r["preconditioner"] for r in json.loads((out / "summary.json").read_text())] == ["none"]
    assert (out / "notes.txt").read_text() == "the user's own file"  # not ours: kept
    assert cli(capsys, *second).code == 0  # the same settings may run again
    (out / RECORD_FILE).unlink()  # as an older version left it: results and no record
    run = cli(capsys, *second)
    one_line_error(run, "basin", r"holds results \(.*none-cutoff0\.01.*\) with no record of the "
                                 r"settings that made them .* pass --overwrite")  # fmt: skip
    assert cli(capsys, *second, "--overwrite").code == 0


def test_interaction_build_and_plot_refuse_to_replace(tmp_path, capsys) -> None:
    out = tmp_path / "g"
    build = ["interaction", "build", "--model", "zoo:digits-mlp", "--n_rows", "60"]
    assert cli(capsys, *build, "--out", str(out)).code == 0
    assert (out / "graph").is_dir() and (out / "graph.png").is_file()
    bases_only = [*build, "--edges", "none", "--out", str(out)]
    run = cli(capsys, *bases_only)
    one_line_error(run, "interaction", r"holds a finished run of other settings: --edges \(saved "
                                       r"squared, now none\); choose another --out")  # fmt: skip
    assert cli(capsys, *bases_only, "--overwrite").code == 0
    assert (out / "bases").is_dir()
    assert not (out / "graph").exists() and not (out / "graph.png").exists()  # no stale edges
    assert cli(capsys, *bases_only).code == 0  # the same settings may run again
    # plot: the build's own graph.png is not replaced without --overwrite
    drawn = tmp_path / "drawn"
    assert cli(capsys, *build, "--out", str(drawn)).code == 0
    png = drawn / "graph.png"
    before = png.stat().st_mtime_ns
    run = cli(capsys, "interaction", "plot", "--graph", str(drawn), "--labels")
    one_line_error(run, "interaction", rf"--out {re.escape(str(png))}: a figure is there "
                                       r"already; choose another --out \(e\.g\. .*graph-2\.png\), "
                                       r"or pass --overwrite to replace it")  # fmt: skip
    assert png.stat().st_mtime_ns == before
    other = drawn / "labelled.png"
    assert cli(capsys, "interaction", "plot", "--graph", str(drawn), "--out", str(other)).code == 0
    assert other.is_file()
    run = cli(capsys, "interaction", "plot", "--graph", str(drawn), "--labels", "--overwrite")
    assert run.code == 0 and png.stat().st_mtime_ns != before


def test_codebook_cache_refuses_a_cache_of_other_settings(
    tmp_path, capsys, trained, text_file
) -> None:
    _, model = trained
    out = tmp_path / "cache"
    first = ["codebook", "cache", "--model", str(model), "--data", str(text_file), "--seq_len",
             "16", "--n_sequences", "4", "--copy_model", "--out", str(out)]  # fmt: skip
    assert cli(capsys, *first).code == 0
    assert (out / "model" / "config.json").is_file()
    second = [*first[:-2], "--n_sequences", "5", "--no-copy_model", "--out", str(out)]
    run = cli(capsys, *second)
    line = one_line_error(run, "codebook", "holds a finished run of other settings")
    assert "--n_sequences (saved 4, now 5)" in line and "--copy_model (saved on, now off)" in line
    assert cli(capsys, *second, "--overwrite").code == 0
    assert not (out / "model").exists()  # the old cache's model copy is gone
    assert json.loads((out / "manifest.json").read_text())["n_sequences"] == 5
    assert cli(capsys, *second, "--batch_size", "3").code == 0  # same results: allowed


# ----------------------------------------------------------------------------- codebook resume
RESUME_CHANGES = [
    (["--k", "1"], r"--k \(saved 2, now 1\)"),
    (["--num_codes", "6"], r"--num_codes \(saved 8, now 6\)"),
    (["--sites", "mlp_out.1"], r"--sites \(saved mlp_out\.0, now mlp_out\.1\)"),
    (["--steps", "3"], r"--steps \(saved 2, now 3\)"),
    (["--seq_len", "12"], r"--seq_len \(saved 16, now 12\)"),
    (["--seed", "1"], r"--seed \(saved 0, now 1\)"),
    (["--eval_sequences", "3"], r"--eval_sequences \(saved 2, now 3\)"),
    (["--from_scratch"], r"--from_scratch \(saved off, now on\)"),
    (["--kmeans_init"], r"--kmeans_init \(saved off, now on\)"),
]


@pytest.mark.parametrize("change,pattern", RESUME_CHANGES, ids=lambda x: " ".join(x)[:24])
def test_codebook_resume_refuses_a_changed_setting_by_name(
    change, pattern, trained, capsys, monkeypatch
) -> None:
    args, out = trained
    _no_loading(monkeypatch, "tyche.cli.codebook.train.load_model")
    run = cli(capsys, *args, "--resume", *change)
    one_line_error(run, "codebook", rf"cannot --resume the run in {re.escape(str(out))}: these "
                                    rf"settings differ from it: {pattern}\. Resume with the "
                                    r"saved settings")  # fmt: skip
    assert run.seconds < AT_ONCE_SECONDS


def test_codebook_resume_with_the_same_settings_works(trained, capsys) -> None:
    from tyche.codebook.model import CodebookModel

    args, out = trained
    run = cli(capsys, *args, "--resume", "--log_every", "1", "--checkpoint_every", "1")
    assert run.code == 0, run.err
    layer = CodebookModel.from_pretrained(out).codebook("mlp_out.0")
    assert (layer.num_codes, layer.k) == (8, 2)
    assert json.loads((out / "train_args.json").read_text())["k"] == 2


def test_train_codebooks_refuses_another_layout_by_name(gpt2_model, tmp_path) -> None:
    """The library checks the codebook layout itself: a changed k is named (it was taken
    silently), a changed num_codes too (it was a raw state_dict size error)."""
    import copy

    import torch

    from tyche.codebook.model import attach
    from tyche.codebook.train import SettingsMismatch, TrainConfig, row_sampler, train_codebooks

    rows = torch.randint(3, 512, (8, 8), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=1, batch_size=2, warmup_steps=1)

    def model(**kw):
        return attach(copy.deepcopy(gpt2_model), ["mlp_out.0"], **{"num_codes": 8, "k": 2, **kw})

    train_codebooks(model(), row_sampler(rows, 2), cfg, out=tmp_path, progress=False,
                    extra_settings={"data": "rows"})  # fmt: skip
    cases = [
        (model(k=1), {}, {"k": (2, 1)}),
        (model(num_codes=6), {}, {"num_codes": (8, 6)}),
        (model(), {"data": "other"}, {"data": ("rows", "other")}),
    ]
    for again, extra, expected in cases:
        with pytest.raises(SettingsMismatch) as caught:
            settings = {"data": "rows", **extra}
            train_codebooks(again, row_sampler(rows, 2), cfg, out=tmp_path, resume=True,
                            progress=False, extra_settings=settings)  # fmt: skip
        assert caught.value.differences == expected
    train_codebooks(model(), row_sampler(rows, 2), cfg, out=tmp_path, resume=True,
                    progress=False, extra_settings={"data": "rows"})  # fmt: skip


def test_codebook_train_refuses_a_finished_run_of_other_settings(
    trained, capsys, monkeypatch, lm_folder, text_file, tmp_path
) -> None:
    args, out = trained
    _no_loading(monkeypatch, "tyche.cli.codebook.train.load_model")
    run = cli(capsys, *args, "--k", "1")
    one_line_error(run, "codebook", rf"--out {re.escape(str(out))} holds a finished run of other "
                                    r"settings: --k \(saved 2, now 1\)")  # fmt: skip
    run = cli(capsys, *args, "--model", str(out), "--overwrite")
    one_line_error(run, "codebook", r"--overwrite would remove --model .* which lies in --out")


def _interrupt(args: list[str], cwd: Path, ready: Path) -> str:
    """Run ``python -m tyche ARGS``, press Ctrl-C once ``ready`` exists; its stderr."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # a suite started in the background inherits SIGINT ignored; any handler here makes the
    # child start with the default one, as from a terminal
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "tyche", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, ignored)
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    return err


def test_codebook_ctrl_c_prints_a_resume_line_that_resumes(
    tmp_path, capsys, lm_folder, text_file
) -> None:
    from tyche.codebook.train import TrainResult

    out = tmp_path / "run"
    args = [*_train_args(lm_folder, text_file, out)[:-2], "--steps", "300",
            "--checkpoint_every", "1", "--log_every", "100", "--out", str(out)]  # fmt: skip
    err = _interrupt(args, tmp_path, out / "checkpoint" / "trainer_state.json")
    hint = f"the last checkpoint is in {out}/checkpoint; continue with: "
    assert hint in err, err[-2000:]
    line = err.split(hint, 1)[1].splitlines()[0]
    assert line == f"tyche codebook train {shlex.join(args[2:])} --resume"
    words = shlex.split(line)
    assert words[:3] == ["tyche", "codebook", "train"]
    run = cli(capsys, *words[1:])
    assert run.code == 0, run.err
    history = TrainResult.load(out / "train_result").history
    assert [h["step"] for h in history] == [100, 200, 300]
    assert not (out / LOCK_FILE).exists()


def test_basin_run_without_argv_prints_its_own_flags(tmp_path, capsys, monkeypatch) -> None:
    """The library entry point builds its resume line from the command it was given."""
    from tyche.cli import commandline
    from tyche.cli.basin import BasinConfig, report, run_basin

    out = tmp_path / "run"
    with monkeypatch.context() as patch:

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        patch.setattr(report, "finish", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_basin(BasinConfig(n_samples=2, preconditioners="none", out=str(out)))
    hint = commandline.interrupt_hint() or ""
    line = hint.rsplit("\n", 1)[-1].strip()
    assert line == f"tyche basin --n_samples 2 --preconditioners none --out {out} --resume"
    assert cli(capsys, *shlex.split(line)[1:]).code == 0
    assert (out / "summary.json").is_file() and not (out / LOCK_FILE).exists()


def test_ctrl_c_while_a_checkpoint_is_swapped_in_keeps_one(gpt2_model, tmp_path, monkeypatch):
    """Ctrl-C between removing the old checkpoint and renaming the new one into place left
    no checkpoint at all; it now waits for the swap."""
    import copy

    import torch

    from tyche.codebook import train as train_module
    from tyche.codebook.model import attach

    rows = torch.randint(3, 512, (8, 8), generator=torch.Generator().manual_seed(0))
    cfg = train_module.TrainConfig(steps=2, batch_size=2, warmup_steps=1, checkpoint_every=1)
    rmtree = train_module.shutil.rmtree

    def rmtree_then_ctrl_c(path, *args, **kwargs):
        rmtree(path, *args, **kwargs)
        if Path(path).name == train_module.CHECKPOINT:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal is handled here, between the removal and the rename

    monkeypatch.setattr(train_module.shutil, "rmtree", rmtree_then_ctrl_c)
    cb = attach(copy.deepcopy(gpt2_model), ["mlp_out.0"], num_codes=8)
    with pytest.raises(KeyboardInterrupt):
        train_module.train_codebooks(cb, train_module.row_sampler(rows, 2), cfg, out=tmp_path,
                                     progress=False)  # fmt: skip
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2


def test_the_cache_files_the_command_owns_are_those_the_cache_writes() -> None:
    """``tyche codebook cache`` names a cache's files without importing torch (its flag checks
    stay fast): the names must be the library's own."""
    from tyche.cli.codebook.folders import OWNED
    from tyche.codebook import cache

    written = {cache.MANIFEST, cache.CODES, cache.TOKENS, cache.TEXTS, cache.NEURONS,
               cache.MODEL_DIR}  # fmt: skip
    assert set(OWNED["cache"].names) == written
