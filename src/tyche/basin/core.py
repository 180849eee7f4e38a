"""`estimate_basin`: the Tyche estimator of a basin's prior probability (or volume).

For an anchor θ ∈ R^D and a loss rise Δ(δ) = L(θ+δ) − L(θ), the region is the star-shaped
set {θ + r v̂ : 0 ≤ r < R(v̂)} where R(v̂) is where Δ first reaches the cutoff. In polar
coordinates its prior mass is an expectation over directions of a one-dimensional radial
integral, so each sampled direction gives an unbiased importance-sampling estimate:

    Gaussian prior N(0, σ²I):  est = log A_{D−1} − (D/2) log(2πσ²)
                                     + log ∫₀^R r^{D−1} exp(−|θ + r v̂|²/(2σ²)) dr − D log|Pu|
    uniform prior (volume):    est = log V_D + D log R − D log|Pu|

with u uniform on the sphere, v = Pu for a unit-determinant preconditioner P (the
−D log|Pu| term is the exact importance weight of the angular central Gaussian), and
v̂ = v/|v|. The answer is the log-mean-exp of the estimates.

Memory stays bounded at any D: directions are drawn chunk by chunk in the anchor's dtype and
device (``tyche.basin.sampling``), the float64 sums they need are accumulated by slices, and
the batch of directions searched together is sized from a memory budget
(``tyche.basin.memory``). The settings come as one `BasinOptions`; with its ``cutoffs=[...]``
every direction is searched once for all of them and the result is a `BasinCurve`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tyche import distributed as dist
from tyche.basin.checkpoint import FIELDS, SampleCheckpoint, field_dtype
from tyche.basin.curve import BasinCurve
from tyche.basin.memory import bytes_per_direction, choose_batch
from tyche.basin.options import BasinOptions
from tyche.basin.preconditioners import user_preconditioner
from tyche.basin.radial import (
    log_gaussian_ray_mass,
    log_uniform_ray_volume,
    log_unit_sphere_area,
)
from tyche.basin.radius import RadiusSearch, search_radii
from tyche.basin.result import VolumeResult
from tyche.basin.sampling import DirectionBatch, sq_norm
from tyche.errors import InputError
from tyche.io import model_hash

LossFn = Callable[[torch.Tensor], torch.Tensor]


def _check_anchor(anchor: torch.Tensor) -> None:
    if not isinstance(anchor, torch.Tensor) or anchor.dim() != 1 or anchor.numel() == 0:
        raise InputError(
            "anchor must be a non-empty 1-D tensor θ of length D (the flat parameters)"
        )
    if not anchor.is_floating_point():
        raise InputError(f"anchor must be a floating-point tensor, got {anchor.dtype}")
    if not torch.isfinite(anchor).all():
        raise InputError("anchor contains NaN or inf values")


def _sq_norm(x: torch.Tensor) -> float:
    """|x|² in float64, accumulated by slices (no float64 copy of x)."""
    return float(sq_norm(x, None))


def _evaluate(loss_fn: LossFn, offsets: torch.Tensor) -> torch.Tensor:
    """loss_fn on a (B, D) batch, with its output checked: (B,) float64 on the CPU."""
    out = loss_fn(offsets)
    if not isinstance(out, torch.Tensor) or out.shape != (offsets.shape[0],):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(
            f"loss_fn returned {shape} for a batch of {offsets.shape[0]} offsets; it must "
            f"map offsets of shape (B, D) to one loss per row, shape (B,)"
        )
    return out.detach().to("cpu", torch.float64)


def estimate_basin(
    loss_fn: LossFn,
    anchor: torch.Tensor,
    options: BasinOptions,
    *,
    preconditioner: torch.Tensor | None = None,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    extra_settings: dict[str, Any] | None = None,
    groups: torch.Tensor | None = None,
) -> VolumeResult | BasinCurve:
    """Estimate log P(region) under N(0, σ²I_D) (or log Vol(region)), natural log.

    Args:
        loss_fn: maps offsets δ, shape (B, D), to losses, shape (B,), e.g. the mean KL of the
            model at θ+δ from the model at θ (``tyche.basin.loss``). It may declare
            ``bytes_per_offset``, the memory it needs per row, for the batch budget.
        anchor: θ, shape (D,). Directions and offsets are built in its dtype and on its
            device.
        options: the estimation settings (`BasinOptions`): the region is where
            loss_fn(δ) − loss_fn(0) < ``options.cutoff`` (nats for a KL), a `VolumeResult`;
            with ``options.cutoffs`` every direction is searched once for all of them and
            the result is a `BasinCurve`. Also the prior and σ (default the anchor's RMS,
            recorded in the result), the number of directions and their seed (direction i
            comes from generators seeded by (seed, i)), rtol, the batch size and memory
            budget (results do not depend on them; ``tyche.basin.memory``) and max_radius
            (default 100·(|θ| + σ√D)).
        preconditioner: None, a positive (D,) vector p (v = p ⊙ u) or a (D, D) positive-
            definite matrix (v = P u, in parameter space); normalised to unit determinant.
        progress: show a progress bar over the directions (rank 0 only).
        checkpoint: folder where finished samples are saved after every batch.
        resume: continue the run saved in ``checkpoint`` (its settings must match).
        extra_settings: more keys recorded in the result's (and the checkpoint's) settings.
        groups: with ``options.adapt``, the coordinates that share one scale of the adapted
            proposal, a (D,) integer tensor of group ids (`tyche.basin.adaptive`); default
            one group per coordinate up to 1,024 parameters, else one per parameter tensor of
            a `ModelLoss` (its ``layout``).
    """
    if not isinstance(options, BasinOptions):
        raise InputError(
            f"options must be a BasinOptions (tyche.basin.BasinOptions), got "
            f"{type(options).__name__}"
        )
    _check_anchor(anchor)
    if resume and checkpoint is None:
        raise InputError("resume=True needs the checkpoint folder of the run to continue")
    if options.adapt:
        from tyche.basin.adaptive import estimate_adaptive

        curve = estimate_adaptive(loss_fn, anchor, options, preconditioner=preconditioner,
                                  groups=groups, progress=progress, checkpoint=checkpoint,
                                  resume=resume, extra_settings=extra_settings)  # fmt: skip
        if dist.get_rank() == 0:
            _warn_if_bound(curve)
        if options.cutoffs is not None:
            return curve
        return dataclasses.replace(curve[0], settings=dict(curve.settings))
    if groups is not None:
        raise InputError("groups= shapes the adapted proposal: it needs options.adapt >= 1")
    curve = run_directions(loss_fn, anchor, options, preconditioner=preconditioner,
                           progress=progress, checkpoint=checkpoint, resume=resume,
                           extra_settings=extra_settings)  # fmt: skip
    if dist.get_rank() == 0:
        _warn_if_bound(curve)
    if options.cutoffs is not None:
        return curve
    return dataclasses.replace(curve[0], settings=dict(curve.settings))


def run_directions(
    loss_fn: LossFn,
    anchor: torch.Tensor,
    options: BasinOptions,
    *,
    preconditioner: torch.Tensor | None,
    progress: bool,
    checkpoint: str | Path | None,
    resume: bool,
    extra_settings: dict[str, Any] | None,
    first_index: int = 0,
) -> BasinCurve:
    """The estimate from directions ``first_index … first_index + n_samples − 1``, each drawn
    as the preconditioner says (`estimate_basin` without adaptation, always a curve)."""
    targets, n_samples, prior = options.targets, options.n_samples, options.prior
    sigma, rtol, seed, max_radius = options.sigma, options.rtol, options.seed, options.max_radius
    dim = anchor.numel()
    anchor = anchor.detach()
    theta_sq = _sq_norm(anchor)
    if sigma is None:
        sigma = math.sqrt(theta_sq / dim) or 1.0
    pre = None if preconditioner is None else user_preconditioner(preconditioner.cpu(), dim)
    if max_radius is None:
        max_radius = 100.0 * (math.sqrt(theta_sq) + sigma * math.sqrt(dim))
    # A ray still inside the basin at max_radius ends there when the Gaussian prior's mass
    # beyond it is below e^-70 of the ray's (|θ + r v̂| ≥ r − |θ| ≥ σ(√D + 12) out there): an
    # exactly flat direction then counts its whole ray instead of failing the run.
    saturate = prior == "gaussian" and max_radius - math.sqrt(theta_sq) >= sigma * (
        math.sqrt(dim) + 12
    )
    per_direction = bytes_per_direction(
        dim, anchor.element_size(), getattr(loss_fn, "bytes_per_offset", 0)
    )
    batch_size = choose_batch(n_samples, dim, per_direction, batch_size=options.batch_size,
                              max_memory=options.max_memory, device=anchor.device)  # fmt: skip
    dist.init_distributed()

    base = _evaluate(loss_fn, torch.zeros(1, dim, dtype=anchor.dtype, device=anchor.device))
    if not torch.isfinite(base).all():
        raise InputError(
            f"loss_fn(0) (the loss at the anchor) is {float(base[0])}; it must be finite"
        )
    settings = {
        **({"cutoff": targets[0]} if options.cutoffs is None else {"cutoffs": targets}),
        "sigma": sigma,
        "n_samples": n_samples,
        "prior": prior,
        "rtol": rtol,
        "seed": seed,
        "n_params": dim,
        "max_radius": max_radius,
        "preconditioner": "none" if pre is None else ("diagonal" if pre.dim() == 1 else "matrix"),
        # its values too, so a resumed run can never mix two preconditioners of one kind
        "preconditioner_hash": None if pre is None else model_hash({"p": pre}),
        **({"first_index": first_index} if first_index else {}),
        **(extra_settings or {}),
    }
    store = None
    if checkpoint is not None:
        store = SampleCheckpoint(checkpoint, settings, resume=resume, rank=dist.get_rank())
        dist.barrier()
    done = store.load_finished() if store is not None and resume else None
    finished = set(done["index"].tolist()) if done is not None else set()
    if pre is not None and pre.dim() == 1:
        pre = pre.to(anchor.device)

    def search(batch: DirectionBatch, init: float | None, guide) -> RadiusSearch:
        def rise(idx: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
            return _evaluate(loss_fn, batch.offsets(idx, radius)) - base

        return search_radii(rise, len(batch.indices), cutoffs=targets, rtol=rtol,
                            init_radius=init, max_radius=max_radius, labels=batch.indices,
                            guide=guide, saturate=saturate)  # fmt: skip

    # A pilot search along direction 0 sets the starting radius of every other direction and
    # the shape they extrapolate along, identically on every rank and for every batch size.
    first = DirectionBatch.draw(seed, [first_index], anchor, pre)
    pilot = search(first, None, None)
    init, guide = float(pilot.radii[0, 0]), pilot.trace[0]
    reuse = {first_index: (first.z[0], first.sums[0])}
    del first

    mine = [first_index + i for i in dist.shard_range(n_samples)
            if first_index + i not in finished]  # fmt: skip
    new: dict[str, list[torch.Tensor]] = {k: [] for k in FIELDS}
    bar = dist.progress(total=len(mine), desc="basin directions", disable=not progress)
    batch = None
    for start in range(0, len(mine), batch_size):
        indices = mine[start : start + batch_size]
        batch = DirectionBatch.draw(seed, indices, anchor, pre, reuse=reuse, recycle=batch)
        reuse = {}  # the pilot's draw is only ever in the first batch (rank 0's)
        found = search(batch, init, guide)
        props, dots = batch.props, batch.dots
        radii = found.radii.to(torch.float64)  # (B, K)
        if prior == "gaussian":
            est = log_gaussian_ray_mass(dim, sigma, dots[:, None], theta_sq, radii)
            # the radial integral alone: the ray mass less its constant (no second quadrature)
            logint = est - log_unit_sphere_area(dim) + dim / 2 * math.log(2 * math.pi * sigma**2)
        else:
            logint = dim * torch.log(radii) - math.log(dim)
            est = log_uniform_ray_volume(dim, radii)
        est = est - dim * torch.log(props)[:, None]
        record = {
            "index": torch.tensor(indices, dtype=torch.long),
            "radii": radii,
            "deltas": found.deltas.to(torch.float64),
            "props": props.double(),
            "logabsint": torch.as_tensor(logint, dtype=torch.float64).reshape(radii.shape),
            "estimates": torch.as_tensor(est, dtype=torch.float64).reshape(radii.shape),
            "n_evals": found.n_evals.to(torch.long),
        }
        for k in FIELDS:
            new[k].append(record[k])
        if store is not None:
            store.add(record)
        bar.update(len(indices))
    bar.close()
    del batch

    width = len(targets)
    gathered = {
        k: dist.all_gather_cat(torch.cat(v) if v else _empty(k, width)) for k, v in new.items()
    }
    if done is not None:
        gathered = {k: torch.cat([done[k], gathered[k]]) for k in FIELDS}
    order = torch.argsort(gathered["index"])
    rec = {k: v[order] for k, v in gathered.items()}
    if rec["index"].tolist() != list(range(first_index, first_index + n_samples)):
        raise RuntimeError("internal error: samples are missing or duplicated after gathering")
    curve = BasinCurve(
        cutoffs=torch.tensor(targets, dtype=torch.float64),
        estimates=rec["estimates"],
        radii=rec["radii"],
        deltas=rec["deltas"],
        props=rec["props"],
        logabsint=rec["logabsint"],
        n_evals=rec["n_evals"],
        sigma=float(sigma),
        n_params=dim,
        prior=prior,
        settings={
            **settings,
            "pilot_radius": init,
            "pilot_radii": pilot.radii[0].tolist(),
            "pilot_evals": int(pilot.n_evals.sum()),
            "batch_size": batch_size,
        },
    )
    return curve


def _warn_if_bound(curve: BasinCurve) -> None:
    bound = [r for r in curve.results if r.is_lower_bound]
    if len(bound) == len(curve) == 1:
        bound[0].warn_if_bound(stacklevel=4)
    elif bound:
        shown = ", ".join(f"{r.cutoff:g} (ESS {r.ess:.2f}, k̂ {r.khat:.2f})" for r in bound)
        warnings.warn(
            f"effective sample size and Pareto k̂ at cutoffs {shown}: lower bound only there: "
            f"{bound[0].bound_reason}, so the log-mean-exp lies below the log-probability; "
            "use a preconditioner or more samples.",
            stacklevel=3,
        )


def _empty(field: str, width: int) -> torch.Tensor:
    per_cutoff = field in ("radii", "deltas", "logabsint", "estimates")
    return torch.empty((0, width) if per_cutoff else (0,), dtype=field_dtype(field))
