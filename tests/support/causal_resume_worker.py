"""Worker for test_causal_resume's torchrun test: an extraction interrupted and resumed on 2 ranks.

Run as ``torchrun --nproc_per_node=2 tests/support/causal_resume_worker.py OUT``. Every rank
extracts the bases of a tiny GPT-2 from its shard of the rows, with resample ablation and random
starts (``n_init=0``): once straight through, once stopped (on every rank) after the fourth
direction and resumed from the shared checkpoint folder ``OUT/ck``, where rank 0 alone writes.
Each rank saves both results as ``OUT/{straight,resumed}_rank{r}/<site>`` and what it loaded as
``OUT/loaded_rank{r}.json``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch


def main(out: Path) -> None:
    from causal_dist_worker import model_problem

    from tyche.causal import CausalOptions, extract_causal_bases
    from tyche.causal.checkpoint import BasisCheckpoint
    from tyche.distributed import barrier, get_rank, init_distributed

    init_distributed()
    torch.set_num_threads(1)
    model, tokens = model_problem()
    options = CausalOptions(mode="resample", n_init=0, max_iter=8, n_pca=2)
    args = (model, tokens, 3, "resid_pre.*", options)
    straight = extract_causal_bases(*args, seed=5, progress=False)
    checkpoint = BasisCheckpoint(out / "ck", {"run": "tiny"}, resume=False)
    save, calls = checkpoint.save_direction, []

    def stop_after_four(partial) -> None:
        save(partial)
        calls.append(partial.k)
        if len(calls) == 4:  # resid_pre.0 finished, resid_pre.1 holds one direction
            raise KeyboardInterrupt

    checkpoint.save_direction = stop_after_four
    with contextlib.suppress(KeyboardInterrupt):
        extract_causal_bases(*args, seed=5, progress=False, checkpoint=checkpoint)
    barrier()  # rank 0 has written everything before any rank reads it back
    again = BasisCheckpoint(out / "ck", {"run": "tiny"}, resume=True)
    resumed = extract_causal_bases(*args, seed=5, progress=False, checkpoint=again)
    rank = get_rank()
    for name, bases in (("straight", straight), ("resumed", resumed)):
        for site, basis in bases.items():
            basis.save(out / f"{name}_rank{rank}" / site)
    (out / f"loaded_rank{rank}.json").write_text(json.dumps(again.loaded))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # causal_dist_worker
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "causal"))  # test_causal
    main(Path(sys.argv[1]))
