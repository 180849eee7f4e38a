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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from tyche import distributed as dist
from tyche.basin.checkpoint import FIELDS, SampleCheckpoint, field_dtype
from tyche.basin.preconditioners import user_preconditioner
from tyche.basin.radial import (
    log_gaussian_ray_mass,
    log_uniform_ray_volume,
    log_unit_sphere_area,
)
from tyche.basin.radius import search_radii
from tyche.basin.result import VolumeResult
from tyche.basin.sampling import unit_directions
from tyche.io import model_hash

LossFn = Callable[[torch.Tensor], torch.Tensor]


def _check_args(
    anchor: torch.Tensor,
    cutoff: float,
    sigma: float | None,
    n_samples: int,
    prior: str,
    batch_size: int | None,
    rtol: float,
) -> None:
    if not isinstance(anchor, torch.Tensor) or anchor.dim() != 1 or anchor.numel() == 0:
        raise ValueError(
            "anchor must be a non-empty 1-D tensor θ of length D (the flat parameters)"
        )
    if not torch.isfinite(anchor).all():
        raise ValueError("anchor contains NaN or inf values")
    if not (isinstance(cutoff, (int, float)) and math.isfinite(cutoff) and cutoff > 0):
        raise ValueError(f"cutoff must be a positive finite number of nats, got {cutoff!r}")
    if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if prior not in ("gaussian", "uniform"):
        raise ValueError(f"prior must be 'gaussian' or 'uniform', got {prior!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must lie in (0, 1), got {rtol!r}")


def _evaluate(loss_fn: LossFn, offsets: torch.Tensor) -> torch.Tensor:
    """loss_fn on a (B, D) batch, with its output checked: (B,) float64 on the CPU."""
    out = loss_fn(offsets)
    if not isinstance(out, torch.Tensor) or out.shape != (offsets.shape[0],):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"loss_fn returned {shape} for a batch of {offsets.shape[0]} offsets; it must "
            f"map offsets of shape (B, D) to one loss per row, shape (B,)"
        )
    return out.detach().to("cpu", torch.float64)


def _apply(pre: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """v = P u for rows u (B, D): diagonal p ⊙ u or matrix P u."""
    if pre is None:
        return u
    return u * pre if pre.dim() == 1 else u @ pre.T


def estimate_basin(
    loss_fn: LossFn,
    anchor: torch.Tensor,
    *,
    cutoff: float,
    sigma: float | None = None,
    n_samples: int,
    prior: Literal["gaussian", "uniform"] = "gaussian",
    preconditioner: torch.Tensor | None = None,
    batch_size: int | None = None,
    rtol: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
    max_radius: float | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    extra_settings: dict[str, Any] | None = None,
) -> VolumeResult:
    """Estimate log P(region) under N(0, σ²I_D) (or log Vol(region)), natural log.

    Args:
        loss_fn: maps offsets δ, shape (B, D), to losses, shape (B,), e.g. the mean KL of the
            model at θ+δ from the model at θ (``tyche.basin.loss``).
        anchor: θ, shape (D,). Offsets are built in its dtype and on its device.
        cutoff: the region is where loss_fn(δ) − loss_fn(0) < cutoff (nats for a KL).
        sigma: prior standard deviation; default the anchor's RMS, recorded in the result.
        n_samples: number of sampled directions.
        prior: "gaussian" for log-probability, "uniform" for log-volume.
        preconditioner: None, a positive (D,) vector p (v = p ⊙ u) or a (D, D) positive-
            definite matrix (v = P u, in parameter space); normalised to unit determinant.
        batch_size: directions evaluated together (one loss_fn call per search round);
            default min(n_samples, 16). Results do not depend on it.
        rtol: every returned loss rise lies within rtol·cutoff of the cutoff.
        seed: direction i is drawn from a generator seeded by (seed, i).
        max_radius: no boundary within this distance raises; default 100·(|θ| + σ√D).
        checkpoint: folder where finished samples are saved after every batch.
        resume: continue the run saved in ``checkpoint`` (its settings must match).
    """
    _check_args(anchor, cutoff, sigma, n_samples, prior, batch_size, rtol)
    if resume and checkpoint is None:
        raise ValueError("resume=True needs the checkpoint folder of the run to continue")
    dim = anchor.numel()
    theta64 = anchor.detach().to("cpu", torch.float64)
    theta_sq = float(theta64 @ theta64)
    if sigma is None:
        sigma = math.sqrt(theta_sq / dim) or 1.0
    pre = None if preconditioner is None else user_preconditioner(preconditioner.cpu(), dim)
    if max_radius is None:
        max_radius = 100.0 * (math.sqrt(theta_sq) + sigma * math.sqrt(dim))
    batch_size = batch_size or min(n_samples, 16)
    dist.init_distributed()

    base = _evaluate(loss_fn, torch.zeros(1, dim, dtype=anchor.dtype, device=anchor.device))
    if not torch.isfinite(base).all():
        raise ValueError(
            f"loss_fn(0) (the loss at the anchor) is {float(base[0])}; it must be finite"
        )
    settings = {
        "cutoff": cutoff,
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
        **(extra_settings or {}),
    }
    store = None
    if checkpoint is not None:
        store = SampleCheckpoint(checkpoint, settings, resume=resume, rank=dist.get_rank())
        dist.barrier()
    done = store.load_finished() if store is not None and resume else None
    finished = set(done["index"].tolist()) if done is not None else set()

    def directions(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unit directions v̂ (B, D) in the anchor's dtype/device, props |Pu| (B,) and
        v̂·θ (B,), the last two from the float64 directions."""
        u = unit_directions(seed, indices, dim, dtype=torch.float64)
        v = _apply(None if pre is None else pre.to(torch.float64), u)
        props = v.norm(dim=1)
        v = v / props[:, None]
        return v.to(anchor.dtype).to(anchor.device), props, v @ theta64

    def search(indices: list[int], init: float | None):
        vhat, props, dots = directions(indices)

        def rise(idx: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
            r = radius.to(anchor.device, anchor.dtype)[:, None]
            return _evaluate(loss_fn, r * vhat[idx.to(anchor.device)]) - base

        found = search_radii(
            rise,
            len(indices),
            cutoff=cutoff,
            rtol=rtol,
            init_radius=init,
            max_radius=max_radius,
            labels=indices,
        )
        return props, dots, found

    # A pilot search along direction 0 sets the starting radius of every other direction,
    # identically on every rank and for every batch size.
    _, _, pilot = search([0], None)
    init = float(pilot.radii[0])

    mine = [i for i in dist.shard_range(n_samples) if i not in finished]
    new: dict[str, list[torch.Tensor]] = {k: [] for k in FIELDS}
    bar = dist.progress(total=len(mine), desc="basin directions", disable=not progress)
    for start in range(0, len(mine), batch_size):
        indices = mine[start : start + batch_size]
        props, dots, found = search(indices, init)
        radii = found.radii.to(torch.float64)
        if prior == "gaussian":
            est = log_gaussian_ray_mass(dim, sigma, dots, theta_sq, radii)
            # the radial integral alone: the ray mass less its constant (no second quadrature)
            logint = est - log_unit_sphere_area(dim) + dim / 2 * math.log(2 * math.pi * sigma**2)
        else:
            logint = dim * torch.log(radii) - math.log(dim)
            est = log_uniform_ray_volume(dim, radii)
        est = est - dim * torch.log(props)
        batch = {
            "index": torch.tensor(indices, dtype=torch.long),
            "radii": radii,
            "deltas": found.deltas.to(torch.float64),
            "props": props.double(),
            "logabsint": torch.as_tensor(logint, dtype=torch.float64).reshape(-1),
            "estimates": torch.as_tensor(est, dtype=torch.float64).reshape(-1),
            "n_evals": found.n_evals.to(torch.long),
        }
        for k in FIELDS:
            new[k].append(batch[k])
        if store is not None:
            store.add(batch)
        bar.update(len(indices))
    bar.close()

    gathered = {
        k: dist.all_gather_cat(torch.cat(v) if v else torch.empty(0, dtype=field_dtype(k)))
        for k, v in new.items()
    }
    if done is not None:
        gathered = {k: torch.cat([done[k], gathered[k]]) for k in FIELDS}
    order = torch.argsort(gathered["index"])
    rec = {k: v[order] for k, v in gathered.items()}
    if rec["index"].tolist() != list(range(n_samples)):
        raise RuntimeError("internal error: samples are missing or duplicated after gathering")
    result = VolumeResult(
        estimates=rec["estimates"],
        radii=rec["radii"],
        deltas=rec["deltas"],
        props=rec["props"],
        mults=rec["radii"] / rec["props"],
        logabsint=rec["logabsint"],
        n_evals=rec["n_evals"],
        cutoff=float(cutoff),
        sigma=float(sigma),
        n_params=dim,
        prior=prior,
        settings={
            **settings,
            "pilot_radius": init,
            "pilot_evals": int(pilot.n_evals.sum()),
            "batch_size": batch_size,
        },
    )
    if dist.get_rank() == 0:
        result.warn_if_bound()
    return result
