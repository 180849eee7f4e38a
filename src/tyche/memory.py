"""Memory sizes: parse a size a user types, and how much memory a device has free now.

Shared by every method that sizes its work from a memory budget.
"""

from __future__ import annotations

import math
import os
import re

import torch

from tyche.errors import InputError

__all__ = ["available_memory", "free_memory_share", "parse_size"]

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
            raise InputError(
                f"{text!r} is not a memory size; write e.g. 4GiB, 512MiB, 2GB or a number of bytes"
            )
        value = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    if not (math.isfinite(value) and value >= 1):
        raise InputError(f"a memory size must be a finite number of bytes >= 1, got {text!r}")
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


def free_memory_share(device: torch.device | str, share: float = 0.5) -> int:
    """Bytes this process may plan to use on ``device``: ``share`` of what is free there now,
    divided among the ``torchrun`` processes of this machine when they share its host memory
    (``LOCAL_WORLD_SIZE``; each CUDA rank has a device of its own)."""
    device = torch.device(device)
    sharing = 1 if device.type == "cuda" else max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return int(share * available_memory(device) / sharing)
