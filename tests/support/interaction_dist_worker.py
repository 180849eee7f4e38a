"""Worker for test_interaction_distributed: each of 2 gloo ranks builds the same graphs.

Run as ``torchrun --nproc_per_node=2 tests/support/interaction_dist_worker.py OUT``. Every
rank passes the whole data; the builder splits it (``split="data"``) or splits the output features
(``split="outputs"``) and reduces the sums. Each rank saves its graphs to ``OUT/{case}_rank{r}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def cases() -> dict[str, tuple]:
    """name -> (model, inputs, node_layers, GraphOptions keywords); the single process runs
    the same."""
    from test_interaction_graph import MLP_LAYERS, TinyMLP, mlp_data

    from conftest import build_gpt2

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 512, (5, 8), generator=g)
    mask = torch.ones(5, 8, dtype=torch.long)
    mask[1, 6:] = 0
    tokens = {"input_ids": ids, "attention_mask": mask}
    lm = ["resid_pre.0", "resid_pre.1", "unembed"]
    return {
        "mlp_jacobian": (TinyMLP(), mlp_data(101), MLP_LAYERS, {"batch_size": 16}),
        "mlp_functional": (TinyMLP(), mlp_data(101), MLP_LAYERS,
                           {"basis": "(1-alpha)^2", "edges": "functional",
                            "integration": "gauss-legendre", "n_intervals": 2}),
        "lm_data": (build_gpt2(), tokens, lm, {"rotate_final": True, "n_stochastic_sources": 3,
                                               "batch_size": 2}),
        "lm_outputs": (build_gpt2(), tokens, lm, {"rotate_final": True, "split": "outputs",
                                                  "n_stochastic_sources": 3}),
    }  # fmt: skip


def main(out: Path) -> None:
    from tyche.distributed import get_rank, init_distributed
    from tyche.interaction import GraphOptions, build_interaction_graph

    init_distributed()
    torch.set_num_threads(1)
    for name, (model, inputs, layers, kwargs) in cases().items():
        graph = build_interaction_graph(model, inputs, layers, GraphOptions(**kwargs),
                                        progress=False)  # fmt: skip
        graph.save(out / f"{name}_rank{get_rank()}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "interaction"))  # its tests
    main(Path(sys.argv[1]))
