"""Resuming a causal basis extraction: `tyche causal --resume` and BasisCheckpoint.

An interrupted run keeps its finished sites and directions in ``--out/checkpoints/``; a resumed
run loads them instead of computing them again and gives the bases of an uninterrupted run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import build_neox, cli, one_line_error
from tyche.causal import CausalBasis, CausalOptions, extract_causal_bases
from tyche.causal.checkpoint import BasisCheckpoint, PartialBasis
from tyche.resume import SettingsMismatch

#: flags of a tiny run: 2 sites (resid_pre.0, resid_pre.1) × 3 directions, well under a second
TINY = ["--seq_len", "16", "--n_sequences", "8", "--k", "3", "--max_iter", "5", "--n_pca", "2",
        "--no-plot"]  # fmt: skip
#: runs `tyche causal` with every saved direction followed by a pause, so that a Ctrl-C sent
#: once a checkpoint appears lands while the run is still going (the computation is untouched)
SLOWED = """
import sys, time
from tyche.causal import checkpoint
save = checkpoint.BasisCheckpoint.save_direction
def slowed(self, partial):
    save(self, partial)
    time.sleep(1.0)
checkpoint.BasisCheckpoint.save_direction = slowed
from tyche.__main__ import main
main(sys.argv[1:])
"""


def _tyche(args: list[str], cwd: Path, *, slowed: bool = False) -> subprocess.Popen:
    """Start ``tyche ARGS`` in a child process (one thread, as every child here)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("TYCHE_DEBUG", None)
    head = ["-c", SLOWED] if slowed else ["-m", "tyche"]
    # a suite started in the background inherits SIGINT ignored, and so would the child: any
    # handler here (not SIG_IGN) makes the child start with the default, like a terminal's
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([sys.executable, *head, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, ignored)


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def test_resume_after_ctrl_c_gives_the_uninterrupted_bases(tmp_path, lm_folder, text_file):
    """The issue's acceptance test: Ctrl-C (a real SIGINT) once a site and a direction of the
    next are checkpointed, then `--resume`: every basis equals an uninterrupted run's, and the
    saved site and direction were loaded, not computed again."""
    base = ["causal", "--model", str(lm_folder), "--data", str(text_file), *TINY]
    out, fresh = tmp_path / "run", tmp_path / "fresh"
    proc = _tyche([*base, "--out", str(out)], tmp_path, slowed=True)
    checkpoints = out / "checkpoints"
    second = checkpoints / "partial" / "resid_pre.1"  # appears once resid_pre.0 is finished
    deadline = time.monotonic() + 180
    while not second.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert second.is_dir(), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    code, _, err = _finish(proc)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err
    assert f"finished sites and directions are saved under {checkpoints}/" in err
    assert f"tyche causal {' '.join(base[1:])} --out {out} --resume" in err
    assert not (out / "summary.json").exists()
    saved_site = CausalBasis.load(checkpoints / "sites" / "resid_pre.0")
    saved_part = PartialBasis.load(second)
    assert saved_site.k == 3 and 1 <= saved_part.k < 3

    resumed = _tyche([*base, "--out", str(out), "--resume"], tmp_path)
    uninterrupted = _tyche([*base, "--out", str(fresh)], tmp_path)
    (code, printed, err), (fresh_code, _, fresh_err) = _finish(resumed), _finish(uninterrupted)
    assert code == 0, err[-3000:]
    assert fresh_code == 0, fresh_err[-3000:]
    assert f"resumed: {3 + saved_part.k} directions (1 finished sites) loaded" in printed
    assert not checkpoints.exists()  # removed once the run finished
    for site in ("resid_pre.0", "resid_pre.1"):
        a, b = CausalBasis.load(out / site), CausalBasis.load(fresh / site)
        # same path: the same model, tokens and flags in the same one-thread process setup;
        # loaded directions are the saved float32 bits, the rest repeat the same ops in order
        for name in ("vectors", "energies", "subspace_energies", "pca_energies"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (site, name)
        assert a.n_evals == b.n_evals
    # loaded, not recomputed: a site's and a direction's wall-clock times come back as saved
    assert CausalBasis.load(out / "resid_pre.0").seconds == saved_site.seconds
    assert set(saved_part.seconds) <= set(CausalBasis.load(out / "resid_pre.1").seconds)


def _interrupt_after(monkeypatch, n: int) -> None:
    """Make an in-process run stop like Ctrl-C right after its n-th direction is saved."""
    save = BasisCheckpoint.save_direction
    calls = []

    def interrupted(self, partial):
        save(self, partial)
        calls.append(partial)
        if len(calls) == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(BasisCheckpoint, "save_direction", interrupted)


def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys, monkeypatch, lm_folder,
                                                text_file):  # fmt: skip
    model_dir, text = tmp_path / "model", tmp_path / "text.txt"
    shutil.copytree(lm_folder, model_dir)
    shutil.copy(text_file, text)
    out = tmp_path / "run"
    base = ["causal", "--model", str(model_dir), "--data", str(text), *TINY, "--out", str(out)]
    # nothing to resume yet
    run = cli(capsys, *base, "--resume")
    one_line_error(run, "causal", rf"--resume: no interrupted run under {out / 'checkpoints'}")
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2)
        run = cli(capsys, *base)
    assert run.code == 130 and "--resume" in run.err
    one_line_error(cli(capsys, *base, "--resume", "--overwrite"), "causal",
                   r"--overwrite discards the run that --resume continues")  # fmt: skip
    one_line_error(cli(capsys, *base), "causal", r"holds an interrupted run: add --resume")
    for extra, named in [
        (["--k", "2"], r"--k \(saved 3, now 2\)"),
        (["--max_iter", "6"], r"--max_iter \(saved 5, now 6\)"),
        (["--seed", "1"], r"--seed \(saved 0, now 1\)"),
        (["--mode", "zero"], r"--mode \(saved mean, now zero\)"),
        (["--sites", "resid_pre.1"], r"--sites \(saved resid_pre\.\*, now resid_pre\.1\)"),
        (["--k", "2", "--seed", "1"], r"--seed \(saved 0, now 1\); --k \(saved 3, now 2\)"),
    ]:
        run = cli(capsys, *base, "--resume", *extra)
        one_line_error(
            run,
            "causal",
            rf"cannot --resume the run in .*: these settings differ "
            rf"from it: {named}\. Resume with the saved settings",
        )
    # the model's weights and the data's tokens are part of the run's identity too
    original = (model_dir / "model.safetensors").read_bytes()
    build_neox(seed=1).save_pretrained(model_dir)
    one_line_error(cli(capsys, *base, "--resume"), "causal", r"--model \(its weights changed\)")
    (model_dir / "model.safetensors").write_bytes(original)
    kept = text.read_text()
    text.write_text(kept.upper())
    one_line_error(cli(capsys, *base, "--resume"), "causal", r"--data \(its tokens changed\)")
    text.write_text(kept)
    # with the same flags (and a free one changed) it continues and cleans up
    run = cli(capsys, *base, "--resume", "--batch_size", "4")
    assert run.code == 0, run.err
    assert "resumed: 2 directions (0 finished sites)" in run.out
    assert sorted(p.name for p in out.iterdir()) == ["resid_pre.0", "resid_pre.1", "run.json",
                                                     "summary.json"]  # fmt: skip
    one_line_error(cli(capsys, *base, "--resume"), "causal", r"no interrupted run under")


@pytest.mark.parametrize(
    ("mode", "n_init", "refine"),
    [("mean", 0, "none"), ("resample", 0, "joint"), ("zero", 4, "joint")],
)
def test_a_resumed_extraction_equals_an_uninterrupted_one(tmp_path, gpt2_model, token_batch,
                                                          mode, n_init, refine):  # fmt: skip
    """Random starts (n_init=0) are drawn per direction from (seed, index), so a site resumed
    after its first direction draws what an uninterrupted run drew."""
    options = CausalOptions(mode=mode, n_init=n_init, refine=refine, max_iter=8, n_pca=2)
    args = (gpt2_model, token_batch, 3, "resid_pre.*", options)
    straight = extract_causal_bases(*args, seed=3, progress=False)
    folder = tmp_path / "ck"
    checkpoint = BasisCheckpoint(folder, {"run": 1}, resume=False)
    calls = []

    def stop_after_four(partial: PartialBasis) -> None:
        BasisCheckpoint.save_direction(checkpoint, partial)
        calls.append(partial.k)
        if len(calls) == 4:  # resid_pre.0 finished, resid_pre.1 holds one direction
            raise KeyboardInterrupt

    checkpoint.save_direction = stop_after_four  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        extract_causal_bases(*args, seed=3, progress=False, checkpoint=checkpoint)
    again = BasisCheckpoint(folder, {"run": 1}, resume=True)
    resumed = extract_causal_bases(*args, seed=3, progress=False, checkpoint=again)
    assert again.loaded == {"resid_pre.0": 3, "resid_pre.1": 1} and again.finished == [
        "resid_pre.0"
    ]
    for site, basis in straight.items():
        # same path: one process, the same inputs and ops; saved directions reload bit for bit
        assert torch.equal(resumed[site].vectors, basis.vectors), site
        assert torch.equal(resumed[site].energies, basis.energies), site
        assert torch.equal(resumed[site].subspace_energies, basis.subspace_energies), site


def test_the_checkpoint_refuses_another_run_and_unseen_overwrites(tmp_path, gpt2_model,
                                                                  token_batch):  # fmt: skip
    options = CausalOptions(max_iter=3, n_pca=0)
    folder = tmp_path / "ck"
    first = BasisCheckpoint(folder, {"data": "a"}, resume=False)
    extract_causal_bases(gpt2_model, token_batch, 2, "resid_pre.1", options, progress=False,
                         checkpoint=first)  # fmt: skip
    with pytest.raises(ValueError, match="already holds the bases of an earlier extraction"):
        BasisCheckpoint(folder, {"data": "a"}, resume=False)
    with pytest.raises(SettingsMismatch, match=r"other settings \(data: saved 'a', now 'b'\)"):
        BasisCheckpoint(folder, {"data": "b"}, resume=True)
    again = BasisCheckpoint(folder, {"data": "a"}, resume=True)
    with pytest.raises(SettingsMismatch) as caught:
        extract_causal_bases(gpt2_model, token_batch, 1, "resid_pre.1", options,
                             progress=False, checkpoint=again)  # fmt: skip
    assert caught.value.differences == {"k": (2, 1)}
    again = BasisCheckpoint(folder, {"data": "a"}, resume=True)
    loaded = extract_causal_bases(gpt2_model, token_batch, 2, "resid_pre.1", options,
                                  progress=False, checkpoint=again)  # fmt: skip
    assert again.finished == ["resid_pre.1"] and loaded["resid_pre.1"].k == 2


@pytest.mark.distributed
def test_two_ranks_resume_from_rank_0s_checkpoint(tmp_path):
    """Under torchrun rank 0 writes the checkpoint and both ranks read it back: the resumed
    bases (resample ablation, random starts) equal the uninterrupted ones on each rank."""
    import json

    from conftest import SUPPORT, run_torchrun

    run_torchrun(SUPPORT / "causal_resume_worker.py", tmp_path)
    for rank in (0, 1):
        loaded = json.loads((tmp_path / f"loaded_rank{rank}.json").read_text())
        assert loaded == {"resid_pre.0": 3, "resid_pre.1": 1}
        for site in ("resid_pre.0", "resid_pre.1"):
            straight = CausalBasis.load(tmp_path / f"straight_rank{rank}" / site)
            resumed = CausalBasis.load(tmp_path / f"resumed_rank{rank}" / site)
            first = CausalBasis.load(tmp_path / "straight_rank0" / site)
            # same path: the same processes and ops; saved directions reload bit for bit
            assert torch.equal(resumed.vectors, straight.vectors), (rank, site)
            assert torch.equal(resumed.energies, straight.energies), (rank, site)
            # the ranks all-reduce every sum, so they take identical steps: bit-identical
            assert torch.equal(straight.vectors, first.vectors), (rank, site)
