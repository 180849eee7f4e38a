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
import warnings
from pathlib import Path
from typing import Any

import torch

from tyche import distributed as dist
from tyche.basin.adaptive import estimate_adaptive
from tyche.basin.curve import BasinCurve
from tyche.basin.fixed import LossFn, run_directions
from tyche.basin.options import BasinOptions
from tyche.basin.result import VolumeResult
from tyche.errors import InputError


def _check_anchor(anchor: torch.Tensor) -> None:
    if not isinstance(anchor, torch.Tensor) or anchor.dim() != 1 or anchor.numel() == 0:
        raise InputError(
            "anchor must be a non-empty 1-D tensor θ of length D (the flat parameters)"
        )
    if not anchor.is_floating_point():
        raise InputError(f"anchor must be a floating-point tensor, got {anchor.dtype}")
    if not torch.isfinite(anchor).all():
        raise InputError("anchor contains NaN or inf values")


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
