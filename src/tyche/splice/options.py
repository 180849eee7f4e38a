"""The settings of a spliced-faithfulness measurement (:class:`SpliceOptions`), checked as made.

:func:`tyche.splice.splice_faithfulness` takes them whole and ``tyche splice`` embeds them, so
each field is also the flag of the same name and its docstring that flag's help.

Standard library only (no torch), so the command line can check its flags before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tyche.errors import InputError

__all__ = ["SpliceOptions"]


@dataclass(frozen=True)
class SpliceOptions:
    """How bottlenecks are measured."""

    ablation: Literal["mean", "zero"] = "mean"
    """the baseline of CE recovered: the sites replaced by their mean over the rows, or zero"""
    each_site: bool = True
    """also measure a bottleneck of several sites at each site alone"""
    batch_size: int = 16
    """sequences per forward pass"""

    def __post_init__(self) -> None:
        if self.ablation not in ("mean", "zero"):
            raise InputError(f"ablation must be 'mean' or 'zero', got {self.ablation!r}")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or \
                self.batch_size < 1:  # fmt: skip
            raise InputError(f"batch_size must be a whole number >= 1, got {self.batch_size!r}")
