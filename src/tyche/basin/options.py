"""`BasinOptions`: the estimation settings of `estimate_basin`, checked when they are made.

The options say what is estimated and how (the cutoffs, the prior, the number of directions,
their seed, the solver's tolerance, the batch and memory budget); the loss, the anchor, the
preconditioner and the run control (progress bar, checkpoint folder, resume) stay arguments of
`estimate_basin`. Field names are those of the ``tyche basin`` flags where it has one, so an
error message names the setting in both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Literal

from tyche.errors import InputError

__all__ = ["BasinOptions"]


@dataclass(frozen=True, kw_only=True)
class BasinOptions:
    """Settings of one basin estimate; give exactly one of ``cutoff`` and ``cutoffs``.

    ``BasinOptions(cutoff=1e-2, n_samples=100)`` asks for one `VolumeResult`,
    ``BasinOptions(cutoffs=[1e-4, 1e-3, 1e-2], n_samples=100)`` for a `BasinCurve`. Every
    field is checked on construction (`tyche.errors.InputError` naming the field).
    """

    n_samples: int
    """Monte Carlo directions (an integer >= 1)"""
    cutoff: float | None = None
    """KL cutoff in nats: the basin is where the loss rise stays below it (one result)"""
    cutoffs: Sequence[float] | None = None
    """several distinct cutoffs (nats) for a log P against cutoff curve; each direction is
    searched once for all of them (kept sorted, as a tuple)"""
    sigma: float | None = None
    """prior standard deviation (default: the RMS of the anchor, recorded in the result)"""
    prior: Literal["gaussian", "uniform"] = "gaussian"
    """"gaussian" for log P under N(0, sigma² I), "uniform" for the log-volume"""
    seed: int = 0
    """seed of the directions (direction i comes from the seed and i alone)"""
    rtol: float = 1e-2
    """every returned loss rise lies within rtol·cutoff of its cutoff (0 < rtol < 1)"""
    batch_size: int | None = None
    """directions searched together (default: as many as max_memory holds, at most 16 and
    at most 2^25 parameters' worth); results do not depend on it"""
    max_memory: int | None = None
    """bytes the batch of directions may use (default: half the memory free on the anchor's
    device when the run starts)"""
    max_radius: float | None = None
    """no boundary within this distance of the anchor raises (default: 100·(|θ| + sigma·√D))"""
    adapt: int = 0
    """rounds of adaptive direction sampling (`tyche.basin.adaptive`): 0 draws every
    direction from the prior's isotropic law (or the preconditioner's); R >= 1 first runs
    R rounds of n_samples directions each, fitting a proposal to where the volume is, and
    estimates from a last round of n_samples drawn from it (so (R + 1)·n_samples in all)"""

    def __post_init__(self) -> None:
        cutoffs = _check_cutoffs(self.cutoff, self.cutoffs)
        if self.cutoffs is not None:
            object.__setattr__(self, "cutoffs", tuple(cutoffs))
        _check_positive("sigma", self.sigma, "a positive finite number")
        if not _is_int(self.n_samples) or self.n_samples < 1:
            raise InputError(f"n_samples must be an integer >= 1, got {self.n_samples!r}")
        if self.prior not in ("gaussian", "uniform"):
            raise InputError(f"prior must be 'gaussian' or 'uniform', got {self.prior!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise InputError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not (_is_real(self.rtol) and 0 < self.rtol < 1):
            raise InputError(f"rtol must lie in (0, 1), got {self.rtol!r}")
        if self.batch_size is not None and (not _is_int(self.batch_size) or self.batch_size < 1):
            raise InputError(
                f"batch_size must be a positive integer or None, got {self.batch_size!r}"
            )
        if self.max_memory is not None and (not _is_int(self.max_memory) or self.max_memory < 1):
            raise InputError(
                f"max_memory must be a positive integer number of bytes or None, got "
                f"{self.max_memory!r} (tyche.memory.parse_size reads sizes such as '4GiB')"
            )
        _check_positive("max_radius", self.max_radius, "a positive finite distance")
        if not _is_int(self.adapt) or self.adapt < 0:
            raise InputError(f"adapt must be an integer >= 0 (rounds), got {self.adapt!r}")

    @property
    def targets(self) -> list[float]:
        """The cutoffs searched for, ascending: ``[cutoff]`` or ``list(cutoffs)``."""
        return [float(self.cutoff)] if self.cutoffs is None else list(self.cutoffs)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_positive(name: str, value: object, what: str) -> None:
    """None, or a positive finite real number."""
    if value is not None and not (_is_real(value) and math.isfinite(value) and value > 0):
        raise InputError(f"{name} must be {what}, got {value!r}")


def _check_cutoffs(cutoff: float | None, cutoffs: Sequence[float] | None) -> list[float]:
    """The cutoffs, checked (positive, finite, distinct) and sorted."""
    if (cutoff is None) == (cutoffs is None):
        raise InputError("give either cutoff= (one cutoff) or cutoffs=[...] (a curve)")
    if isinstance(cutoffs, (str, bytes)):
        raise InputError(f"cutoffs must be a sequence of numbers, got the text {cutoffs!r}")
    values = [cutoff] if cutoffs is None else list(cutoffs)
    if not values:
        raise InputError("cutoffs is empty; give at least one cutoff in nats")
    for c in values:
        if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
            raise InputError(f"cutoff must be a positive finite number of nats, got {c!r}")
    if len(set(values)) != len(values):
        raise InputError(f"cutoffs must be distinct, got {values}")
    return sorted(float(c) for c in values)
