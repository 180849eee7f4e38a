"""Integration rules for the integrated gradients along the straight path ``alpha * f``.

Every quantity of the local interaction basis that takes a gradient of the next layer with
respect to this layer's activations ``f`` integrates it over ``alpha`` in ``[0, 1]`` along
the path ``alpha * f`` (baseline 0; the constant coordinate scales too, so the biases are
switched on gradually). A rule gives points ``alpha_k`` and weights ``w_k`` with
``sum_k w_k g(alpha_k) ~ integral_0^1 g(alpha) d alpha``:

* ``gradient``: the single point ``alpha = 1`` with weight 1, i.e. the plain gradient at the
  data (``n_intervals`` must be 0).
* ``trapezoidal``: ``n_intervals = 0`` gives the midpoint ``alpha = 1/2``; otherwise
  ``n_intervals + 1`` equally spaced points in ``[eps, 1 - eps]`` with
  ``eps = 1e-3 / (n_intervals + 1)`` (so no point sits exactly on 0 or 1) and the
  trapezoid weights (ends halved), which sum to 1.
* ``gauss-legendre``: the ``n_intervals + 1`` Gauss-Legendre nodes mapped to ``[0, 1]``
  (``n_intervals = 0``: the midpoint). Exact for polynomials of degree ``2 n_intervals + 1``.

The rule may differ per node layer: :func:`rule_for_layers` resolves a rule name, or a dict
from node-layer names (or name prefixes) to rule names, into one rule per node layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from tyche.errors import InputError

__all__ = ["RULES", "IntegrationRule", "integration_points", "rule_for_layers"]

RuleName = Literal["gradient", "trapezoidal", "gauss-legendre"]
RULES: tuple[str, ...] = ("gradient", "trapezoidal", "gauss-legendre")


@dataclass(frozen=True)
class IntegrationRule:
    """A named rule with its ``n_intervals``; ``points()`` gives ``(alphas, weights)``."""

    name: str = "gradient"
    n_intervals: int = 0

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise InputError(f"unknown integration rule {self.name!r}; choose one of {RULES}")
        if self.n_intervals < 0:
            raise InputError(f"n_intervals must be >= 0, got {self.n_intervals}")
        if self.name == "gradient" and self.n_intervals != 0:
            raise InputError(
                "the 'gradient' rule takes the gradient at alpha = 1 only, so n_intervals must "
                f"be 0 (got {self.n_intervals}); use 'trapezoidal' or 'gauss-legendre' to "
                "integrate over alpha"
            )

    def points(self) -> tuple[list[float], list[float]]:
        """``(alphas, weights)`` as Python floats (weights sum to 1)."""
        return integration_points(self.name, self.n_intervals)


def integration_points(rule: str, n_intervals: int = 0) -> tuple[list[float], list[float]]:
    """Points ``alpha_k`` in ``[0, 1]`` and weights ``w_k`` of an integration rule."""
    if rule not in RULES:
        raise InputError(f"unknown integration rule {rule!r}; choose one of {RULES}")
    if n_intervals < 0:
        raise InputError(f"n_intervals must be >= 0, got {n_intervals}")
    if rule == "gradient":
        if n_intervals != 0:
            raise InputError("the 'gradient' rule needs n_intervals = 0")
        return [1.0], [1.0]
    if n_intervals == 0:
        return [0.5], [1.0]
    if rule == "trapezoidal":
        eps = 1e-3 / (n_intervals + 1)
        alphas = np.linspace(eps, 1.0 - eps, n_intervals + 1)
        weights = np.full(n_intervals + 1, 1.0 / n_intervals)
        weights[0] = weights[-1] = 0.5 / n_intervals
        return alphas.tolist(), weights.tolist()
    nodes, weights = np.polynomial.legendre.leggauss(n_intervals + 1)
    return ((nodes + 1.0) / 2.0).tolist(), (weights / 2.0).tolist()


def rule_for_layers(
    rule: str | Mapping[str, str], n_intervals: int, node_layers: Sequence[str]
) -> list[IntegrationRule]:
    """One :class:`IntegrationRule` per node layer.

    ``rule`` is a rule name for every layer, or a dict whose keys are node-layer names or
    prefixes of them (the longest matching key wins). A dict must cover every node layer
    except the last (which has no section after it) and every key must match one.
    """
    if isinstance(rule, str):
        return [IntegrationRule(rule, n_intervals) for _ in node_layers]
    if not isinstance(rule, Mapping):
        raise TypeError(f"integration must be a rule name or a dict, got {type(rule).__name__}")
    unused = [k for k in rule if not any(name.startswith(k) for name in node_layers)]
    if unused:
        raise InputError(
            f"integration keys {unused} match no node layer; node layers: {list(node_layers)}"
        )
    rules = []
    for i, name in enumerate(node_layers):
        keys = [k for k in rule if name.startswith(k)]
        if not keys:
            if i == len(node_layers) - 1:  # the last layer integrates nothing
                rules.append(IntegrationRule("gradient", 0))
                continue
            raise InputError(
                f"integration dict {dict(rule)} names no rule for node layer {name!r}; "
                "add it (or a prefix of it) as a key"
            )
        best = max(keys, key=len)
        rules.append(IntegrationRule(rule[best], 0 if rule[best] == "gradient" else n_intervals))
    return rules
