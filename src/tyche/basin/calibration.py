"""Exact basin cases: losses whose prior mass is known, to calibrate the estimator against.

`ExactCase(quadratic=a, quartic=b, flat=k)` is the loss on D = a + b + k coordinates

    K(w) = Σ_{i<a} w_i² + Σ_{a≤i<a+b} w_i⁴       (the last k coordinates exactly flat)

around the anchor θ = 0, with the prior w ~ N(0, σ² I_D). Its basin {K < ε} has the prior
mass P(S + T < ε) with S = Σ w_i² ~ σ²χ²_a and T = Σ w_j⁴ independent (the flat coordinates
integrate to 1), so its Laplace transform is closed-form:

    ∫₀^∞ e^(−sε) P(ε) dε = (1 + 2σ²s)^(−a/2) M(s)^b / s,
    M(s) = E[e^(−s w⁴)] = √(2/π)/σ · ½ √(γ/(2s)) e^(γ²/(2s)) K_¼(γ²/(2s)),  γ = 1/(4σ²)

(Gradshteyn & Ryzhik 3.323.3, K_¼ the modified Bessel function), and `log_prob` inverts
it numerically with mpmath's Talbot contour at 40 digits: it equals the regularised
incomplete gamma function (b = 0) and erf(ε^¼/(σ√2)) (a = 0, b = 1) to 1e-30, and a direct
quadrature of small cases (tests/basin/test_calibration_exact.py). The learning
coefficient is a/2 + b/4 as ε → 0; `fitted_slope` is what `learning_coefficient` would fit
to the exact log P at the given cutoffs (least squares against ln ε), the number an
estimate's λ is compared with.

`SUITE` is the calibration suite of `benchmarks/lambda.py --cases calibration`: exactly
flat directions with quadratic or quartic ones, D from 2 to 1,000, and quadratic/quartic
mixes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from tyche.errors import InputError

__all__ = ["SUITE", "SUITE_CUTOFFS", "ExactCase"]

DIGITS = 40


@lru_cache(maxsize=4096)
def _log_prob(a: int, b: int, cutoff: float, sigma: float) -> float:
    import mpmath as mp

    with mp.workdps(DIGITS):
        eps, sig = mp.mpf(cutoff), mp.mpf(sigma)
        if b == 0:
            return float(mp.log(mp.gammainc(mp.mpf(a) / 2, 0, eps / (2 * sig**2),
                                            regularized=True)))  # fmt: skip
        gamma = 1 / (4 * sig**2)

        def moment(s):  # E[exp(-s w⁴)], w ~ N(0, σ²)
            z = gamma**2 / (2 * s)
            half = mp.sqrt(gamma / (2 * s)) * mp.exp(z) * mp.besselk(mp.mpf(1) / 4, z) / 2
            return mp.sqrt(2 / mp.pi) / sig * half

        def transform(s):
            return (1 + 2 * sig**2 * s) ** (-mp.mpf(a) / 2) * moment(s) ** b / s

        return float(mp.log(mp.invertlaplace(transform, eps, method="talbot")))


@dataclass(frozen=True)
class ExactCase:
    """K(w) = Σ_{i<a} w_i² + Σ_{a≤i<a+b} w_i⁴ on D = a + b + k coordinates (k flat)."""

    quadratic: int = 0
    quartic: int = 0
    flat: int = 0

    def __post_init__(self) -> None:
        for name in ("quadratic", "quartic", "flat"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise InputError(f"{name} must be an integer >= 0, got {value!r}")
        if self.quadratic + self.quartic == 0:
            raise InputError("an exact case needs a quadratic or quartic coordinate")

    @property
    def dim(self) -> int:
        return self.quadratic + self.quartic + self.flat

    @property
    def name(self) -> str:
        counts = ((self.quadratic, "quadratic"), (self.quartic, "quartic"), (self.flat, "flat"))
        parts = [f"{n} {w}" for n, w in counts if n]
        return " + ".join(parts)

    @property
    def asymptotic_lambda(self) -> float:
        """a/2 + b/4: the exponent of P(ε) as ε → 0."""
        return self.quadratic / 2 + self.quartic / 4

    def anchor(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.zeros(self.dim, dtype=dtype)

    def loss(self, offsets: torch.Tensor) -> torch.Tensor:
        """K at anchor + offsets: offsets (B, D) -> (B,) float64."""
        if offsets.dim() != 2 or offsets.shape[1] != self.dim:
            raise InputError(f"offsets must have shape (B, {self.dim}), got {tuple(offsets.shape)}")
        w = offsets.double()
        a, b = self.quadratic, self.quartic
        return (w[:, :a] ** 2).sum(1) + (w[:, a : a + b] ** 4).sum(1)

    def log_prob(self, cutoff: float, sigma: float = 1.0) -> float:
        """Exact ln P(K(w) < cutoff), w ~ N(0, σ² I_D) (nats)."""
        if not (cutoff > 0 and math.isfinite(cutoff)) or not (sigma > 0 and math.isfinite(sigma)):
            raise InputError(f"cutoff and sigma must be positive, got {cutoff!r}, {sigma!r}")
        return _log_prob(self.quadratic, self.quartic, float(cutoff), float(sigma))

    def slope(self, cutoff: float, sigma: float = 1.0, step: float = 1e-4) -> float:
        """d ln P / d ln cutoff at ``cutoff`` (a central difference of the exact log P, step
        1e-4 in ln ε: its error is ~step² times the curvature, far below 1e-6)."""
        up = self.log_prob(cutoff * math.exp(step), sigma)
        down = self.log_prob(cutoff * math.exp(-step), sigma)
        return (up - down) / (2 * step)

    def fitted_slope(self, cutoffs, sigma: float = 1.0) -> float:
        """The least-squares slope of the exact ln P against ln ε over ``cutoffs`` (the three
        smallest, as `learning_coefficient` fits)."""
        use = sorted(float(c) for c in cutoffs)[:3]
        x = torch.tensor([math.log(c) for c in use], dtype=torch.float64)
        y = torch.tensor([self.log_prob(c, sigma) for c in use], dtype=torch.float64)
        xc = x - x.mean()
        return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


SUITE_CUTOFFS = (1e-8, 1e-7, 1e-6)

SUITE = (
    ExactCase(quadratic=1, flat=1),  # the K = w₂² in D = 2 (coordinates swapped)
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
