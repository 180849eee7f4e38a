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


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(Path(sys.argv[1]))
