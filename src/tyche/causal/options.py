"""The search settings of a causal basis extraction, as one validated object.

:class:`CausalOptions` is taken whole by :func:`~tyche.causal.extract_causal_basis`,
:func:`~tyche.causal.extract_causal_bases` and :class:`~tyche.causal.AblationObjective`
(which reads the fields that define the objective: ``mode``, ``objective``, ``batch_size``,
``fast``, ``cache_gb``, ``screen_positions``). The command line embeds it in its config, so
each field is also the flag of the same name and its docstring that flag's help.

Standard library only (no torch), so the command line can check its flags before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from tyche.errors import InputError

__all__ = ["SCREEN_POSITIONS", "CausalOptions", "Objective", "Refine", "resolve_options"]

#: the ablations of ``tyche.ablation`` (its ``ABLATION_MODES``), the default first
Mode = Literal["mean", "zero", "resample"]
Objective = Literal["kl", "ce"]
Refine = Literal["none", "joint"]
#: default size of the screening subsample (positions): the energy of a candidate direction
#: is a mean over positions, and 1,024 of them rank candidates whose energies differ by more
#: than a few per cent (the spread of such means on 1/8 of the data)
SCREEN_POSITIONS = 1024


def _whole(value: object) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value: object) -> bool:
    """A real number (int or float, not a bool) that is not NaN."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


@dataclass(frozen=True)
class CausalOptions:
    """How the directions are searched for: the ablation, the objective, the L-BFGS stopping
    rule, the starts and the evaluation's memory and batching. Every field is checked when the
    object is made (:class:`~tyche.errors.InputError` naming the field)."""

    mode: Mode = "mean"
    """ablation: mean, zero or resample"""
    objective: Objective = "kl"
    """kl: mean KL(clean || ablated); ce: increase of the next-token cross-entropy (nats)"""
    max_iter: int = 100
    """L-BFGS iterations per run (each direction's climb and polish, the joint refinement)"""
    min_energy: float = 0.0
    """stop at a site once a direction's energy is below this (nats); that direction is not
    included"""
    tol: float = 1e-2
    """a search ends once its tangent gradient is at most tol × energy"""
    n_init: int = 4
    """candidates of each kind (principal, readout) screened for each direction's start; 0:
    random starts only"""
    n_starts: int = 2
    """climbs per direction (on a token subsample) from the best candidate starts; the best
    is polished on all tokens"""
    refine: Refine = "none"
    """joint: after the greedy pass, maximise the energy of ablating all k directions
    together and order them by marginal contribution"""
    batch_size: int | None = None
    """rows of the hidden states' leading dimension (sequences) per forward pass (default:
    chunks of about 1024 positions)"""
    fast: bool = True
    """evaluate lens targets (logit, tuned) by exact algebra instead of running the lens"""
    cache_gb: float | None = None
    """GiB of clean lens readouts and probabilities (tokens × vocabulary each) kept between
    evaluations; the rest is recomputed each time (default: half the free memory)"""
    n_pca: int = 16
    """top principal directions whose energies are reported for comparison (0: none)"""
    screen_positions: int = SCREEN_POSITIONS
    """positions in the subsample used to screen the starts and climb"""

    def __post_init__(self) -> None:
        if self.mode not in get_args(Mode):
            raise InputError(f"unknown ablation mode {self.mode!r}; choose one of {get_args(Mode)}")
        if self.objective not in ("kl", "ce"):
            raise InputError(f"unknown objective {self.objective!r}; choose 'kl' or 'ce'")
        for name, low in (("max_iter", 0), ("n_init", 0), ("n_pca", 0), ("n_starts", 1),
                          ("screen_positions", 1)):  # fmt: skip
            value = getattr(self, name)
            if not _whole(value) or value < low:
                raise InputError(f"need {name} >= {low} (a whole number), got {value!r}")
        if not _real(self.min_energy):
            raise InputError(f"min_energy must be a number (nats), got {self.min_energy!r}")
        if not _real(self.tol) or not self.tol > 0:
            raise InputError(f"tol must be > 0, got {self.tol}")
        if self.refine not in ("none", "joint"):
            raise InputError(f"refine must be 'none' or 'joint', got {self.refine!r}")
        if self.batch_size is not None and (not _whole(self.batch_size) or self.batch_size < 1):
            raise InputError(
                f"batch_size must be a positive number of rows, got {self.batch_size!r}"
            )
        if not isinstance(self.fast, bool):
            raise InputError(f"fast must be True or False, got {self.fast!r}")
        if self.cache_gb is not None and not (_real(self.cache_gb) and self.cache_gb >= 0):
            raise InputError(
                f"cache_gb must be >= 0 (GiB of cached lens readouts), got {self.cache_gb!r}"
            )


def resolve_options(options: CausalOptions | None) -> CausalOptions:
    """``options``, or the defaults for None; anything else is refused."""
    if options is None:
        return CausalOptions()
    if not isinstance(options, CausalOptions):
        raise InputError(
            f"options must be a CausalOptions (e.g. CausalOptions(mode='zero')), "
            f"got {type(options).__name__}"
        )
    return options
