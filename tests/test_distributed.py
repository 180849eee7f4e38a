"""Tests for tyche.distributed: single-process no-ops, and 2 gloo ranks under torchrun."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from conftest import run_torchrun
from tyche import distributed as td

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.mark.parametrize("n", [0, 1, 5, 12, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shard_range_partitions_evenly(n, world):
    shards = [td.shard_range(n, rank=r, world_size=world) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))  # contiguous, in rank order, once
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n


def test_shard_range_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank must be in"):
        td.shard_range(4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="n >= 0"):
        td.shard_range(-1, rank=0, world_size=1)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        td.shard_range(3, rank=0, world_size=0)


def test_single_process_is_a_no_op(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    td.init_distributed()  # nothing to initialise
    assert not torch.distributed.is_initialized()
    assert (td.is_distributed(), td.get_rank(), td.get_world_size()) == (False, 0, 1)
    assert td.shard_range(7) == range(7)
    x = torch.arange(6.0).view(2, 3)
    summed = td.all_reduce_sum(x)
    assert torch.equal(summed, x) and summed is not x  # one process: a copy, no arithmetic
    assert td.all_gather_cat(x, dim=1) is x
    td.barrier()
    td.rank0_print("hello", 3)
    assert capsys.readouterr().out == "hello 3\n"
    bar = td.progress(range(4), desc="x")
    assert not bar.disable and list(bar) == [0, 1, 2, 3]
    assert td.progress(range(2), disable=True).disable
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert td.default_device().type == expected


def test_progress_is_silent_off_rank_zero(monkeypatch):
    monkeypatch.setattr(td, "get_rank", lambda: 1)
    bar = td.progress(range(3))
    assert bar.disable and list(bar) == [0, 1, 2]
    printed = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: printed.append(a))
    td.rank0_print("not shown")
    assert printed == []


def test_init_distributed_requires_torchrun_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        td.init_distributed()


@pytest.mark.distributed
def test_two_gloo_ranks_under_torchrun(tmp_path):
    proc = run_torchrun(WORKER, tmp_path)
    assert proc.stdout.count("TYCHE-MARKER printed by rank 0") == 1
    assert "TYCHE-MARKER printed by rank 1" not in proc.stdout

    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert (res["rank"], res["world"], res["env_rank"], res["env_world"]) == (r, 2, r, 2)
        assert res["is_distributed"] and res["device"] == "cpu"
        for n, shard in res["shards"].items():
            assert shard["all"] == list(range(int(n)))  # every index exactly once, in order
            assert max(shard["sizes"]) - min(shard["sizes"]) <= 1
            assert shard["mine"] == [
                td.shard_range(int(n), r, 2).start,
                td.shard_range(int(n), r, 2).stop,
            ]
        assert res["reduced"] == [[3.0, 3.0], [3.0, 3.0]]
        assert res["reduced_int"] == [3, 20]
        assert res["gathered0"] == [[0.0] * 3, [1.0] * 3, [1.0] * 3]
        assert (
            res["gathered1"] == [[0.0, 1.0, 10.0]] * 2 and res["gathered1_dtype"] == "torch.float64"
        )
        assert res["progress_items"] == [0, 1, 2]
        assert res["progress_disabled"] == (r != 0)


def test_a_failing_rank_ends_the_run_at_once():
    """An uncaught error skips the exit barrier (which waits up to 60 s for the other ranks)."""
    start = time.perf_counter()
    proc = run_torchrun(WORKER, "--fail", check=False, timeout=100)
    seconds = time.perf_counter() - start
    assert proc.returncode != 0 and "TYCHE-DELIBERATE" in proc.stdout + proc.stderr
    # the exit barrier's timeout is 60 s; a run that skips it takes ~5-10 s here (two
    # interpreters importing torch), so 45 s separates the two even on a loaded machine
    assert seconds < 45, seconds
