"""Worker for tests/shared/test_distributed.py: every method's entry point under torchrun,
called from a plain script that never calls ``tyche.distributed.init_distributed`` itself.

Run as ``torchrun --nproc_per_node=2 entry_points_dist_worker.py OUT``. The first call
(``build_interaction_graph``) must start the process group on its own; the others then find
it. Each rank writes ``OUT/rank{RANK}.pt`` with what it computed (and whether a group existed
before the first call); the test compares rank 0 with rank 1 and with one process running
:func:`run_all` (``world=1``) on the same problems.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest

#: rows of every language-model problem: 8 (4 per rank), no padding, so each rank's half has
#: as many positions as the other and the mean of the two half-means is the whole mean
ROWS, LENGTH = 8, 10
LM_LAYERS = ["resid_pre.0", "resid_pre.1", "unembed"]
#: the lens and the codebooks train on every row at every step: per rank its 4 rows, one
#: process all 8, so both follow the same mean gradient
LENS = {"sites": "resid_pre.*", "steps": 3, "lr": 1e-3, "progress": False}
CODEBOOKS = {"steps": 3, "batch_size": ROWS, "log_every": 1, "warmup_steps": 0}


def tokens() -> dict[str, torch.Tensor]:
    """input_ids (8, 10) over ids 3..511 and an all-ones attention mask."""
    ids = torch.randint(3, 512, (ROWS, LENGTH), generator=torch.Generator().manual_seed(4))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def lm() -> nn.Module:
    """The tiny GPT-2 of conftest with dropout off (training must not depend on the rank's
    dropout draws)."""
    from conftest import build_gpt2

    model = build_gpt2()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def basin_problem() -> tuple[Any, torch.Tensor]:
    """A ModelLoss on a small MLP (as tests/support/basin_dist_worker.py) and its anchor."""
    from tyche.basin.loss import ModelLoss

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 5)).eval()
    loss = ModelLoss(model, torch.randn(32, 8))
    return loss, loss.anchor


def run_all(world: int) -> dict[str, Any]:
    """Every entry point on the shared problems, on one thread (the caller's thread count is
    restored); ``world``: the number of processes (the lens's rows per step are
    ``ROWS // world`` per process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun ranks: the basin estimate is compared exactly
    try:
        return _run_all(world)
    finally:
        torch.set_num_threads(threads)


def _run_all(world: int) -> dict[str, Any]:
    """:func:`run_all` on the current threads."""
    from causal_dist_worker import TOL, model_problem

    from tyche.basin.core import estimate_basin
    from tyche.basin.options import BasinOptions
    from tyche.causal import CausalOptions, extract_causal_bases, train_tuned_lens
    from tyche.causal.train_lens import evaluate_lens
    from tyche.codebook.model import attach
    from tyche.codebook.train import TrainConfig, row_sampler, train_codebooks
    from tyche.interaction import GraphOptions, build_grams, build_interaction_graph

    data, model = tokens(), lm()
    out: dict[str, Any] = {}
    graph = build_interaction_graph(
        model,
        data,
        LM_LAYERS,
        GraphOptions(rotate_final=True, n_stochastic_sources=3, batch_size=2),
        progress=False,
    )
    out["graph"] = {
        "C": [b.C for b in graph.bases],
        "Lambda": [b.Lambda for b in graph.bases],
        "edges": list(graph.edges),
        "n_positions": graph.n_positions,
    }
    grams = build_grams(model, data, LM_LAYERS, GraphOptions(batch_size=2), progress=False)
    out["grams"] = {
        "counts": list(grams.counts),
        "means": list(grams.means),
        "covariances": list(grams.covariances),
    }
    lens = train_tuned_lens(model, data, batch_size=ROWS // world, **LENS)
    out["lens"] = {
        "weight": [t.weight.detach().clone() for t in lens.translators],
        "bias": [t.bias.detach().clone() for t in lens.translators],
        "kl_tuned_lens": lens.stats["kl_tuned_lens"],
    }
    out["evaluate_lens"] = evaluate_lens(lens, data, batch_size=3)
    # the problem of tests/causal/test_causal.py's torchrun test, whose tolerances were
    # measured on it
    causal_model, causal_tokens = model_problem()
    out["causal"] = extract_causal_bases(
        causal_model,
        causal_tokens,
        2,
        "resid_pre.1",
        CausalOptions(max_iter=60, n_pca=2, tol=TOL),
        progress=False,
    )["resid_pre.1"]
    cb = attach(copy.deepcopy(model), ["mlp_out.*"], num_codes=16, seed=0)
    trained = train_codebooks(
        cb, row_sampler(data["input_ids"], ROWS), TrainConfig(**CODEBOOKS), progress=False
    )
    out["codebooks"] = {
        "params": {n: p.detach().clone() for n, p in cb.named_parameters()},
        "losses": [h["loss"] for h in trained.history],
    }
    loss, anchor = basin_problem()
    basin = estimate_basin(
        loss, anchor, BasinOptions(cutoff=1e-2, n_samples=7, batch_size=2, seed=3), progress=False
    )
    out["basin"] = {"estimates": basin.estimates, "radii": basin.radii}
    return out


def average_gradients_check(rank: int) -> dict[str, torch.Tensor]:
    """Gradients that differ between the ranks below float32 resolution, averaged.

    float64: rank r holds 1 + r·2⁻³⁰, whose mean 1 + 2⁻³¹ float64 keeps and float32 rounds
    to 1; bfloat16 and float32 gradients in the same call keep their dtypes.
    """
    from tyche.distributed import average_gradients

    params = {
        "float64": nn.Parameter(torch.ones(3, dtype=torch.float64)),
        "float32": nn.Parameter(torch.ones(2)),
        "bfloat16": nn.Parameter(torch.ones(2, dtype=torch.bfloat16)),
    }
    params["float64"].grad = torch.full((3,), 1.0 + rank * 2.0**-30, dtype=torch.float64)
    params["float32"].grad = torch.full((2,), 1.0 + rank * 2.0**-20)
    params["bfloat16"].grad = torch.full((2,), 1.0 + 2 * rank, dtype=torch.bfloat16)
    average_gradients(params.values())
    return {k: p.grad for k, p in params.items()}


def main(out_dir: Path) -> None:
    import torch.distributed as dist

    from tyche.distributed import get_rank

    before = dist.is_initialized()
    result = run_all(world=2)
    result["group_before_first_call"] = before
    result["world_size"] = dist.get_world_size()
    result["average_gradients"] = average_gradients_check(get_rank())
    torch.save(result, out_dir / f"rank{get_rank()}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
