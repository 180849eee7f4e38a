"""Which parameters a basin is measured over, and moving between them and one flat vector.

The basin lives in the space of the *selected* parameters only: every other parameter
stays at its trained value. Selection is by glob over ``named_parameters()`` names.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tyche.errors import InputError


def _as_patterns(patterns: str | Sequence[str] | None) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


def select_parameters(
    model: nn.Module,
    include: str | Sequence[str] = "*",
    exclude: str | Sequence[str] | None = None,
) -> list[tuple[str, nn.Parameter]]:
    """Parameters whose names match any ``include`` glob and no ``exclude`` glob.

    Order is that of ``model.named_parameters()`` (tied weights appear once). Raises a
    ``ValueError`` that lists some parameter names when a glob matches no parameter (a typo
    would otherwise leave the selection silently unchanged) or the selection is empty.
    """
    inc, exc = _as_patterns(include), _as_patterns(exclude)
    named = list(model.named_parameters())
    for kind, patterns in (("include", inc), ("exclude", exc)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in named):
                shown = ", ".join(n for n, _ in named[:6]) + (" ..." if len(named) > 6 else "")
                raise InputError(
                    f"{kind} glob {pattern!r} matches no parameter of {type(model).__name__}; "
                    f"its parameters are named like {shown}"
                )
    chosen = [
        (name, p)
        for name, p in named
        if any(fnmatch.fnmatchcase(name, pat) for pat in inc)
        and not any(fnmatch.fnmatchcase(name, pat) for pat in exc)
    ]
    if not chosen:
        shown = ", ".join(n for n, _ in named[:8]) + (" ..." if len(named) > 8 else "")
        raise InputError(f"no parameters match include={inc} exclude={exc}; the model has: {shown}")
    return chosen


@dataclass(frozen=True)
class ParameterLayout:
    """Where each selected parameter sits in the flat vector θ of length ``size``."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    size: int

    @classmethod
    def of(cls, named: Sequence[tuple[str, torch.Tensor]]) -> ParameterLayout:
        offsets, total = [], 0
        for _, p in named:
            offsets.append(total)
            total += p.numel()
        return cls(
            tuple(n for n, _ in named), tuple(p.shape for _, p in named), tuple(offsets), total
        )

    def flatten(
        self, tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Concatenate ``tensors`` (in layout order) into one vector of length ``size``."""
        return torch.cat([t.detach().reshape(-1).to(dtype or t.dtype) for t in tensors])

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` (..., size) as named tensors of shape (..., *param_shape)."""
        if flat.shape[-1] != self.size:
            raise InputError(f"expected a last dimension of {self.size}, got {tuple(flat.shape)}")
        lead = flat.shape[:-1]
        return {
            name: flat[..., off : off + shape.numel()].reshape(*lead, *shape)
            for name, shape, off in zip(self.names, self.shapes, self.offsets)
        }
