"""Exact, cheap ablation energies for lens targets: an affine map, a norm, a linear readout.

A lens target maps a hidden state ``h`` (d,) to logits (V,) as

    z(h) = W (γ ⊙ n(g) + β) + b,        g = M h + c,

with ``M, c`` an affine translator (tuned lens: ``M = I + A_s``, ``c = b_s``; logit lens:
``M = I``, ``c = 0``), ``n`` the model's final norm (LayerNorm: ``(g - mean g) / s``,
RMSNorm: ``g / s``, with ``s = sqrt(mean of the squares + ε)``; or none, ``s = 1``), and
``W`` (V, d), ``b`` the unembedding. Ablating span(V) (d, m) maps ``h`` to
``h' = h - C Vᵀ`` with ``C = δ V`` (``δ = h - r``, see ``tyche.ablation``), so
``g' = g - C Uᵀ`` with ``U = M V``. With ``x = P g`` (``P`` centres for LayerNorm, ``P = I``
otherwise) and ``Ũ = P U``, everything about ``h'`` follows from quantities of ``h``:

    s'² = (‖x‖² - 2 Σ_j C_j (x·Ũ_j) + Σ_jl C_j (ŨᵀŨ)_jl C_l) / d + ε
    z'  = (A - C Rᵀ) / s' + W β + b,     A = W diag(γ) x  (once),   R = W diag(γ) P M V

so an evaluation costs one (V × d × m) product for ``R`` and element-wise work over (N, V)
instead of an (N × d × V) product. Writing ``G = A / s`` (the clean readout without bias),
``Δ = z' - z = (s/s' - 1) G - (C/s') Rᵀ`` and ``p = softmax z``, the per-position energies are

    KL(p ‖ softmax z') = log Σ_v p_v e^{Δ_v} - Σ_v p_v Δ_v,
    CE(z', y) - CE(z, y) = log Σ_v p_v e^{Δ_v} - Δ_y,

free of the large cancelling terms of ``log p - log q`` (``Δ`` is small when the ablation
is). Norm statistics are carried in float64 (they are (N, m) numbers, cheap at any
precision); the (N, V) work runs in float32 (float64 for float64 hidden states).

``A`` is held per chunk of positions while it fits ``cache_bytes``; chunks beyond the budget
recompute it on each evaluation (a forward product, still no backward one).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tyche.errors import InputError

__all__ = ["FactoredReadout", "LensFactors", "norm_factors"]

#: a recognised norm whose clean logits differ from the target's by more than this (relative
#: to 1 + max |logit|) is not what we think it is: structural mismatches (a gain of 1 + w, a
#: different eps placement) are O(1e-2..1); float32 reduction-order differences over d ≤ 10⁴
#: terms are ≤ 1e-5. Half-precision targets get 8 ulps of their own dtype instead.
FACTOR_CHECK_RTOL = 1e-3
#: (n, V) work is done in blocks of about this many elements (4 MiB of float32), reusing the
#: same buffers: 2-8 MiB blocks measured 3-6x faster per element on CPU than fresh 8-200 MiB
#: tensors (allocation page faults, caches); smaller blocks lose to per-block overhead
BLOCK_ELEMENTS = 2**20
#: thin (n, m) @ (m, V) updates use m rank-one updates up to this m, addmm above
RANK_UPDATE_COLUMNS = 4


@dataclass(frozen=True)
class LensFactors:
    """A target written as ``z(h) = W (γ ⊙ n(M h + c) + β) + b`` (see the module docstring).

    Attributes:
        readout: W, (V, d).
        readout_bias: b, (V,) or None.
        centre: the norm subtracts the mean over d (LayerNorm).
        scale: the norm divides by ``sqrt(mean square + eps)`` (LayerNorm, RMSNorm).
        eps: ε of the norm.
        gain: γ, (d,) or None (1).
        norm_bias: β, (d,) or None (0).
        translator: M, (d, d) or None (identity).
        shift: c, (d,) or None (0).
    """

    readout: Tensor
    readout_bias: Tensor | None = None
    centre: bool = False
    scale: bool = False
    eps: float = 0.0
    gain: Tensor | None = None
    norm_bias: Tensor | None = None
    translator: Tensor | None = None
    shift: Tensor | None = None

    def with_translator(self, matrix: Tensor, shift: Tensor | None) -> LensFactors:
        """The same norm and readout after ``h -> matrix h + shift``."""
        return LensFactors(**{**self.__dict__, "translator": matrix, "shift": shift})

    def pre_norm(self, h: Tensor) -> Tensor:
        """``g = M h + c`` for hidden states (..., d)."""
        g = h if self.translator is None else h @ self.translator.to(h).T
        return g if self.shift is None else g + self.shift.to(h)

    def logits(self, h: Tensor) -> Tensor:
        """The target's logits (..., V) computed from the factors (a reference, not fast)."""
        g = self.pre_norm(h)
        if self.centre:
            g = g - g.mean(-1, keepdim=True)
        if self.scale:
            g = g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gain is not None:
            g = g * self.gain.to(g)
        if self.norm_bias is not None:
            g = g + self.norm_bias.to(g)
        z = g @ self.readout.to(g).T
        return z if self.readout_bias is None else z + self.readout_bias.to(z)


#: TransformerLens's final norms by class name: (centres, has the gain ``w``, has the bias ``b``)
HOOKED_NORMS = {
    "LayerNorm": (True, True, True),
    "LayerNormPre": (True, False, False),
    "RMSNorm": (False, True, False),
    "RMSNormPre": (False, False, False),
}


def _hooked_norm_factors(norm: nn.Module, d: int) -> dict | None:
    """The factors of a TransformerLens norm (``transformer_lens.components``), recognised by
    class name and attributes (``eps``; gain ``w`` (d,), bias ``b`` (d,)); None otherwise."""
    kind = HOOKED_NORMS.get(type(norm).__name__)
    eps = getattr(norm, "eps", None)
    if kind is None or not isinstance(eps, float | int) or isinstance(eps, bool):
        return None
    centre, has_gain, has_bias = kind
    out: dict = {"centre": centre, "scale": True, "eps": float(eps)}
    for key, attr, present in (("gain", "w", has_gain), ("norm_bias", "b", has_bias)):
        value = getattr(norm, attr, None)
        if present and not (isinstance(value, Tensor) and tuple(value.shape) == (d,)):
            return None
        if present:
            out[key] = value
    return out


def norm_factors(norm: nn.Module, d: int) -> dict | None:
    """``centre, scale, eps, gain, norm_bias`` of a recognised final norm, or None.

    Recognised: ``nn.Identity``; ``nn.LayerNorm`` over the last dimension (GPT-2, GPT-NeoX),
    with or without elementwise affine/bias; RMSNorms with a ``weight`` (d,) and
    ``variance_epsilon`` or ``eps`` (Llama and alike); TransformerLens's ``LayerNorm``
    (gain ``w``, bias ``b``), ``LayerNormPre`` (no parameters, as after ``fold_ln``),
    ``RMSNorm`` (``w``) and ``RMSNormPre``. Anything else: None (general path).
    """
    if isinstance(norm, nn.Identity):
        return {"centre": False, "scale": False}
    if type(norm).__module__.startswith("transformer_lens."):
        return _hooked_norm_factors(norm, d)
    if isinstance(norm, nn.LayerNorm):
        if tuple(norm.normalized_shape) != (d,):
            return None
        return {"centre": True, "scale": True, "eps": float(norm.eps), "gain": norm.weight,
                "norm_bias": norm.bias}  # fmt: skip
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    weight = getattr(norm, "weight", None)
    named = "RMSNorm" in type(norm).__name__ and isinstance(eps, float | int)
    if named and isinstance(weight, Tensor) and tuple(weight.shape) == (d,):
        return {"centre": False, "scale": True, "eps": float(eps), "gain": weight}
    return None


def _block_energy(
    rho: Tensor,
    a: Tensor,
    r: Tensor,
    clean: Tensor,
    prob: Tensor,
    stats: Tensor,
    bias: Tensor,
    labels: Tensor | None,
    out: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Energies (n,) of one block of positions; ``S`` (n,) and ``Σ_v p_v R_v`` (n, m).

    ``clean`` G and ``prob`` p (n, V); ``stats`` (n, 4) float64: Σ p, Σ p G, G_y, log Σ e^z;
    ``bias`` (V,) the logits' bias (z = G + bias). With ``Δ = ρ G - a Rᵀ``, ``μ = Σ p Δ``
    (float64), ``c`` = μ rounded to the work dtype and ``S = Σ p e^(Δ - c)``: KL = log(S / Σp)
    + c - μ and CE increase = log(S / Σp) + c - Δ_y, the sums carried by ``S`` (relative
    rounding ~1e-7, so ~1e-7 nats however large the logits). Since Σ p e^(Δ - μ) ≥ Σp
    (Jensen), S cannot underflow, whatever common shift Δ has; if it overflows, ``c`` also
    takes the maximum of ``log p + Δ - μ``. On return ``out`` (n, V) holds ``p e^(Δ - c)``,
    so ``q = out / S`` is the ablated distribution.
    """
    p_sum, p_clean, clean_y, log_norm = stats.unbind(1)
    p_r = prob @ r  # Σ_v p_v R_v (n, m)
    mu = rho * p_clean - (a * p_r).sum(-1)  # Σ p Δ, float64
    shift = mu.to(out.dtype)

    def shifted() -> Tensor:  # Δ - c = ρ G - c - a Rᵀ, into ``out``
        t = torch.addcmul(-shift[:, None], clean, rho[:, None].to(out.dtype), out=out)
        if a.shape[1] > RANK_UPDATE_COLUMNS:
            return t.addmm_(a, r.T, alpha=-1)
        for j in range(a.shape[1]):  # rank-one updates: faster than a thin addmm on CPU
            t.addcmul_(a[:, j : j + 1], r[:, j], value=-1)
        return t

    total = torch.exp(shifted(), out=out).mul_(prob).sum(-1, dtype=torch.float64)
    peak = 0
    if not bool(torch.isfinite(total).all()):  # e^(Δ - c) overflowed: shift by the max
        t = shifted().add_(clean).add_(bias).sub_(log_norm[:, None].to(out.dtype))
        peak = t.amax(-1).double()  # of log p + Δ - c
        total = torch.exp(t.sub_(peak[:, None].to(out.dtype)), out=out).sum(-1, dtype=torch.float64)
        total = total * p_sum  # so that total / Σp is Σ e^(log p + Δ - c - peak) as above
    log_ratio = (total / p_sum).log() + peak + shift.double()  # log Σ p e^Δ / Σp
    if labels is None:
        return log_ratio - mu, total, p_r
    return log_ratio - (rho * clean_y - (a * r[labels]).sum(-1)), total, p_r


class _ReadoutSum(torch.autograd.Function):
    """Weighted sum of per-position energies over a chunk, in blocks, gradient computed eagerly.

    Inputs ``rho`` (n,) = s/s' - 1, ``a`` (n, m) = C/s', ``r`` (V, m) = R; ``readout`` the
    :class:`FactoredReadout`; ``item`` its chunk. The output is a scalar, so the gradient wrt
    ``Δ`` is known in the forward pass: ``w (q - p)`` (KL) or ``w (q - onehot y)`` (CE) with
    ``q = p e^(Δ - c) / S``. Its products with G, R and a need only reads of ``p e^Δ`` and ``p``
    (Σ p G and p R are known): each block's gradients wrt ``rho, a, r`` are reduced at once
    and no (n, V) tensor outlives its block (the work buffers are reused).
    """

    @staticmethod
    def forward(ctx, rho, a, r, readout, item, positions):  # noqa: D102
        grad = any(ctx.needs_input_grad[:3])
        total = rho.new_zeros((), dtype=torch.float64)
        grads = (torch.zeros_like(rho), torch.zeros_like(a), torch.zeros_like(r)) if grad else ()
        for block in readout.blocks(positions):
            mine = slice(block.start - positions.start, block.stop - positions.start)
            work = readout.work(block.stop - block.start)
            clean = readout.clean(item, block)
            prob = readout.prob(item, block, clean)
            stats = item["stats"][block]
            labels = item["labels"][block] if "labels" in item else None
            ab = a[mine]
            energy, s, p_r = _block_energy(rho[mine], ab, r, clean, prob, stats, readout.bias,
                                           labels, work[0])  # fmt: skip
            w = item["weight"][block]
            total += torch.where(w > 0, energy, 0).sum()
            if not grad:
                continue
            u, wq = work[0], (w / s).to(rho.dtype)  # u = p e^(Δ - c): w q = wq u
            # d = w q - w p (KL) or w q - w onehot(y) (CE); G·d, d R and dᵀ a from reads only
            u_clean = torch.mul(u, clean, out=work[1]).sum(-1, dtype=torch.float64)
            if labels is None:
                grads[0][mine] = wq * u_clean - w * stats[:, 1]
                grads[1][mine] = -(wq[:, None] * (u @ r) - w[:, None] * p_r)
                grads[2].sub_(u.T @ (ab * wq[:, None]) - prob.T @ (ab * w[:, None]))
            else:
                grads[0][mine] = wq * u_clean - w * stats[:, 2]
                grads[1][mine] = -(wq[:, None] * (u @ r) - w[:, None] * r[labels])
                grads[2].sub_(u.T @ (ab * wq[:, None]))
                grads[2].index_add_(0, labels, ab * w[:, None])
        ctx.grads = grads
        return total.to(rho.dtype)

    @staticmethod
    def backward(ctx, grad_total):  # noqa: D102
        grad_rho, grad_a, grad_r = (g * grad_total for g in ctx.grads)
        return grad_rho, grad_a, grad_r, None, None, None


class FactoredReadout:
    """Energies of ablations for a :class:`LensFactors` target, chunk by chunk.

    Args:
        factors: the target's factors.
        hiddens: (..., d) hidden states (this rank's shard).
        delta: ``h - r`` (..., d) (0 at positions not selected).
        weight: (...) bool, the positions the energy sums over.
        chunks: slices of the leading dimension, in the order they will be evaluated.
        labels: (...) long (``-100``: none) for the CE objective, or None for KL.
        cache_bytes: bytes of clean readouts ``G`` and probabilities ``p`` (N, V) to keep
            between evaluations (all ``G`` first); the rest is recomputed per evaluation.
    """

    def __init__(
        self,
        factors: LensFactors,
        hiddens: Tensor,
        delta: Tensor,
        weight: Tensor,
        chunks: Sequence[slice],
        labels: Tensor | None,
        cache_bytes: float,
    ) -> None:
        self.factors = f = factors
        self.dtype = torch.promote_types(hiddens.dtype, torch.float32)
        self.d = d = hiddens.shape[-1]
        dev, wide = hiddens.device, torch.float64
        eye = torch.eye(d, dtype=wide, device=dev)
        m = eye if f.translator is None else f.translator.detach().to(dev, wide)
        centring = eye - 1.0 / d if f.centre else eye
        gain = torch.ones(d, dtype=wide, device=dev) if f.gain is None else f.gain.detach()
        readout = f.readout.detach().to(dev, wide)
        w_gain = readout * gain.to(dev, wide)  # W diag(γ)
        # minus its mean row: logits then change by a per-position constant, which no energy
        # sees (softmax, KL and CE increase are shift-invariant), and a component that all
        # rows share (e.g. logits near -100 in GPT-2) no longer costs float32 ulps of it
        w_gain = w_gain - w_gain.mean(0, keepdim=True)
        #: K = Mᵀ P M (d, d): the Gram matrix of directions as the norm sees them
        self.gram = m.T @ centring @ m
        self.w_gain = w_gain.to(self.dtype)
        #: W diag(γ) P M (V, d): R = w_eff V
        self.w_eff = (w_gain @ centring @ m).to(self.dtype)
        bias = torch.zeros(readout.shape[0], dtype=wide, device=dev)
        if f.norm_bias is not None:
            bias = bias + readout @ f.norm_bias.detach().to(dev, wide)
        if f.readout_bias is not None:
            bias = bias + f.readout_bias.detach().to(dev, wide)
        self.bias = bias.to(self.dtype)
        self.m = None if f.translator is None else m
        self.block_size = max(1, BLOCK_ELEMENTS // readout.shape[0])
        self._work: tuple[Tensor, ...] = ()
        self._chunk: list[dict[str, Tensor]] = []
        budget = float(cache_bytes)
        for index, rows in enumerate(chunks):  # clean readouts first, as many as fit
            lab = None if labels is None else labels[rows]
            budget -= self._prepare(index, hiddens[rows], delta[rows], weight[rows], lab, budget)
        for item in self._chunk:  # then clean probabilities with what is left
            if "clean" in item and item["clean"].numel() * item["clean"].element_size() <= budget:
                log_norm = item["stats"][:, 3:].to(self.dtype)
                item["prob"] = (item["clean"] + self.bias).sub_(log_norm).exp_()
                budget -= item["prob"].numel() * item["prob"].element_size()

    @torch.no_grad()
    def _prepare(
        self, index: int, h: Tensor, delta: Tensor, weight: Tensor, labels: Tensor | None,
        budget: float,
    ) -> int:  # fmt: skip
        """Clean statistics of one chunk, block by block (so no (n, V) temporary is larger
        than a block); returns the bytes of the cached ``G`` (0 if it does not fit)."""
        f = self.factors
        g = f.pre_norm(h.reshape(-1, self.d).to(torch.float64))
        x = g - g.mean(-1, keepdim=True) if f.centre else g
        square = x.pow(2).sum(-1)
        scale = torch.sqrt(square / self.d + f.eps) if f.scale else torch.ones_like(square)
        n, vocab = x.shape[0], self.bias.shape[0]
        size = n * vocab * self.bias.element_size()
        item = {
            "square": square,
            "scale": scale,
            "x_m": x if self.m is None else x @ self.m,  # x M (n, d), float64
            "delta": delta.reshape(-1, self.d).to(torch.float64),
            "weight": weight.reshape(-1).to(self.dtype),
            "x": x.to(self.dtype),
            # per position, float64: Σ p, Σ p G, G_y, log Σ e^z
            "stats": torch.zeros(n, 4, dtype=torch.float64, device=x.device),
        }
        if labels is not None:
            item["labels"] = labels.reshape(-1).clamp_min(0)
        if size <= budget:
            item["clean"] = self.bias.new_empty(n, vocab)
        stats = item["stats"]
        for block in self.blocks(slice(0, n)):
            clean = self.clean(item, block) if "clean" not in item else item["clean"][block]
            if "clean" in item:
                torch.mm(item["x"][block], self.w_gain.T, out=clean)
                clean.div_(scale[block].to(self.dtype)[:, None])
            logits = torch.add(clean, self.bias, out=self.work(block.stop - block.start)[3])
            stats[block, 3] = torch.logsumexp(logits, -1).to(torch.float64)
            if not bool(torch.isfinite(stats[block, 3]).all()):
                raise InputError("the lens gives NaN/inf logits on the clean hidden states")
            prob = logits.sub_(stats[block, 3:].to(self.dtype)).exp_()
            stats[block, 0] = prob.sum(-1, dtype=torch.float64)
            stats[block, 1] = (prob * clean).sum(-1, dtype=torch.float64)
            if labels is not None:
                stats[block, 2] = clean.gather(-1, item["labels"][block, None])[:, 0].double()
        if "clean" in item:
            del item["x"]
        self._chunk.append(item)
        return size if "clean" in item else 0

    @property
    def cached_fraction(self) -> float:
        """Fraction of chunks whose clean readout is held in memory."""
        held = sum("clean" in c for c in self._chunk)
        return held / max(len(self._chunk), 1)

    def blocks(self, positions: slice) -> list[slice]:
        """``positions`` in blocks small enough for the (n, V) work to stay in cache."""
        step, stop = self.block_size, positions.stop
        return [slice(i, min(i + step, stop)) for i in range(positions.start, stop, step)]

    def work(self, n: int) -> tuple[Tensor, ...]:
        """Four reusable (n, V) buffers (views of ones allocated once)."""
        if not self._work:
            shape = (self.block_size, self.bias.shape[0])
            self._work = tuple(self.bias.new_empty(shape) for _ in range(4))
        return tuple(w[:n] for w in self._work)

    def clean(self, item: dict[str, Tensor], block: slice) -> Tensor:
        """The clean readout ``G`` (n, V) of a block of a chunk (cached or recomputed)."""
        if "clean" in item:
            return item["clean"][block]
        out = self.work(block.stop - block.start)[2]
        torch.mm(item["x"][block], self.w_gain.T, out=out)
        return out.div_(item["scale"][block].to(self.dtype)[:, None])

    def prob(self, item: dict[str, Tensor], block: slice, clean: Tensor) -> Tensor:
        """The clean probabilities ``p`` (n, V) of a block (cached or recomputed)."""
        if "prob" in item:
            return item["prob"][block]
        out = self.work(block.stop - block.start)[3]
        torch.add(clean, self.bias, out=out)
        return out.sub_(item["stats"][block, 3:].to(self.dtype)).exp_()

    def chunk_sum(self, index: int, positions: slice, vectors: Tensor) -> Tensor:
        """Sum over counted ``positions`` (flattened) of chunk ``index`` of the energy of
        ablating span(``vectors``) (d, m).

        ``vectors`` need not be orthonormal (the algebra holds for any ``h' = h - (δ V) Vᵀ``).
        Differentiable in ``vectors`` (scalar output).
        """
        item = self._chunk[index]
        v = vectors.to(torch.float64)
        coeff = item["delta"][positions] @ v  # C (n, m)
        if self.factors.scale:
            proj = item["x_m"][positions] @ v  # x·Ũ (n, m)
            gram = v.T @ self.gram @ v
            square = item["square"][positions] - 2 * (coeff * proj).sum(-1)
            square = square + ((coeff @ gram) * coeff).sum(-1)
            scale = torch.sqrt(square.clamp_min(0) / self.d + self.factors.eps)
            rho = item["scale"][positions] / scale - 1
            a = coeff / scale[:, None]
        else:
            rho, a = coeff.new_zeros(coeff.shape[0]), coeff
        r = self.w_eff @ vectors.to(self.dtype)
        return _ReadoutSum.apply(rho.to(self.dtype), a.to(self.dtype), r, self, item, positions)


def check_factors(factors: LensFactors, target, h: Tensor) -> bool:
    """Whether ``factors`` reproduce ``target``'s logits on ``h`` (n, d) (warns if not)."""
    with torch.no_grad():
        expected = target(h)
        expected = getattr(expected, "logits", expected)
        got = factors.logits(h.to(torch.promote_types(h.dtype, torch.float32)))
    dtype = expected.dtype
    rtol = max(FACTOR_CHECK_RTOL, 8 * torch.finfo(dtype).eps)
    err = float((got - expected.to(got)).abs().max())
    scale = 1.0 + float(expected.abs().max())
    if err <= rtol * scale:
        return True
    warnings.warn(
        f"the lens's norm/readout did not reproduce its logits (max error {err:.3g}); "
        "using the general (slower) evaluation",
        stacklevel=3,
    )
    return False
