"""Two gloo ranks under torchrun build the same local interaction graph as one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from interaction_dist_worker import cases

from conftest import SUPPORT, run_torchrun
from tyche.interaction import GraphOptions, InteractionGraph, build_interaction_graph


@pytest.mark.distributed
def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    run_torchrun(SUPPORT / "interaction_dist_worker.py", tmp_path, timeout=600)
    for name, (model, inputs, layers, kwargs) in cases().items():
        single = build_interaction_graph(model, inputs, layers, GraphOptions(**kwargs),
                                         progress=False)  # fmt: skip
        ranks = [InteractionGraph.load(tmp_path / f"{name}_rank{r}") for r in (0, 1)]
        # exact: with two ranks every reduced element is a + b on both (addition commutes),
        # and each rank then runs the same ops on the same sums: identical graphs
        for a, b in zip(ranks[0].edges, ranks[1].edges):
            assert torch.equal(a, b), name
        assert ranks[0].n_positions == single.n_positions, name
        for a, b in zip(single.bases, ranks[0].bases):
            if a.C is None:
                continue
            # sums split in two and added: float64 rounding, ~1e-15 relative per sum, grown by
            # the eigendecompositions' conditioning (well-separated Lambdas here)
            torch.testing.assert_close(a.C, b.C, rtol=1e-8, atol=1e-10 * a.C.abs().max())
            if a.Lambda is not None:
                # eigenvalues of those sums (well separated): ~1e-15 relative, grown ≲ 1e3×
                torch.testing.assert_close(a.Lambda, b.Lambda, rtol=1e-9, atol=0)
        # the edges: split sums (~1e-15 relative) through the bases above, as C
        for a, b in zip(single.edges, ranks[0].edges):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12 * a.abs().max())


@pytest.mark.distributed
def test_two_ranks_resume_from_the_sections_rank_0_saved(tmp_path: Path) -> None:
    import json

    run_torchrun(SUPPORT / "interaction_checkpoint_worker.py", tmp_path,
                 timeout=600)  # fmt: skip
    counts = [json.loads((tmp_path / f"counts_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(c["interrupted"] for c in counts)
    # rank 0 wrote section 2 before the interrupt and sections 1 and 0 on resume; rank 1 none
    assert counts[0]["writes"] == [2, 1, 0] and counts[1]["writes"] == []
    assert counts[0]["saved"] == counts[1]["saved"] == ["section-2"]
    assert counts[0]["computed"] == counts[1]["computed"] == 2  # sections 1 and 0 only
    whole = InteractionGraph.load(tmp_path / "whole_rank0")
    for r in (0, 1):
        resumed = InteractionGraph.load(tmp_path / f"resumed_rank{r}")
        # same path: the same two ranks reduce the same sums in both builds, bit for bit
        for a, b in zip(whole.edges, resumed.edges):
            assert torch.equal(a, b)
        for a, b in zip(whole.bases, resumed.bases):
            assert (a.C is None and b.C is None) or torch.equal(a.C, b.C)
