"""The causal-basis objective: the energy of ablating directions in fixed hidden states.

For a *target* ``f`` (hidden states ``(..., d)`` -> logits ``(..., V)``), hidden states ``h``
and directions ``V`` (d, m, orthonormal) the energy is

* ``objective="kl"``: the mean over selected positions of ``KL(softmax f(h) ‖ softmax f(h'))``,
* ``objective="ce"``: the mean over labelled positions of ``CE(f(h'), y) - CE(f(h), y)``,

in nats, where ``h' = h - (h - r) V Vᵀ`` is ``h`` with span(V) ablated (``tyche.ablation``).

Under ``torchrun`` each rank holds its own shard of ``h``: every sum (of energies, gradients,
counts, the mean used by mean ablation, second moments) is all-reduced, so N ranks see the
same objective, gradient and statistics as one process holding all the data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from tyche.ablation import resample_donors
from tyche.causal.lens_algebra import FactoredReadout, check_factors
from tyche.causal.options import SCREEN_POSITIONS, CausalOptions, Objective, resolve_options
from tyche.distributed import all_reduce_sum, get_rank, get_world_size, init_distributed
from tyche.divergence import masked_kl
from tyche.errors import InputError
from tyche.memory import free_memory_share

__all__ = ["SCREEN_POSITIONS", "AblationObjective", "Objective", "Target", "target_for_rows"]

#: maps hidden states (..., d) to logits (..., V)
Target = Callable[[Tensor], Tensor]
IGNORE_INDEX = -100
#: with ``batch_size=None``, chunks hold about this many positions (measured fastest on CPU:
#: 512-1024 positions per chunk evaluate ~2x faster than 8192 at once)
AUTO_CHUNK_POSITIONS = 1024
#: share of the memory free on the hidden states' device that the fast lens path may keep
#: its clean readouts and probabilities (N, V) in, when ``cache_gb`` is None. Both held save
#: an exponential and two passes over (N, V) per evaluation: measured 1.3x faster forward
#: energies and 1.2x faster gradients at N = 8,192, V = 49,152 than holding the readouts only
AUTO_CACHE_SHARE = 0.5
#: the subsample is this many runs of consecutive rows, spread evenly over the data
SCREEN_RUNS = 8


def target_for_rows(target: Target, rows: slice) -> Target:
    """The target restricted to rows ``rows`` of the leading dimension.

    Targets tied to a batch of inputs (``ModelFromSite``) expose ``select(rows)``; any other
    callable is assumed to act on each row independently.
    """
    select = getattr(target, "select", None)
    return select(rows) if callable(select) else target


def _upcast(x: Tensor) -> Tensor:
    """``x`` in float32, or float64 if it already is (half precision is too coarse here)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _logits(out: object) -> Tensor:
    """Logits from a target's output (a tensor or an object with ``.logits``)."""
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor):
        raise TypeError(f"the target must return logits as a Tensor, got {type(out).__name__}")
    return logits


class AblationObjective:
    """Energy of ablating directions in fixed hidden states (this rank's shard of them).

    Args:
        target: hidden states (..., d) -> logits (..., V).
        hiddens: (..., d) floating point, finite; the leading dimension is split into chunks
            of ``options.batch_size`` rows for each evaluation.
        options: the settings (None: the defaults); read here:

            * ``mode``: ``"zero"``, ``"mean"`` or ``"resample"``; ``objective``: ``"kl"`` or
              ``"ce"``.
            * ``batch_size``: rows of the leading dimension per forward pass (None: about
              ``AUTO_CHUNK_POSITIONS`` positions per pass).
            * ``fast``: for targets that expose ``lens_factors()`` (:class:`LogitLens`, a
              tuned lens), evaluate by the exact algebra of ``tyche.causal.lens_algebra`` (no
              (N × d × V) product per evaluation) once the factors are checked to reproduce
              the target's logits; False: always run the target.
            * ``cache_gb``: GiB of clean lens readouts and probabilities (N × V each) the fast
              path keeps between evaluations (readouts first); what does not fit is
              recomputed on every evaluation. None: half the memory free on the hidden
              states' device (``AUTO_CACHE_SHARE``, split among the ``torchrun`` processes
              sharing a host); the value used is ``self.cache_gb``.
            * ``screen_positions``: about this many positions (whole chunks, spread over the
              data) make the subsample used by ``subsample=True`` evaluations (all positions
              if fewer).
        mask: ``hiddens.shape[:-1]`` bool/0-1: positions that are ablated, enter the mean and
            the resampling pool, and are averaged over (None: all).
        labels: ``hiddens.shape[:-1]`` long: the class each position's logits should predict
            (already shifted for next-token prediction; ``-100`` = none). Needed for ``"ce"``.
        generator: draws the one resampling derangement used for every evaluation (so the
            objective is deterministic).
    """

    def __init__(
        self,
        target: Target,
        hiddens: Tensor,
        options: CausalOptions | None = None,
        *,
        mask: Tensor | None = None,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(hiddens, Tensor) or not hiddens.is_floating_point():
            raise TypeError("hiddens must be a floating-point tensor of shape (..., d)")
        if hiddens.ndim < 2:
            raise InputError(f"hiddens must have shape (N, d) or (B, T, d), got {hiddens.shape}")
        if not torch.isfinite(hiddens).all():
            bad = int((~torch.isfinite(hiddens)).sum())
            raise InputError(f"hiddens contains {bad} NaN/inf values; clean the activations first")
        options = resolve_options(options)
        mode, objective, cache_gb = options.mode, options.objective, options.cache_gb
        if cache_gb is None:
            cache_gb = free_memory_share(hiddens.device, AUTO_CACHE_SHARE) / 2**30
        self.target, self.mode, self.objective = target, mode, objective
        self.cache_gb = float(cache_gb)
        self.hiddens = hiddens.detach()
        per_row = max(int(torch.Size(hiddens.shape[1:-1]).numel()), 1)
        self.batch_size = options.batch_size or max(AUTO_CHUNK_POSITIONS // per_row, 1)
        lead = hiddens.shape[:-1]
        self.keep = self._check_mask(mask, lead).to(hiddens.device)
        self.weight = self.keep
        if objective == "ce":
            if labels is None:
                raise InputError("objective='ce' needs labels (the next token of each position)")
            if tuple(labels.shape) != tuple(lead) or labels.is_floating_point():
                raise InputError(
                    f"labels must be an integer tensor of shape {tuple(lead)}, "
                    f"got {labels.dtype} {tuple(labels.shape)}"
                )
            labels = labels.to(hiddens.device)
            self.weight = self.keep & (labels != IGNORE_INDEX)
            self.labels = torch.where(self.weight, labels, IGNORE_INDEX).long()
        init_distributed()  # every sum below is over ranks
        self.n_positions = int(all_reduce_sum(self.weight.sum().double()).item())
        if self.n_positions == 0:
            raise InputError("no positions to average over: the mask (and labels) select nothing")
        self.delta = self._ablation_offsets(generator)
        self.screen = self._screening_rows(options.screen_positions)
        self.factored = self._factored_readout(options.fast, cache_gb)
        self.clean = None if self.factored is not None else self._clean_statistics()

    @staticmethod
    def _check_mask(mask: Tensor | None, lead: torch.Size) -> Tensor:
        if mask is None:
            return torch.ones(lead, dtype=torch.bool)
        if tuple(mask.shape) != tuple(lead):
            raise InputError(
                f"mask has shape {tuple(mask.shape)} but hiddens needs {tuple(lead)} "
                "(all dimensions of hiddens except the last)"
            )
        if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
            raise InputError("mask must be bool or contain only 0 and 1")
        return mask != 0 if mask.dtype != torch.bool else mask

    def _ablation_offsets(self, generator: torch.Generator | None) -> Tensor:
        """``h - r`` on selected positions (0 elsewhere): ablation is ``h - (h - r) V Vᵀ``."""
        h = self.hiddens
        keep = self.keep[..., None].to(h.dtype)
        if self.mode == "zero":
            return h * keep
        if self.mode == "mean":
            self.mean = self.masked_sum(h) / self.n_selected
            return (h - self.mean) * keep
        donors = resample_donors(h.shape[:-1], self.keep.cpu(), generator).to(h.device)
        flat = h.reshape(-1, h.shape[-1])
        return (h - flat[donors].reshape(h.shape)) * keep

    @property
    def n_selected(self) -> int:
        """Number of positions selected by the mask, over every rank."""
        if not hasattr(self, "_n_selected"):
            self._n_selected = int(all_reduce_sum(self.keep.sum().double()).item())
            if self._n_selected == 0:
                raise InputError("the mask selects no position")
        return self._n_selected

    def masked_sum(self, x: Tensor) -> Tensor:
        """Sum over every rank of the rows of ``x`` (..., m) at selected positions; (m,)."""
        total = x.new_zeros(x.shape[-1], dtype=torch.float64)
        for rows in self.chunks():
            total += x[rows][self.keep[rows]].double().sum(0)
        return all_reduce_sum(total).to(x.dtype)

    def second_moment(self, centred: bool) -> Tensor:
        """(d, d) float64 covariance (``centred``) or uncentred second moment of the data."""
        d = self.hiddens.shape[-1]
        total = self.hiddens.new_zeros(d + 1, d, dtype=torch.float64)
        for rows in self.chunks():
            flat = self.hiddens[rows][self.keep[rows]].double()
            total[:-1] += flat.T @ flat
            total[-1] += flat.sum(0)
        total = all_reduce_sum(total)
        moment, mean = total[:-1] / self.n_selected, total[-1] / self.n_selected
        return moment - torch.outer(mean, mean) if centred else moment

    def chunks(self) -> Iterator[slice]:
        """Slices of the leading dimension, ``batch_size`` rows each."""
        n = self.hiddens.shape[0]
        for start in range(0, n, self.batch_size):
            yield slice(start, min(start + self.batch_size, n))

    def _screening_rows(self, positions: int) -> tuple[list[slice], int]:
        """The subsample for ``subsample=True``: slices of this rank's rows, and the number of
        counted positions in it over every rank.

        The subsample is defined on the global row index (ranks hold contiguous blocks of rows
        in rank order, as ``tyche.distributed.shard_range`` gives them), so N ranks use the
        same rows as one process: ``SCREEN_RUNS`` runs of rows starting at evenly spaced
        rows, about ``positions`` positions in all. Everything if the data is not larger.
        """
        n_local = self.hiddens.shape[0]
        per_row = max(int(torch.Size(self.hiddens.shape[1:-1]).numel()), 1)
        counts = torch.zeros(get_world_size(), dtype=torch.float64)
        counts[get_rank()] = n_local
        counts = all_reduce_sum(counts)
        n_rows, offset = int(counts.sum()), int(counts[: get_rank()].sum())
        n_pick = -(-max(positions, 1) // per_row)
        if n_pick * 2 > n_rows:  # not worth it: use everything
            return list(self.chunks()), self.n_positions
        runs = min(SCREEN_RUNS, n_pick)
        length = -(-n_pick // runs)
        picked = []
        for k in range(runs):
            first = k * n_rows // runs
            last = min(first + length, (k + 1) * n_rows // runs)  # runs never overlap
            lo, hi = max(first - offset, 0), min(last - offset, n_local)
            for chunk in self.chunks():  # never straddle a chunk
                start, stop = max(lo, chunk.start), min(hi, chunk.stop)
                if start < stop:
                    picked.append(slice(start, stop))
        count = sum(int(self.weight[rows].sum()) for rows in picked)
        total = int(all_reduce_sum(torch.tensor(float(count), dtype=torch.float64)).item())
        if total == 0:  # the subsample holds no counted position: use everything
            return list(self.chunks()), self.n_positions
        return picked, total

    def _factored_readout(self, fast: bool, cache_gb: float) -> FactoredReadout | None:
        """The exact lens algebra for targets that expose ``lens_factors()``, if it checks out.

        The decision is the same on every rank (all must run the same reductions).
        """
        factors_of = getattr(self.target, "lens_factors", None)
        factors = factors_of() if fast and callable(factors_of) else None
        probe = self.hiddens.reshape(-1, self.hiddens.shape[-1])[:64]
        usable = factors is not None and check_factors(factors, self.target, probe)
        votes = all_reduce_sum(torch.tensor(float(usable), dtype=torch.float64))
        if factors is None or int(votes.item()) != get_world_size():
            return None
        labels = self.labels if self.objective == "ce" else None
        return FactoredReadout(
            factors,
            self.hiddens,
            self.delta,
            self.weight,
            list(self.chunks()),
            labels,
            cache_gb * 2**30,
        )

    @torch.no_grad()
    def _clean_statistics(self) -> list[Tensor]:
        """Per chunk: clean log-probs (KL) or clean cross-entropies per position (CE)."""
        out = []
        for rows in self.chunks():
            logits = _logits(target_for_rows(self.target, rows)(self.hiddens[rows]))
            self._check_logits(logits, rows)
            if self.objective == "kl":
                out.append(_upcast(logits).log_softmax(-1))
            else:
                out.append(self._cross_entropy(logits, rows).double())
        return out

    def _check_logits(self, logits: Tensor, rows: slice) -> None:
        if tuple(logits.shape[:-1]) != tuple(self.hiddens[rows].shape[:-1]):
            raise InputError(
                f"the target returned logits of shape {tuple(logits.shape)} for hidden states "
                f"{tuple(self.hiddens[rows].shape)}; it must keep every leading dimension"
            )
        if not torch.isfinite(logits).all():
            raise InputError("the target returned NaN/inf logits on the clean hidden states")

    def _cross_entropy(self, logits: Tensor, rows: slice) -> Tensor:
        """Cross-entropy at each position of ``rows`` (0 where there is no label)."""
        return F.cross_entropy(
            _upcast(logits).reshape(-1, logits.shape[-1]),
            self.labels[rows].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).reshape(self.labels[rows].shape)

    def _chunk_sum(self, rows: slice, vectors: Tensor) -> Tensor:
        """Sum over the counted positions of ``rows`` (within one chunk) of the energy."""
        index = rows.start // self.batch_size
        local = slice(rows.start - index * self.batch_size, rows.stop - index * self.batch_size)
        if self.factored is not None:
            per_row = self.delta[0].numel() // self.delta.shape[-1]
            positions = slice(local.start * per_row, local.stop * per_row)
            return self.factored.chunk_sum(index, positions, vectors)
        h = self.hiddens[rows]
        ablated = h - (self.delta[rows] @ vectors) @ vectors.T
        logits = _logits(target_for_rows(self.target, rows)(ablated))
        if self.objective == "kl":
            kl = masked_kl(self.clean[index][local], _upcast(logits), self.weight[rows], "token")
            return kl.sum()
        return (self._cross_entropy(logits, rows) - self.clean[index][local]).sum()

    def _finish(self, total: Tensor, count: int) -> Tensor:
        energy = total / count
        if not torch.isfinite(energy):
            raise FloatingPointError(
                "the ablation energy is not finite; the target overflowed on ablated hidden "
                "states (try float32/float64 hidden states or a smaller batch)"
            )
        return energy

    @property
    def subsample_fraction(self) -> float:
        """Counted positions in the subsample over all counted positions (1: everything)."""
        return self.screen[1] / self.n_positions

    def _rows(self, subsample: bool) -> tuple[list[slice], int]:
        return self.screen if subsample else (list(self.chunks()), self.n_positions)

    @torch.no_grad()
    def energy(self, vectors: Tensor, *, subsample: bool = False) -> float:
        """Energy (nats) of ablating span(``vectors``) jointly; ``vectors`` (d,) or (d, m).

        ``subsample``: average over the screening subsample only (``screen_positions``).
        """
        vectors = (vectors[:, None] if vectors.ndim == 1 else vectors).to(self.hiddens)
        chunks, count = self._rows(subsample)
        total = self.hiddens.new_zeros((), dtype=torch.float64)
        for rows in chunks:
            total = total + self._chunk_sum(rows, vectors).double()
        return float(self._finish(all_reduce_sum(total), count))

    def value_and_grad(self, vectors: Tensor, *, subsample: bool = False) -> tuple[Tensor, Tensor]:
        """Energy of ablating span(``vectors``) and its gradient wrt ``vectors``.

        ``vectors`` is a unit vector (d,) or an orthonormal (d, m) matrix; the gradient has its
        shape and treats it as free in the ablation formula ``h - (δ V) Vᵀ`` (chain it through
        any parametrisation). Both are identical on every rank.
        """
        leaf = vectors.detach().to(self.hiddens).clone().requires_grad_(True)
        matrix = leaf[:, None] if leaf.ndim == 1 else leaf
        chunks, count = self._rows(subsample)
        total = torch.zeros((), dtype=torch.float64, device=leaf.device)
        grad = torch.zeros_like(leaf, dtype=torch.float64)
        with torch.enable_grad():
            for rows in chunks:
                s = self._chunk_sum(rows, matrix)
                (g,) = torch.autograd.grad(s, leaf)
                total, grad = total + s.detach().double(), grad + g.double()
        packed = all_reduce_sum(torch.cat([grad.reshape(-1), total[None]]))
        energy = self._finish(packed[-1], count)
        return energy, (packed[:-1] / count).reshape(leaf.shape).to(leaf.dtype)
