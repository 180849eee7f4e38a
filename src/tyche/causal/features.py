"""Causal energy of a dictionary's latents, and how their decoder spans cover a causal basis.

For hidden states ``h`` (B, T, d) at a site, a target ``f`` (h -> logits) and a dictionary
(:class:`tyche.dictionaries.Dictionary`) with activations ``a_i`` (read from ``h``, or from
the transcoder's input site), latent ``i``'s *energy* is

    E_i = mean over counted positions of KL(softmax f(h) ‖ softmax f(h - a_i ⊙ W_dec[i]))  [nats]

with ``a_i · W_dec[i]`` removed at every position where it fires and nothing changed elsewhere.
``E_i`` averages over every counted position (for the model target a removal also changes
later positions); the *energy when firing* averages the same KL over the positions where
``i`` fires only. Positions where the mask is off are neither changed nor counted.

The work is batched by (row, latent) pairs, where a row is what the target treats as one
unit: a sequence for :class:`~tyche.causal.lenses.ModelFromSite` (and any target with
``select``), a single position for a lens (any other target acts position by position). Each
target call evaluates about ``positions_per_pass`` positions: that many pairs for a lens,
``positions_per_pass // T`` sequences for the model. Pairs come sorted by row, and the clean
log-probabilities of the rows a call touches are computed in the same pass.

:func:`coverage` gives the principal angles between a causal basis (its top-k directions)
and the span of the top-m latents' decoder rows, ranked by energy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from tyche.causal.activations import read_site_activations, token_inputs
from tyche.causal.objective import Target
from tyche.dictionaries import Dictionary
from tyche.distributed import all_reduce_sum, init_distributed, shard_range
from tyche.distributed import progress as progress_bar
from tyche.divergence import token_kl
from tyche.errors import InputError
from tyche.frameworks import as_module
from tyche.io import ResultIO, model_hash
from tyche.sites import resolve_sites

__all__ = [
    "Coverage",
    "FeatureOptions",
    "LatentEnergies",
    "coverage",
    "feature_energies",
    "latent_energies",
    "subspace_angles",
]

#: positions evaluated per target call
POSITIONS_PER_PASS = 2048


@dataclass(frozen=True)
class FeatureOptions:
    """How the latents' energies are computed."""

    latents: tuple[int, ...] | None = None
    """only these latent ids (None: every latent that fires)"""
    positions_per_pass: int = POSITIONS_PER_PASS
    """positions per target call; memory grows with it (this many × vocabulary floats, a few
    times over)"""
    batch_size: int = 16
    """rows of token ids per forward pass that reads the activations (:func:`feature_energies`)"""
    coverage_m: tuple[int, ...] = ()
    """sizes m of the top-m latents whose decoder span :func:`feature_energies` compares with
    a causal basis (empty: no coverage)"""

    def __post_init__(self) -> None:
        for name in ("positions_per_pass", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive int, got {value!r}")
        for size in self.coverage_m:
            if not isinstance(size, int) or size < 1:
                raise InputError(f"coverage_m must hold positive ints, got {size!r}")


@dataclass(frozen=True)
class Coverage(ResultIO):
    """Principal angles between a causal basis (k directions) and the span of the decoder
    rows of the ``m[j]`` most energetic latents, for each ``j``.

    ``degrees[j]`` and ``cosines[j]`` hold ``min(k, rank)`` angles, smallest first (0°: a
    causal direction lies in the latents' span)."""

    m: list[int]
    degrees: list[Tensor]
    cosines: list[Tensor]
    k: int


@dataclass(frozen=True)
class LatentEnergies(ResultIO):
    """Per-latent causal energies at one site, ranked (largest energy first).

    Attributes:
        latents: (L,) ids of the latents that fire on the counted positions, ranked.
        energies: (L,) mean KL over all counted positions when the latent is removed (nats).
        fires: (L,) counted positions where the latent fires.
        firing_energies: (L,) mean KL over the positions where it fires (nats).
        n_positions: counted positions (over every rank).
        n_latents: the dictionary's size.
        site: where the contributions were removed; target: what maps it to logits.
        coverage: principal angles against a causal basis (:func:`coverage`), or None.
        dictionary: where the dictionary came from (source, hook names, activation).
        model_hash: ``tyche.io.model_hash`` of the model, or None.
        settings: how it was computed.
    """

    UNITS: ClassVar[dict[str, str]] = {"energies": "nats", "firing_energies": "nats"}

    latents: Tensor
    energies: Tensor
    fires: Tensor
    firing_energies: Tensor
    n_positions: int
    n_latents: int
    site: str | None = None
    target: str = "callable"
    coverage: Coverage | None = None
    dictionary: dict = field(default_factory=dict)
    model_hash: str | None = None
    settings: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- energies
def _units(h: Tensor, sequences: bool) -> Tensor:
    """(U, S, d): sequences (B, T, d) as they are, or every position as its own unit."""
    if sequences:
        if h.ndim != 3:
            raise InputError(f"a sequence target needs hidden states (B, T, d), got {h.shape}")
        return h
    return h.reshape(-1, 1, h.shape[-1])


def _firing(dictionary: Dictionary, x: Tensor, keep: Tensor, wanted: Tensor | None,
            chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Every (unit, position, latent) where a latent fires on a kept position, with its
    activation: four (nnz,) tensors, encoded ``chunk`` units at a time."""
    empty = torch.zeros(0, dtype=torch.long, device=x.device)
    parts: list[tuple[Tensor, ...]] = [(empty, empty, empty, x.new_zeros(0))]
    for start in range(0, x.shape[0], chunk):
        a = dictionary.encode(x[start : start + chunk])  # (c, S, n)
        fire = (a != 0) & keep[start : start + chunk, :, None]
        if wanted is not None:
            fire &= wanted
        unit, pos, latent = fire.nonzero(as_tuple=True)
        parts.append((unit + start, pos, latent, a[unit, pos, latent]))
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]


def _rows_target(target: Target, units: Tensor, sequences: bool) -> Target:
    return target.select(units) if sequences else target  # type: ignore[attr-defined]


@torch.no_grad()
def latent_energies(
    target: Target,
    hiddens: Tensor,
    dictionary: Dictionary,
    options: FeatureOptions | None = None,
    *,
    mask: Tensor | None = None,
    encoder_inputs: Tensor | None = None,
    site: str | None = None,
    target_name: str = "callable",
    progress: bool = False,
) -> LatentEnergies:
    """The causal energy of every latent that fires on ``hiddens`` (see the module docstring).

    Args:
        target: hidden states -> logits: a lens (row by row), or a target tied to a batch of
            sequences with ``select(index)`` (:class:`~tyche.causal.lenses.ModelFromSite`).
        hiddens: (B, T, d_out) at the site (or (N, d_out) for a row-wise target); per-head
            sites may come as (B, T, H, d_head) with H·d_head = d_out.
        dictionary: the :class:`~tyche.dictionaries.Dictionary` whose decoder writes the site.
        options: ``latents`` (a subset) and ``positions_per_pass`` (:class:`FeatureOptions`).
        mask: ``(B, T)`` positions counted (and changed); None = all.
        encoder_inputs: what the encoder reads, ``(B, T, d_in)``: a transcoder's input site
            (None: ``hiddens``, for SAEs).
        site: the site's name, recorded in the result.
        target_name: what ``target`` is (``"model"``, ``"logit"``, ...), recorded too.
        progress: show a bar over the (row, latent) pairs.

    Returns:
        A :class:`LatentEnergies`; sums are over every ``torchrun`` rank's rows.
    """
    options = FeatureOptions() if options is None else options
    latents = options.latents
    sequences = callable(getattr(target, "select", None))
    h, x, keep, tail = _inputs(hiddens, dictionary, mask, encoder_inputs, sequences)
    d = dictionary.to(h.device)
    wanted = None
    if latents is not None:
        wanted = torch.zeros(d.n_latents, dtype=torch.bool, device=h.device)
        wanted[torch.as_tensor(list(latents), dtype=torch.long, device=h.device)] = True
    chunk = max(options.positions_per_pass // h.shape[1], 1)  # units per target call
    fired = _firing(d, x, keep, wanted, chunk)
    desc = f"latent energies {site or ''}".strip() if progress else None
    sums = _accumulate(target, h, keep, d, fired, chunk, tail, sequences, desc)
    init_distributed()
    total = all_reduce_sum(torch.cat([sums.reshape(-1), keep.sum().double()[None]]))
    chosen = None if latents is None else sorted({int(i) for i in latents})
    settings = {"positions_per_pass": options.positions_per_pass, "latents": chosen,
                "rows": "sequences" if sequences else "positions"}  # fmt: skip
    return _ranked(total[:-1].reshape(3, -1).cpu(), int(total[-1]), d, site, target_name, settings)


def _inputs(hiddens: Tensor, d: Dictionary, mask: Tensor | None, encoder_inputs: Tensor | None,
            sequences: bool) -> tuple[Tensor, Tensor, Tensor, tuple[int, ...]]:  # fmt: skip
    """Checked units ``h`` (U, S, d_out), encoder inputs (U, S, d_in), the mask (U, S) and the
    site's own trailing shape ((d_out,) or (H, d_head))."""
    merge = hiddens.ndim >= 3 and hiddens.shape[-1] != d.d_out
    flat = hiddens.flatten(-2) if merge else hiddens
    if flat.shape[-1] != d.d_out:
        raise InputError(f"the dictionary writes width d_out={d.d_out}, but the hidden states "
                         f"have shape {tuple(hiddens.shape)}")  # fmt: skip
    lead = flat.shape[:-1]
    keep = torch.ones(lead, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    if tuple(keep.shape) != tuple(lead):
        raise InputError(f"mask has shape {tuple(keep.shape)}, expected {tuple(lead)}")
    x = d.flat_input(flat if encoder_inputs is None else encoder_inputs)
    if tuple(x.shape[:-1]) != tuple(lead):
        raise InputError(f"encoder_inputs {tuple(x.shape)} must have the hidden states' "
                         f"leading shape {tuple(lead)}")  # fmt: skip
    h = _units(flat, sequences)
    return h, x.reshape(*h.shape[:2], -1), keep.to(h.device).reshape(h.shape[:2]), \
        tuple(hiddens.shape[len(lead) :])  # fmt: skip


def _accumulate(target: Target, h: Tensor, keep: Tensor, d: Dictionary,
                fired: tuple[Tensor, Tensor, Tensor, Tensor], chunk: int,
                tail: tuple[int, ...], sequences: bool, desc: str | None) -> Tensor:  # fmt: skip
    """(3, n) float64: per latent, the KL summed over counted positions, over its firing
    positions, and its firing count; ``chunk`` (unit, latent) pairs per target call (a
    progress bar named ``desc`` over the pairs; None: none)."""
    unit, pos, latent, value = fired
    n = d.n_latents
    pair_key, entry_pair = torch.unique(unit * n + latent, return_inverse=True)
    order = entry_pair.argsort(stable=True)  # entries grouped by pair, pairs by unit
    pos, latent, value, entry_pair = (t[order] for t in (pos, latent, value, entry_pair))
    pair_unit, pair_latent = pair_key // n, pair_key % n
    sums = torch.zeros(3, n, dtype=torch.float64, device=h.device)
    sums[2].index_add_(0, latent, torch.ones_like(latent, dtype=torch.float64))
    starts = torch.arange(0, len(pair_key) + chunk, chunk, device=h.device)
    bounds = torch.searchsorted(entry_pair, starts).tolist()
    bar = progress_bar(total=len(pair_key), desc=desc, disable=desc is None)
    for index, p0 in enumerate(range(0, len(pair_key), chunk)):
        p1 = min(p0 + chunk, len(pair_key))
        entries = slice(bounds[index], bounds[index + 1])
        local, rows = entry_pair[entries] - p0, pair_unit[p0:p1]
        ablated = h[rows].clone()
        removed = value[entries, None] * d.W_dec[latent[entries]]
        ablated.index_put_((local, pos[entries]), -removed.to(h.dtype), accumulate=True)
        firing = torch.zeros(ablated.shape[:2], dtype=torch.bool, device=h.device)
        firing[local, pos[entries]] = True
        uniq, back = torch.unique(rows, return_inverse=True)
        both = torch.cat([h[uniq], ablated])  # the clean rows first, then the changed ones
        pick = _rows_target(target, torch.cat([uniq, rows]), sequences)
        logits = _logits(pick, both, tail, sequences)
        kl = token_kl(logits[: len(uniq)][back], logits[len(uniq) :]).double()  # (c, S)
        sums[0].index_add_(0, pair_latent[p0:p1], (kl * keep[rows]).sum(-1))
        sums[1].index_add_(0, pair_latent[p0:p1], (kl * firing).sum(-1))
        bar.update(p1 - p0)
    bar.close()
    return sums


def _logits(target: Target, h: Tensor, tail: tuple[int, ...], sequences: bool) -> Tensor:
    """The target's logits (c, S, V) for units ``h`` (c, S, d), given in the site's own layout
    (``tail``: (d,), or (H, d_head) for per-head sites; single positions lose their S axis)."""
    out = target(h.reshape(*h.shape[:2], *tail) if sequences else h.reshape(-1, *tail))
    logits = getattr(out, "logits", out)
    return logits.reshape(*h.shape[:2], logits.shape[-1]).float()


def _ranked(sums: Tensor, n_positions: int, d: Dictionary, site: str | None, target: str,
            settings: dict) -> LatentEnergies:  # fmt: skip
    if n_positions == 0:
        raise InputError("no positions to average over: the mask selects nothing")
    fires = sums[2].round().long()
    ids = fires.nonzero().flatten()
    ids = ids[torch.argsort(sums[0, ids], descending=True, stable=True)]
    return LatentEnergies(
        latents=ids, energies=sums[0, ids] / n_positions, fires=fires[ids],
        firing_energies=sums[1, ids] / fires[ids].double(), n_positions=n_positions,
        n_latents=d.n_latents, site=site, target=target, settings=settings,
        dictionary={"source": d.source, "hook_name": d.hook_name, "activation": d.activation,
                    "hook_name_out": d.hook_name_out, "transcoder": d.transcoder},
    )  # fmt: skip


# ----------------------------------------------------------------------------- coverage
def _orth(a: Tensor) -> Tensor:
    """(d, r) float64 orthonormal basis of the column span of ``a`` (d, p), r = its rank."""
    u, s, _ = torch.linalg.svd(a.double(), full_matrices=False)
    tol = max(a.shape) * torch.finfo(torch.float64).eps * (float(s[0]) if len(s) else 0.0)
    return u[:, s > tol]


def subspace_angles(a: Tensor, b: Tensor) -> Tensor:
    """(min(rank a, rank b),) principal angles (radians, smallest first) between the column
    spans of ``a`` (d, p) and ``b`` (d, q), in float64. Small angles come from their sines
    (the singular values of the part of one basis outside the other), the rest from their
    cosines, so both ends are accurate."""
    qa, qb = _orth(a), _orth(b)
    if qa.shape[1] < qb.shape[1]:
        qa, qb = qb, qa  # qb is the smaller subspace
    cross = qa.T @ qb
    cos = torch.linalg.svdvals(cross).clamp(0, 1)  # largest first: angles ascending
    sin = torch.linalg.svdvals(qb - qa @ cross).clamp(0, 1).flip(0)[: len(cos)]
    return torch.where(cos**2 >= 0.5, torch.arcsin(sin), torch.arccos(cos))


def coverage(vectors: Tensor, dictionary: Dictionary, ranking: Tensor,
             m: Sequence[int]) -> Coverage:  # fmt: skip
    """Principal angles between span(``vectors``) (d, k) (a causal basis's top-k directions)
    and the span of the decoder rows of the first ``m[j]`` latents of ``ranking`` (ids, best
    first, e.g. ``LatentEnergies.latents``); an ``m`` beyond the ranking is cut to its length."""
    if vectors.ndim != 2 or vectors.shape[0] != dictionary.d_out:
        raise InputError(f"the causal basis has shape {tuple(vectors.shape)} but the decoder "
                         f"writes width {dictionary.d_out}")  # fmt: skip
    if len(ranking) == 0:
        raise InputError("no latent fired, so there is no decoder span to compare with")
    sizes, degrees, cosines = [], [], []
    for size in m:
        if not isinstance(size, int) or size < 1:
            raise InputError(f"coverage sizes m must be positive ints, got {size!r}")
        size = min(size, len(ranking))
        rows = dictionary.W_dec.detach().cpu()[ranking[:size].cpu()]
        angles = subspace_angles(vectors.detach().cpu(), rows.T)
        sizes.append(size)
        degrees.append(torch.rad2deg(angles))
        cosines.append(torch.cos(angles))
    return Coverage(m=sizes, degrees=degrees, cosines=cosines, k=vectors.shape[1])


# ----------------------------------------------------------------------------- models
def feature_energies(
    model: Any,
    data: Mapping[str, Tensor] | Tensor,
    dictionary: Dictionary,
    site: str | None = None,
    options: FeatureOptions | None = None,
    *,
    target: str = "model",
    lens: Any = None,
    basis: Any = None,
    progress: bool = False,
) -> LatentEnergies:
    """Per-latent causal energies of ``dictionary`` inside ``model`` (see the module docstring).

    Args:
        model: an HF causal LM, a TransformerLens or nnsight model (``tyche.frameworks``).
        data: token ids (N, T) or a dict with ``input_ids``/``attention_mask``; under
            torchrun each rank takes its own block of rows.
        site: where the contributions are removed (None: the dictionary's own output site).
        target: ``"model"`` (the rest of the model, :class:`ModelFromSite`), ``"logit"`` (the
            logit lens) or ``"tuned"`` (``lens``, a :class:`TunedLens`).
        options: a :class:`FeatureOptions` (``batch_size``: rows per forward pass that reads
            the activations; ``coverage_m``: the sizes compared with ``basis``).
        basis: a :class:`~tyche.causal.result.CausalBasis` of the site: with ``coverage_m``,
            the result holds the principal angles between it and the top-m latents' span.
        progress: show a progress bar.
    """
    from tyche.causal.lenses import LogitLens, ModelFromSite, TunedLens

    model = as_module(model)
    options = FeatureOptions() if options is None else options
    if target not in ("model", "logit", "tuned"):
        raise InputError(f"target must be 'model', 'logit' or 'tuned', got {target!r}")
    if target == "tuned" and not isinstance(lens, TunedLens):
        raise InputError("target='tuned' needs lens=TunedLens(...) (see train_tuned_lens)")
    out_name, in_name = _dictionary_sites(model, dictionary, site)
    tokens = token_inputs(data)
    init_distributed()
    rows = shard_range(tokens["input_ids"].shape[0])
    device = next(model.parameters()).device
    local = {k: v[rows.start : rows.stop].to(device) for k, v in tokens.items()}
    was_training = model.training
    model.eval()
    try:
        acts = read_site_activations(model, local, list(dict.fromkeys([out_name, in_name])),
                                     options.batch_size)  # fmt: skip
        check_widths(dictionary, acts[out_name], acts[in_name], out_name, in_name)
        if target == "model":
            fn: Target = ModelFromSite(model, out_name, local)
        else:
            fn = LogitLens.from_model(model) if target == "logit" else lens.for_site(out_name)
        result = latent_energies(
            fn, acts[out_name], dictionary, options, mask=local["attention_mask"],
            encoder_inputs=acts[in_name] if in_name != out_name else None, site=out_name,
            target_name=target, progress=progress,
        )  # fmt: skip
    finally:
        model.train(was_training)
    sizes = list(options.coverage_m)
    found = coverage(basis.vectors, dictionary, result.latents, sizes) if (
        basis is not None and sizes) else None  # fmt: skip
    return replace(result, coverage=found, model_hash=model_hash(model))


def _dictionary_sites(model: Any, d: Dictionary, site: str | None) -> tuple[str, str]:
    """The resolved names of the site the decoder writes and the one the encoder reads."""
    spec = site or d.output_site
    if spec is None:
        raise InputError("the dictionary does not name its site; pass site=")
    out = resolve_sites(model, spec)
    if len(out) != 1:
        raise InputError(f"site {spec!r} matches {[s.name for s in out]}; name exactly one")
    if not d.transcoder:
        return out[0].name, out[0].name
    if d.hook_name is None:
        raise InputError("the transcoder does not name the site its encoder reads")
    return out[0].name, resolve_sites(model, d.hook_name)[0].name


def check_widths(d: Dictionary, out: Tensor, inp: Tensor, out_name: str, in_name: str) -> None:
    """Refuse activations whose width the dictionary does not read/write (one line)."""
    for acts, width, name, what in ((inp, d.d_in, in_name, "reads d_in"),
                                    (out, d.d_out, out_name, "writes d_out")):  # fmt: skip
        merged = acts.shape[-2] * acts.shape[-1] if acts.ndim >= 4 else acts.shape[-1]
        if width not in (acts.shape[-1], merged):
            raise InputError(f"the dictionary {what}={width}, but site {name} has width "
                             f"{acts.shape[-1]}; use a dictionary of this model")  # fmt: skip
