"""Edges between consecutive node layers: attributions from one basis's features to the next.

For section ``l`` with its input features ``f_hat = [f, 1] C^l`` and output features
``F_hat = F(...) C^{l+1}`` (raw outputs for an unrotated final layer):

* ``squared`` (``E`` is ``(k_{l+1}, k_l)``, all entries >= 0)::

      A_{x,t,i,j} = sum_k w_k sum_s dF_hat_{t,i}(alpha_k f_hat) / d(alpha_k f_hat_{s,j}) f_hat_{s,j}
      E_ij = sum_x sum_t A_{x,t,i,j}^2 / (N P)

  input positions ``s`` summed inside the square, output positions ``t`` and rows outside.
  With ``n_stochastic_sources = R`` the sum over ``t`` is replaced by ``R`` random +-1
  combinations of the output positions (and divided by ``R``): unbiased, cheaper for long
  sequences.
* ``functional`` (can be negative)::

      E_ij = sum_k w_k sum_{x,s} [d/d(alpha_k f_hat_{s,j}) -sum_t (F_hat_{t,i}(f_hat)
             - F_hat_{t,i}(alpha_k f_hat))^2] f_hat_{s,j} / (N P)

  With the ``(1-alpha)^2`` basis ``sum_i E_ij = Lambda_j`` exactly, for any integration rule:
  both are the same integrated gradients.

Gradients are taken in the folded original coordinates and turned into the input basis with
``C+`` (``d/d f_hat = d/d[f, 1] C+^T``); the section is evaluated at the data's activations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tyche.distributed import all_reduce_sum
from tyche.distributed import progress as progress_bar
from tyche.errors import InputError
from tyche.interaction.basis import InteractionBasis
from tyche.interaction.jacobian import (
    SectionPlan,
    functional_cotangents,
    integrated_vjp,
    position_weights,
    section_blocks,
    source_cotangents,
)
from tyche.interaction.moments import GradientCache
from tyche.interaction.sections import Batch, ModelRunner

__all__ = ["EDGE_FORMULAS", "edges_from_cache", "section_edges"]

EDGE_FORMULAS = ("squared", "functional")


def edges_from_cache(
    cache: GradientCache, basis_in: InteractionBasis, n_positions: float
) -> Tensor:
    """Squared edges from the integrated gradients kept by a ``jacobian`` basis pass."""
    C, C_pinv = basis_in.C, basis_in.C_pinv
    E = torch.zeros(cache.n_out, C.shape[1], dtype=torch.float64, device=C.device)
    h_seen, f_hat = None, None
    for features, J, h in cache.entries:
        if h is not h_seen:  # a block's entries are consecutive: its features computed once
            h_seen, f_hat = h, h @ C
        a = J.attributions(C_pinv, f_hat)  # (m, B, k)
        E.index_add_(0, features, a.square_().sum(1))
    return all_reduce_sum(E) * (cache.scale / n_positions)


def section_edges(
    runner: ModelRunner,
    batches: list[Batch],
    plan: SectionPlan,
    basis_in: InteractionBasis,
    formula: str,
    n_out: int,
    *,
    progress: bool = True,
) -> Tensor:
    """``(n_out, k_in)`` edges of section ``plan.index`` by one pass over ``batches``."""
    if formula not in EDGE_FORMULAS:
        raise InputError(f"unknown edge formula {formula!r}; choose one of {EDGE_FORMULAS}")
    if basis_in.C is None:
        raise InputError(f"node layer {basis_in.node_layer!r} has no basis to attribute from")
    C, C_pinv = basis_in.C, basis_in.C_pinv
    E = torch.zeros(n_out, C.shape[1], dtype=torch.float64, device=C.device)
    n_pos = torch.zeros((), dtype=torch.float64, device=C.device)
    scale = 1.0
    bar = progress_bar(batches, desc=f"edges {basis_in.node_layer}", disable=not progress,
                       leave=False)  # fmt: skip
    for whole in bar:
        for batch, fwd in section_blocks(runner, whole, plan, need_full=formula == "functional"):
            w_in = position_weights(batch, fwd.h)
            w_out = position_weights(batch, fwd.full).unsqueeze(-1)
            f_hat = (fwd.h.double() @ C) * w_in.unsqueeze(-1)
            n_pos += w_in.sum()
            if formula == "squared":
                cot = plan.cotangents(fwd.full, hidden=False)
                scale = cot.scale
                make = source_cotangents(cot, batch, w_out)
                for a, b, J in integrated_vjp(fwd, plan.rule, plan.my_range(len(cot)), make,
                                              plan.chunk(fwd)):  # fmt: skip
                    attr = J.double().attributions(C_pinv, f_hat)  # (m, B, k_in)
                    E.index_add_(0, cot.feature_of(a, b).to(E.device), attr.square_().sum(1))
            else:
                make = functional_cotangents(plan, fwd.full, w_out)
                for a, b, J in integrated_vjp(fwd, plan.rule, plan.my_range(n_out), make,
                                              plan.chunk(fwd)):  # fmt: skip
                    E[a:b] += J.double().attributions(C_pinv, f_hat).sum(1)
    E = all_reduce_sum(E)
    if not plan.split_outputs:
        n_pos = all_reduce_sum(n_pos)
    return E * (scale / float(n_pos))
