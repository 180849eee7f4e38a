"""Direction sampling in bounded memory: direction i depends only on (seed, i).

A direction is a vector z ~ N(0, I_D) drawn in fixed chunks of ``CHUNK`` entries, chunk k
from its own generator seeded by (seed, i, k), in the model's dtype and on its device. So a
direction never depends on the batch it is drawn in or on the number of processes, and it is
never held in float64: the float64 quantities the estimator needs (|z|, |p ⊙ z| and
(p ⊙ z)·θ) are accumulated over slices of ``STAT_CHUNK`` entries. (A CUDA run draws from
the device's generator, so its directions differ from a CPU run's, with the same law.)

:class:`DirectionBatch` keeps the raw draws z (B, D) and, per row, the scale that maps them
onto the unit direction v̂ = p ⊙ z / |p ⊙ z| (p the diagonal preconditioner, 1 without), so
an offset r·v̂ costs one pass over D and no copy of the direction is ever made.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from tyche.errors import InputError

#: entries per generator chunk: part of the definition of a direction (changing it changes
#: every direction), not a memory setting
CHUNK = 1 << 20
#: entries per float64 accumulation slice: below torch's parallel grain size (32,768), so
#: each slice's products and sums run on one thread, with no hand-offs between threads and
#: no BLAS call (on a busy 2-core machine both cost 10-30× more than the arithmetic)
STAT_CHUNK = 1 << 14


def chunk_seed(seed: int, index: int, chunk: int) -> int:
    """A 63-bit seed for chunk ``chunk`` of direction ``index`` (numpy SeedSequence mix)."""
    state = np.random.SeedSequence([int(seed), int(index), int(chunk)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def fill_gaussian(
    out: torch.Tensor,
    seed: int,
    index: int,
    *,
    anchor: torch.Tensor | None = None,
    pre: torch.Tensor | None = None,
) -> tuple[float, float, float] | None:
    """Fill the 1-D tensor ``out`` (D,) with direction ``index``'s N(0, 1) draws, in place.

    Drawn chunk by chunk in ``out``'s dtype on ``out``'s device (on a CPU, chunks are drawn
    by ``torch.get_num_threads()`` threads at once: each chunk has its own generator, so
    the values do not depend on the threads). With ``anchor`` θ (D,), also returns
    ``direction_stats(out, pre, anchor)``, accumulated per chunk while the chunk is in
    cache and added up in chunk order.
    """
    if out.dim() != 1 or not out.is_contiguous():
        raise InputError("out must be a contiguous 1-D tensor")
    starts = list(range(0, out.numel(), CHUNK))

    def chunk(k: int) -> torch.Tensor | None:
        g = torch.Generator(out.device).manual_seed(chunk_seed(seed, index, k))
        part = out[starts[k] : starts[k] + CHUNK]
        torch.randn(part.shape, generator=g, dtype=out.dtype, device=out.device, out=part)
        if anchor is None:
            return None
        sums = torch.zeros(3, dtype=torch.float64, device=out.device)
        end = starts[k] + part.numel()
        _accumulate(sums, part, None if pre is None else pre[starts[k] : end],
                    anchor[starts[k] : end])  # fmt: skip
        return sums

    workers = min(torch.get_num_threads(), len(starts)) if out.device.type == "cpu" else 1
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(chunk, range(len(starts))))
    else:
        parts = [chunk(k) for k in range(len(starts))]
    if anchor is None:
        return None
    total = torch.zeros(3, dtype=torch.float64, device=out.device)
    for part_sums in parts:  # in chunk order: the same sum for any number of threads
        total += part_sums
    zz, ww, wt = total.tolist()
    return zz, (zz if pre is None else ww), wt


def _accumulate(
    sums: torch.Tensor, z: torch.Tensor, pre: torch.Tensor | None, anchor: torch.Tensor
) -> None:
    """sums += (|z|², |p ⊙ z|², (p ⊙ z)·θ) in float64, slice by slice."""
    for s in range(0, z.numel(), STAT_CHUNK):
        c = z[s : s + STAT_CHUNK].double()  # no copy for float64 z: nothing in place below
        t = anchor[s : s + STAT_CHUNK].double()
        sums[0] += (c * c).sum()
        if pre is not None:
            c = c * pre[s : s + STAT_CHUNK]
            sums[1] += (c * c).sum()
        sums[2] += (c * t).sum()


def gaussian_directions(
    seed: int,
    indices: Sequence[int],
    dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The raw draws z (len(indices), dim) of the given directions (see :func:`fill_gaussian`)."""
    out = torch.empty(len(indices), dim, dtype=dtype, device=device)
    for row, i in zip(out, indices):
        fill_gaussian(row, seed, int(i))
    return out


def unit_directions(
    seed: int,
    indices: Sequence[int] | torch.Tensor,
    dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform random unit vectors u_i = z_i/|z_i| on the sphere S^{dim-1}: (len, dim).

    The draws are made in ``dtype`` and normalised by their float64 norm (a test and
    benchmark helper: it holds the whole batch).
    """
    idx = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
    z = gaussian_directions(seed, idx, dim, dtype=dtype, device=device)
    norms = torch.stack([sq_norm(row, None).sqrt() for row in z])
    return (z.double() / norms[:, None].to(z.device)).to(dtype)


def sq_norm(x: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    """Σ (p ⊙ x)² in float64 by slices (a scalar tensor on x's device)."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for s in range(0, x.numel(), STAT_CHUNK):
        c = x[s : s + STAT_CHUNK].double()  # no copy for float64 x: nothing in place below
        if p is not None:
            c = c * p[s : s + STAT_CHUNK]
        total += (c * c).sum()
    return total


def direction_stats(
    z: torch.Tensor, pre: torch.Tensor | None, anchor: torch.Tensor
) -> tuple[float, float, float]:
    """(|z|², |p ⊙ z|², (p ⊙ z)·θ) of one draw z (D,), in float64, accumulated by slices.

    ``pre`` is the diagonal p (D,) or None; ``anchor`` θ (D,). No float64 copy of a whole
    vector is made.
    """
    total = torch.zeros(3, dtype=torch.float64, device=z.device)
    for start in range(0, z.numel(), CHUNK):  # grouped like fill_gaussian's, so equal to it
        end = start + CHUNK
        sums = torch.zeros(3, dtype=torch.float64, device=z.device)
        _accumulate(sums, z[start:end], None if pre is None else pre[start:end],
                    anchor[start:end])  # fmt: skip
        total += sums
    zz, ww, wt = total.tolist()
    return zz, (zz if pre is None else ww), wt


@dataclass
class DirectionBatch:
    """Directions ``indices`` as raw draws plus the float64 sums that map them onto v̂.

    z: (B, D) draws in the model's dtype and device (for a matrix preconditioner: the
        directions P u themselves).
    sums: (B, 3) float64 per row: |z|², |p ⊙ z|² and (p ⊙ z)·θ (for a matrix P: |u|², |Pu|²
        and Pu·θ with u the unit draw).
    mult: the diagonal p in z's dtype (None without one, or for a matrix).
    """

    indices: list[int]
    z: torch.Tensor
    sums: torch.Tensor
    mult: torch.Tensor | None
    _buffer: torch.Tensor | None = field(default=None, repr=False)

    @property
    def props(self) -> torch.Tensor:
        """|P u| (B,) float64: the importance weight's base (1 without a preconditioner)."""
        return (self.sums[:, 1] / self.sums[:, 0]).sqrt()

    @property
    def dots(self) -> torch.Tensor:
        """v̂·θ (B,) float64."""
        return self.sums[:, 2] / self.sums[:, 1].sqrt()

    @property
    def scale(self) -> torch.Tensor:
        """(B,) float64 factor with v̂ = p ⊙ z · scale."""
        return self.sums[:, 1].rsqrt()

    @classmethod
    def draw(
        cls,
        seed: int,
        indices: Sequence[int],
        anchor: torch.Tensor,
        pre: torch.Tensor | None,
        *,
        reuse: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
        recycle: DirectionBatch | None = None,
    ) -> DirectionBatch:
        """Draw the directions for ``anchor`` θ (D,) and a preconditioner: None, a diagonal
        p (D,) (on θ's device) or a (D, D) matrix (then D is small and P u is formed in
        float64). ``reuse`` maps an index to a row drawn before, ``(z, sums)``, which is
        copied instead of drawn again; ``recycle`` is a finished batch whose memory is
        written over (no fresh D-sized allocations, whose page faults cost as much as the
        arithmetic)."""
        dim = anchor.numel()
        idx = [int(i) for i in indices]
        shape = (len(idx), dim)
        buffer = None
        if recycle is not None and recycle.z.shape[1] == dim and len(recycle.z) >= len(idx):
            z, buffer = recycle.z[: len(idx)], recycle._buffer
            buffer = None if buffer is None else buffer[: len(idx)]
        else:
            z = torch.empty(shape, dtype=anchor.dtype, device=anchor.device)
        sums = torch.empty(len(idx), 3, dtype=torch.float64)
        matrix = pre is not None and pre.dim() == 2
        for j, (row, i) in enumerate(zip(z, idx)):
            if reuse is not None and i in reuse:
                row.copy_(reuse[i][0])
                sums[j] = reuse[i][1]
                continue
            if matrix:
                fill_gaussian(row, seed, i)
                u = row.double()
                v = pre.to(u.device, torch.float64) @ u
                stats = (float(u @ u), float(v @ v), float(v @ anchor.double()))
                row.copy_(v)
            else:
                stats = fill_gaussian(row, seed, i, anchor=anchor, pre=pre)
            sums[j] = torch.tensor(stats, dtype=torch.float64)
        mult = None if pre is None or matrix else pre.to(anchor.device, anchor.dtype)
        return cls(idx, z, sums, mult, buffer)

    def offsets(self, rows: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
        """r_j · v̂_{rows[j]} for rows (m,) and radii (m,) float64: (m, D) in z's dtype.

        One pass over each row (two with a diagonal preconditioner); the factor r/|p ⊙ z| is
        formed in float64 and rounded once. The result lives in a buffer of the batch that
        the next call overwrites (no fresh D-sized allocation per loss evaluation).
        """
        factor = (radii.double() * self.scale[rows.cpu()]).tolist()
        if self._buffer is None:
            self._buffer = torch.empty_like(self.z)
        out = self._buffer[: len(factor)]
        for j, (r, f) in enumerate(zip(rows.tolist(), factor)):
            if self.mult is None:
                torch.mul(self.z[r], f, out=out[j])
            else:
                torch.mul(self.z[r], self.mult, out=out[j]).mul_(f)
        return out
