"""Worker for test_causal's torchrun test: each rank extracts a basis from its shard.

Run as ``torchrun --standalone --nproc_per_node=2 tests/causal_dist_worker.py OUT``. Every
rank takes its contiguous block of rows of the same problem (7 sequences: 4 + 3 rows, so the
shards differ in size and in their means), and saves its result to ``OUT/{mode}_rank{r}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The shared tiny problem: (target, hiddens (7, 9, 6), mask (7, 9))."""
    from test_causal import SoftmaxTarget, random_hiddens

    h = random_hiddens((7, 9, 6), seed=11)
    h[:4] += 0.7  # the first shard is off-centre: local means would differ from the global one
    mask = torch.ones(7, 9, dtype=torch.bool)
    mask[5, 6:] = False
    mask[1, 8:] = False
    return SoftmaxTarget(6, seed=12), h, mask


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
    from tyche.causal import extract_causal_basis
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
            mode=mode,
            mask=mask[rows.start : rows.stop],
            max_iter=60,
        )
        basis.save(out / f"{mode}_rank{get_rank()}")
    # the model-level call shards the rows itself (the original gave every rank the same data)
    from tyche.causal import extract_causal_bases

    model, tokens = model_problem()
    bases = extract_causal_bases(model, tokens, 2, "resid_pre.1", max_iter=20, n_pca=2,
                                 progress=False)  # fmt: skip
    bases["resid_pre.1"].save(out / f"model_rank{get_rank()}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(Path(sys.argv[1]))
