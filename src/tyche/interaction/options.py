"""The settings of a build (:class:`GraphOptions`) and of an ablation (:class:`AblationOptions`).

Both are frozen dataclasses checked when made (``__post_init__`` raises
:class:`~tyche.errors.InputError` naming the field), so a bad setting is refused before a
model is run. They are taken whole: ``build_interaction_graph(model, inputs, node_layers,
GraphOptions(basis="svd"))``, ``ablate_nodes(model, graph, inputs, labels,
AblationOptions(cutoff=8))``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from tyche.errors import InputError
from tyche.interaction.basis import BASES
from tyche.interaction.edges import EDGE_FORMULAS
from tyche.interaction.integrate import IntegrationRule

__all__ = ["SCHEDULES", "AblationOptions", "GraphOptions"]

#: the schedules of :func:`tyche.interaction.ablate.ablate_nodes` / ``ablate_edges``
SCHEDULES = ("exponential", "bisect", "thresholds")


# ----------------------------------------------------------------------------- checks
def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InputError(f"{name} must be True or False, got {value!r}")


def _check_whole(name: str, value: object, minimum: int | None, *, none: bool = False) -> None:
    """``value`` an int ``>= minimum`` (any int where None), or None where ``none``."""
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None
                                                                 and value < minimum):  # fmt: skip
        what = {None: "an int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise InputError(f"{name} must be {what}{' or None' if none else ''}, got {value!r}")


def _check_batch_size(value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InputError(f"batch_size must be >= 1 or None, got {value!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_dtype(name: str, value: object, *, none: bool) -> None:
    if value is None and none:
        return
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise InputError(f"{name} must be a floating dtype{' (or None)' if none else ''}, "
                         f"got {value!r}")  # fmt: skip


def _check_integration(integration: object, n_intervals: int) -> None:
    """A rule name, or a dict of node-layer names (or prefixes) to rule names."""
    if isinstance(integration, str):
        IntegrationRule(integration, n_intervals)
        return
    if not isinstance(integration, Mapping):
        raise InputError(
            f"integration must be a rule name or a dict, got {type(integration).__name__}"
        )
    for key, rule in integration.items():
        if not isinstance(key, str) or not isinstance(rule, str):
            raise InputError(f"integration dict maps node-layer names to rule names, got "
                             f"{key!r}: {rule!r}")  # fmt: skip
        IntegrationRule(rule, 0 if rule == "gradient" else n_intervals)


# ----------------------------------------------------------------------------- the build
@dataclass(frozen=True)
class GraphOptions:
    """How :func:`~tyche.interaction.graph.build_interaction_graph` builds the graph.

    Every field is recorded in the graph's ``settings`` (but ``cache_gb`` and ``check_cuts``,
    which change the time taken, never the result), and a resumed build must use the same.
    """

    basis: str = "jacobian"
    """basis formula: jacobian, (1-0)*alpha, (1-alpha)^2, svd (PCA) or neuron (identity)"""
    edges: str | None = "squared"
    """edge formula: squared, functional, or None for bases only"""
    integration: str | Mapping[str, str] = "gradient"
    """gradient, trapezoidal or gauss-legendre, or a dict from node-layer names (or prefixes)
    to rules"""
    n_intervals: int = 0
    """intervals of the trapezoidal / gauss-legendre rule"""
    center: bool = True
    """centre the bases (the constant direction first); False for the neuron basis"""
    dtype: torch.dtype | None = torch.float64
    """dtype the model runs in (float64 recommended; None keeps the model's)"""
    rotate_final: bool = False
    """give the last node layer its PCA rotation (else raw coordinates)"""
    n_stochastic_sources: int | None = None
    """random +-1 combinations of output positions per feature (None: every position)"""
    n_stochastic_sources_hidden: int | None = None
    """random +-1 combinations of output features, jacobian basis only (None: every feature)"""
    truncation_threshold: float = 1e-14
    """drop directions whose Gram eigenvalue or Lambda is at most this fraction of the largest
    (at least 1e-6 with float32 Grams); both are squared quantities, so a dropped direction
    moves the next layer by at most about the square root of this, relative"""
    batch_size: int | None = None
    """rows per forward pass for tensor or dict inputs (None: all at once)"""
    gram_dtype: torch.dtype = torch.float64
    """accumulation dtype of the Gram matrices (float64 or float32)"""
    seed: int = 0
    """seed of the stochastic sources"""
    split: str = "data"
    """under torchrun: split the rows (data) or the output features (outputs) over the ranks"""
    cache_gb: float | None = None
    """memory (GiB) for reusing the jacobian basis's gradients for the edges (None: half the
    memory free on the model's device, shared among the torchrun processes of a host)"""
    check_cuts: bool = True
    """test that every node layer is a cut of the model (one extra pass on a few rows per
    section)"""

    def __post_init__(self) -> None:
        if self.basis not in BASES:
            raise InputError(f"unknown basis {self.basis!r}; choose one of {BASES}")
        if self.edges is not None and self.edges not in EDGE_FORMULAS:
            raise InputError(f"unknown edges {self.edges!r}; choose one of {EDGE_FORMULAS} or None")
        _check_whole("n_intervals", self.n_intervals, None)  # its sign: IntegrationRule
        _check_integration(self.integration, self.n_intervals)
        if isinstance(self.integration, Mapping):  # a copy: the caller's dict may change
            object.__setattr__(self, "integration", dict(self.integration))
        for name in ("center", "rotate_final", "check_cuts"):
            _check_bool(name, getattr(self, name))
        _check_dtype("dtype", self.dtype, none=True)
        if self.gram_dtype not in (torch.float32, torch.float64):
            raise InputError(
                f"gram_dtype must be torch.float64 or torch.float32, got {self.gram_dtype}"
            )
        for name in ("n_stochastic_sources", "n_stochastic_sources_hidden"):
            _check_whole(name, getattr(self, name), 1, none=True)
        if not _is_number(self.truncation_threshold) or not 0 <= self.truncation_threshold < 1:
            raise InputError("truncation_threshold is a fraction of the largest: a number in "
                             f"[0, 1), got {self.truncation_threshold!r}")  # fmt: skip
        _check_batch_size(self.batch_size)
        _check_whole("seed", self.seed, None)
        if self.split not in ("data", "outputs"):
            raise InputError(f"split must be 'data' or 'outputs', got {self.split!r}")
        if self.cache_gb is not None and not (_is_number(self.cache_gb) and self.cache_gb >= 0):
            raise InputError(
                f"cache_gb must be >= 0 (None: half the free memory), got {self.cache_gb}"
            )
        self._check_combination()

    def _check_combination(self) -> None:
        """Settings that are fine alone but cannot work together."""
        if self.basis == "neuron" and self.center:
            raise InputError("the neuron basis is the identity and cannot be centred: center=False")
        if self.n_stochastic_sources_hidden is not None and self.basis != "jacobian":
            raise InputError("n_stochastic_sources_hidden only applies to the jacobian basis")
        if self.edges == "functional" and self.n_stochastic_sources is not None:
            raise InputError("functional edges are exact; drop n_stochastic_sources or use squared")
        if self.basis == "(1-alpha)^2":
            rules = (
                self.integration.values()
                if isinstance(self.integration, Mapping)
                else [self.integration]
            )
            if "gradient" in rules or self.n_intervals == 0:
                raise InputError(
                    "the (1-alpha)^2 basis integrates over alpha (its integrand vanishes at "
                    "alpha = 1): use integration='trapezoidal' or 'gauss-legendre' with "
                    "n_intervals > 0"
                )


# ----------------------------------------------------------------------------- ablations
@dataclass(frozen=True)
class AblationOptions:
    """How :func:`~tyche.interaction.ablate.ablate_nodes` and ``ablate_edges`` choose the
    counts to keep and run the model. ``schedule`` and ``tolerance`` left at None take each
    function's own default (nodes: exponential, 0.01; edges: bisect, 0.001)."""

    schedule: str | None = None
    """kept counts: exponential (every count up to cutoff, then steps of base), bisect (the
    fewest within tolerance of the unablated accuracy) or thresholds (edges: the edges at or
    above each fraction of the section's largest); None: exponential for nodes, bisect for
    edges"""
    cutoff: int = 16
    """exponential schedule: every count up to this"""
    base: float = 1.25
    """exponential schedule: then steps of this factor"""
    tolerance: float | None = None
    """bisect: accuracy drop allowed against the unablated model (None: 0.01 for nodes, 0.001
    for edges)"""
    thresholds: Sequence[float] = (0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 1e-4, 1e-6, 0.0)
    """thresholds schedule (edges): fractions of the section's largest edge"""
    batch_size: int | None = None
    """rows per forward pass (None: all at once)"""
    dtype: torch.dtype | None = None
    """dtype the model runs in (None keeps the model's)"""
    group_chunk: int = 16
    """edges: distinct sets of kept inputs rebuilt in one batched section pass"""

    def __post_init__(self) -> None:
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise InputError(
                f"unknown schedule {self.schedule!r}; choose 'exponential', 'bisect' or "
                "'thresholds'"
            )
        _check_whole("cutoff", self.cutoff, 0)
        if not _is_number(self.base) or self.base <= 1:
            raise InputError(f"base must be > 1, got {self.base}")
        if self.tolerance is not None and not (_is_number(self.tolerance)
                                               and self.tolerance >= 0):  # fmt: skip
            raise InputError(f"tolerance must be a number >= 0 or None, got {self.tolerance!r}")
        if isinstance(self.thresholds, str | bytes) or not isinstance(self.thresholds, Sequence) \
                or not all(_is_number(t) and t >= 0 for t in self.thresholds):  # fmt: skip
            raise InputError(f"thresholds must be fractions >= 0, got {self.thresholds!r}")
        object.__setattr__(self, "thresholds", tuple(self.thresholds))
        _check_batch_size(self.batch_size)
        _check_dtype("dtype", self.dtype, none=True)
        _check_whole("group_chunk", self.group_chunk, 1)

    def schedule_for(self, default: str) -> str:
        """The schedule, ``default`` where None."""
        return default if self.schedule is None else self.schedule

    def tolerance_for(self, default: float) -> float:
        """The tolerance, ``default`` where None."""
        return default if self.tolerance is None else self.tolerance
