"""Greedy causal basis extraction: directions whose ablation changes the output most.

For a target ``f`` (hidden states -> logits) and hidden states ``h``, the j-th direction is

    v_j = argmax_{‖v‖ = 1, v ⟂ v_1..v_{j-1}}  σ(v),
    σ(v) = mean over positions of KL(softmax f(h) ‖ softmax f(r(h, v)))   [nats]

where ``r`` ablates span(v) by zero, mean or resample ablation (``tyche.ablation``), or the
increase in next-token cross-entropy with ``objective="ce"``. Each direction is found by
L-BFGS on the sphere in the complement of the earlier ones (``tyche.causal.search``: screen
candidate starts on a subsample, climb on it, polish on all the data, stop on the tangent
gradient). Lens targets are evaluated by exact algebra (``tyche.causal.lens_algebra``).

``refine="joint"`` then maximises the energy of ablating all k directions together over
orthonormal bases and orders the result by marginal contribution (``tyche.causal.refine``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from tyche.causal.activations import (
    next_token_labels,
    per_position,
    read_site_activations,
    token_inputs,
)
from tyche.causal.checkpoint import BasisCheckpoint, PartialBasis
from tyche.causal.objective import AblationObjective, Target
from tyche.causal.options import CausalOptions, Refine, resolve_options
from tyche.causal.refine import order_by_marginal_contribution, refine_jointly
from tyche.causal.result import CausalBasis
from tyche.causal.search import (
    find_direction,
    pca_directions,
    readout_directions,
    starting_directions,
)
from tyche.data import token_ids_sha256
from tyche.distributed import init_distributed, shard_range
from tyche.distributed import progress as progress_bar
from tyche.errors import InputError
from tyche.frameworks import as_module
from tyche.io import model_hash
from tyche.sites import resolve_sites

__all__ = [
    "Refine",
    "direction_generator",
    "extract_causal_basis",
    "extract_causal_bases",
    "pca_directions",
]

#: sequences per forward pass of :func:`extract_causal_bases` when ``options.batch_size`` is None
SITE_BATCH_SIZE = 16


def extract_causal_basis(
    target: Target,
    hiddens: Tensor,
    k: int,
    options: CausalOptions | None = None,
    *,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
    site: str | None = None,
    model_hash: str | None = None,
    progress: Any = False,
) -> CausalBasis:
    """Find ``k`` orthonormal directions of ``hiddens`` whose ablation changes ``target`` most.

    Args:
        target: hidden states (..., d) -> logits (..., V) (a lens, ``ModelFromSite``, or any
            callable acting row by row on the leading dimension).
        hiddens: (N, d) or (B, T, d) float hidden states (this rank's shard under torchrun).
        k: number of directions, 1 <= k <= d.
        options: the search settings (None: the defaults), a :class:`CausalOptions`:

            * ``mode``: ablation, ``"mean"`` (default), ``"zero"`` or ``"resample"``;
              ``objective``: ``"kl"`` (mean KL(clean ‖ ablated), nats) or ``"ce"`` (mean
              increase of the cross-entropy against ``labels``, nats).
            * ``max_iter``: L-BFGS iterations per run (each direction's climb and polish, the
              joint refinement).
            * ``min_energy``: stop when a direction's energy falls below this (nats); it is
              not included.
            * ``tol``: a search ends once the gradient tangent to its constraint set is at
              most ``tol`` times the energy (the energy is then within ~``tol²`` of the
              maximum).
            * ``n_init``: candidates of each kind (principal, readout) screened for each
              direction's start; 0: random starts only.
            * ``n_starts``: climbs per direction (on the subsample), from the best
              ``n_starts`` candidates; the best is polished (the objective has several local
              maxima).
            * ``n_pca``: also report the energies of the top ``n_pca`` principal directions
              (0: skip).
            * ``refine``: ``"none"`` (greedy basis, sorted by energy) or ``"joint"`` (then
              maximise the energy of ablating all k together, ordered by marginal
              contribution).
            * ``batch_size``, ``fast``, ``cache_gb``, ``screen_positions``: how the objective
              is evaluated (see :class:`AblationObjective`).
        mask: ``hiddens.shape[:-1]`` bool/0-1 positions to use (padding off); None = all.
        labels: ``hiddens.shape[:-1]`` long, the class each position predicts (``-100`` =
            none); required for ``objective="ce"``.
        generator: CPU generator of the resampling derangement (held fixed for the whole
            extraction); the random starts of direction ``j`` (``n_init=0``, or too few
            candidates) come from :func:`direction_generator` (its seed and ``j`` only).
            Default: seeded with 0, so every rank under torchrun starts identically.
        site: recorded in the result.
        model_hash: recorded in the result.
        progress: True for a progress bar, or an existing tqdm bar to advance by one per
            direction.

    Returns:
        A :class:`CausalBasis`; identical on every rank.
    """
    return _extract_basis(target, hiddens, k, options, mask=mask, labels=labels,
                          generator=generator, site=site, model_hash=model_hash,
                          progress=progress)  # fmt: skip


def direction_generator(generator: torch.Generator, index: int) -> torch.Generator:
    """The generator of direction ``index``'s random starts: a new CPU generator seeded from
    ``generator``'s seed (``initial_seed()``) and ``index`` alone, so a direction draws the same
    starts whatever was drawn before it (a resumed extraction draws what an uninterrupted one
    did, and every rank draws alike)."""
    key = f"{generator.initial_seed()}/direction/{index}".encode()
    seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1
    return torch.Generator().manual_seed(seed)


def _extract_basis(
    target: Target,
    hiddens: Tensor,
    k: int,
    options: CausalOptions | None = None,
    *,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
    site: str | None = None,
    model_hash: str | None = None,
    progress: Any = False,
    start: PartialBasis | None = None,
    on_direction: Callable[[PartialBasis], None] | None = None,
) -> CausalBasis:
    """:func:`extract_causal_basis`, continuing from the greedy directions of ``start`` (found
    earlier, in order) and telling ``on_direction`` the directions found so far after each new
    one (to checkpoint them)."""
    if not isinstance(hiddens, Tensor) or hiddens.ndim < 2:
        raise InputError("hiddens must be a tensor of shape (N, d) or (B, T, d)")
    d = hiddens.shape[-1]
    if not isinstance(k, int) or not 1 <= k <= d:
        raise InputError(f"k must be an int in 1..d={d} (the hidden size), got {k!r}")
    options = resolve_options(options)
    mode, tol, max_iter = options.mode, options.tol, options.max_iter
    min_energy, n_init, n_pca = options.min_energy, options.n_init, options.n_pca
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    init_distributed()  # the objective sums over ranks
    obj = AblationObjective(target, hiddens, options, mask=mask, labels=labels, generator=generator)
    moment = obj.second_moment(centred=mode != "zero")
    readout = readout_directions(target, d) if n_init else None
    if progress is True:
        bar = progress_bar(total=k, desc=site or "causal basis")
    else:  # False/None: no bar; otherwise a bar owned by the caller
        bar = None if progress is False or progress is None else progress

    found = hiddens.new_zeros(d, 0)
    energies: list[float] = []
    evals: list[float] = []
    seconds: list[float] = []
    if start is not None:  # directions found before: loaded, not searched again
        found = start.vectors.to(hiddens)[:, :k]
        energies, evals = list(start.energies[:k]), list(start.n_evals[:k])
        seconds = list(start.seconds[:k])
        if bar is not None:
            bar.update(len(energies))
    for index in range(len(energies), k):
        start_time = time.perf_counter()
        starts, start_energies, n_screened = starting_directions(
            obj, found, moment, readout, n_init, options.n_starts,
            direction_generator(generator, index),
        )  # fmt: skip
        best = find_direction(obj, found, starts, start_energies, tol=tol, max_iter=max_iter)
        if best.energy < min_energy:
            break
        n_evals = best.evals + n_screened * obj.subsample_fraction
        if bar is not None:
            bar.update(1)
            bar.set_postfix(energy=f"{best.energy:.4g}", evals=f"{n_evals:.1f}")
        found = torch.cat([found, best.vector[:, None]], 1)
        energies.append(best.energy)
        evals.append(n_evals)
        seconds.append(time.perf_counter() - start_time)
        if on_direction is not None:
            on_direction(PartialBasis(site or "", found.detach().cpu(), list(energies),
                                      list(evals), list(seconds)))  # fmt: skip
    if progress is True and bar is not None:
        bar.close()
    if not energies:
        raise InputError(
            f"no direction reached min_energy={min_energy} nats (the best had "
            f"{best.energy:.3g}); lower min_energy"
        )

    order = torch.tensor(energies).argsort(descending=True)
    vectors = found[:, order]
    single = torch.tensor(energies, dtype=torch.float64)[order]
    evals, seconds = [evals[i] for i in order.tolist()], [seconds[i] for i in order.tolist()]
    subspace = [obj.energy(vectors[:, : i + 1]) for i in range(vectors.shape[1])]
    greedy_subspace = None
    if options.refine == "joint" and vectors.shape[1] > 1:
        start_time = time.perf_counter()
        joint = refine_jointly(obj, vectors, subspace[-1], tol=tol, max_iter=max_iter)
        vectors, prefix, n_order = order_by_marginal_contribution(obj, joint.vector)
        single = torch.tensor([obj.energy(v) for v in vectors.T], dtype=torch.float64)
        greedy_subspace, subspace = torch.tensor(subspace, dtype=torch.float64), prefix
        share = (time.perf_counter() - start_time) / len(seconds)  # spread over the directions
        spent = (joint.evals + n_order + vectors.shape[1]) / len(evals)
        evals, seconds = [e + spent for e in evals], [s + share for s in seconds]
    pca_energies = None
    if n_pca:
        pcs = pca_directions(obj.second_moment(centred=True), min(n_pca, d)).to(hiddens)
        pca_energies = torch.tensor(
            [obj.energy(pcs[:, i]) for i in range(pcs.shape[1])], dtype=torch.float64
        )
    return CausalBasis(
        vectors=vectors.detach().cpu(),
        energies=single,
        subspace_energies=torch.tensor(subspace, dtype=torch.float64),
        greedy_subspace_energies=greedy_subspace,
        site=site,
        mode=mode,
        objective=options.objective,
        n_positions=obj.n_positions,
        n_evals=evals,
        seconds=seconds,
        pca_energies=pca_energies,
        model_hash=model_hash,
        settings={
            "max_iter": max_iter,
            "min_energy": min_energy,
            "tol": tol,
            "n_init": n_init,
            "n_starts": options.n_starts,
            "refine": options.refine,
            "fast": obj.factored is not None,
            "cache_gb": obj.cache_gb,
            "cached_fraction": 0.0 if obj.factored is None else obj.factored.cached_fraction,
            "screen_positions": obj.screen[1],
            "k_requested": k,
        },
    )


def extract_causal_bases(
    model: nn.Module,
    data: Mapping[str, Tensor] | Tensor,
    k: int,
    sites: str | Sequence[str] = "resid_pre.*",
    options: CausalOptions | None = None,
    *,
    target: str = "logit",
    lens: Any = None,
    seed: int = 0,
    progress: bool = True,
    checkpoint: BasisCheckpoint | None = None,
) -> dict[str, CausalBasis]:
    """Causal bases of every site of a model, in one call (one progress bar).

    Args:
        model: an HF causal LM (or any module ``tyche.sites`` can hook), a TransformerLens
            ``HookedTransformer`` (its hook names are sites: ``blocks.1.hook_resid_pre``) or
            an nnsight wrapper (``tyche.frameworks.as_module``).
        data: token ids (N, T) or a dict with ``input_ids``/``attention_mask``. Under torchrun
            each rank takes its own contiguous block of rows (``shard_range``).
        k: directions per site.
        sites: site patterns, e.g. ``"resid_pre.*"`` (every block's input), or nnsight
            Envoys. A per-head site (``attn_heads.i``, ``blocks.i.attn.hook_z``) is searched
            with its heads concatenated (directions of H·d_head), with ``target="model"`` only.
        options: the search settings, passed to :func:`extract_causal_basis` (None: the
            defaults); ``options.batch_size`` is also the rows of ``data`` per forward pass
            that reads the activations (None: ``SITE_BATCH_SIZE`` = 16, for both).
        target: ``"logit"`` (logit lens), ``"tuned"`` (``lens``, a :class:`TunedLens`), or
            ``"model"`` (the rest of the model from the site, :class:`ModelFromSite`).
        seed: seeds the generator of every site's extraction (same on every rank).
        checkpoint: a :class:`~tyche.causal.checkpoint.BasisCheckpoint` told of every
            finished direction and site as soon as it is done, so an interruption loses
            neither. Made with ``resume=True``, the work it holds is used: finished sites are
            loaded, a site in progress continues from its saved directions, and the result
            equals an uninterrupted run's. What the extraction depends on (k, the sites, the
            target, ``seed``, the search settings that change results, the model's hash, the
            tokens' sha256) must match the saved run's
            (:class:`~tyche.resume.SettingsMismatch` otherwise).

    Returns:
        ``{site name: CausalBasis}`` in layer order; identical on every rank.
    """
    from tyche.causal.lenses import TunedLens, refuse_per_head_sites

    model = as_module(model)
    if target not in ("logit", "tuned", "model"):
        raise InputError(f"target must be 'logit', 'tuned' or 'model', got {target!r}")
    if target == "tuned" and not isinstance(lens, TunedLens):
        raise InputError("target='tuned' needs lens=TunedLens(...) (see train_tuned_lens)")
    options = resolve_options(options)
    batch_size = SITE_BATCH_SIZE if options.batch_size is None else options.batch_size
    options = replace(options, batch_size=batch_size)
    init_distributed()
    tokens = token_inputs(data)
    resolved = resolve_sites(model, sites)
    if target != "model":
        refuse_per_head_sites(resolved, f"the {target} lens (target={target!r})")
    names = [s.name for s in resolved]
    rows = shard_range(tokens["input_ids"].shape[0])
    device = next(model.parameters()).device
    local = {key: v[rows.start : rows.stop].to(device) for key, v in tokens.items()}
    labels = None
    if options.objective == "ce":
        labels = next_token_labels(local["input_ids"], local["attention_mask"])
    hash_ = model_hash(model)
    saved: dict[str, CausalBasis | PartialBasis] = {}
    if checkpoint is not None:
        lens_hash = model_hash(lens) if target == "tuned" else None
        checkpoint.check(_identity(k, names, target, seed, options, hash_, tokens, lens_hash))
        saved = checkpoint.load(names)
    todo = [n for n in names if not isinstance(saved.get(n), CausalBasis)]
    was_training = model.training
    model.eval()
    try:
        hiddens = read_site_activations(model, local, todo, batch_size) if todo else {}
        shape = tuple(local["input_ids"].shape)
        hiddens = {n: per_position(n, h, shape, target) for n, h in hiddens.items()}
        bar = progress_bar(total=len(names) * k, desc="causal bases", disable=not progress)
        bases: dict[str, CausalBasis] = {}
        for name in names:
            bar.set_description(f"causal bases {name}")
            done = saved.get(name)
            if isinstance(done, CausalBasis):  # finished before: loaded, not recomputed
                bases[name] = done
                bar.update(k)
                continue
            fit: Callable[..., CausalBasis] = extract_causal_basis
            if checkpoint is not None:  # continue from the saved directions, save each new one
                fit = partial(_extract_basis, start=done, on_direction=checkpoint.save_direction)
            bases[name] = fit(
                _site_target(model, name, target, lens, local, hiddens[name].shape[-1]),
                hiddens[name],
                k,
                options,
                mask=local["attention_mask"],
                labels=labels,
                generator=torch.Generator().manual_seed(seed),
                site=name,
                model_hash=hash_,
                progress=bar,
            )
            bar.update(k - bases[name].k)  # directions not found (min_energy)
            if checkpoint is not None:
                checkpoint.save_site(name, bases[name])
        bar.close()
    finally:
        model.train(was_training)
    return bases


def _site_target(model: nn.Module, name: str, target: str, lens: Any,
                 local: Mapping[str, Tensor], width: int) -> Target:  # fmt: skip
    """The map from site ``name``'s hidden states (``width`` wide) to logits that ``target``
    names; a lens must read hidden states as wide as the model."""
    from tyche.causal.lenses import LogitLens, ModelFromSite

    if target == "model":
        return ModelFromSite(model, name, local)
    found = LogitLens.from_model(model) if target == "logit" else lens.for_site(name)
    d_model = found.readout_matrix().shape[1]
    if width != d_model:
        raise InputError(
            f"site {name} is {width} wide but the {target} lens reads hidden states of the "
            f"model's width {d_model}; use target='model' there, or a residual site"
        )
    return found


#: the search settings that change an extraction's results (the others change only how the
#: objective is evaluated: ``batch_size``, ``fast``, ``cache_gb``)
RESULT_OPTIONS = ("mode", "objective", "max_iter", "min_energy", "tol", "n_init", "n_starts",
                  "refine", "n_pca", "screen_positions")  # fmt: skip


def _identity(k: int, names: Sequence[str], target: str, seed: int, options: CausalOptions,
              hash_: str, tokens: Mapping[str, Tensor], lens_hash: str | None) -> dict:  # fmt: skip
    """What an extraction's results depend on, as a resumed run must match it."""
    return {
        "k": k,
        "sites": list(names),
        "target": target,
        "seed": seed,
        **{name: getattr(options, name) for name in RESULT_OPTIONS},
        "model_hash": hash_,
        "lens_hash": lens_hash,
        "input_ids_sha256": token_ids_sha256(tokens["input_ids"]),
        "attention_mask_sha256": token_ids_sha256(tokens["attention_mask"]),
    }
