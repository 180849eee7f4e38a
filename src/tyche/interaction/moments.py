"""The gradient moments a node layer's local interaction basis is built from.

For section ``l`` (node layer ``l`` to ``l + 1``, the output in the basis of ``l + 1``),
:func:`lib_moments` accumulates, over the integrated gradients ``g`` (rows over the folded
coordinates ``[f, 1]``) and then turns into the whitened PCA coordinates of ``l``
(``M = R+ M' R+^T``, ``Lambda'_white = R+ Lambda' R``):

* ``jacobian``: ``M' = sum_r sum_{x, s} g_r g_r^T / (N P R)``, the integrated Jacobian's
  second moment over every output coordinate ``r`` (or stochastic source);
* ``(1-0)*alpha``: one scalar ``S = sum F(alpha f) . F(f)`` per point, ``M'`` as above and
  ``Lambda' = sum_{x, s} g [f, 1]^T / (N P)``;
* ``(1-alpha)^2``: the same with ``S = -sum (F(f) - F(alpha f))^2``.

Positions count as samples (``N P`` rows; rows with attention mask 0 are left out). For the
``jacobian`` formula the gradients can be kept (:class:`GradientCache`) so the section's
edges come from them once the basis is known, without differentiating the section again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tyche.distributed import all_reduce_sum
from tyche.distributed import progress as progress_bar
from tyche.errors import InputError
from tyche.interaction.basis import PCA
from tyche.interaction.jacobian import (
    SectionPlan,
    alpha_cotangents,
    integrated_vjp,
    position_weights,
    section_blocks,
    source_cotangents,
)
from tyche.interaction.sections import Batch, ModelRunner

__all__ = ["GradientCache", "Moments", "lib_moments"]


@dataclass
class GradientCache:
    """Integrated gradients of one section, kept for its edges.

    ``entries``: ``(features, J, h)`` with ``J`` the :class:`Gradients` ``(m, B, P, d + 1)``
    (masked positions zeroed), ``h`` the folded activation ``(B, P, d + 1)`` and ``features``
    ``(m,)`` the output feature of each cotangent. ``scale`` is the stochastic-source factor
    ``1 / R``.
    """

    entries: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)
    scale: float = 1.0
    n_out: int = 0
    nbytes: int = 0


@dataclass
class Moments:
    """``M`` and ``Lambda'`` (whitened, ``(k1, k1)``; None for ``jacobian``), the number of
    positions they average over, and the gradient cache (None unless kept)."""

    M: Tensor
    lambda_dash: Tensor | None
    n_positions: float
    cache: GradientCache | None


def lib_moments(
    runner: ModelRunner,
    batches: list[Batch],
    plan: SectionPlan,
    p: PCA,
    formula: str,
    *,
    cache_bytes: float = 0.0,
    progress: bool = True,
) -> Moments:
    """Accumulate ``M`` (and ``Lambda'``) of section ``plan.index`` over ``batches``.

    With ``cache_bytes > 0`` and the ``jacobian`` formula with one cotangent per output
    feature, the gradients are kept if they fit in that many bytes.
    """
    width = p.W.shape[0]
    dev = p.R.device
    Mraw = torch.zeros(width, width, dtype=torch.float64, device=dev)
    lam = None if formula == "jacobian" else torch.zeros_like(Mraw)
    n_pos = torch.zeros((), dtype=torch.float64, device=dev)
    cache: GradientCache | None = None
    if formula == "jacobian" and plan.n_stochastic_sources_hidden is None and cache_bytes > 0:
        cache = GradientCache()
    scale = 1.0
    name = runner.node_layers[plan.index].name
    for whole in progress_bar(batches, desc=f"basis {name}", disable=not progress, leave=False):
        for batch, fwd in section_blocks(runner, whole, plan, need_full=formula != "jacobian",
                                         split=formula == "jacobian"):  # fmt: skip
            w_in = position_weights(batch, fwd.h)
            w_out = position_weights(batch, fwd.full).unsqueeze(-1)
            h = fwd.h.double()
            n_pos += w_in.sum()
            w_in = None if bool((w_in == 1).all()) else w_in
            if formula == "jacobian":
                cot = plan.cotangents(fwd.full)
                scale = cot.scale
                if cache is not None:
                    cache.scale, cache.n_out = cot.scale, cot.n_out_features
                make = source_cotangents(cot, batch, w_out)
                for a, b, J in integrated_vjp(fwd, plan.rule, plan.my_range(len(cot)), make,
                                              plan.chunk(fwd)):  # fmt: skip
                    J = J.double().masked(w_in)
                    Mraw += J.gram()
                    if cache is not None:
                        cache.entries.append((cot.feature_of(a, b).to(dev), J, h))
                        cache.nbytes += J.nbytes
                        if cache.nbytes > cache_bytes:
                            cache = None
            else:
                make = alpha_cotangents(formula, plan, fwd.full, w_out)
                for _, _, J in integrated_vjp(fwd, plan.rule, range(1), make, 1):
                    J = J.double().masked(w_in)
                    Mraw += J.gram()
                    lam += J.outer(h)
    Mraw = all_reduce_sum(Mraw)
    if not (plan.split_outputs and formula == "jacobian"):  # else every rank saw all rows
        n_pos = all_reduce_sum(n_pos)
    if n_pos == 0:
        raise InputError(f"no positions to average over at node layer {name!r}")
    M = p.R_pinv @ Mraw @ p.R_pinv.T * (scale / float(n_pos))
    if lam is not None:
        lam = p.R_pinv @ all_reduce_sum(lam) @ p.R / float(n_pos)
    return Moments(M, lam, float(n_pos), cache)
