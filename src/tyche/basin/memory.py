"""How many directions to search together: a memory budget and a size beyond which batching
directions saves nothing.

Each direction of a batch holds its draw (D entries in the model's dtype) and, while its loss
is evaluated, its offset (D more), plus whatever the loss needs per offset (a ``ModelLoss``
that evaluates offsets side by side builds θ+δ for each: D more; one that writes them into
the model in place needs nothing per offset). The batch is the largest that fits in
``max_memory`` (default: half the memory free on the anchor's device, split among the
``torchrun`` processes sharing a host: ``tyche.memory.free_memory_share``), at most
``batch_size``; without ``batch_size`` also at most 16 directions and at most
``MAX_BATCH_ENTRIES`` parameters' worth of them: batching amortises the per-call overhead
of the loss, which is negligible once one call moves tens of millions of numbers.
"""

from __future__ import annotations

import torch

from tyche.errors import InputError
from tyche.memory import free_memory_share

__all__ = ["bytes_per_direction", "choose_batch"]

#: default batches hold at most this many direction entries (2^25 ≈ 33.5M: 128 MiB in float32)
MAX_BATCH_ENTRIES = 1 << 25
#: default batches hold at most this many directions
DEFAULT_BATCH = 16


def bytes_per_direction(dim: int, itemsize: int, loss_bytes: int = 0) -> int:
    """Memory one direction of a batch needs: its draw and its offset, plus the loss's own."""
    return 2 * dim * itemsize + max(int(loss_bytes), 0)


def choose_batch(
    n_samples: int,
    dim: int,
    per_direction: int,
    *,
    batch_size: int | None,
    max_memory: int | None,
    device: torch.device | str,
) -> int:
    """Directions searched together (see the module docstring); at least 1.

    Raises ValueError when an explicit ``max_memory`` cannot hold even one direction.
    """
    budget = free_memory_share(device) if max_memory is None else int(max_memory)
    fit = budget // max(per_direction, 1)
    if fit < 1 and max_memory is not None:
        raise InputError(
            f"max_memory={max_memory:,} bytes holds not even one direction, which needs "
            f"{per_direction:,} bytes (2 × D × itemsize plus the loss's own); raise max_memory"
        )
    if batch_size is None:
        batch = min(DEFAULT_BATCH, max(1, MAX_BATCH_ENTRIES // dim), fit)
    else:
        batch = min(batch_size, fit)
    return max(1, min(batch, n_samples))
