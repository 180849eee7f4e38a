"""Vectorised integrated Jacobians of a section: batched backward passes over output features.

For a section ``F`` from node layer ``l`` to ``l + 1`` and cotangents ``phi_r`` over its
folded output ``y = [g, c_out]`` ``(B, P', d' + 1)``, :func:`integrated_vjp` returns

    J_r = sum_k w_k  d< phi_r, F(alpha_k h) > / d(alpha_k h)        shape (B, P, d + 1)

a chunk of ``r`` at a time. One forward pass per integration point builds the graph; the
backward passes for all cotangents of a chunk run as one batched call
(``torch.autograd.grad(..., is_grads_batched=True)``, i.e. ``vmap`` over the backward), never
one backward pass per output feature in a Python loop.

:class:`Cotangents` spans the next layer's features ``F_hat = y @ C`` directly in ``y``'s
coordinates (cotangent ``C[:, i]`` for feature ``i``, so the projection is never
differentiated): a position factor (one-hot over the ``P'`` output positions, or ``R_pos``
random +-1 vectors over them, "stochastic sources") times a feature factor (one per feature
``i``, or ``R_hid`` random +-1 combinations of them). Random signs are a hash of (seed, global
row, source, item), so every split of the data over batches and ranks draws the same ones.
``E[(sum_t phi_t a_t)^2] = sum_t a_t^2`` makes sums of squares over the random factor
unbiased once divided by the number of sources.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from tyche.interaction.integrate import IntegrationRule
from tyche.interaction.sections import Batch, ModelRunner

__all__ = [
    "Cotangents",
    "Gradients",
    "SectionOutputs",
    "SectionPlan",
    "integrated_vjp",
    "position_weights",
    "rademacher",
    "section_blocks",
    "section_outputs",
]

_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer hash (lowbias32) on int64 tensors holding 32-bit values."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def rademacher(seed: int, salt: int, rows: Tensor, n_sources: int, length: int) -> Tensor:
    """Random signs ``(n_sources, len(rows), length)`` (float64, +-1) hashed from their indices.

    ``rows`` are global row indices (LongTensor); the same (seed, salt, row, source, item)
    always gives the same sign.
    """
    device = rows.device
    x = _mix32(torch.tensor(seed * 0x9E3779B1 + salt * 0x632BE5AB, dtype=torch.long, device=device))
    x = _mix32(x + rows.view(1, -1, 1).long())
    x = _mix32(x + torch.arange(n_sources, device=device).view(-1, 1, 1) * 0x2545F491)
    x = _mix32(x + torch.arange(length, device=device).view(1, 1, -1) * 0x9E3779B9)
    return ((x >> 31) & 1).to(torch.float64) * 2.0 - 1.0


def feature_matrix(C: Tensor | None, width: int) -> Tensor:
    """``(d' + 1, K)``: the next layer's features as columns over its folded coordinates.

    ``C`` is ``(d' + 1, K)`` for a folded basis, ``(d', K)`` for the last layer's rotation
    (its constant is left out), None for the last layer's raw coordinates.
    """
    if C is None:
        return torch.eye(width, dtype=torch.float64)[:, : width - 1]
    if C.shape[0] == width - 1:
        return torch.cat([C, C.new_zeros(1, C.shape[1])])
    return C


@dataclass(frozen=True)
class Cotangents:
    """Cotangents over a folded section output ``(B, P', d' + 1)`` spanning ``y @ features``.

    ``features`` ``(d' + 1, K)``. ``n_positions`` / ``n_hidden``: None for one per output
    position / feature, else the number of random +-1 sources. Cotangent ``r`` pairs position
    factor ``r // n_hid`` with feature factor ``r % n_hid``.
    """

    n_out_positions: int
    features: Tensor
    n_positions: int | None = None
    n_hidden: int | None = None
    seed: int = 0
    salt: int = 0

    @property
    def n_out_features(self) -> int:
        return self.features.shape[1]

    @property
    def n_pos(self) -> int:
        return self.n_out_positions if self.n_positions is None else self.n_positions

    @property
    def n_hid(self) -> int:
        return self.n_out_features if self.n_hidden is None else self.n_hidden

    def __len__(self) -> int:
        return self.n_pos * self.n_hid

    @property
    def scale(self) -> float:
        """Factor making sums of squares over the sources unbiased: 1 / (R_pos R_hid)."""
        return 1.0 / ((self.n_positions or 1) * (self.n_hidden or 1))

    def feature_of(self, start: int, stop: int) -> Tensor | None:
        """Output feature index of cotangents ``start..stop`` (None with hidden sources)."""
        if self.n_hidden is not None:
            return None
        return torch.arange(start, stop) % self.n_hid

    def chunk(self, start: int, stop: int, batch: Batch, like: Tensor) -> Tensor:
        """Cotangents ``start..stop`` for ``batch``: ``(stop - start, B, P', d' + 1)``."""
        r = torch.arange(start, stop)
        rp, rh = r // self.n_hid, r % self.n_hid
        b, p = batch.n, self.n_out_positions
        opts = {"dtype": like.dtype, "device": like.device}
        feats = self.features.to(**opts)
        rows = torch.arange(batch.offset, batch.offset + b, device=like.device)
        if self.n_positions is None:
            pos = torch.eye(p, **opts)[rp].unsqueeze(1)  # (m, 1, P')
        else:
            pos = rademacher(self.seed, 2 * self.salt, rows, self.n_positions, p).to(**opts)[rp]
        if self.n_hidden is None:
            vec = feats.T[rh].unsqueeze(1)  # (m, 1, d' + 1)
        else:
            signs = rademacher(self.seed, 2 * self.salt + 1, rows, self.n_hidden, feats.shape[1])
            vec = signs.to(**opts)[rh] @ feats.T  # (m, B, d' + 1)
        # materialised: stride-0 (expanded) cotangents make every backward op slower
        out = (pos.unsqueeze(-1) * vec.unsqueeze(-2)).expand(len(r), b, p, feats.shape[0])
        return out.contiguous()


@dataclass
class SectionOutputs:
    """One batch's forward passes through a section.

    ``h``: the folded activation at node layer ``l`` ``(B, P, d + 1)``; ``vjps[k]`` the
    backward function of the section at ``alpha_k`` (``torch.func.vjp``); ``ys[k]`` its
    folded output ``(B, P', d' + 1)``; ``full`` the output at ``alpha = 1``.
    """

    h: Tensor
    vjps: list[Callable[[Tensor], tuple[Tensor, Tensor]]]
    ys: list[Tensor]
    full: Tensor


def section_outputs(
    runner: ModelRunner, batch: Batch, index: int, rule: IntegrationRule, *, need_full: bool
) -> SectionOutputs:
    """Forward passes of section ``index`` at every point of ``rule`` (backward functions kept)."""
    alphas, _ = rule.points()
    h, shape = runner.capture(batch, index)
    fn = runner.section_fn(batch, index, shape)
    vjps, ys = [], []
    for alpha in alphas:
        y, vjp_fn = torch.func.vjp(fn, alpha * h[..., :-1], alpha * h[..., -1])
        vjps.append(vjp_fn)
        ys.append(y.detach())
    if 1.0 in alphas:
        full = ys[alphas.index(1.0)]
    elif need_full:
        with torch.no_grad():
            full = fn(h[..., :-1], h[..., -1])
    else:
        full = ys[-1]
    return SectionOutputs(h, vjps, ys, full)


def section_blocks(
    runner: ModelRunner, batch: Batch, plan: SectionPlan, *, need_full: bool, split: bool = True
) -> Iterator[tuple[Batch, SectionOutputs]]:
    """Forward passes of section ``plan.index`` over ``batch``, in blocks of rows small enough
    that each batched backward carries at least :data:`MIN_CHUNK` cotangents (one block when
    the whole batch allows that, or when not ``split``: for one cotangent per point)."""
    rows = plan.rows_per_block(runner, batch) if split and batch.n > 1 else batch.n
    for start in range(0, batch.n, rows):
        block = batch if rows >= batch.n else batch.slice(start, min(start + rows, batch.n))
        yield block, section_outputs(runner, block, plan.index, plan.rule, need_full=need_full)


MakeCotangents = Callable[[int, int, int, Tensor], Tensor]


def symmetric_product(a: Tensor) -> Tensor:
    """``a^T a`` for ``a`` ``(n, k)``, exactly symmetric.

    One torch matmul, on torch's own threads. A BLAS ``syrk`` from another library would do
    half the flops but run its own thread pool, which contends with torch's: on 2 cores with
    one busy, the Grams of the ``zoo:modadd`` build took 12-33 s that way instead of 0.5-3 s.
    """
    out = a.T @ a
    return (out + out.T) * 0.5


@dataclass
class Gradients:
    """Integrated gradients over the folded coordinates, kept in two parts (no concatenation):
    ``f`` ``(m, B, P, d)`` with respect to the activation and ``c`` ``(m, B, P)`` with respect
    to the constant."""

    f: Tensor
    c: Tensor

    def double(self) -> Gradients:
        return Gradients(self.f.double(), self.c.double())

    def masked(self, w: Tensor | None) -> Gradients:
        """Positions with weight 0 zeroed (``w`` ``(B, P)``; None: unchanged)."""
        if w is None:
            return self
        return Gradients(self.f * w.unsqueeze(-1).to(self.f), self.c * w.to(self.c))

    def matmul(self, matrix: Tensor) -> Tensor:
        """``[g_f, g_c] @ matrix`` for ``matrix`` ``(d + 1, k)``: ``(m, B, P, k)``."""
        return (self.f @ matrix[:-1]).addcmul_(self.c.unsqueeze(-1), matrix[-1])

    def gram(self) -> Tensor:
        """``sum over rows of [g_f, g_c]^T [g_f, g_c]``: ``(d + 1, d + 1)``."""
        d = self.f.shape[-1]
        f, c = self.f.reshape(-1, d), self.c.reshape(-1)
        out = f.new_empty(d + 1, d + 1)
        out[:d, :d] = symmetric_product(f)
        out[:d, d] = out[d, :d] = c @ f
        out[d, d] = c @ c
        return out

    def outer(self, h: Tensor) -> Tensor:
        """``sum over rows of [g_f, g_c]^T h`` for ``h`` ``(B, P, d + 1)``: ``(d + 1, d + 1)``."""
        d = self.f.shape[-1]
        rows = h.reshape(-1, h.shape[-1])
        return torch.cat([self.f.reshape(-1, d).T @ rows, (self.c.reshape(-1) @ rows)[None]])

    def attributions(self, C_pinv: Tensor, f_hat: Tensor) -> Tensor:
        """``(m, B, k)``: ``sum over positions of (d out / d f_hat) * f_hat`` for the input
        features ``f_hat = [f, 1] C`` ``(B, P, k)`` (``C_pinv`` ``(k, d + 1)``)."""
        x = self.matmul(C_pinv.T).mul_(f_hat)  # (m, B, P, k)
        return x.squeeze(2) if x.shape[2] == 1 else x.sum(2)

    @property
    def nbytes(self) -> int:
        return self.f.numel() * self.f.element_size() + self.c.numel() * self.c.element_size()


def integrated_vjp(
    fwd: SectionOutputs,
    rule: IntegrationRule,
    cotangents: range,
    make_cotangents: MakeCotangents,
    chunk: int,
) -> Iterator[tuple[int, int, Gradients]]:
    """Yield ``(start, stop, J)``: ``J = sum_k w_k vjp_k(cotangents start..stop)``.

    ``cotangents`` is the range of cotangent indices to do (all, or this rank's share);
    ``make_cotangents(k, start, stop, y_k)`` returns ``(stop - start, *y_k.shape)``; ``J``
    holds ``(stop - start, B, P, d + 1)`` in two parts. Each chunk is one ``vmap`` over the
    backward function.
    """
    _, weights = rule.points()
    for start in range(cotangents.start, cotangents.stop, chunk):
        stop = min(start + chunk, cotangents.stop)
        g_f = g_c = None
        for k, (vjp_fn, y, w) in enumerate(zip(fwd.vjps, fwd.ys, weights)):
            f, c = torch.func.vmap(vjp_fn)(make_cotangents(k, start, stop, y))
            if g_f is None:
                g_f, g_c = (f, c) if w == 1.0 else (f * w, c * w)
            else:
                g_f = g_f + f * w
                g_c = g_c + c * w
        yield start, stop, Gradients(g_f, g_c)


#: ``chunk * B * width`` elements per batched backward on the CPU: small enough that a chunk's
#: tensors stay in cache. The ``zoo:modadd`` build on 2 cores (median of 2 runs): 2^21 19 s,
#: 2^22 17 s, 2^23 20 s, 2^24 20 s, 2^25 26 s.
CPU_BUDGET = 2**22
#: the same on an accelerator, where larger batches fill the device
ACCELERATOR_BUDGET = 2**25
#: fewest cotangents per batched backward: a batch with more rows than the budget allows at
#: this many is split into blocks of rows (on ``zoo:modadd``'s attention section, 4 cotangents
#: over 1,024 rows cost the same CPU time per cotangent as 1 over all 3,830)
MIN_CHUNK = 4


@dataclass(frozen=True)
class SectionPlan:
    """How to sweep section ``index``: its rule, the next layer's basis, the sources.

    ``C_next`` ``(d' + 1, K)`` is the next node layer's basis (None: its raw features).
    ``split_outputs``: under ``torchrun`` every rank sees all the data and does its share of
    the cotangents (else each rank has its share of the data). ``budget``: elements of
    ``chunk * B * width`` one batched backward may hold (None: :data:`CPU_BUDGET` on the CPU,
    :data:`ACCELERATOR_BUDGET` elsewhere).
    """

    index: int
    rule: IntegrationRule
    C_next: Tensor | None
    n_stochastic_sources: int | None = None
    n_stochastic_sources_hidden: int | None = None
    seed: int = 0
    split_outputs: bool = False
    budget: int | None = None

    def features(self, y: Tensor) -> Tensor:
        """``(d' + 1, K)``: the output features as columns over ``y``'s coordinates."""
        return feature_matrix(self.C_next, y.shape[-1]).to(device=y.device, dtype=torch.float64)

    def project(self, y: Tensor) -> Tensor:
        """The next layer's features ``(B, P', K)`` of a folded output ``y``."""
        return y @ self.features(y).to(y.dtype)

    def cotangents(self, y: Tensor, *, hidden: bool = True) -> Cotangents:
        """The cotangents over an output ``y`` (hidden sources only if ``hidden``)."""
        hid = self.n_stochastic_sources_hidden if hidden else None
        return Cotangents(y.shape[1], self.features(y), self.n_stochastic_sources, hid,
                          self.seed, self.index)  # fmt: skip

    def my_range(self, n: int) -> range:
        """This rank's cotangents (all of them unless ``split_outputs``)."""
        from tyche.distributed import shard_range

        return shard_range(n) if self.split_outputs else range(n)

    def _budget(self, device: torch.device) -> int:
        if self.budget is not None:
            return self.budget
        return CPU_BUDGET if device.type == "cpu" else ACCELERATOR_BUDGET

    @staticmethod
    def _per_row(h: Tensor, y: Tensor) -> int:
        """Elements one cotangent of one row costs a batched backward (input ``h`` and output
        ``y`` ``(B, P, width)``; 4 tensors of the larger size)."""
        return 4 * max(h.shape[1] * h.shape[2], y.shape[1] * y.shape[2])

    def chunk(self, fwd: SectionOutputs) -> int:
        """Cotangents per batched backward for this batch."""
        per_row = self._per_row(fwd.h, fwd.full)
        return max(1, self._budget(fwd.h.device) // max(1, fwd.h.shape[0] * per_row))

    def rows_per_block(self, runner: ModelRunner, batch: Batch) -> int:
        """Rows per forward pass such that :meth:`chunk` is at least :data:`MIN_CHUNK` (all of
        ``batch`` if it fits; the sizes come from one row run without gradients)."""
        h, y = runner.section(batch.slice(0, 1), self.index)
        return max(1, self._budget(h.device) // (MIN_CHUNK * self._per_row(h, y)))


def position_weights(batch: Batch, acts: Tensor) -> Tensor:
    """``(B, P)`` weights of an activation's positions: the attention mask where it fits."""
    mask = batch.mask()
    if mask is not None and tuple(mask.shape) == tuple(acts.shape[:2]):
        return mask.to(device=acts.device, dtype=torch.float64)
    return torch.ones(acts.shape[:2], dtype=torch.float64, device=acts.device)


def source_cotangents(cot: Cotangents, batch: Batch, w_out: Tensor) -> MakeCotangents:
    """Cotangents ``start..stop`` of ``cot`` with masked output positions ``w_out`` zeroed."""

    unmasked = bool((w_out == 1).all())

    def make(k: int, start: int, stop: int, y: Tensor) -> Tensor:
        chunk = cot.chunk(start, stop, batch, y)
        return chunk if unmasked else chunk * w_out.to(y.dtype)

    return make


def alpha_cotangents(
    formula: str, plan: SectionPlan, full: Tensor, w_out: Tensor
) -> MakeCotangents:
    """The one cotangent of ``S`` per point, mapped to ``y``'s coordinates: ``F(f)`` for
    ``(1-0)*alpha``, ``2 (F(f) - F(alpha f))`` for ``(1-alpha)^2`` (``S = -sum (F(f) -
    F(alpha f))^2``), with ``F = y @ C``."""
    f_full = plan.project(full)

    def make(k: int, start: int, stop: int, y: Tensor) -> Tensor:
        feats = plan.features(y).to(y.dtype)
        # (1-0)*alpha: F(f); (1-alpha)^2: 2 (F(f) - F(alpha f))
        dual = f_full if formula == "(1-0)*alpha" else 2.0 * (f_full - plan.project(y.detach()))
        return ((dual * w_out.to(y.dtype)) @ feats.T).unsqueeze(0)

    return make


def functional_cotangents(plan: SectionPlan, full: Tensor, w_out: Tensor) -> MakeCotangents:
    """Cotangent ``i`` is ``2 (F_i(f) - F_i(alpha f))`` on output feature ``i`` only."""
    f_full = plan.project(full)

    def make(k: int, start: int, stop: int, y: Tensor) -> Tensor:
        feats = plan.features(y).to(y.dtype)[:, start:stop]  # (d' + 1, m)
        diff = 2.0 * (f_full - plan.project(y.detach()))[..., start:stop] * w_out.to(y.dtype)
        return diff.permute(2, 0, 1).unsqueeze(-1) * feats.T.view(-1, 1, 1, feats.shape[0])

    return make
