"""Exact basin cases: losses whose prior mass is known, to calibrate the estimator against.

`ExactCase(quadratic=a, quartic=b, flat=k)` is the loss on D = a + b + k coordinates

    K(w) = Σ_{i<a} w_i² + Σ_{a≤i<a+b} w_i⁴       (the last k coordinates exactly flat)

around the anchor θ = 0, with the prior w ~ N(0, σ² I_D). Its basin {K < ε} has the prior
mass P(ε) = P(S + T < ε), S = Σ w_i² ~ σ²χ²_a and T = Σ w_j⁴ independent (the flat
coordinates integrate to 1). `log_prob` gives ln P(ε), `slope` d ln P / d ln ε,
`asymptotic_lambda` the limit a/2 + b/4 of that slope as ε → 0 (the learning coefficient),
and `fitted_slope` the least-squares slope of the exact ln P against ln ε over the cutoffs
that `tyche.basin.lambda_fit.learning_coefficient` fits: the number an estimated λ is
compared with.

Method
------
* b = 0: the regularised lower incomplete gamma function, P = P(a/2, x), x = ε/(2σ²), and
  slope = x^(a/2) e^(−x) / γ(a/2, x) (mpmath).
* a = 0, b = 1: P = erf(u), u = ε^¼/(σ√2); slope = u e^(−u²) / (2√π erf u).
* otherwise: the Bromwich integral of the Laplace transform, in closed form,

      ∫₀^∞ e^(−sε) P(ε) dε = L(s) = (1 + 2σ²s)^(−a/2) M(s)^b / s,
      M(s) = E[e^(−s w⁴)] = e^z K_¼(z) / (4σ² √(π s)),   z = 1/(32 σ⁴ s),

  (Gradshteyn & Ryzhik 3.323.3 with β² = s, γ² = 1/(4σ²); K_¼ the modified Bessel function
  of the second kind; checked against a quadrature of the defining integral in the tests).
  L is analytic off the negative real axis, so the Bromwich line may be bent into the
  hyperbola s(u) = μ (1 − sin(α − iu)), u ∈ ℝ (α = 0.8), whose rightmost point μ(1 − sin α)
  is the saddle point r of e^(εs) L(s) on the positive axis (found by bisection of the
  derivative, which is increasing; r lies in [1/ε, (λ + 1)/ε]). Through the saddle the
  integrand is a Gaussian hump of height e^(εr) L(r) and it decays double-exponentially
  along the contour (Re s → −∞ like cosh u); the hyperbola's geometric spread of |s| keeps
  it far from the branch point −1/(2σ²) at every scale, so the terms do not cancel
  (Σ|terms| / P stays near 1 in every regime tested, from P ≈ e^(−24000) to P ≈ 1).
  P = (1/π) Im ∫₀^∞ e^(εs) L(s) s'(u) du and the density f(ε) (the same with L(s)·s) are
  summed by the trapezoid rule in u — for an integrand analytic in a strip about the real
  axis its error falls geometrically as the step halves — from the hump's width, halving
  until two steps agree to 1e-13 (relative in P, and in the slope ε f / P). Arithmetic at
  30 significant digits (mpmath; more if the terms ever cancel), so P keeps its relative
  precision at any size.

Accuracy (tests/basin/test_calibration_exact.py): the contour route equals the closed forms
above (which it does not use) to < 1e-25 in ln P over a ≤ 1000, ε 1e-14 … 10,
σ 0.1 … 10; a direct quadrature of small mixed cases; the small-ε power series of P (exact
and convergent, with no Bessel function) for the suite's cases; 10⁶ Monte Carlo draws
within 4 standard errors. The promise is 1e-9 relative in ln P (1e-9 absolute where
|ln P| < 1) for 0 ≤ a, b ≤ 1000, cutoff 1e-14 … 10, σ 0.1 … 10.

`SUITE` is the calibration suite of `benchmarks/lambda.py --cases calibration`: exactly
flat directions with quadratic or quartic ones, D from 2 to 1,000, and quadratic/quartic
mixes, at `SUITE_CUTOFFS` with σ = 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from tyche.errors import InputError

__all__ = ["SUITE", "SUITE_CUTOFFS", "ExactCase"]

#: significant digits of the contour sums (raised if the terms ever cancel)
DIGITS = 30
#: relative agreement of two successive trapezoid steps that ends the halving
TOL = 1e-13
#: the hyperbola's angle parameter: its asymptotes make π/2 + α with the positive axis
ALPHA = 0.8
#: learning_coefficient's default number of fitted (smallest) cutoffs
FIT_POINTS = 3


def _mp() -> Any:
    import mpmath

    return mpmath


def _log_m(s: Any, sig2: Any) -> Any:
    """ln M(s), M(s) = E[exp(−s w⁴)] for w ~ N(0, σ²), s off the negative real axis."""
    mp = _mp()
    z = 1 / (32 * sig2**2 * s)
    return z + mp.log(mp.besselk(mp.mpf(1) / 4, z)) - mp.log(4 * sig2 * mp.sqrt(mp.pi * s))


def _log_transform(s: Any, a: int, b: int, sig2: Any) -> Any:
    """ln L(s) = −(a/2) ln(1 + 2σ²s) + b ln M(s) − ln s (principal branches)."""
    mp = _mp()
    out = -mp.log(s)
    if a:
        out -= mp.mpf(a) / 2 * mp.log(1 + 2 * sig2 * s)
    if b:
        out += b * _log_m(s, sig2)
    return out


def _dphi(s: Any, eps: Any, a: int, b: int, sig2: Any) -> Any:
    """d/ds [ε s + ln L(s)] for real s > 0, increasing in s (ln L is convex).

    d ln M / ds = (z (R − 1) − 1/4) / s with R = K_¾(z) / K_¼(z) (from K_ν' = −K_{ν−1} −
    (ν/z) K_ν and K_{−¾} = K_¾)."""
    mp = _mp()
    out = eps - 1 / s
    if a:
        out -= a * sig2 / (1 + 2 * sig2 * s)
    if b:
        z = 1 / (32 * sig2**2 * s)
        ratio = mp.besselk(mp.mpf(3) / 4, z) / mp.besselk(mp.mpf(1) / 4, z)
        out += b * (z * (ratio - 1) - mp.mpf(1) / 4) / s
    return out


def _saddle(eps: Any, a: int, b: int, sig2: Any) -> tuple[Any, Any]:
    """(r, φ''(r)): the minimiser r > 0 of φ(s) = ε s + ln L(s) (to ~1e-4 relative) and its
    curvature there. −1/s ≥ d ln L/ds ≥ −(λ + 1)/s puts r in [1/ε, (λ + 1)/ε]."""
    mp = _mp()
    lam = mp.mpf(a) / 2 + mp.mpf(b) / 4
    lo, hi = mp.log(1 / eps), mp.log((lam + 1) / eps)
    with mp.workdps(15):
        for _ in range(16):
            mid = (lo + hi) / 2
            if _dphi(mp.exp(mid), eps, a, b, sig2) > 0:
                hi = mid
            else:
                lo = mid
        r = mp.exp((lo + hi) / 2)
        step = mp.mpf("1e-3")
        curv = _dphi(r * (1 + step), eps, a, b, sig2) - _dphi(r * (1 - step), eps, a, b, sig2)
        curv /= 2 * r * step
    return r, max(curv, 1 / r**2)


def _invert(a: int, b: int, eps: Any, sig2: Any) -> tuple[Any, Any, Any]:
    """(P(ε), f(ε), Σ|terms| / P) by the trapezoid rule on the hyperbola through the saddle,
    at the working precision in force."""
    mp = _mp()
    r, curv = _saddle(eps, a, b, sig2)
    alpha = mp.mpf(ALPHA)
    mu = r / (1 - mp.sin(alpha))
    # the hump's width in u: Im s ≈ μ cos α · u near u = 0, standard deviation 1/√φ''
    h = min(mp.mpf(1) / 2, 1 / (mu * mp.cos(alpha) * mp.sqrt(curv)))

    def term(u: Any) -> tuple[Any, Any, Any]:
        w = alpha - 1j * u
        s = mu * (1 - mp.sin(w))
        v = mp.exp(eps * s + _log_transform(s, a, b, sig2)) * (1j * mu * mp.cos(w))
        return mp.im(v), mp.im(v * s), abs(v) * (1 + eps * abs(s))

    values = {0: term(mp.mpf(0))}
    # march out on the first grid until two successive terms are negligible for P and for
    # ε f (their modulus does not oscillate, so a zero of Im cannot stop the march early)
    span, quiet, total = 0, 0, values[0][2] / 2
    while quiet < 2:
        span += 1
        if span > 20_000:
            raise RuntimeError(f"the contour sum for a={a}, b={b}, ε={eps} does not decay")
        values[span] = term(span * h)
        total += values[span][2]
        quiet = quiet + 1 if values[span][2] < 1e-25 * total else 0

    def sums(scale: int) -> tuple[Any, Any, Any]:
        inner = [values[j] for j in range(1, span * scale + 1)]
        step = h / scale / mp.pi
        p = (values[0][0] / 2 + mp.fsum(t[0] for t in inner)) * step
        d = (values[0][1] / 2 + mp.fsum(t[1] for t in inner)) * step
        mag = (abs(values[0][0]) / 2 + mp.fsum(abs(t[0]) for t in inner)) * step
        return p, d, mag

    scale = 1
    p, d, mag = sums(scale)
    for level in range(12):
        values = {2 * j: t for j, t in values.items()}
        scale *= 2
        for j in range(1, span * scale, 2):
            values[j] = term(j * h / scale)
        p2, d2, mag = sums(scale)
        dp = abs(p2 - p) / abs(p2)
        ds = eps * abs(d2 - d) / abs(p2)
        p, d = p2, d2
        if level >= 1 and dp < TOL and ds < TOL * (eps * abs(d) / abs(p) + mp.mpf("1e-6")):
            break
    else:
        raise RuntimeError(f"the contour sum for a={a}, b={b}, ε={eps} does not converge")
    if not p > 0:
        raise RuntimeError(f"the contour sum for a={a}, b={b}, ε={eps} gave P = {p}")
    return p, d, mag / p


def _contour(a: int, b: int, cutoff: float, sigma: float) -> tuple[float, float]:
    """(ln P, d ln P / d ln ε) by the contour integral alone (any a, b with a + b ≥ 1)."""
    mp = _mp()
    digits = DIGITS
    for _ in range(4):
        with mp.workdps(digits):
            eps = mp.mpf(cutoff)
            p, d, cancel = _invert(a, b, eps, mp.mpf(sigma) ** 2)
            # the sums keep about digits − log10(cancel) digits: 20 are wanted
            if cancel < mp.mpf(10) ** (digits - 20):
                return min(float(mp.log(p)), 0.0), float(eps * d / p)
            digits += int(mp.log10(cancel)) + 10
    raise RuntimeError(f"the contour sum for a={a}, b={b}, ε={cutoff} cancels too much")


def _closed_form(a: int, b: int, cutoff: float, sigma: float) -> tuple[float, float] | None:
    """(ln P, slope) where a closed form applies (b = 0, or a = 0 and b = 1), else None."""
    mp = _mp()
    with mp.workdps(DIGITS):
        eps, sig = mp.mpf(cutoff), mp.mpf(sigma)
        if b == 0:
            half, x = mp.mpf(a) / 2, eps / (2 * sig**2)
            lower = mp.gammainc(half, 0, x)  # γ(a/2, x), unregularised
            log_p = mp.log(lower) - mp.loggamma(half)
            return min(float(log_p), 0.0), float(mp.exp(half * mp.log(x) - x) / lower)
        if a == 0 and b == 1:
            u = mp.root(eps, 4) / (sig * mp.sqrt(2))
            p = mp.erf(u)
            slope = u * mp.exp(-(u**2)) / (2 * mp.sqrt(mp.pi) * p)
            return min(float(mp.log(p)), 0.0), float(slope)
    return None


@lru_cache(maxsize=4096)
def _exact(a: int, b: int, cutoff: float, sigma: float) -> tuple[float, float]:
    """(ln P(K < cutoff), d ln P / d ln cutoff) for a quadratic and b quartic coordinates."""
    return _closed_form(a, b, cutoff, sigma) or _contour(a, b, cutoff, sigma)


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ExactCase:
    """K(w) = Σ_{i<a} w_i² + Σ_{a≤i<a+b} w_i⁴ on D = a + b + k coordinates (k flat), in that
    order, around the anchor 0: ``quadratic`` = a, ``quartic`` = b, ``flat`` = k."""

    quadratic: int = 0
    quartic: int = 0
    flat: int = 0

    def __post_init__(self) -> None:
        for name in ("quadratic", "quartic", "flat"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"{name} must be an integer >= 0, got {value!r}")
        if self.quadratic + self.quartic == 0:
            raise InputError("an exact case needs a quadratic or quartic coordinate "
                             "(with flat ones only, K ≡ 0 and P = 1 at every cutoff)")  # fmt: skip

    @property
    def dim(self) -> int:
        """D = a + b + k."""
        return self.quadratic + self.quartic + self.flat

    @property
    def name(self) -> str:
        """e.g. "2 quadratic + 3 quartic + 5 flat" (parts with no coordinate left out)."""
        counts = ((self.quadratic, "quadratic"), (self.quartic, "quartic"), (self.flat, "flat"))
        return " + ".join(f"{n} {kind}" for n, kind in counts if n)

    @property
    def asymptotic_lambda(self) -> float:
        """a/2 + b/4: the limit of d ln P / d ln ε as ε → 0 (the learning coefficient)."""
        return self.quadratic / 2 + self.quartic / 4

    def anchor(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """θ = 0, shape (D,), in ``dtype``."""
        return torch.zeros(self.dim, dtype=dtype)

    def loss(self, offsets: torch.Tensor) -> torch.Tensor:
        """K(offsets): offsets (B, D) → (B,), computed and returned in float64 on the
        offsets' device. Raises InputError for anything but a (B, D) tensor."""
        if not isinstance(offsets, torch.Tensor):
            raise InputError(f"offsets must be a torch.Tensor of shape (B, {self.dim}), got "
                             f"{type(offsets).__name__}")  # fmt: skip
        if offsets.dim() != 2 or offsets.shape[1] != self.dim:
            raise InputError(f"offsets must have shape (B, {self.dim}) for {self.name}, got "
                             f"{tuple(offsets.shape)}")  # fmt: skip
        a, b = self.quadratic, self.quartic
        square = offsets[:, : a + b].to(torch.float64).square()
        return square[:, :a].sum(1) + square[:, a:].square().sum(1)

    def log_prob(self, cutoff: float, sigma: float = 1.0) -> float:
        """Exact ln P(K(w) < cutoff) for w ~ N(0, σ² I_D), natural log (≤ 0).

        Relative error ≤ 1e-9 (absolute where |ln P| < 1) for a, b ≤ 1000, cutoff 1e-14 …
        10, σ 0.1 … 10 (the verified range; the method holds beyond it). Cached."""
        return _exact(self.quadratic, self.quartic, _positive("cutoff", cutoff),
                      _positive("sigma", sigma))[0]  # fmt: skip

    def slope(self, cutoff: float, sigma: float = 1.0) -> float:
        """Exact d ln P / d ln cutoff = cutoff · f(cutoff) / P(cutoff), f the density of K.

        Relative error ≤ 1e-9 where the slope is ≥ 1e-6 (absolute ≤ 1e-15 below: cutoffs far
        above the prior's typical K, where P ≈ 1)."""
        return _exact(self.quadratic, self.quartic, _positive("cutoff", cutoff),
                      _positive("sigma", sigma))[1]  # fmt: skip

    def fitted_slope(
        self, cutoffs: Sequence[float], sigma: float = 1.0, n_points: int = FIT_POINTS
    ) -> float:
        """The unweighted least-squares slope of the exact ln P against ln ε over the
        ``n_points`` smallest ``cutoffs`` (all if fewer): the line that
        `tyche.basin.lambda_fit.learning_coefficient` (default n_points = 3) fits to a
        curve's estimated ln P at those cutoffs; the exact slope at the fitted cutoffs."""
        if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 2:
            raise InputError(f"n_points must be an integer >= 2, got {n_points!r}")
        values = sorted({_positive("cutoff", c) for c in cutoffs})
        if len(values) < 2:
            raise InputError(f"a slope needs at least two distinct cutoffs, got {list(cutoffs)}")
        use = values[:n_points]
        x = [math.log(c) for c in use]
        y = [self.log_prob(c, sigma) for c in use]
        xm, ym = sum(x) / len(x), sum(y) / len(y)
        return sum((xi - xm) * (yi - ym) for xi, yi in zip(x, y)) / sum((xi - xm) ** 2 for xi in x)


SUITE_CUTOFFS = (1e-8, 1e-7, 1e-6)

SUITE = (
    ExactCase(quadratic=1, flat=1),  # K = w₂² in D = 2, up to the order of the coordinates
    ExactCase(quadratic=2, flat=8),
    ExactCase(quadratic=10, flat=90),
    ExactCase(quadratic=50, flat=950),
    ExactCase(quartic=1, flat=1),
    ExactCase(quartic=5, flat=5),
    ExactCase(quartic=10, flat=90),
    ExactCase(quartic=50, flat=950),
    ExactCase(quadratic=50, quartic=50),
    ExactCase(quadratic=10, quartic=90),
    ExactCase(quadratic=90, quartic=10),
    ExactCase(quadratic=5, quartic=5, flat=90),
)
