"""The search for one causal direction: screen candidate starts, climb cheaply, then polish.

Each direction maximises the energy over unit vectors orthogonal to the directions ``B``
found before it. L-BFGS (strong-Wolfe line search) runs on an unconstrained ``w``, evaluated
at ``v = Q w / ‖Q w‖`` with ``Q = I - B Bᵀ``: the constraint lives inside the objective, so
nothing edits the parameter behind the optimiser's back, and a fresh optimiser is made for
every run. A run stops once the gradient tangent to the constraint set is small,
``‖(I - B Bᵀ - v vᵀ) ∇σ‖ ≤ tol · σ`` (near a maximum the energy lost is about
``(tol · σ)² / (2 κ)`` for curvature ``κ``: ~1e-5 relative at ``tol = 1e-2``), rather than on
energy changes, which stall at float32 rounding long before. A run returns the point that met
the rule (or, if none did, the best point it evaluated) with the energy measured there, so no
pass is spent re-measuring it.

The work per direction, in passes over the data:

1. screening: the energies of the candidate starts (top principal directions and readout
   directions, in the complement of ``B``) on the objective's subsample (forward only);
2. climbing: L-BFGS from the best ``n_starts`` candidates on the subsample, to a loose
   tolerance (its optimum is only as good as the subsample anyway);
3. polishing: L-BFGS from the best climbed point on all the data, to ``tol``.

With data no larger than the subsample, steps 2-3 are one L-BFGS run per start on all of it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from tyche.causal.objective import AblationObjective, Target
from tyche.errors import InputError

__all__ = ["Direction", "find_direction", "pca_directions", "project_out", "readout_directions"]

#: tangent-gradient tolerance (relative to the energy) of the climb on the subsample: its
#: optimum is within ~0.1-0.2 rad of the full data's (measured on zoo:shakespeare-lm with
#: 1,024 positions), so climbing further than ~energy error 1e-3 buys nothing
CLIMB_TOL = 0.1


def project_out(x: Tensor, basis: Tensor) -> Tensor:
    """``(I - B Bᵀ) x`` applied twice (re-orthogonalisation keeps float32 errors ~1e-7)."""
    if basis.shape[1] == 0:
        return x
    for _ in range(2):
        x = x - basis @ (basis.T @ x)
    return x


def pca_directions(moment: Tensor, m: int, exclude: Tensor | None = None) -> Tensor:
    """Top-``m`` eigenvectors (d, m) of a (d, d) second moment, in the complement of ``exclude``.

    Eigenvectors are ordered by decreasing eigenvalue; the sign of each is fixed so that its
    largest-magnitude entry is positive (the same on every rank and every run).
    """
    d = moment.shape[0]
    if exclude is not None and exclude.shape[1]:
        q = torch.eye(d, dtype=moment.dtype, device=moment.device)
        q = q - exclude.to(moment) @ exclude.to(moment).T
        moment = q @ moment @ q
    values, vectors = torch.linalg.eigh((moment + moment.T) / 2)
    vectors = vectors[:, values.argsort(descending=True)[:m]]
    sign = vectors.gather(0, vectors.abs().argmax(0, keepdim=True)).sign()
    return vectors * torch.where(sign == 0, 1.0, sign)


def readout_directions(target: Target, d: int) -> Tensor | None:
    """(d, r) right-singular vectors of ``target.readout_matrix()``, strongest first."""
    readout = getattr(target, "readout_matrix", None)
    if not callable(readout):
        return None
    matrix = readout()
    if not isinstance(matrix, Tensor) or matrix.ndim != 2 or matrix.shape[1] != d:
        raise InputError(f"readout_matrix() must return a (V, {d}) tensor")
    _, _, vh = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    return vh.T


def _random_directions(d: int, m: int, found: Tensor, generator: torch.Generator) -> Tensor:
    """``m`` random unit directions (d, m) orthogonal to ``found``, from ``generator``."""
    w = project_out(torch.randn(d, m, generator=generator, dtype=torch.float64), found.double())
    return w / w.norm(dim=0)


@dataclass
class Direction:
    """A point found by a search: the unit vector, its energy (nats) on the data it was
    measured on, and the evaluation-equivalents spent (passes over all the data)."""

    vector: Tensor
    energy: float
    evals: float


class _Converged(Exception):
    """Raised in the L-BFGS closure once the tangent gradient is small enough."""


def maximise(
    objective: AblationObjective,
    found: Tensor,
    start: Tensor,
    *,
    tol: float,
    max_iter: int,
    scale: float,
    subsample: bool = False,
) -> Direction:
    """L-BFGS from ``start`` over unit vectors ⟂ ``found``; the point that met the stopping
    rule, or else the best point evaluated.

    Stops when ``‖tangent gradient‖ ≤ tol · |energy|``, after ``max_iter`` iterations, or when
    L-BFGS stalls: energy changes below the dtype's resolution relative to ``scale`` (an
    energy of the order of those on the way, e.g. the start's).
    """
    w = torch.nn.Parameter(start.detach().clone())
    if max_iter == 0:
        v = project_out(w.detach(), found)
        v = v / v.norm()
        return Direction(v, objective.energy(v, subsample=subsample), 0.0)
    optimiser = torch.optim.LBFGS(
        [w],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=0.0,
        tolerance_change=torch.finfo(objective.hiddens.dtype).eps * max(abs(scale), 1e-30),
        history_size=10,
        line_search_fn="strong_wolfe",
    )
    best = Direction(start, -float("inf"), 0.0)

    def closure() -> Tensor:
        best.evals += 1
        optimiser.zero_grad()
        with torch.enable_grad():
            u = project_out(w, found)
            v = u / u.norm()
            energy, grad = objective.value_and_grad(v.detach(), subsample=subsample)
            (w.grad,) = torch.autograd.grad(v, w, grad_outputs=-grad)
        v = v.detach()
        tangent = project_out(grad, found)
        tangent = tangent - (tangent @ v) * v
        converged = float(tangent.norm()) <= tol * abs(float(energy))
        if converged or float(energy) > best.energy:
            best.vector, best.energy = v.clone(), float(energy)
        if converged:  # return this point: it meets the stopping rule
            raise _Converged
        return -energy.to(w.dtype)

    with contextlib.suppress(_Converged):
        optimiser.step(closure)
    return best


def starting_directions(
    objective: AblationObjective,
    found: Tensor,
    moment: Tensor,
    readout: Tensor | None,
    n_init: int,
    n_starts: int,
    generator: torch.Generator,
) -> tuple[Tensor, list[float], int]:
    """The ``n_starts`` best candidates (d, n_starts) by energy on the subsample, unit and
    ⟂ ``found``, their energies there, and the number of candidates screened.

    Candidates: the top ``n_init`` principal directions of the data in the complement of
    ``found`` and the top ``n_init`` readout directions projected into it; random directions
    make up the number when there are too few (or ``n_init=0``).
    """
    h = objective.hiddens
    d = h.shape[-1]
    pool = moment.new_zeros(d, 0)
    if n_init:
        candidates = [pca_directions(moment, n_init, found)]
        if readout is not None:
            candidates.append(readout[:, :n_init].to(moment))
        pool = project_out(torch.cat(candidates, 1), found.to(moment))
        norms = pool.norm(dim=0)
        pool = pool[:, norms > 1e-6] / norms[norms > 1e-6]
    if pool.shape[1] < n_starts:  # too few candidates (or none): add random directions
        extra = _random_directions(d, n_starts - pool.shape[1], found, generator)
        pool = torch.cat([pool, extra.to(pool)], 1)
    pool = pool.to(h)
    energies = torch.tensor([objective.energy(pool[:, i], subsample=True)
                             for i in range(pool.shape[1])])  # fmt: skip
    best = energies.argsort(descending=True)[:n_starts]
    return pool[:, best], energies[best].tolist(), pool.shape[1]


def find_direction(
    objective: AblationObjective,
    found: Tensor,
    starts: Tensor,
    start_energies: list[float],
    *,
    tol: float,
    max_iter: int,
) -> Direction:
    """The best direction ⟂ ``found`` from the candidate ``starts`` (d, n) (see module doc).

    ``start_energies`` are the starts' energies on the subsample. ``evals`` of the result
    counts every pass spent here, a subsample pass as its fraction of the positions
    (screening is counted by the caller).
    """
    fraction = objective.subsample_fraction
    if fraction >= 1:  # no subsample: one run per start on all the data
        runs = [maximise(objective, found, starts[:, i], tol=tol, max_iter=max_iter, scale=e)
                for i, e in enumerate(start_energies)]  # fmt: skip
        best = max(runs, key=lambda r: r.energy)
        return Direction(best.vector, best.energy, sum(r.evals for r in runs))
    climbs = [maximise(objective, found, starts[:, i], tol=CLIMB_TOL, max_iter=max_iter,
                       scale=e, subsample=True) for i, e in enumerate(start_energies)]  # fmt: skip
    climbed = max(climbs, key=lambda r: r.energy)
    polished = maximise(objective, found, climbed.vector, tol=tol, max_iter=max_iter,
                        scale=climbed.energy)  # fmt: skip
    polished.evals += fraction * sum(r.evals for r in climbs)
    return polished
