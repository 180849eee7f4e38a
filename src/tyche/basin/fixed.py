"""`run_directions`: the estimate from directions drawn from one fixed law.

The law is the isotropic one or a preconditioner's (v = Pu); `estimate_basin` runs it once,
or once per round and component of the adaptive mixture (`tyche.basin.adaptive`). See
`tyche.basin.core` for the estimator's formulas.
"""

from __future__ import annotations

import math
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
from tyche.basin.radius import Horizon, RadiusSearch, search_radii
from tyche.basin.sampling import DirectionBatch, sq_norm
from tyche.errors import InputError
from tyche.io import model_hash

LossFn = Callable[[torch.Tensor], torch.Tensor]


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
                            init_radius=init, max_radius=Horizon(max_radius) if saturate
                            else max_radius, labels=batch.indices, guide=guide)  # fmt: skip

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


def _empty(field: str, width: int) -> torch.Tensor:
    per_cutoff = field in ("radii", "deltas", "logabsint", "estimates")
    return torch.empty((0, width) if per_cutoff else (0,), dtype=field_dtype(field))
