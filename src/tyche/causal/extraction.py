"""Greedy causal basis extraction: directions whose ablation changes the output most.

For a target ``f`` (hidden states -> logits) and hidden states ``h``, the j-th direction is

    v_j = argmax_{‖v‖ = 1, v ⟂ v_1..v_{j-1}}  σ(v),
    σ(v) = mean over positions of KL(softmax f(h) ‖ softmax f(r(h, v)))   [nats]

where ``r`` ablates span(v) by zero, mean or resample ablation (``tyche.ablation``), or the
increase in next-token cross-entropy with ``objective="ce"``. Each direction is found by
L-BFGS with a strong-Wolfe line search on an unconstrained ``w``, evaluated at
``v = Q w / ‖Q w‖`` with ``Q = I - B Bᵀ`` projecting out the directions ``B`` found so far:
the constraint lives inside the objective, so gradients respect it and nothing edits the
parameter behind the optimiser's back. A fresh optimiser is made for every direction.

The search for each direction starts from the best (by energy) of a few candidates: the top
principal directions of the hidden states in the complement of ``B`` and, when the target
exposes ``readout_matrix()``, the top right-singular vectors of that readout (projected into
the complement). ``n_init=0`` starts from a random direction instead. The objective has
several local maxima; ``n_starts > 1`` runs L-BFGS from that many of the best candidates and
keeps the best result (a more global search at ``n_starts`` times the cost).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tyche.ablation import AblationMode
from tyche.causal.activations import next_token_labels, read_site_activations, token_inputs
from tyche.causal.objective import AblationObjective, Objective, Target
from tyche.causal.result import CausalBasis
from tyche.distributed import progress as progress_bar
from tyche.distributed import shard_range
from tyche.io import model_hash
from tyche.sites import resolve_sites

__all__ = [
    "extract_causal_basis",
    "extract_causal_bases",
    "pca_directions",
]


def _project_out(x: Tensor, basis: Tensor) -> Tensor:
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


def _readout_directions(target: Target, d: int) -> Tensor | None:
    """(d, r) right-singular vectors of ``target.readout_matrix()``, strongest first."""
    readout = getattr(target, "readout_matrix", None)
    if not callable(readout):
        return None
    matrix = readout()
    if not isinstance(matrix, Tensor) or matrix.ndim != 2 or matrix.shape[1] != d:
        raise ValueError(f"readout_matrix() must return a (V, {d}) tensor")
    _, _, vh = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    return vh.T


def _random_directions(d: int, m: int, found: Tensor, generator: torch.Generator) -> Tensor:
    """``m`` random unit directions (d, m) orthogonal to ``found``, from ``generator``."""
    w = _project_out(torch.randn(d, m, generator=generator, dtype=torch.float64), found.double())
    return w / w.norm(dim=0)


def _starting_directions(
    objective: AblationObjective,
    found: Tensor,
    moment: Tensor,
    readout: Tensor | None,
    n_init: int,
    n_starts: int,
    generator: torch.Generator,
) -> tuple[Tensor, list[float], int]:
    """The ``n_starts`` best candidates (d, n_starts), unit and ⟂ ``found``, their energies,
    and the number of candidates evaluated.

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
        pool = _project_out(torch.cat(candidates, 1), found.to(moment))
        norms = pool.norm(dim=0)
        pool = pool[:, norms > 1e-6] / norms[norms > 1e-6]
    if pool.shape[1] < n_starts:  # too few candidates (or none): add random directions
        extra = _random_directions(d, n_starts - pool.shape[1], found, generator)
        pool = torch.cat([pool, extra.to(pool)], 1)
    pool = pool.to(h)
    energies = torch.tensor([objective.energy(pool[:, i]) for i in range(pool.shape[1])])
    best = energies.argsort(descending=True)[:n_starts]
    return pool[:, best], energies[best].tolist(), pool.shape[1]


def _optimise_direction(
    objective: AblationObjective,
    found: Tensor,
    start: Tensor,
    start_energy: float,
    max_iter: int,
    tol: float,
) -> tuple[Tensor, int]:
    """Maximise the energy over unit vectors ⟂ ``found`` from ``start``; (v, evaluations)."""
    w = torch.nn.Parameter(start.detach().clone())
    scale = max(abs(start_energy), 1e-12)
    optimiser = torch.optim.LBFGS(
        [w],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol * scale,
        tolerance_change=tol * scale,
        history_size=10,
        line_search_fn="strong_wolfe",
    )
    n_evals = 0

    def closure() -> Tensor:
        nonlocal n_evals
        n_evals += 1
        optimiser.zero_grad()
        with torch.enable_grad():
            u = _project_out(w, found)
            v = u / u.norm()
            energy, grad_v = objective.value_and_grad(v.detach())
            (w.grad,) = torch.autograd.grad(v, w, grad_outputs=-grad_v)
        return -energy.to(w.dtype)

    if max_iter > 0:
        optimiser.step(closure)
    u = _project_out(w.detach(), found)
    return u / u.norm(), n_evals


def _best_direction(
    objective: AblationObjective,
    found: Tensor,
    starts: Tensor,
    start_energies: list[float],
    max_iter: int,
    tol: float,
) -> tuple[Tensor, float, int]:
    """Optimise from every start; the best direction, its energy and the evaluations spent."""
    best_v, best_energy, n_evals = starts[:, 0], -math.inf, 0
    for i, e0 in enumerate(start_energies):
        v, n = _optimise_direction(objective, found, starts[:, i], e0, max_iter, tol)
        energy = objective.energy(v)
        n_evals += n + 1
        if energy > best_energy:
            best_v, best_energy = v, energy
    return best_v, best_energy, n_evals


def extract_causal_basis(
    target: Target,
    hiddens: Tensor,
    k: int,
    *,
    mode: AblationMode = "mean",
    objective: Objective = "kl",
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    max_iter: int = 100,
    min_energy: float = 0.0,
    tol: float = 1e-7,
    n_init: int = 4,
    n_starts: int = 1,
    n_pca: int = 16,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    site: str | None = None,
    model_hash: str | None = None,
    progress: Any = False,
) -> CausalBasis:
    """Find ``k`` orthonormal directions of ``hiddens`` whose ablation changes ``target`` most.

    Args:
        target: hidden states (..., d) -> logits (..., V) (a lens, ``ModelFromSite``, or any
            callable acting row by row on the leading dimension).
        hiddens: (N, d) or (B, T, d) float hidden states (this rank's shard under torchrun).
        k: number of directions, 1 <= k <= d.
        mode: ablation, ``"mean"`` (default), ``"zero"`` or ``"resample"``.
        objective: ``"kl"`` (mean KL(clean ‖ ablated), nats) or ``"ce"`` (mean increase of
            the cross-entropy against ``labels``, nats).
        mask: ``hiddens.shape[:-1]`` bool/0-1 positions to use (padding off); None = all.
        labels: ``hiddens.shape[:-1]`` long, the class each position predicts (``-100`` =
            none); required for ``objective="ce"``.
        max_iter: L-BFGS iterations per direction.
        min_energy: stop when a direction's energy falls below this; it is not included.
        tol: relative tolerance on energy change (and gradient) that ends a direction's search.
        n_init: candidates of each kind (principal, readout) screened for each direction's
            start; 0: random starts only.
        n_starts: L-BFGS runs per direction, from the best ``n_starts`` candidates by energy;
            the best result is kept (the objective has several local maxima; cost grows
            linearly).
        n_pca: also report the energies of the top ``n_pca`` principal directions (0: skip).
        batch_size: rows of the leading dimension per forward pass (None: chunks of about
            1024 positions).
        generator: CPU generator for the random start (``n_init=0``) and the resampling
            derangement (held fixed for the whole extraction). Default: seeded with 0, so
            every rank under torchrun starts identically.
        site, model_hash: recorded in the result.
        progress: True for a progress bar, or an existing tqdm bar to advance by one per
            direction.

    Returns:
        A :class:`CausalBasis`; identical on every rank.
    """
    if not isinstance(hiddens, Tensor) or hiddens.ndim < 2:
        raise ValueError("hiddens must be a tensor of shape (N, d) or (B, T, d)")
    d = hiddens.shape[-1]
    if not isinstance(k, int) or not 1 <= k <= d:
        raise ValueError(f"k must be an int in 1..d={d} (the hidden size), got {k!r}")
    if max_iter < 0 or n_init < 0 or n_pca < 0 or n_starts < 1:
        raise ValueError("max_iter, n_init and n_pca must be >= 0 and n_starts >= 1")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    obj = AblationObjective(
        target,
        hiddens,
        mode=mode,
        objective=objective,
        mask=mask,
        labels=labels,
        generator=generator,
        batch_size=batch_size,
    )
    moment = obj.second_moment(centred=mode != "zero")
    readout = _readout_directions(target, d) if n_init else None
    if progress is True:
        bar = progress_bar(total=k, desc=site or "causal basis")
    else:  # False/None: no bar; otherwise a bar owned by the caller
        bar = None if progress is False or progress is None else progress

    found = hiddens.new_zeros(d, 0)
    energies: list[float] = []
    evals: list[int] = []
    seconds: list[float] = []
    for _ in range(k):
        start_time = time.perf_counter()
        starts, start_energies, n_screened = _starting_directions(
            obj, found, moment, readout, n_init, n_starts, generator
        )
        v, energy, n_opt = _best_direction(obj, found, starts, start_energies, max_iter, tol)
        if energy < min_energy:
            break
        n_evals = n_screened + n_opt
        if bar is not None:
            bar.update(1)
            bar.set_postfix(energy=f"{energy:.4g}", evals=n_evals)
        found = torch.cat([found, v[:, None]], 1)
        energies.append(energy)
        evals.append(n_evals)
        seconds.append(time.perf_counter() - start_time)
    if progress is True and bar is not None:
        bar.close()
    if not energies:
        raise ValueError(
            f"no direction reached min_energy={min_energy} nats (the best had {energy:.3g}); "
            "lower min_energy"
        )

    order = torch.tensor(energies).argsort(descending=True)
    vectors = found[:, order]
    subspace = [obj.energy(vectors[:, : i + 1]) for i in range(vectors.shape[1])]
    pca_energies = None
    if n_pca:
        pcs = pca_directions(obj.second_moment(centred=True), min(n_pca, d)).to(hiddens)
        pca_energies = torch.tensor(
            [obj.energy(pcs[:, i]) for i in range(pcs.shape[1])], dtype=torch.float64
        )
    return CausalBasis(
        vectors=vectors.detach().cpu(),
        energies=torch.tensor(energies, dtype=torch.float64)[order],
        subspace_energies=torch.tensor(subspace, dtype=torch.float64),
        site=site,
        mode=mode,
        objective=objective,
        n_positions=obj.n_positions,
        n_evals=[evals[i] for i in order.tolist()],
        seconds=[seconds[i] for i in order.tolist()],
        pca_energies=pca_energies,
        model_hash=model_hash,
        settings={
            "max_iter": max_iter,
            "min_energy": min_energy,
            "tol": tol,
            "n_init": n_init,
            "n_starts": n_starts,
            "k_requested": k,
        },
    )


def extract_causal_bases(
    model: nn.Module,
    data: Mapping[str, Tensor] | Tensor,
    k: int,
    sites: str | Sequence[str] = "resid_pre.*",
    *,
    target: str = "logit",
    lens: Any = None,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    on_basis: Callable[[str, CausalBasis], None] | None = None,
    **options: Any,
) -> dict[str, CausalBasis]:
    """Causal bases of every site of a model, in one call (one progress bar).

    Args:
        model: an HF causal LM (or any module ``tyche.sites`` can hook).
        data: token ids (N, T) or a dict with ``input_ids``/``attention_mask``. Under torchrun
            each rank takes its own contiguous block of rows (``shard_range``).
        k: directions per site.
        sites: site patterns, e.g. ``"resid_pre.*"`` (every block's input).
        target: ``"logit"`` (logit lens), ``"tuned"`` (``lens``, a :class:`TunedLens`), or
            ``"model"`` (the rest of the model from the site, :class:`ModelFromSite`).
        batch_size: rows of ``data`` per forward pass.
        seed: seeds the generator of every site's extraction (same on every rank).
        on_basis: called as ``on_basis(site, basis)`` as soon as a site is done (e.g. to save
            it, so an interruption loses no finished site).
        options: passed to :func:`extract_causal_basis` (``mode``, ``objective``,
            ``max_iter``, ``min_energy``, ``tol``, ``n_init``, ``n_starts``, ``n_pca``).

    Returns:
        ``{site name: CausalBasis}`` in layer order; identical on every rank.
    """
    from tyche.causal.lenses import LogitLens, ModelFromSite, TunedLens

    if target not in ("logit", "tuned", "model"):
        raise ValueError(f"target must be 'logit', 'tuned' or 'model', got {target!r}")
    if target == "tuned" and not isinstance(lens, TunedLens):
        raise ValueError("target='tuned' needs lens=TunedLens(...) (see train_tuned_lens)")
    tokens = token_inputs(data)
    names = [s.name for s in resolve_sites(model, sites)]
    rows = shard_range(tokens["input_ids"].shape[0])
    device = next(model.parameters()).device
    local = {key: v[rows.start : rows.stop].to(device) for key, v in tokens.items()}
    if options.get("objective", "kl") == "ce":
        options["labels"] = next_token_labels(local["input_ids"], local["attention_mask"])
    was_training = model.training
    model.eval()
    try:
        hiddens = read_site_activations(model, local, names, batch_size)
        hash_ = model_hash(model)
        bar = progress_bar(total=len(names) * k, desc="causal bases", disable=not progress)
        bases: dict[str, CausalBasis] = {}
        for name in names:
            bar.set_description(f"causal bases {name}")
            if target == "logit":
                fn: Target = LogitLens.from_model(model)
            elif target == "tuned":
                fn = lens.for_site(name)
            else:
                fn = ModelFromSite(model, name, local)
            bases[name] = extract_causal_basis(
                fn,
                hiddens[name],
                k,
                mask=local["attention_mask"],
                batch_size=batch_size,
                generator=torch.Generator().manual_seed(seed),
                site=name,
                model_hash=hash_,
                progress=bar,
                **options,
            )
            bar.update(k - bases[name].k)  # directions not found (min_energy)
            if on_basis is not None:
                on_basis(name, bases[name])
        bar.close()
    finally:
        model.train(was_training)
    return bases
