"""Tests for tyche.distributed: single-process no-ops, and 2 gloo ranks under torchrun."""

from __future__ import annotations

import json
import time

import pytest
import torch

from conftest import SUPPORT, run_torchrun
from tyche import distributed as td

WORKER = SUPPORT / "dist_worker.py"


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


# ----------------------------------------------------------------------------- entry points
def test_shard_range_under_torchrun_without_a_group_says_to_initialise(monkeypatch):
    """RANK=1 of WORLD_SIZE=2 with no process group: get_world_size() is still 1, so a
    one-process split would give rank 1 nothing valid; the error says what to call."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not torch.distributed.is_initialized()
    first = r"call tyche\.distributed\.init_distributed\(\) first"
    with pytest.raises(RuntimeError, match=first):
        td.shard_range(10)
    with pytest.raises(RuntimeError, match=first):  # rank and world size read too early
        td.shard_range(10, td.get_rank(), td.get_world_size())
    assert td.shard_range(10, rank=1, world_size=2) == range(5, 10)  # explicit: no group needed


class _GroupStarted(Exception):
    """Raised by a stand-in for ``torch.distributed.init_process_group``."""


def _entry_points() -> dict[str, object]:
    """name -> a call of that public entry point on tiny inputs (``(model, ids)`` given)."""
    from tyche.basin.core import estimate_basin
    from tyche.basin.options import BasinOptions
    from tyche.causal import (
        AblationObjective,
        TunedLens,
        extract_causal_bases,
        extract_causal_basis,
        train_tuned_lens,
    )
    from tyche.causal.train_lens import evaluate_lens
    from tyche.codebook.model import attach
    from tyche.codebook.train import TrainConfig, row_sampler, train_codebooks
    from tyche.interaction import ablate_edges, ablate_nodes, build_grams, build_interaction_graph

    layers = ["resid_pre.0", "resid_pre.1", "unembed"]
    h = torch.randn(2, 3, 4)
    return {
        "estimate_basin": lambda m, ids: estimate_basin(
            lambda d: d.square().sum(-1), torch.ones(3), BasinOptions(cutoff=0.1, n_samples=2),
            progress=False,
        ),
        "build_interaction_graph": lambda m, ids: build_interaction_graph(
            m, ids, layers, progress=False
        ),
        "build_grams": lambda m, ids: build_grams(m, ids, layers, progress=False),
        "ablate_nodes": lambda m, ids: ablate_nodes(m, None, ids, progress=False),
        "ablate_edges": lambda m, ids: ablate_edges(m, None, ids, progress=False),
        "train_tuned_lens": lambda m, ids: train_tuned_lens(m, ids, steps=1, progress=False),
        "evaluate_lens": lambda m, ids: evaluate_lens(TunedLens(m, "resid_pre.*"), ids),
        "extract_causal_bases": lambda m, ids: extract_causal_bases(
            m, ids, 1, "resid_pre.1", progress=False
        ),
        "extract_causal_basis": lambda m, ids: extract_causal_basis(torch.nn.Linear(4, 5), h, 1),
        "AblationObjective": lambda m, ids: AblationObjective(torch.nn.Linear(4, 5), h),
        "train_codebooks": lambda m, ids: train_codebooks(
            attach(m, ["mlp_out.0"], num_codes=4),
            row_sampler(ids, 2),
            TrainConfig(steps=1, batch_size=2),
            progress=False,
        ),
    }


@pytest.mark.parametrize("name", list(_entry_points()))
def test_every_entry_point_starts_the_process_group_itself(monkeypatch, name):
    """Under torchrun's environment each public entry point that shards or reduces starts the
    process group before anything else (here a stand-in that raises), as estimate_basin does."""
    from conftest import build_gpt2

    model, ids = build_gpt2(), torch.randint(3, 512, (4, 6))
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def started(*args, **kwargs):
        raise _GroupStarted

    monkeypatch.setattr(torch.distributed, "init_process_group", started)
    with pytest.raises(_GroupStarted):
        _entry_points()[name](model, ids)


@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore:effective sample size")  # 7 samples: a bound, as expected
def test_entry_points_under_torchrun_need_no_set_up(tmp_path):
    """Two ranks run every entry point from a script that never calls init_distributed: the
    ranks agree exactly and match one process (tests/support/entry_points_dist_worker.py)."""
    import entry_points_dist_worker as worker
    from test_causal import MODEL_TOLERANCE, assert_same_basis

    from tyche.causal import AblationObjective, CausalOptions, LogitLens, TunedLens
    from tyche.causal.train_lens import evaluate_lens
    from tyche.hooks import read_activations

    run_torchrun(SUPPORT / "entry_points_dist_worker.py", tmp_path, timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    two, one = ranks[0], worker.run_all(world=1)
    assert not two["group_before_first_call"] and two["world_size"] == 2
    _assert_ranks_agree(ranks[0], ranks[1])

    # interaction: sums split in two and added (float64 rounding ~1e-15 relative per sum),
    # grown by the eigendecompositions' conditioning; the bounds of
    # tests/interaction/test_interaction_distributed.py (measured here: C 4.7e-13, edges
    # 5.4e-14 of max)
    assert two["graph"]["n_positions"] == one["graph"]["n_positions"]
    for a, b in zip(one["graph"]["C"], two["graph"]["C"]):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10 * a.abs().max())  # as above
    for a, b in zip(one["graph"]["Lambda"], two["graph"]["Lambda"]):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-9, atol=0)  # as above
    for a, b in zip(one["graph"]["edges"], two["graph"]["edges"]):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12 * a.abs().max())  # as above
    assert two["grams"]["counts"] == one["grams"]["counts"] == [80.0, 80.0, 0.0]
    for key in ("means", "covariances"):
        for a, b in zip(one["grams"][key], two["grams"][key]):
            if a is not None:
                # float64 sums of 80 positions in 2 parts: ≲ 80·2⁻⁵³ ≈ 1e-14 of the largest
                # term; measured 1.8e-16 of max
                torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12 * a.abs().max())

    # tuned lens: both follow the same mean gradient, summed in another order (float32). 3
    # AdamW steps of lr 1e-3 move a weight by ≤ 3e-3; the two differ by ≤ 1.9e-6 (AVX2 and
    # ATEN_CPU_CAPABILITY=default, 1-2 threads, rows reversed); one rank's rows alone: 4e-3
    for key in ("weight", "bias"):
        for a, b in zip(one["lens"][key], two["lens"][key]):
            torch.testing.assert_close(b, a, rtol=0, atol=2e-5)  # measured as above
    # their KLs (~2e-3 nats): measured ≤ 1.0e-5 relative; one rank's rows alone: 3.5e-2
    assert two["lens"]["kl_tuned_lens"] == pytest.approx(one["lens"]["kl_tuned_lens"], rel=2e-4)
    lens = TunedLens(worker.lm(), "resid_pre.*")  # the two ranks' lens, in one process
    with torch.no_grad():
        for t, w, b in zip(lens.translators, two["lens"]["weight"], two["lens"]["bias"]):
            t.weight.copy_(w)
            t.bias.copy_(b)
    alone = evaluate_lens(lens, worker.tokens(), batch_size=3)
    # the same lens on other batches (4 rows vs 8: float32 kernels round per batch shape);
    # measured ≤ 1.7e-5 relative (generic kernels), 2.2e-8 (AVX2); one rank's rows: 4.8e-2
    assert two["evaluate_lens"] == pytest.approx(alone, rel=2e-4)

    # causal basis: the problem and bounds of tests/causal/test_causal.py's torchrun test
    from causal_dist_worker import model_problem

    model, tokens = model_problem()
    assert two["causal"].n_positions == one["causal"].n_positions == 5 * 12 - 3 - 7
    with read_activations(model, "resid_pre.1") as acts:
        model(**tokens)
    evaluator = AblationObjective(LogitLens.from_model(model), acts["resid_pre.1"],
                                  CausalOptions(mode="mean"),
                                  mask=tokens["attention_mask"].bool())  # fmt: skip
    assert_same_basis(two["causal"], one["causal"], evaluator.energy, MODEL_TOLERANCE)
    # one eigensolve of the same all-reduced second moment (see tests/causal/test_causal.py)
    torch.testing.assert_close(
        two["causal"].pca_energies, one["causal"].pca_energies, rtol=1e-4, atol=0
    )

    # codebooks: the global batch is split over the ranks and the gradients averaged (float32
    # sums in another order); 3 AdamW steps of lr 1e-3. Measured ≤ 1.8e-6 apart (generic
    # kernels; 3.7e-7 AVX2), losses ≤ 9.5e-7; training on one rank's half alone: 4.2e-3, 4.8e-2
    for name, a in one["codebooks"]["params"].items():
        torch.testing.assert_close(two["codebooks"]["params"][name], a, rtol=0, atol=2e-5)
    # as above: measured ≤ 9.5e-7 nats
    assert two["codebooks"]["losses"] == pytest.approx(one["codebooks"]["losses"], abs=1e-5)

    # basin: exact, as in tests/basin/test_basin_model.py (the shards fall into the same batches
    # of 2, each direction's loss depends only on its own batch, one thread)
    assert torch.equal(two["basin"]["estimates"], one["basin"]["estimates"])
    assert torch.equal(two["basin"]["radii"], one["basin"]["radii"])

    # average_gradients sums in the widest dtype: float64 keeps the mean 1 + 2⁻³¹ of 1 and
    # 1 + 2⁻³⁰ (a float32 sum gives 1); every gradient keeps its dtype
    grads = two["average_gradients"]
    assert torch.equal(grads["float64"], torch.full((3,), 1 + 2.0**-31, dtype=torch.float64))
    assert torch.equal(grads["float32"], torch.full((2,), 1 + 2.0**-21))
    assert torch.equal(grads["bfloat16"], torch.full((2,), 2.0, dtype=torch.bfloat16))


def _assert_ranks_agree(a: object, b: object, path: str = "") -> None:
    """Every tensor and number of rank 0's results equals rank 1's: each rank reduces the
    same sums, so they hold the same results bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_ranks_agree(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_ranks_agree(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif hasattr(a, "vectors"):  # a CausalBasis
        assert torch.equal(a.vectors, b.vectors) and torch.equal(a.energies, b.energies), path
    else:
        assert a == b, path
