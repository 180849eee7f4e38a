"""Worker for test_interaction_distributed: 2 gloo ranks interrupt a build, then resume it.

Run as ``torchrun --nproc_per_node=2 tests/support/interaction_checkpoint_worker.py OUT``. Each rank
builds the graph uninterrupted (``OUT/whole_rank{r}``), then with a section checkpoint in
``OUT/sections`` stopped by ``KeyboardInterrupt`` in the second section, then resumed
(``OUT/resumed_rank{r}``); ``OUT/counts_rank{r}.json`` says how many sections the rank wrote,
which sections were saved when it stopped and how many section bases the resume computed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

LAYERS = ["layers.0:input", "layers.1:input", "layers.2:input", "output"]


def main(out: Path) -> None:
    from test_interaction_graph import TinyMLP, mlp_data

    import tyche.interaction.checkpoint as checkpoint_module
    import tyche.interaction.graph as graph_module
    from tyche.distributed import barrier, get_rank, init_distributed
    from tyche.interaction import GraphOptions

    init_distributed()
    torch.set_num_threads(1)
    rank = get_rank()
    writes, calls, stop = [], [], [2]
    save, moments = checkpoint_module.SavedSection.save, graph_module.lib_moments

    def counted_save(self, path):  # noqa: ANN001, ANN202
        writes.append(self.index)
        return save(self, path)

    def interrupted_moments(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) in stop:
            raise KeyboardInterrupt
        return moments(*args, **kwargs)

    checkpoint_module.SavedSection.save = counted_save
    graph_module.lib_moments = interrupted_moments

    def build(**kwargs):  # noqa: ANN003, ANN202
        model, x = TinyMLP(), mlp_data(101)
        return graph_module.build_interaction_graph(
            model, x, LAYERS, GraphOptions(batch_size=16), progress=False, **kwargs
        )

    stop[:] = []
    build().save(out / f"whole_rank{rank}")
    stop[:], calls[:] = [2], []
    interrupted = False
    try:
        build(checkpoint=out / "sections")
    except KeyboardInterrupt:
        interrupted = True
    barrier()
    saved = sorted(p.name for p in (out / "sections").iterdir())
    barrier()
    stop[:], calls[:] = [], []
    build(checkpoint=out / "sections", resume=True).save(out / f"resumed_rank{rank}")
    counts = {"interrupted": interrupted, "writes": writes, "saved": saved, "computed": len(calls)}
    (out / f"counts_rank{rank}.json").write_text(json.dumps(counts))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "interaction"))  # its tests
    main(Path(sys.argv[1]))
