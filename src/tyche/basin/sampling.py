"""Direction sampling: direction i depends only on (seed, i), never on batching or ranks."""

from __future__ import annotations

import numpy as np
import torch


def direction_seed(seed: int, index: int) -> int:
    """A 63-bit seed for direction ``index`` of a run seeded with ``seed`` (SeedSequence mix)."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def unit_directions(
    seed: int,
    indices: list[int] | torch.Tensor,
    dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform random unit vectors u_i on the sphere S^{dim-1}, one row per index: (len, dim).

    Each row is drawn on the CPU from its own generator, so results are identical on every
    device, for every batch size and number of processes.
    """
    rows = []
    for i in indices.tolist() if isinstance(indices, torch.Tensor) else indices:
        g = torch.Generator().manual_seed(direction_seed(seed, i))
        z = torch.randn(dim, generator=g, dtype=torch.float64)
        rows.append((z / z.norm()).to(dtype))
    return torch.stack(rows).to(device)
