"""Joint refinement of a causal basis: the best k-dimensional subspace to ablate at once.

Greedy deflation maximises each direction's energy given the earlier ones; nothing makes
their span the best subspace to ablate jointly (the energy of ablating the first i together
need not even grow with i). :func:`refine_jointly` maximises the joint energy
``σ(span Q)`` over orthonormal ``Q`` (d, k) by L-BFGS (strong-Wolfe line search) on an
unconstrained ``W`` (d, k) mapped to the Stiefel manifold by ``Q = qf(W)`` (the Q factor of
a QR decomposition with ``diag R > 0``, so ``qf(W) = W`` when ``W`` is orthonormal: a warm
start from the greedy basis starts exactly there). The energy depends on ``span Q`` only, so
the run stops once the gradient's component normal to the span is small,
``‖(I - Q Qᵀ) ∇σ‖ ≤ tol · σ``.

:func:`order_by_marginal_contribution` then orders a basis of the span greedily: the i-th
direction is the remaining one whose addition gives the largest joint energy of the first i
(chosen on the objective's subsample, then measured on all the data).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from tyche.causal.objective import AblationObjective
from tyche.causal.search import Direction

__all__ = ["order_by_marginal_contribution", "orthonormal_factor", "refine_jointly"]


def orthonormal_factor(w: Tensor) -> Tensor:
    """``qf(W)``: the Q factor of ``W`` (d, k) with the signs that make ``diag R > 0``."""
    q, r = torch.linalg.qr(w)
    sign = torch.sign(torch.diagonal(r))
    return q * torch.where(sign == 0, 1.0, sign)


class _Converged(Exception):
    pass


def refine_jointly(
    objective: AblationObjective, vectors: Tensor, energy: float, *, tol: float, max_iter: int
) -> Direction:
    """Maximise the joint energy of ablating span(Q), Q (d, k) orthonormal, from ``vectors``
    (orthonormal, with joint energy ``energy``).

    Returns the orthonormal basis (``Direction.vector``, (d, k)) that met the stopping rule
    (else the best evaluated, the start included), its joint energy and the passes spent.
    """
    w = torch.nn.Parameter(vectors.detach().clone())
    best = Direction(vectors, energy, 0.0)
    if max_iter == 0:
        return best
    optimiser = torch.optim.LBFGS(
        [w],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=0.0,
        tolerance_change=torch.finfo(objective.hiddens.dtype).eps * max(abs(best.energy), 1e-30),
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        best.evals += 1
        optimiser.zero_grad()
        with torch.enable_grad():
            q = orthonormal_factor(w)
            energy, grad = objective.value_and_grad(q.detach())
            (g,) = torch.autograd.grad(q, w, grad_outputs=-grad)
            w.grad = g.contiguous()
        q = q.detach()
        normal = grad - q @ (q.T @ grad)
        converged = float(normal.norm()) <= tol * abs(float(energy))
        if converged or float(energy) > best.energy:
            best.vector, best.energy = q.clone(), float(energy)
        if converged:
            raise _Converged
        return -energy.to(w.dtype)

    with contextlib.suppress(_Converged):
        optimiser.step(closure)
    return best


def order_by_marginal_contribution(
    objective: AblationObjective, vectors: Tensor
) -> tuple[Tensor, list[float], float]:
    """Columns of ``vectors`` (d, k) in greedy order of joint energy, the joint energies of the
    first i (on all the data), and the passes spent.

    Step i adds the remaining column that maximises the joint energy of the chosen ones plus
    it, measured on the subsample; ``k (k + 1) / 2 - 1`` subsample passes, then ``k`` full.
    """
    k = vectors.shape[1]
    chosen: list[int] = []
    remaining = list(range(k))
    passes = 0
    while len(remaining) > 1:
        scores = [objective.energy(vectors[:, chosen + [j]], subsample=True) for j in remaining]
        passes += len(remaining)
        chosen.append(remaining.pop(int(torch.tensor(scores).argmax())))
    ordered = vectors[:, chosen + remaining]
    prefix = [objective.energy(ordered[:, : i + 1]) for i in range(k)]
    return ordered, prefix, k + passes * objective.subsample_fraction
