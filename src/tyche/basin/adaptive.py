"""Adaptive direction sampling: a proposal over directions learned from the search itself.

Why. The estimator averages, over directions v̂, the prior mass of the ray up to the
basin's boundary, divided by the density q(v̂) the direction was drawn from. Where the
minimum is degenerate the mass lives in rare directions (within about √ε of a flat axis),
which isotropic draws almost never hit: the average then follows the typical direction and
is only a lower bound (Pareto k̂ ≥ 0.7). The best proposal is q*(v̂) ∝ ray mass(v̂). For a
quadratic loss ½ δᵀHδ with radii inside the prior's scale that is (v̂ᵀHv̂)^(−D/2): exactly
an *angular central Gaussian* (ACG), the law of Σ^½z/|Σ^½z| for z ~ N(0, I), whose density
on the sphere relative to the uniform law is |Σ|^(−½) (v̂ᵀΣ⁻¹v̂)^(−D/2), with Σ ∝ H⁻¹. The
existing preconditioners are ACGs already (Σ = PPᵀ); adaptation fits Σ to the volume.

How (the cross-entropy method for rare events, with importance weights throughout).
Round 0 draws ``n_samples`` directions from the base law (isotropic, or the given diagonal
preconditioner b). After each round, the rises measured along every ray so far are fitted
by a quadratic plus a quartic term per *group* of coordinates (per coordinate for small D,
per parameter tensor of a model, or any (D,) group ids given), which gives each cutoff a
diagonal Σ = b² ⊙ c with one scale c_g per group (`_fit_proposals`); one sharpness factor
is then fitted to the volume itself: the weighted maximum likelihood of those ACGs, the
directions' weights w_i ∝ ray mass_ik / q(v̂_i) tempered to w^β, β ≤ 1 the largest that
keeps their effective sample size at ``ESS_FRACTION`` of the round (so one lucky direction
cannot decide it). The statistics needed are the (n, G) sums of û² and û⁴ per group
(û = v̂/b), accumulated in float64 by slices (bounded memory).

The next round draws from the deterministic mixture of the base law (a defensive share,
``DEFENSIVE_SHARE``) and one fitted ACG per cutoff, each direction weighted by the mixture's
density (the balance heuristic): with the shares fixed beforehand this is exactly unbiased
for the prior mass at every cutoff, and the base share bounds every weight by
1/(share · q_base). The result is the last round's directions and weights (so unbiased
given the proposal, which the earlier rounds chose); the earlier rounds are recorded in
``settings["adapt_rounds"]`` with their own log P, k̂ and loss evaluations.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from tyche import distributed as dist
from tyche.basin.curve import BasinCurve
from tyche.basin.fixed import run_directions
from tyche.basin.options import BasinOptions
from tyche.basin.preconditioners import user_preconditioner
from tyche.basin.result import effective_sample_size
from tyche.basin.sampling import STAT_CHUNK, fill_gaussian
from tyche.errors import InputError

__all__ = ["DEFENSIVE_SHARE", "ESS_FRACTION", "default_groups", "estimate_adaptive"]

#: share of each adapted round drawn from the base law (defensive importance sampling)
DEFENSIVE_SHARE = 0.1
#: the tempered weights of a fit keep an effective sample size of this share of the round
ESS_FRACTION = 0.1
#: up to this many parameters, every coordinate has its own scale by default
PER_COORDINATE_UP_TO = 1024


def default_groups(loss_fn: Any, dim: int) -> torch.Tensor:
    """(D,) long group ids: one per coordinate up to ``PER_COORDINATE_UP_TO`` parameters,
    else one per parameter tensor of ``loss_fn.layout`` (a `ModelLoss`), else one group."""
    if dim <= PER_COORDINATE_UP_TO:
        return torch.arange(dim)
    layout = getattr(loss_fn, "layout", None)
    shapes = getattr(layout, "shapes", None)
    sizes = None if shapes is None else [math.prod(s) for s in shapes]
    if sizes is not None and sum(sizes) == dim:
        return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(list(sizes)))
    warnings.warn(
        f"adapt: D = {dim:,} and loss_fn has no parameter layout, so the proposal has a "
        "single scale and cannot adapt its shape; give groups= (one id per coordinate)",
        stacklevel=3,
    )
    return torch.zeros(dim, dtype=torch.long)


def _check_groups(groups: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Relabelled ids 0..G−1 (D,) and the group sizes (G,) float64."""
    if not isinstance(groups, torch.Tensor) or groups.shape != (dim,) or groups.is_floating_point():
        raise InputError(f"groups must be a (D,) = ({dim},) integer tensor of group ids")
    _, ids = torch.unique(groups.cpu(), return_inverse=True)
    return ids, torch.bincount(ids).double()


@dataclasses.dataclass(frozen=True)
class _Component:
    """One ACG of the mixture: its diagonal preconditioner p = b ⊙ √c[group] (None: the
    base law without a base preconditioner), its scales c (G,) and its directions."""

    name: str
    scales: torch.Tensor  # (G,) float64, Σ n_g log c_g = 0
    count: int


def estimate_adaptive(
    loss_fn: Any,
    anchor: torch.Tensor,
    options: BasinOptions,
    *,
    preconditioner: torch.Tensor | None,
    groups: torch.Tensor | None,
    progress: bool,
    checkpoint: str | Path | None,
    resume: bool,
    extra_settings: dict[str, Any] | None,
) -> BasinCurve:
    """``options.adapt`` rounds of adaptation, then the estimate (a `BasinCurve`); see the
    module docstring. Arguments as `tyche.basin.estimate_basin`'s."""
    dim, n = anchor.numel(), options.n_samples
    if preconditioner is not None and torch.as_tensor(preconditioner).dim() != 1:
        raise InputError(
            "adapt fits a diagonal proposal: give a diagonal preconditioner (a (D,) vector) "
            "or none with adapt >= 1"
        )
    base = None if preconditioner is None else user_preconditioner(preconditioner.cpu(), dim)
    ids, sizes = _check_groups(default_groups(loss_fn, dim) if groups is None else groups, dim)
    n_groups, n_cut = len(sizes), len(options.targets)
    if n < 2 * (n_cut + 1):
        raise InputError(
            f"adapt needs n_samples >= {2 * (n_cut + 1)} with {n_cut} cutoff(s): each round "
            "draws at least two directions from the base law and from each cutoff's proposal"
        )
    fixed = dataclasses.replace(options, adapt=0)
    prior_precision = _prior_precision(base, ids, sizes, anchor, options)
    ones = torch.zeros(n_groups, dtype=torch.float64)  # log scales of the base law
    components = [_Component("base", ones, n)]
    fits = [ones] * n_cut
    history: list[dict[str, Any]] = []
    seen: list[tuple[torch.Tensor, torch.Tensor, BasinCurve]] = []  # each round's A, B, curve
    offset, total_evals = 0, 0
    bar = dist.progress(total=(options.adapt + 1) * n, desc="basin directions (adaptive)",
                        disable=not progress)  # fmt: skip
    for rnd in range(options.adapt + 1):
        parts, stats = [], []
        for m, comp in enumerate(components):
            pre = _preconditioner(base, comp.scales, ids)
            sub = None if checkpoint is None else Path(checkpoint) / f"round{rnd}-{comp.name}"
            with warnings.catch_warnings():  # the final curve's verdict speaks for the round
                warnings.filterwarnings("ignore", message="effective sample size")
                part = run_directions(
                    loss_fn, anchor, dataclasses.replace(fixed, n_samples=comp.count),
                    preconditioner=pre, progress=False, checkpoint=sub,
                    resume=resume and sub is not None and sub.is_dir(),
                    extra_settings={**(extra_settings or {}), "adapt": options.adapt,
                                    "adapt_round": rnd, "adapt_component": m},
                    first_index=offset,
                )  # fmt: skip
            parts.append(part)
            stats.append(_group_stats(options.seed, offset, comp.count, anchor, pre, ids,
                                      n_groups))  # fmt: skip
            offset += comp.count
            bar.update(comp.count)
        drawn = torch.cat([c.scales.expand(c.count, -1) for c in components])  # (n, G)
        curve = _mixture_curve(parts, stats, components, drawn, dim)
        total_evals += int(curve.n_evals.sum()) + sum(
            int(p.settings["pilot_evals"]) + 1 for p in parts
        )
        taus: list[float] = []
        if rnd < options.adapt:
            both = torch.cat(stats)  # in the base law's coordinates u = v̂/b:
            scale = torch.exp(drawn)  # Σ_g u² (A) and Σ_g u⁴ (B) per group
            seen.append((both[:, :n_groups] * scale, both[:, n_groups:] * scale**2, curve))
            fits, taus = _fit_proposals(seen, options.targets, sizes, prior_precision,
                                        first=rnd == 0)  # fmt: skip
            share = _fitted_share(curve, components) if rnd else 1 - DEFENSIVE_SHARE
            components = _next_components(fits, n, options.targets, share)
        history.append(
            {
                "round": rnd,
                "directions": curve.n_samples,
                "log_probs": curve.log_probs.tolist(),
                "khats": list(curve.khats),
                "loss_evals": int(curve.n_evals.sum()),
                "sharpness": taus,
                "fitted_directions": sum(c.count for c in components[1:]) if rnd else 0,
                "scale_spread": [float(f.max() - f.min()) for f in fits],
            }
        )
    bar.close()
    settings = {
        **curve.settings,
        "adapt": options.adapt,
        "adapt_groups": n_groups,
        "adapt_rounds": history,
        "adapt_loss_evals": total_evals,
        "n_samples": n,
    }
    return dataclasses.replace(curve, settings=settings)


def _preconditioner(base: torch.Tensor | None, log_scales: torch.Tensor, ids: torch.Tensor):
    """p = b ⊙ √c[group] (unit determinant), or None for the plain base law."""
    if base is None and not log_scales.any():
        return None
    p = torch.exp(0.5 * log_scales)[ids]
    return p if base is None else p * base.double()


def _group_stats(
    seed: int,
    first: int,
    count: int,
    anchor: torch.Tensor,
    pre: torch.Tensor | None,
    ids: torch.Tensor,
    n_groups: int,
) -> torch.Tensor:
    """(count, 2G) float64 per direction: Σ_{j∈g} z_j² / |p ⊙ z|² and Σ_{j∈g} z_j⁴ / |p ⊙ z|⁴
    per group of its raw draw z (the directions are drawn again from their seeds, so the
    memory stays bounded)."""
    out = torch.zeros(count, 2 * n_groups, dtype=torch.float64)
    row = torch.empty(anchor.numel(), dtype=anchor.dtype, device=anchor.device)
    p = None if pre is None else pre.to(anchor.device, torch.float64)
    for j in range(count):
        fill_gaussian(row, seed, first + j)
        acc = torch.zeros(2, n_groups, dtype=torch.float64, device=anchor.device)
        norm = torch.zeros((), dtype=torch.float64, device=anchor.device)
        for s in range(0, row.numel(), STAT_CHUNK):
            z2 = row[s : s + STAT_CHUNK].double() ** 2
            where = ids[s : s + STAT_CHUNK].to(acc.device)
            acc[0].index_add_(0, where, z2)
            acc[1].index_add_(0, where, z2 * z2)
            norm += z2.sum() if p is None else (z2 * p[s : s + STAT_CHUNK] ** 2).sum()
        out[j] = torch.cat([acc[0] / norm, acc[1] / norm**2]).cpu()
    return out


def _log_density(
    z_stats: torch.Tensor, drawn: torch.Tensor, comp: torch.Tensor, dim: int
) -> torch.Tensor:
    """log q_comp(v̂) relative to the uniform law, (n,), for directions drawn from log scales
    ``drawn`` (n, G) whose group statistics are ``z_stats`` (n, G): v̂ᵀΣ⁻¹v̂ with Σ = b²⊙c is
    Σ_g c_drawn,g z_stats_g / c_comp,g (both unit determinant)."""
    quad = (z_stats * torch.exp(drawn - comp[None, :])).sum(1)
    return -0.5 * dim * torch.log(quad)


def _mixture_curve(
    parts: list[BasinCurve],
    stats: list[torch.Tensor],
    components: list[_Component],
    drawn: torch.Tensor,
    dim: int,
) -> BasinCurve:
    """The round's directions with their balance-heuristic weights (a `BasinCurve`);
    ``drawn`` (n, G) holds the log scales of the law each direction was drawn from."""
    total = sum(c.count for c in components)
    z_stats = torch.cat(stats)[:, : drawn.shape[1]]
    ray = torch.cat([p.estimates + dim * torch.log(p.props)[:, None] for p in parts])
    log_q = torch.stack([math.log(c.count / total) + _log_density(z_stats, drawn, c.scales, dim)
                         for c in components]).logsumexp(0)  # fmt: skip
    cat = {f: torch.cat([getattr(p, f) for p in parts])
           for f in ("radii", "deltas", "logabsint", "n_evals")}  # fmt: skip
    first = parts[0]
    return BasinCurve(
        cutoffs=first.cutoffs,
        estimates=ray - log_q[:, None],
        props=torch.exp(log_q / dim),
        sigma=first.sigma,
        n_params=dim,
        prior=first.prior,
        settings={**first.settings, "components": [c.name for c in components]},
        **cat,
    )


def _prior_precision(
    base: torch.Tensor | None,
    ids: torch.Tensor,
    sizes: torch.Tensor,
    anchor: torch.Tensor,
    options: BasinOptions,
) -> torch.Tensor:
    """(G,) the Gaussian prior's precision per group in the base law's coordinates u = δ/b
    (mean of b_j²/σ² over the group; zeros for the uniform prior)."""
    if options.prior != "gaussian":
        return torch.zeros(len(sizes), dtype=torch.float64)
    sigma = options.sigma
    if sigma is None:  # as estimate_basin's default: the anchor's RMS
        sigma = math.sqrt(float(anchor.double().square().mean())) or 1.0
    b2 = torch.ones(len(ids), dtype=torch.float64) if base is None else base.double() ** 2
    return torch.zeros(len(sizes), dtype=torch.float64).index_add_(0, ids, b2) / sizes / sigma**2


def _fit_proposals(
    seen: list[tuple[torch.Tensor, torch.Tensor, BasinCurve]],
    cutoffs: list[float],
    sizes: torch.Tensor,
    prior: torch.Tensor,
    first: bool,
) -> tuple[list[torch.Tensor], list[float]]:
    """The next round's log scales (G,) per cutoff, and the sharpness τ each uses.

    Shape: the rises measured along every round's rays (at every cutoff's radius) are
    fitted by least squares to a quadratic plus a quartic term per group, in the base law's
    coordinates u = δ/b: Δ_ik ≈ Σ_g h2_g R_ik² A_ig + h4_g R_ik⁴ B_ig, with A_ig, B_ig the
    sums of û² and û⁴ over the group (exact for a loss that is such a polynomial on each
    group). At cutoff ε a group is confined to u² ≲ ε/h_g with the secant curvature
    h_g = h2_g + √(ε h4_g). The region {Σ_g h_g u_g² < ε} is approximated by a Gaussian of
    precision τ h/ε (τ = d + 2 matches its covariance, d the number of coordinates it
    confines: where h/ε exceeds the prior's precision) and, times the prior's, gives
    Σ_g = 1 / (τ h_g/ε + π_g): ∝ H⁻¹ where the basin lies inside the prior (the zero-variance
    law of a quadratic basin), the prior's where it is flat.

    Sharpness: after the first round, one factor f (τ = f·(d + 2) at every cutoff) is fitted
    to the volume itself: the weighted maximum likelihood of the ACGs over the last round's
    directions, summed over the cutoffs, their weights exp(estimate) tempered (`_temper`),
    over a grid of f from 10⁻⁴ to 10⁴.
    """
    dim = float(sizes.sum())
    a_last, _, last = seen[-1]
    h2, h4 = _fit_polynomial(*(torch.cat([part[i] for part in seen]) for i in (0, 1)),
                             torch.cat([c.radii for _, _, c in seen]),
                             torch.cat([c.deltas for _, _, c in seen]))  # fmt: skip
    shapes = []  # per cutoff: (secant curvature h (G,), d + 2)
    for eps in cutoffs:
        h = h2 + torch.sqrt(eps * h4)
        # the coordinates the region confines (narrower than the prior there) set τ
        confined = float(sizes[h / eps > prior].sum()) if prior.any() else dim
        shapes.append((h, confined + 2))

    def scales(k: int, factor: float) -> torch.Tensor:
        h, tau = shapes[k]
        log_c = -torch.log(factor * tau * h / cutoffs[k] + prior + 1e-300)
        return log_c - (sizes * log_c).sum() / dim

    factor = 1.0
    if not first:  # one factor for every cutoff: the summed weighted log-likelihood
        weights = []
        for k in range(len(cutoffs)):
            log_w = last.estimates[:, k].nan_to_num(nan=-math.inf)
            ok = torch.isfinite(log_w)
            beta = _temper(log_w[ok], ESS_FRACTION * int(ok.sum()))
            weights.append(torch.where(ok, torch.softmax(beta * log_w, 0), 0.0).nan_to_num())
        zero = torch.zeros_like(a_last)
        grid = [10 ** (x / 8) for x in range(-32, 33)]
        score = [sum(float((w * _log_density(a_last, zero, scales(k, f), int(dim))).nan_to_num()
                           .sum()) for k, w in enumerate(weights))
                 for f in grid]  # fmt: skip
        factor = grid[max(range(len(grid)), key=score.__getitem__)]
    fits = [scales(k, factor) for k in range(len(cutoffs))]
    return fits, [factor * tau for _, tau in shapes]


def _fit_polynomial(
    a: torch.Tensor, b: torch.Tensor, radii: torch.Tensor, deltas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """h2, h4 (G,) ≥ 0 with Σ_g h2_g R² A_ig + h4_g R⁴ B_ig ≈ Δ_ik in relative error, over
    every ray i and cutoff k (least squares on the rows divided by Δ, minimum-norm when the
    rows are fewer than the unknowns; negative coefficients, which the rays cannot tell
    apart from zero, set to 0)."""
    r2 = radii**2  # (n, K)
    rows = torch.cat([r2[:, :, None] * a[:, None, :], (r2**2)[:, :, None] * b[:, None, :]], 2)
    rows, y = rows.reshape(-1, rows.shape[-1]), deltas.reshape(-1)
    keep = (y > 0) & torch.isfinite(y) & torch.isfinite(rows).all(1)
    rows, y = rows[keep], y[keep]
    g = a.shape[1]
    if not len(y):  # no ray rose at all: nothing is confined
        return torch.zeros(g, dtype=torch.float64), torch.zeros(g, dtype=torch.float64)
    scale = rows.abs().amax(0).clamp(min=1e-300)  # columns to one scale for the solver
    sol = torch.linalg.lstsq(rows / y[:, None] / scale, torch.ones_like(y)[:, None],
                             driver="gelsd").solution[:, 0] / scale  # fmt: skip
    sol = sol.clamp(min=0.0)
    return sol[:g], sol[g:]


def _temper(log_w: torch.Tensor, target: float) -> float:
    """The largest β in (0, 1] with ESS(exp(β log_w)) ≥ target (bisection in log β)."""
    if effective_sample_size(log_w) >= target:
        return 1.0
    lo, hi = -30.0, 0.0  # log β
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if effective_sample_size(math.exp(mid) * log_w) >= target:
            lo = mid
        else:
            hi = mid
    return math.exp(lo)


def _fitted_share(curve: BasinCurve, components: list[_Component]) -> float:
    """The share of the next round to draw from fitted proposals: the share of this round's
    importance weight that its fitted components' directions carried (mean over cutoffs),
    kept within [DEFENSIVE_SHARE, 1 − DEFENSIVE_SHARE]. Fixed before the next round is
    drawn, so that round stays exactly unbiased; where the fits do not help, the base law
    gets most of the directions."""
    n_base = components[0].count
    w = torch.softmax(curve.estimates.nan_to_num(nan=-math.inf), 0)  # (n, K)
    carried = float(w[n_base:].sum(0).mean())
    return min(max(carried, DEFENSIVE_SHARE), 1 - DEFENSIVE_SHARE)


def _next_components(
    fits: list[torch.Tensor], n: int, cutoffs: list[float], share: float
) -> list[_Component]:
    """The base law's share and one ACG per cutoff, ``n`` directions in all."""
    k = len(fits)
    n_base = max(1, min(n - k, round((1 - share) * n)))
    counts = [(n - n_base) // k + (1 if i < (n - n_base) % k else 0) for i in range(k)]
    zero = torch.zeros_like(fits[0])
    comps = [_Component("base", zero, n_base)]
    comps += [_Component(f"fit{c:g}", f, m) for c, f, m in zip(cutoffs, fits, counts)]
    return comps
