"""Worker for tests/shared/test_distributed.py, run as
``torchrun --nproc_per_node=2 dist_worker.py OUT``.

Each rank checks the tyche.distributed helpers under a real gloo process group and writes
``OUT/rank{RANK}.json`` with what it saw; the test asserts on those files.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from tyche import distributed as td


def fail_on_rank_one() -> None:
    """Rank 1 raises at once while rank 0 waits for it at a barrier."""
    td.init_distributed()
    if td.get_rank() == 1:
        raise RuntimeError("TYCHE-DELIBERATE failure on rank 1")
    td.barrier()


def main(out_dir: Path) -> None:
    td.init_distributed()
    td.init_distributed()  # idempotent
    rank, world = td.get_rank(), td.get_world_size()
    result: dict[str, object] = {
        "env_rank": int(os.environ["RANK"]),
        "env_world": int(os.environ["WORLD_SIZE"]),
        "rank": rank,
        "world": world,
        "is_distributed": td.is_distributed(),
        "device": str(td.default_device()),
    }

    # shard_range: gather every rank's indices and check they cover range(n) exactly once
    shards = {}
    for n in (0, 1, 2, 7, 10):
        mine = td.shard_range(n)
        everything = td.all_gather_cat(torch.tensor(list(mine), dtype=torch.long))
        sizes = td.all_gather_cat(torch.tensor([len(mine)]))
        shards[str(n)] = {
            "mine": [mine.start, mine.stop],
            "all": everything.tolist(),
            "sizes": sizes.tolist(),
        }
    result["shards"] = shards

    # all_reduce_sum: (rank + 1) everywhere, float and integer
    result["reduced"] = td.all_reduce_sum(torch.full((2, 2), rank + 1.0)).tolist()
    result["reduced_int"] = td.all_reduce_sum(torch.tensor([rank + 1, 10])).tolist()

    # all_gather_cat with uneven sizes along dim 0 and dim 1 (rank r gives r + 1 / 2 - r rows)
    rows = torch.full((rank + 1, 3), float(rank))
    result["gathered0"] = td.all_gather_cat(rows).tolist()
    cols = torch.arange(2 - rank, dtype=torch.float64).view(1, -1).expand(2, -1) + 10 * rank
    gathered1 = td.all_gather_cat(cols, dim=1)
    result["gathered1"] = gathered1.tolist()
    result["gathered1_dtype"] = str(gathered1.dtype)

    # rank0_print prints once (the test counts the marker); progress is silent off rank 0
    td.rank0_print("TYCHE-MARKER printed by rank", rank)
    bar = td.progress(range(3), desc="work")
    result["progress_disabled"] = bool(bar.disable)  # tqdm sets disable=True once closed
    result["progress_items"] = list(bar)
    td.barrier()

    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "--fail":
        fail_on_rank_one()
    else:
        main(Path(sys.argv[1]))
