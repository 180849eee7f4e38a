"""How many directions to search together: a memory budget and a size beyond which batching
directions saves nothing.

Each direction of a batch holds its draw (D entries in the model's dtype) and, while its loss
is evaluated, its offset (D more), plus whatever the loss needs per offset (a ``ModelLoss``
that evaluates offsets side by side builds θ+δ for each: D more; one that writes them into
the model in place needs nothing per offset). The batch is the largest that fits in
``max_memory`` (default: half the memory free on the anchor's device), at most
``batch_size``; without ``batch_size`` also at most 16 directions and at most
``MAX_BATCH_ENTRIES`` parameters' worth of them: batching amortises the per-call overhead
of the loss, which is negligible once one call moves tens of millions of numbers.
"""

from __future__ import annotations

import math
import os
import re

import torch

#: default batches hold at most this many direction entries (2^25 ≈ 33.5M: 128 MiB in float32)
MAX_BATCH_ENTRIES = 1 << 25
#: default batches hold at most this many directions
DEFAULT_BATCH = 16

_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]i?)?b?\s*", re.I)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}  # fmt: skip


def parse_size(text: str | int | float) -> int:
    """Bytes from ``"4GiB"``, ``"512MB"``, ``"1.5G"``, ``"2000000"`` (B optional, case ignored).

    Raises ValueError for anything else or a size that is not positive.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _SIZE.fullmatch(str(text))
        if m is None:
            raise ValueError(
                f"{text!r} is not a memory size; write e.g. 4GiB, 512MiB, 2GB or a number of bytes"
            )
        value = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"a memory size must be a finite number of bytes >= 1, got {text!r}")
    return int(value)


def available_memory(device: torch.device | str) -> int:
    """Bytes free now on ``device``: the CUDA allocator's free memory, else the host's
    available memory (MemAvailable of /proc/meminfo, or free pages)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic platforms
        return 8 << 30


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
    budget = available_memory(device) // 2 if max_memory is None else int(max_memory)
    fit = budget // max(per_direction, 1)
    if fit < 1 and max_memory is not None:
        raise ValueError(
            f"max_memory={max_memory:,} bytes holds not even one direction, which needs "
            f"{per_direction:,} bytes (2 × D × itemsize plus the loss's own); raise max_memory"
        )
    if batch_size is None:
        batch = min(DEFAULT_BATCH, max(1, MAX_BATCH_ENTRIES // dim), fit)
    else:
        batch = min(batch_size, fit)
    return max(1, min(batch, n_samples))
