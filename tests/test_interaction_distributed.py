"""Two gloo ranks under torchrun build the same local interaction graph as one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import run_torchrun
from interaction_dist_worker import cases
from tyche.interaction import InteractionGraph, build_interaction_graph


@pytest.mark.distributed
def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    run_torchrun(Path(__file__).with_name("interaction_dist_worker.py"), tmp_path, timeout=600)
    for name, (model, inputs, layers, kwargs) in cases().items():
        single = build_interaction_graph(model, inputs, layers, progress=False, **kwargs)
        ranks = [InteractionGraph.load(tmp_path / f"{name}_rank{r}") for r in (0, 1)]
        # every rank reduces the same sums: identical graphs on both ranks
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
                torch.testing.assert_close(a.Lambda, b.Lambda, rtol=1e-9, atol=0)
        for a, b in zip(single.edges, ranks[0].edges):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12 * a.abs().max())
