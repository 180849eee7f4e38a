"""The inputs every command shares (tyche.cli.inputs): the same flags, one seeded row draw,
and the same ``input_ids_sha256`` recorded by basin, causal, interaction build and codebook
train."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import cli, make_tiny_tokenizer
from tyche.cli.commandline import CommandError
from tyche.cli.inputs import TextRows
from tyche.data import token_ids_sha256

INPUT_FLAGS = ("--model", "--data", "--n_sequences", "--seq_len", "--seed")
COMMANDS = (("basin",), ("causal",), ("interaction", "build"), ("codebook", "cache"),
            ("codebook", "train"))  # fmt: skip


def _hashes(folder: Path, key: str = "input_ids_sha256") -> set[str]:
    """Every value of ``key`` in the JSON files under ``folder``, at any depth."""

    def walk(value: Any) -> list[str]:
        if isinstance(value, dict):
            found = [value[key]] if key in value else []
            return found + [h for v in value.values() for h in walk(v)]
        if isinstance(value, list):
            return [h for v in value for h in walk(v)]
        return []

    return {h for path in folder.rglob("*.json") for h in walk(json.loads(path.read_text()))}


# ----------------------------------------------------------------------------- the draw
def test_the_hash_is_of_the_ids_in_order_whatever_their_dtype_or_layout() -> None:
    ids = torch.arange(24).reshape(4, 6)
    same = token_ids_sha256(ids)
    assert same == token_ids_sha256(ids.to(torch.int32))
    assert same == token_ids_sha256(ids.t().contiguous().t())  # another memory layout
    assert same != token_ids_sha256(ids.flip(0))  # the order of rows counts
    assert same != token_ids_sha256(ids.reshape(6, 4))  # and the shape
    assert len(same) == 64


def test_one_seeded_draw_with_a_disjoint_held_out_end(text_file: Path) -> None:
    tokenizer = make_tiny_tokenizer()
    rows = TextRows(data=str(text_file), n_sequences=5, seq_len=16, seed=3)
    first = rows.load(tokenizer, held_out=7)
    again = rows.load(tokenizer)
    # the drawn rows do not depend on the held-out count: both are ends of one permutation
    assert torch.equal(first.input_ids, again.input_ids)
    assert first.held_out is not None and first.held_out["input_ids"].shape == (7, 16)
    drawn = {tuple(r) for r in first.input_ids.tolist()}
    held = {tuple(r) for r in first.held_out["input_ids"].tolist()}
    assert not drawn & held
    other = TextRows(data=str(text_file), n_sequences=5, seq_len=16, seed=4).load(tokenizer)
    assert not torch.equal(other.input_ids, first.input_ids)
    record = first.record(rows)
    assert record["input_ids_sha256"] == token_ids_sha256(again.input_ids)
    assert record["n_sequences"] == 5 and record["held_out_sequences"] == 7


def test_too_few_rows_for_the_draw_and_the_held_out_rows_is_refused(text_file: Path) -> None:
    rows = TextRows(data=str(text_file), n_sequences=80, seq_len=16)
    with pytest.raises(CommandError, match=r"--n_sequences 80: .* needs 90; ask for fewer"):
        rows.load(make_tiny_tokenizer(), held_out=10)


# ----------------------------------------------------------------------------- the commands
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_shows_the_input_flags(command: tuple[str, ...], capsys) -> None:
    run = cli(capsys, *command, "--help")
    assert run.code == 0, run.err
    for flag in INPUT_FLAGS:
        assert f"{flag} " in run.out, (command, flag)


def _four_commands(model: str, data: list[str], rows: list[str], out: Path) -> list[list[str]]:
    """basin, causal, interaction build and codebook train (one step) on the same inputs."""
    source = ["--model", model, *data, *rows]
    return [
        ["basin", *source, "--n_samples", "1", "--preconditioners", "none",
         "--out", str(out / "basin")],
        ["causal", *source, "--k", "1", "--sites", "resid_pre.0", "--max_iter", "2",
         "--n_pca", "0", "--no-plot", "--out", str(out / "causal")],
        ["interaction", "build", *source, "--node_layers", "resid_pre.1,unembed",
         "--no-plot", "--out", str(out / "interaction")],
        ["codebook", "train", *source, "--sites", "mlp_out.0", "--num_codes", "8",
         "--steps", "1", "--batch_size", "2", "--eval_sequences", "2", "--warmup_steps", "0",
         "--out", str(out / "codebook")],
    ]  # fmt: skip


def _assert_one_hash(runs: list[list[str]], out: Path, capsys) -> set[str]:
    hashes = {}
    for argv in runs:
        run = cli(capsys, *argv)
        assert run.code == 0, (argv, run.err[-2000:])
        folder = Path(argv[argv.index("--out") + 1])
        hashes[argv[0]] = _hashes(folder)
    assert all(len(h) == 1 for h in hashes.values()), hashes
    assert len(set().union(*hashes.values())) == 1, hashes
    return set().union(*hashes.values())


def test_the_same_flags_give_the_same_rows_in_all_four_methods(
    lm_folder: Path, text_file: Path, tmp_path: Path, capsys
) -> None:
    rows = ["--n_sequences", "4", "--seq_len", "16", "--seed", "3"]
    runs = _four_commands(str(lm_folder), ["--data", str(text_file)], rows, tmp_path)
    (one,) = _assert_one_hash(runs, tmp_path, capsys)
    # and it is the hash of the rows that TextRows draws for these flags
    drawn = TextRows(data=str(text_file), n_sequences=4, seq_len=16, seed=3)
    assert one == token_ids_sha256(drawn.load(make_tiny_tokenizer()).input_ids)
    # another seed draws other rows, and says so
    runs = _four_commands(str(lm_folder), ["--data", str(text_file)],
                          [*rows[:-1], "4"], tmp_path / "seed4")  # fmt: skip
    assert _assert_one_hash(runs, tmp_path / "seed4", capsys) != {one}


def test_the_old_basin_flags_still_work_with_a_note(
    lm_folder: Path, text_file: Path, tmp_path: Path, capsys
) -> None:
    common = ["basin", "--model", str(lm_folder), "--data", str(text_file), "--seed", "3",
              "--n_samples", "1", "--preconditioners", "none"]  # fmt: skip
    old = cli(capsys, *common, "--val_size", "4", "--max_seq_len", "16",
              "--out", str(tmp_path / "old"))  # fmt: skip
    assert old.code == 0, old.err
    assert "--val_size is deprecated; use --n_sequences" in old.err
    assert "--max_seq_len is deprecated; use --seq_len" in old.err
    new = cli(capsys, *common, "--n_sequences", "4", "--seq_len", "16",
              "--out", str(tmp_path / "new"))  # fmt: skip
    assert new.code == 0 and "deprecated" not in new.err
    assert _hashes(tmp_path / "old") == _hashes(tmp_path / "new")
    assert len(_hashes(tmp_path / "new")) == 1
    clash = cli(capsys, *common, "--val_size", "4", "--n_sequences", "5",
                "--out", str(tmp_path / "clash"))  # fmt: skip
    assert clash.code == 2 and "--val_size 4 and --n_sequences 5 disagree" in clash.err


@pytest.mark.slow
def test_the_same_flags_give_the_same_rows_on_the_zoo_text_model(tmp_path: Path, capsys) -> None:
    """The acceptance check on zoo:shakespeare-lm (trained on first use: minutes)."""
    rows = ["--n_sequences", "4", "--seq_len", "32", "--seed", "1"]
    runs = _four_commands("zoo:shakespeare-lm", ["--data", "zoo:shakespeare"], rows, tmp_path)
    assert len(_assert_one_hash(runs, tmp_path, capsys)) == 1
    assert os.environ.get("TYCHE_CACHE")  # the suite's own zoo cache was used
