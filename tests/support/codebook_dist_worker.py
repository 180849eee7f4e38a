"""Worker for tests/codebook/test_codebook_train.py: ``torchrun --nproc_per_node=2 ... OUT``.

Rank 0 writes the averaged gradients of one batch (``OUT/grads.pt``); then both ranks train
three steps with dead-code replacement and rank 0 records whether every rank ended with the
same parameters (``OUT/same.pt``).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest

from conftest import build_neox  # noqa: E402
from tyche import distributed as td  # noqa: E402
from tyche.codebook.model import attach  # noqa: E402
from tyche.codebook.train import (  # noqa: E402
    TrainConfig,
    compute_gradients,
    row_sampler,
    train_codebooks,
)


def main(out: Path) -> None:
    td.init_distributed()
    rows = torch.load(out / "rows.pt")
    base = build_neox()
    cb = attach(copy.deepcopy(base), ["attn_heads.*", "mlp_out.*"], num_codes=16, seed=0)
    cb.train()
    loss = compute_gradients(cb, rows)
    if td.get_rank() == 0:
        grads = {n: p.grad.clone() for n, p in cb.named_parameters()}
        grads["__loss__"] = loss
        torch.save(grads, out / "grads.pt")
    cb = attach(copy.deepcopy(base), ["attn_heads.*", "mlp_out.*"], num_codes=16, seed=0)
    cfg = TrainConfig(steps=3, batch_size=8, replace_dead_every=1, log_every=1, warmup_steps=0)
    train_codebooks(cb, row_sampler(rows, 8), cfg, progress=False)
    flat = torch.cat([p.detach().reshape(-1) for p in cb.parameters()])
    gathered = td.all_gather_cat(flat.unsqueeze(0))
    if td.get_rank() == 0:
        torch.save(bool(torch.equal(gathered[0], gathered[1])), out / "same.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
