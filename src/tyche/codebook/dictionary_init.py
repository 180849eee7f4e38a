"""Codebooks initialised from a sparse dictionary's decoder directions (SAELens, sparsify).

A codebook at the site a dictionary writes takes ``num_codes`` of its decoder rows as codes:
the rows with the largest norm, or the largest ``scores`` when given (e.g. the latents'
causal energies from ``tyche causal --features``). A codebook compares and outputs vectors
in layer-norm space (:mod:`tyche.codebook.layer`), where an activation ``x`` appears as
``(x - mean(x)) / std(x)``, so a decoder row ``v`` becomes the code

    c = √dim · (v - mean(v)) / ‖v - mean(v)‖

(``mean`` over the row's features): the direction ``v`` as the layer norm sees it, with the
norm √dim of a layer-normalised vector (layer-norm affine at its initial identity). With
``restore_scale`` the output ``c · σ(x) + μ(x)`` then moves ``x`` along ``v`` at its own
scale. Per-head codebooks (``attn_heads``, ``n_groups`` heads) take each head's slice of the
same rows; by norm, each head ranks the rows by the norm of its own slice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tyche.dictionaries import Dictionary
from tyche.errors import InputError
from tyche.sites import resolve_sites

if TYPE_CHECKING:
    from tyche.codebook.layer import GroupedCodebookLayer
    from tyche.codebook.model import CodebookModel

__all__ = ["decoder_codes", "energy_scores", "init_from_dictionary"]


def decoder_codes(dictionary: Dictionary, n_groups: int, dim: int, num_codes: int,
                  scores: Tensor | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The codes ``(n_groups, num_codes, dim)`` (float32) and the latent ids they come from
    ``(n_groups, num_codes)``, best first (see the module docstring).

    ``scores`` (n_latents,): rank by it (larger first; NaN counts as -inf, ties by norm)
    instead of by the decoder rows' norms.
    """
    n = dictionary.n_latents
    if n_groups * dim != dictionary.d_out:
        raise InputError(f"the codebook is {n_groups} × {dim} wide but the dictionary's "
                         f"decoder writes d_out={dictionary.d_out}")  # fmt: skip
    if num_codes > n:
        raise InputError(f"the dictionary has {n} latents, fewer than num_codes={num_codes}; "
                         "lower num_codes")  # fmt: skip
    rows = dictionary.W_dec.detach().float().reshape(n, n_groups, dim).transpose(0, 1)
    norms = rows.norm(dim=-1)  # (G, n)
    by_norm = norms.argsort(dim=-1, descending=True, stable=True)
    if scores is None:
        ids = by_norm[:, :num_codes]
    else:
        if tuple(scores.shape) != (n,):
            raise InputError(f"scores must have shape ({n},), one per latent, got "
                             f"{tuple(scores.shape)}")  # fmt: skip
        key = torch.nan_to_num(scores.detach().double().cpu(), nan=-torch.inf)
        by_row = (
            dictionary.W_dec.detach().float().norm(dim=-1).argsort(descending=True, stable=True)
        )
        order = by_row[key[by_row].argsort(descending=True, stable=True)]
        ids = order[:num_codes].expand(n_groups, num_codes)
    chosen = rows.gather(1, ids[..., None].expand(-1, -1, dim))  # (G, N, dim)
    centred = chosen - chosen.mean(-1, keepdim=True)
    length = centred.norm(dim=-1, keepdim=True)
    if bool((length < 1e-12).any()):
        raise InputError("a chosen decoder row is constant over its features, which a layer "
                         "norm maps to zero; rank by other scores")  # fmt: skip
    return centred / length * dim**0.5, ids


@torch.no_grad()
def init_from_dictionary(model: CodebookModel, dictionary: Dictionary, *, site: str | None = None,
                         scores: Tensor | None = None) -> Tensor:  # fmt: skip
    """Set the codes of the codebook at ``site`` (None: the one at the dictionary's site, or
    the model's only codebook) to decoder directions (:func:`decoder_codes`); returns the
    latent ids ``(n_groups, num_codes)``."""
    name = _codebook_site(model, dictionary, site)
    layer: GroupedCodebookLayer = model.codebook(name)
    codes, ids = decoder_codes(dictionary, layer.n_groups, layer.dim, layer.num_codes, scores)
    layer.codebook.copy_(codes.to(layer.codebook))
    return ids


def _codebook_site(model: CodebookModel, dictionary: Dictionary, site: str | None) -> str:
    if site is not None:
        if site not in model.sites:
            raise InputError(f"no codebook at {site!r}; the codebooks are at {model.sites}")
        return site
    written = dictionary.output_site
    if written is None:
        if len(model.sites) != 1:
            raise InputError(f"the dictionary does not name its site and there are codebooks "
                             f"at {model.sites}; name one")  # fmt: skip
        return model.sites[0]
    target = resolve_sites(model.base, written)
    keys = {(s.module_name, s.where) for s in target}
    for name in model.sites:
        if any((s.module_name, s.where) in keys for s in resolve_sites(model.base, name)):
            return name
    raise InputError(f"the dictionary writes {written} ({target[0].name if target else '?'}), "
                     f"where there is no codebook (they are at {model.sites})")  # fmt: skip


def energy_scores(latents: Tensor, energies: Tensor, n_latents: int) -> Tensor:
    """(n_latents,) scores for :func:`decoder_codes` from the ranked ``latents`` (L,) and their
    ``energies`` (L,) (a ``LatentEnergies`` of ``tyche causal --features``); -inf for the
    latents it does not list (they never fired)."""
    if latents.shape != energies.shape or (len(latents) and int(latents.max()) >= n_latents):
        raise InputError(f"the latent energies do not fit a dictionary of {n_latents} latents")
    scores = torch.full((n_latents,), -torch.inf, dtype=torch.float64)
    scores[latents.long()] = energies.double()
    return scores
