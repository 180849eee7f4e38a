"""Worker for test_causal's torchrun test: each rank extracts a basis from its shard.

Run as ``torchrun --standalone --nproc_per_node=2 tests/support/causal_dist_worker.py OUT``. Every
rank takes its contiguous block of rows of the same problem (7 sequences: 4 + 3 rows, so the
shards differ in size and in their means), and saves its result to ``OUT/{mode}_rank{r}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

#: a search tolerance below float32 resolution: runs end on L-BFGS's stall test, so one and
#: two processes are compared at the noise floor of the objective, not at the stopping rule
TOL = 1e-6


def problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The shared tiny problem: (target, hiddens (7, 9, 6), mask (7, 9))."""
    from test_causal import SoftmaxTarget, random_hiddens

    h = random_hiddens((7, 9, 6), seed=11)
    h[:4] += 0.7  # the first shard is off-centre: local means would differ from the global one
    mask = torch.ones(7, 9, dtype=torch.bool)
    mask[5, 6:] = False
    mask[1, 8:] = False
    return SoftmaxTarget(6, seed=12), h, mask


def subsample_problem() -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (41, 9, 6) and a mask: enough rows for a screening subsample."""
    from test_causal import random_hiddens

    mask = torch.ones(41, 9, dtype=torch.bool)
    mask[20, 5:] = False
    return random_hiddens((41, 9, 6), seed=13), mask


def SoftmaxTarget6() -> torch.nn.Module:  # noqa: N802
    from test_causal import SoftmaxTarget

    return SoftmaxTarget(6, seed=14)


def model_problem() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny GPT-2 and 5 token rows (3 + 2 per rank) with padding in rows 1 and 4."""
    from conftest import build_gpt2

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 512, (5, 12), generator=g)
    mask = torch.ones(5, 12, dtype=torch.long)
    mask[1, 9:] = 0
    mask[4, 5:] = 0
    return build_gpt2(), {"input_ids": ids, "attention_mask": mask}


def main(out: Path) -> None:
    from tyche.causal import CausalOptions, extract_causal_basis
    from tyche.distributed import get_rank, init_distributed, shard_range

    init_distributed()
    torch.set_num_threads(1)
    target, h, mask = problem()
    rows = shard_range(h.shape[0])
    for mode in ("zero", "mean"):
        basis = extract_causal_basis(
            target,
            h[rows.start : rows.stop],
            3,
            CausalOptions(mode=mode, max_iter=60, tol=TOL),
            mask=mask[rows.start : rows.stop],
        )
        basis.save(out / f"{mode}_rank{get_rank()}")
    # the screening subsample is defined on global rows: the ranks' parts make up one process's
    from tyche.causal import AblationObjective, CausalOptions

    big, big_mask = subsample_problem()
    rows = shard_range(big.shape[0])
    obj = AblationObjective(SoftmaxTarget6(), big[rows.start : rows.stop],
                            CausalOptions(batch_size=3, screen_positions=72),
                            mask=big_mask[rows.start : rows.stop])  # fmt: skip
    picked = [rows.start + r for s in obj.screen[0] for r in range(s.start, s.stop)]
    (out / f"screen_rank{get_rank()}.json").write_text(json.dumps([picked, obj.screen[1]]))
    # the model-level call shards the rows itself (the original gave every rank the same data)
    from tyche.causal import CausalOptions, extract_causal_bases

    model, tokens = model_problem()
    bases = extract_causal_bases(model, tokens, 2, "resid_pre.1",
                                 CausalOptions(max_iter=60, n_pca=2, tol=TOL),
                                 progress=False)  # fmt: skip
    bases["resid_pre.1"].save(out / f"model_rank{get_rank()}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "causal"))  # test_causal
    main(Path(sys.argv[1]))
