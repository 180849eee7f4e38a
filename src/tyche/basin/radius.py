"""Radius search: along each direction, the radius where the loss rise reaches the cutoff.

For directions i = 0..n-1 the caller supplies Δ_i(r) = L(θ + r v̂_i) − L(θ). We look for a
radius r_i with |Δ_i(r_i) − cutoff| ≤ rtol·cutoff and return that radius together with the
Δ *measured there* (the original code returned a radius one update past the measured one,
up to 2× too large, and accepted NaN losses; neither can happen here).

Near a minimum Δ(r) ≈ k r², a straight line in (log r, log Δ). The search therefore works in
log-log coordinates x = log r, f = log(Δ/cutoff) (the root is f = 0):

* until the crossing is bracketed, extrapolate along the line through the last two points on
  the same side (slope 2 from a single point), with the step factor clamped to [1/30, 30];
* once bracketed, interpolate: inverse quadratic through the last three points, else the
  secant through the last two, else regula falsi on the bracket ends — whichever first lands
  strictly inside the bracket — and bisect in log r when none does, or when three steps in a
  row fail to halve the bracket (a safeguarded, Brent-like root finder).

On a quadratic the second evaluation is exact; on smooth losses the mean is 3–4.5
evaluations per direction at rtol = 1e-2 (see tests/basin/test_basin_radius.py). A NaN or infinite
Δ counts as "above the cutoff" (never accepted); a negative or zero Δ counts as "below".

Several cutoffs c_1 < … < c_K are searched along each direction at once: one target at a
time, smallest first, each starting from every point measured so far. Up to its first
crossing the rise is monotone along the ray, so the points measured for one cutoff bracket
the next, and a point that lands in another cutoff's band settles that one too. Every cutoff
still gets a radius where Δ was measured within its own band. A ``guide`` (the measured
points of a reference direction, e.g. a pilot) supplies the shape of Δ(r) when extrapolating:
the next radius is placed where the guide reaches the target, scaled to the nearest measured
point, instead of along a straight log-log line.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tyche.errors import InputError

RiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

MAX_STEP = math.log(30.0)  # largest step in log r before the crossing is bracketed
MIN_SLOPE, MAX_SLOPE = 0.5, 8.0  # clamp on log-log slopes used for extrapolation
COLLAPSE = 1e-12  # relative bracket width at which the search gives up
MIN_LOG_RADIUS = math.log(1e-300)  # below this the radius would underflow


@dataclass(frozen=True)
class RadiusSearch:
    """Result of `search_radii` for n directions and K cutoffs (tensors on the CPU).

    With ``cutoff=c`` the per-cutoff fields have shape (n,); with ``cutoffs=[...]`` they have
    shape (n, K), column k for ``cutoffs[k]`` (sorted ascending).

    radii: radius at which ``deltas`` was measured and accepted (same units as the radii
        passed to ``rise_fn``), float64.
    deltas: Δ measured at exactly ``radii``; |deltas − cutoff| ≤ rtol·cutoff, float64.
    n_evals: (n,) ``rise_fn`` evaluations spent on each direction (for all cutoffs), int64.
    low, high: the measured radii nearest the returned one below and above the band (0 = the
        anchor; inf when nothing was measured above it), float64.
    trace: per direction, every (radius, Δ) measured, in order (a guide for other searches).
    """

    radii: torch.Tensor
    deltas: torch.Tensor
    n_evals: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    cutoff: float | None
    rtol: float
    cutoffs: tuple[float, ...] = ()
    trace: tuple[tuple[tuple[float, float], ...], ...] = ()

    @property
    def mean_evals(self) -> float:
        """Average number of loss evaluations per direction."""
        return float(self.n_evals.double().mean())


class Guide:
    """The shape of a reference direction's Δ(r): log r as a function of log Δ.

    Built from measured (radius, Δ) points; only finite positive Δ that rise with r are
    kept (the part before the first crossing). Between points it interpolates linearly in
    (log Δ, log r); beyond them it continues with the end segment's slope (clamped), and
    with the quadratic slope 2 when fewer than two points are usable.
    """

    def __init__(self, points: Sequence[tuple[float, float]]):
        kept: list[tuple[float, float]] = []  # (log Δ, log r), increasing in both
        for r, d in sorted(points):
            if r > 0 and math.isfinite(d) and d > 0 and (not kept or math.log(d) > kept[-1][0]):
                kept.append((math.log(d), math.log(r)))
        self.points = kept

    def _end_slope(self, a: tuple[float, float], b: tuple[float, float]) -> float:
        s = (b[0] - a[0]) / (b[1] - a[1]) if b[1] != a[1] else 2.0
        return min(max(s, MIN_SLOPE), MAX_SLOPE)

    def log_radius(self, log_delta: float) -> float:
        """log r at which the reference reaches log Δ (up to an additive constant)."""
        pts = self.points
        if not pts:
            return log_delta / 2.0
        if len(pts) == 1:
            return pts[0][1] + (log_delta - pts[0][0]) / 2.0
        if log_delta <= pts[0][0]:
            return pts[0][1] + (log_delta - pts[0][0]) / self._end_slope(pts[0], pts[1])
        if log_delta >= pts[-1][0]:
            return pts[-1][1] + (log_delta - pts[-1][0]) / self._end_slope(pts[-2], pts[-1])
        k = bisect.bisect_right([p[0] for p in pts], log_delta)
        (f0, x0), (f1, x1) = pts[k - 1], pts[k]
        return x0 + (log_delta - f0) * (x1 - x0) / (f1 - f0)

    def step(self, from_log_delta: float, to_log_delta: float) -> float:
        """Δ(log r) between the levels, along the reference."""
        return self.log_radius(to_log_delta) - self.log_radius(from_log_delta)


@dataclass
class _Ray:
    """Search state of one direction, in x = log r and f = log(Δ/cutoff)."""

    index: int
    r: float  # next radius to evaluate
    label: int = -1  # how error messages name this direction (the caller's sample index)
    log_cut: float = 0.0  # log of this target's cutoff
    guide: Guide | None = None  # the reference shape used to extrapolate
    x_lo: float = -math.inf  # bracket: f(x_lo) < band (−inf: the anchor r = 0)
    f_lo: float = -math.inf  # −inf when Δ ≤ 0 there
    x_hi: float = math.inf  # bracket: f(x_hi) > band or non-finite (inf: none yet)
    f_hi: float = math.inf  # +inf when Δ is NaN/inf there
    prev_lo: tuple[float, float] | None = None  # the bracket end replaced last time
    prev_hi: tuple[float, float] | None = None
    history: list[tuple[float, float]] = field(default_factory=list)  # last 3 finite (x, f)
    width_ref: float = math.inf  # bracket width at the last halving (stall guard)
    stalls: int = 0
    n_evals: int = 0
    radius: float = math.nan
    delta: float = math.nan


def _slope(a: tuple[float, float] | None, x: float, f: float) -> float:
    """Log-log slope between point a and (x, f), clamped; 2 (a quadratic) when unusable."""
    if a is None or not (math.isfinite(a[1]) and math.isfinite(f)) or a[0] == x:
        return 2.0
    s = (f - a[1]) / (x - a[0])
    return min(max(s, MIN_SLOPE), MAX_SLOPE) if s > 0 else 2.0


def _inverse_quadratic(
    a: tuple[float, float], b: tuple[float, float], c: tuple[float, float]
) -> float:
    """x at f = 0 of the quadratic x(f) through three points (NaN if two f coincide)."""
    (xa, fa), (xb, fb), (xc, fc) = a, b, c
    if fa in (fb, fc) or fb == fc:
        return math.nan
    return (
        xa * fb * fc / ((fa - fb) * (fa - fc))
        + xb * fa * fc / ((fb - fa) * (fb - fc))
        + xc * fa * fb / ((fc - fa) * (fc - fb))
    )


def _record(ray: _Ray, x: float, delta: float, cutoff: float) -> None:
    """Put the measured point (x, Δ) on the right side of the bracket."""
    if not math.isfinite(delta):
        f = math.inf
    else:
        f = math.log(delta / cutoff) if delta > 0 else -math.inf
    if f < 0:
        ray.prev_lo = (ray.x_lo, ray.f_lo) if math.isfinite(ray.x_lo) else None
        ray.x_lo, ray.f_lo = x, f
    else:
        ray.prev_hi = (ray.x_hi, ray.f_hi) if math.isfinite(ray.x_hi) else None
        ray.x_hi, ray.f_hi = x, f
    if math.isfinite(f):
        ray.history = [*ray.history[-2:], (x, f)]


def _propose(ray: _Ray, log_max: float, max_radius: float) -> float:
    """Next x = log r to evaluate for an unfinished ray (raises if the search is stuck)."""
    if math.isinf(ray.x_hi):  # nothing above the band yet: extrapolate upwards
        if ray.x_lo >= log_max:
            raise InputError(
                f"no boundary found along direction {ray.label} up to max_radius="
                f"{max_radius:.6g} (loss rise there is {math.exp(ray.f_lo):.6g}×cutoff); "
                "increase max_radius or the cutoff may be above the loss's range"
            )
        if math.isfinite(ray.f_lo):
            if ray.guide is not None:
                step = ray.guide.step(ray.f_lo + ray.log_cut, ray.log_cut)
            else:
                step = -ray.f_lo / _slope(ray.prev_lo, ray.x_lo, ray.f_lo)
            step = min(max(step, 1e-6), MAX_STEP)
        else:
            step = MAX_STEP
        return min(ray.x_lo + step, log_max)
    if math.isinf(ray.x_lo):  # nothing below yet: extrapolate downwards from the high end
        step = -MAX_STEP
        if math.isfinite(ray.f_hi):
            if ray.guide is not None:
                step = max(ray.guide.step(ray.f_hi + ray.log_cut, ray.log_cut), -MAX_STEP)
            else:
                step = max(-ray.f_hi / _slope(ray.prev_hi, ray.x_hi, ray.f_hi), -MAX_STEP)
        if ray.x_hi + step < MIN_LOG_RADIUS:
            raise InputError(
                f"the loss rise is above the cutoff at every radius tried along direction "
                f"{ray.label}, down to r={math.exp(ray.x_hi):.3g}; is the loss discontinuous "
                "at the anchor?"
            )
        return ray.x_hi + min(step, -1e-6)

    width = ray.x_hi - ray.x_lo
    if width < COLLAPSE:
        r = math.exp(ray.x_hi)
        if math.isinf(ray.f_hi):
            raise InputError(
                f"loss is NaN/inf at radius r={r:.6g} along direction {ray.label}, between "
                f"the anchor and the cutoff (the loss rise just below is "
                f"{math.exp(ray.f_lo):.6g}×cutoff); lower the cutoff, use float32/float64 "
                "weights, or check the model for overflow"
            )
        raise InputError(
            f"the loss rise jumps across the cutoff band at radius r={r:.6g} along direction "
            f"{ray.label} (from {math.exp(ray.f_lo):.6g}× to {math.exp(ray.f_hi):.6g}×cutoff); "
            "the loss is discontinuous there: increase rtol or change the cutoff"
        )
    if width <= ray.width_ref / 2:
        ray.width_ref, ray.stalls = width, 0
    else:
        ray.stalls += 1
    tries = []  # interpolations, best first; the first inside the bracket is taken
    pts = ray.history
    if len(pts) == 3:
        tries.append(_inverse_quadratic(*pts))
    if len(pts) >= 2 and pts[-1][1] != pts[-2][1]:
        (x0, f0), (x1, f1) = pts[-2:]
        tries.append(x1 - f1 * (x1 - x0) / (f1 - f0))
    if math.isfinite(ray.f_lo) and math.isfinite(ray.f_hi):  # regula falsi
        tries.append(ray.x_hi - ray.f_hi * width / (ray.f_hi - ray.f_lo))
    elif math.isfinite(ray.f_hi):  # Δ ≤ 0 at the low end: model from the high end
        tries.append(ray.x_hi - ray.f_hi / _slope(ray.prev_hi, ray.x_hi, ray.f_hi))
    elif math.isfinite(ray.f_lo):  # NaN/inf at the high end: model from the low end
        tries.append(ray.x_lo - ray.f_lo / _slope(ray.prev_lo, ray.x_lo, ray.f_lo))
    x = next((t for t in tries if ray.x_lo < t < ray.x_hi), math.nan)
    if math.isnan(x) or ray.stalls >= 3:
        x = ray.x_lo + width / 2  # bisection in log r
        ray.width_ref, ray.stalls = width, 0
    return x


def _initial_radii(
    init_radius: float | torch.Tensor | Sequence[float] | None, n: int, max_radius: float
) -> list[float]:
    if init_radius is None:
        init = torch.ones(n, dtype=torch.float64)
    else:
        init = torch.as_tensor(init_radius, dtype=torch.float64).reshape(-1)
        if init.numel() == 1:
            init = init.expand(n)
        elif init.numel() != n:
            raise InputError(
                f"init_radius must be a scalar or have {n} entries, got {init.numel()}"
            )
    if not (torch.isfinite(init).all() and (init > 0).all()):
        raise InputError(f"init_radius must be positive and finite, got {init_radius!r}")
    if (init > max_radius).any():
        raise InputError(f"init_radius exceeds max_radius={max_radius:.6g}")
    return init.tolist()


def _f(delta: float, log_cut: float) -> float:
    """log(Δ/cutoff): +inf for NaN/inf Δ (above), −inf for Δ ≤ 0 (below)."""
    if not math.isfinite(delta):
        return math.inf
    return math.log(delta) - log_cut if delta > 0 else -math.inf


class _Direction:
    """Search state of one direction over every cutoff: its points and its current target."""

    def __init__(self, index: int, r: float, label: int, cutoffs: list[float], guide):
        self.index, self.r, self.label = index, r, label
        self.cutoffs = cutoffs
        self.guide = guide
        self.points: list[tuple[float, float]] = []  # (x = log r, Δ) in measurement order
        self.found: list[tuple[float, float] | None] = [None] * len(cutoffs)
        self.n_evals = 0
        self.target = 0
        self.ray = _Ray(index, r, label=label, log_cut=math.log(cutoffs[0]), guide=guide)

    def in_band(self, delta: float, k: int, rtol: float) -> bool:
        return math.isfinite(delta) and abs(delta - self.cutoffs[k]) <= rtol * self.cutoffs[k]

    def start_target(self, k: int) -> None:
        """Make cutoff k the current target, its bracket rebuilt from every measured point."""
        self.target = k
        c = self.cutoffs[k]
        ray = _Ray(self.index, self.r, label=self.label, log_cut=math.log(c), guide=self.guide)
        pts = sorted(self.points)
        above = [(x, d) for x, d in pts if not (math.isfinite(d) and d < c)]
        x_hi = above[0][0] if above else math.inf
        for x, d in pts:  # ascending, so the largest point below is recorded last
            if math.isfinite(d) and d < c and x < x_hi:
                _record(ray, x, d, c)
        for x, d in reversed(above[:2]):  # the nearest point above is recorded last
            _record(ray, x, d, c)
        near = [ray.prev_lo, (ray.x_lo, ray.f_lo), (ray.x_hi, ray.f_hi), ray.prev_hi]
        ray.history = [p for p in near if p is not None and all(map(math.isfinite, p))][:3]
        self.ray = ray

    def record(self, r: float, delta: float, rtol: float, limit: int, log_max: float,
               max_r: float, saturate: bool = False) -> bool:  # fmt: skip
        """Take the measurement Δ(r) and propose the next radius; True when all are found
        (with ``saturate``, a ray still below its cutoff at max_r ends there)."""
        self.n_evals += 1
        x = math.log(r)
        self.points.append((x, delta))
        for k in range(len(self.cutoffs)):
            if self.found[k] is None and self.in_band(delta, k, rtol):
                self.found[k] = (r, delta)
        if self.found[self.target] is None:
            _record(self.ray, x, delta, self.cutoffs[self.target])
        else:
            rest = [k for k, v in enumerate(self.found) if v is None]
            if not rest:
                return True
            self.start_target(rest[0])
        if self.n_evals >= limit:
            ray = self.ray
            raise InputError(
                f"radius search along direction {self.label} did not converge in {limit} "
                f"evaluations; the crossing lies in [{math.exp(ray.x_lo):.6g}, "
                f"{math.exp(ray.x_hi):.6g}] (last Δ={delta:.6g}, cutoff="
                f"{self.cutoffs[self.target]:.6g}); raise max_evals or rtol, or check that "
                "the loss is continuous"
            )
        if saturate and math.isinf(self.ray.x_hi) and self.ray.x_lo >= log_max:
            for k, v in enumerate(self.found):  # below every remaining cutoff at max_r
                if v is None:
                    self.found[k] = (max_r, delta)
            return True
        self.r = math.exp(_propose(self.ray, log_max, max_r))
        return False

    def bracket(self, k: int) -> tuple[float, float]:
        """Measured radii nearest the accepted one below and above cutoff k's band."""
        r, c = self.found[k][0], self.cutoffs[k]
        below = [math.exp(x) for x, d in self.points if math.isfinite(d) and d < c]
        above = [math.exp(x) for x, d in self.points if not (math.isfinite(d) and d <= c)]
        below = [v for v in below if v < r]
        above = [v for v in above if v > r]
        return (max(below) if below else 0.0), (min(above) if above else math.inf)


class Horizon(float):
    """A max_radius past which the caller's integrand is negligible (a Gaussian prior far
    out): a ray still inside the basin there ends at it instead of failing the search."""


def search_radii(
    rise_fn: RiseFn,
    n: int,
    *,
    cutoff: float | None = None,
    cutoffs: Sequence[float] | None = None,
    rtol: float = 1e-2,
    init_radius: float | torch.Tensor | Sequence[float] | None = None,
    max_radius: float = 1e8,
    max_evals: int = 60,
    labels: Sequence[int] | None = None,
    guide: Sequence[tuple[float, float]] | None = None,
) -> RadiusSearch:
    """Find, for n directions, radii where the loss rise is within rtol·cutoff of each cutoff.

    Args:
        rise_fn: ``rise_fn(index, radius) -> delta``: index LongTensor (m,) of directions in
            range(n), radius float64 CPU tensor (m,), returns the loss rise Δ (m,) at those
            radii. Called once per round with every unfinished direction, so the caller can
            batch the forward passes. Δ may be negative (below), NaN or inf (above).
        n: number of directions (≥ 1).
        cutoff: target loss rise (> 0), e.g. nats of KL; or
        cutoffs: several targets, searched together (one of the two must be given).
        rtol: relative tolerance on Δ: accept |Δ − cutoff| ≤ rtol·cutoff, 0 < rtol < 1.
        init_radius: first radius to try, scalar or (n,); default 1.0.
        max_radius: largest radius tried; no crossing below it raises, unless it is a
            `Horizon`: then a direction still below a cutoff there returns max_radius (and
            the rise there) for it (for a caller whose integrand is negligible beyond it).
        max_evals: evaluations allowed per direction and cutoff before raising.
        labels: how error messages name direction i (default i), e.g. global sample indices.
        guide: measured (radius, Δ) points of a reference direction whose shape predicts
            where each target lies (see the module docstring); None: log-log lines.

    Returns:
        `RadiusSearch`; the result for direction i depends only on Δ_i (and the guide), not
        on the batch.

    Raises:
        ValueError: bad arguments; no crossing up to max_radius; NaN/inf loss between the
        anchor and the cutoff; a jump across the band; more than max_evals evaluations.
    """
    if (cutoff is None) == (cutoffs is None):
        raise InputError("give either cutoff= (one target) or cutoffs= (several)")
    targets = [cutoff] if cutoffs is None else list(cutoffs)
    if not targets:
        raise InputError("cutoffs is empty; give at least one cutoff")
    for c in targets:
        if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
            raise InputError(f"cutoff must be positive and finite, got {c!r}")
    targets = sorted(float(c) for c in targets)
    if len(set(targets)) != len(targets):
        raise InputError(f"cutoffs must be distinct, got {targets}")
    if not isinstance(n, int) or n < 1:
        raise InputError(f"n must be an integer >= 1, got {n!r}")
    if not 0 < rtol < 1:
        raise InputError(f"rtol must lie in (0, 1), got {rtol!r}")
    if not (math.isfinite(max_radius) and max_radius > 0):
        raise InputError(f"max_radius must be positive and finite, got {max_radius!r}")
    if not isinstance(max_evals, int) or max_evals < 1:
        raise InputError(f"max_evals must be an integer >= 1, got {max_evals!r}")
    log_max = math.log(max_radius)
    saturate = isinstance(max_radius, Horizon)
    if labels is not None and len(labels) != n:
        raise InputError(f"labels must have {n} entries, got {len(labels)}")
    names = list(range(n)) if labels is None else [int(v) for v in labels]
    shape = None if guide is None else Guide(guide)
    limit = max_evals * len(targets)
    rays = [
        _Direction(i, r, names[i], targets, shape)
        for i, r in enumerate(_initial_radii(init_radius, n, max_radius))
    ]
    active = list(rays)
    while active:
        radii = [d.r for d in active]
        index = torch.tensor([d.index for d in active], dtype=torch.long)
        out = rise_fn(index, torch.tensor(radii, dtype=torch.float64))
        out = torch.as_tensor(out)
        if out.shape != (len(active),):
            raise InputError(
                f"rise_fn returned shape {tuple(out.shape)} for {len(active)} directions; "
                f"it must return one loss rise per direction, shape ({len(active)},)"
            )
        deltas = out.detach().to("cpu", torch.float64).tolist()
        still = []
        for d, r, delta in zip(active, radii, deltas):
            if not d.record(r, delta, rtol, limit, log_max, max_radius, saturate):
                still.append(d)
        active = still

    def col(values: list, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype)
        return t[:, 0] if cutoffs is None and t.dim() == 2 else t

    brackets = [[d.bracket(k) for k in range(len(targets))] for d in rays]
    return RadiusSearch(
        radii=col([[f[0] for f in d.found] for d in rays]),
        deltas=col([[f[1] for f in d.found] for d in rays]),
        n_evals=torch.tensor([d.n_evals for d in rays], dtype=torch.long),
        low=col([[b[0] for b in bs] for bs in brackets]),
        high=col([[b[1] for b in bs] for bs in brackets]),
        cutoff=None if cutoff is None else float(cutoff),
        rtol=float(rtol),
        cutoffs=tuple(targets),
        trace=tuple(tuple((math.exp(x), dl) for x, dl in d.points) for d in rays),
    )
