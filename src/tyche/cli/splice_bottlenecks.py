"""The bottlenecks of ``tyche splice``, read from folders: codebooks, dictionaries, projections.

:class:`Sources` reads every folder the flags name before the model loads (and checks what
can be checked without it: saved bases, ranks, the dictionaries' sites);
:func:`build_bottlenecks` then resolves the sites on the model, checks widths and fingerprints,
takes the sites' means (and the PCA sites' covariances) over the rows in one pass, and makes
the :class:`tyche.splice.Bottleneck` list.

Directions of the projections ``h -> mu + (h - mu) V_k D_k`` (:func:`tyche.splice.projection`):

- causal: ``V`` the basis's orthonormal vectors ``(d, k)``, ``D = V^T``;
- PCA: the covariance's eigenvectors over the same rows, ``D = V^T``;
- LIB (:func:`lib_directions`): a centred basis acts on the folded activation ``[h, 1]`` with
  ``C`` ``(d + 1, K)`` (column 0 the constant direction) and its left inverse ``C+``
  ``(K, d + 1)``; feature ``j >= 1`` reads ``(h - mu) . C[:d, j]`` and writes back
  ``C+[j, :d]``, so ``V = C[:d, 1:]`` and ``D = C+[1:, :d]``. The directions are not
  orthogonal: ``V_k D_k`` is the oblique projection along the other LIB directions
  (``D_k V_k = I_k``), which keeps the first k LIB features of ``h`` exactly and sets the
  others to their mean. An uncentred basis mixes the mean into its directions and is refused.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tyche.cli.commandline import CommandError, split_list

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tyche.splice import Bottleneck, SiteMoments

__all__ = ["BasisSpec", "Sources", "build_bottlenecks", "lib_directions"]

#: the parsed flags of ``tyche splice`` (a :class:`tyche.cli.splice.SpliceConfig`)
SpliceConfig = Any


@dataclass(frozen=True)
class BasisSpec:
    """One ``--basis`` entry: ``kind`` causal, lib or pca, its folder, its label."""

    kind: str
    folder: Path | None
    label: str


@dataclass
class LoadedBasis:
    """A ``--basis`` entry with what its folder holds (causal: ``{site: CausalBasis}``; lib:
    the InteractionGraph; pca: nothing)."""

    spec: BasisSpec
    causal: dict[str, Any] = field(default_factory=dict)
    graph: Any = None
    layers: dict[str, Any] = field(default_factory=dict)
    """lib: ``{site: InteractionBasis}`` of the node layers with a basis"""


@dataclass
class Sources:
    """Every bottleneck folder of the flags, read (before the model)."""

    codebooks: Any  # {site: codebook layer} or None
    codebook_hash: str | None
    dictionaries: list[tuple[str, Any]]
    bases: list[LoadedBasis]
    ks: list[int]
    ks_given: bool = True
    """--k was given (then a rank beyond a basis is refused; else the defaults beyond it are
    left out)"""

    @classmethod
    def load(cls, cfg: SpliceConfig, specs: list[BasisSpec], ks: list[int],
             saes: list[str]) -> Sources:  # fmt: skip
        layers, base_hash = _codebooks(cfg.codebooks) if cfg.codebooks else (None, None)
        dictionaries = [(sae, _dictionary(sae, cfg.sites is not None)) for sae in saes]
        patterns = split_list(cfg.sites)
        plain = [folder for folder, d in dictionaries if not d.transcoder]
        if patterns and plain and len(patterns) not in (1, len(plain)):
            raise CommandError(f"--sites lists {len(patterns)} sites for {len(plain)} --sae "
                               "folders (transcoders keep their own sites); give one site for "
                               "all or one per folder")  # fmt: skip
        bases = [_basis(spec) for spec in specs]
        for basis in bases:
            for site, n in _directions_count(basis).items():
                chosen = not patterns or any(fnmatch.fnmatch(site, p) for p in patterns)
                if chosen and cfg.k is not None and max(ks) > n:
                    raise CommandError(_too_few(basis.spec, site, n, max(ks)))
        return cls(layers, base_hash, dictionaries, bases, ks, cfg.k is not None)


def _too_few(spec: BasisSpec, site: str, n: int, k: int) -> str:
    return (f"--k {k} is more than the {n} directions of the {spec.label} basis at {site}"
            f"{f' ({spec.folder})' if spec.folder else ''}; give ranks up to {n}")  # fmt: skip


def _codebooks(folder: str) -> tuple[dict[str, Any], str]:
    """The codebook layers of a codebook model folder (eval mode, snapping) and the hash of
    the base model saved with them."""
    from tyche.codebook.model import CodebookModel
    from tyche.io import model_hash

    model = CodebookModel.from_pretrained(Path(folder).expanduser()).eval()
    base_hash = model_hash(model.base)
    layers = model.layers()
    for layer in layers.values():
        layer.snap = True
    model.detach()
    return layers, base_hash


def _dictionary(folder: str, sites_given: bool) -> Any:
    """The dictionary of a --sae folder, refused if nothing says where it goes."""
    from tyche.dictionaries import load_dictionary
    from tyche.errors import InputError

    try:
        d = load_dictionary(folder)
    except InputError as err:
        raise CommandError(f"--sae {folder}: {err}") from None
    if d.transcoder and not (d.hook_name and d.hook_name_out):
        raise CommandError(f"--sae {folder}: the transcoder's folder does not name its input "
                           "and output sites")  # fmt: skip
    if not d.transcoder and not d.hook_name and not sites_given:
        raise CommandError(f"--sae {folder}: its folder does not say which site it was "
                           "trained on; give --sites")  # fmt: skip
    return d


def _basis(spec: BasisSpec) -> LoadedBasis:
    """Read the basis folder of a ``--basis`` entry."""
    if spec.kind == "pca":
        return LoadedBasis(spec)
    folder = spec.folder
    assert folder is not None
    if spec.kind == "causal":
        from tyche.causal.result import CausalBasis

        found = [p for p in [folder, *sorted(folder.iterdir())] if _holds(p, "CausalBasis")]
        if not found:
            raise CommandError(f"--basis causal:{folder}: no causal basis in it (a tyche causal "
                               "--out folder holds one per site)")  # fmt: skip
        bases = [CausalBasis.load(p) for p in found]
        return LoadedBasis(spec, causal={b.site or p.name: b for b, p in zip(bases, found)})
    from tyche.interaction.result import InteractionGraph

    for candidate in (folder / "graph", folder / "bases", folder):
        if _holds(candidate, "InteractionGraph"):
            return LoadedBasis(spec, graph=InteractionGraph.load(candidate))
    raise CommandError(f"--basis lib:{folder}: no interaction basis in it (a tyche interaction "
                       "build --out folder, with graph/ or bases/)")  # fmt: skip


def _holds(folder: Path, result_type: str) -> bool:
    meta = folder / "meta.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("type") == result_type
    except (OSError, ValueError):
        return False


def _lib_layers(graph: Any) -> dict[str, Any]:
    """The node layers of a graph that have a basis to project onto."""
    return {b.node_layer: b for b in graph.bases if b.node_layer != "output" and b.C is not None}


def _directions_count(basis: LoadedBasis) -> dict[str, int]:
    """``{site: directions}`` of a loaded basis (pca: none known before the model)."""
    if basis.spec.kind == "causal":
        return {site: b.k for site, b in basis.causal.items()}
    if basis.spec.kind == "lib":
        return {site: lib_directions(b, site)[0].shape[1] for site, b in
                _lib_layers(basis.graph).items()}  # fmt: skip
    return {}


def lib_directions(basis: Any, site: str = "?") -> tuple[torch.Tensor, torch.Tensor]:
    """``(V, D)`` ``(d, K)`` and ``(K, d)``, float64, of an interaction basis (see the module
    docstring): its directions in order of importance and their dual, ``D @ V = I``."""
    if basis.C is None:
        raise CommandError(f"--basis lib: node layer {site} has no basis (an unrotated final "
                           "layer)")  # fmt: skip
    C, C_pinv = basis.C.double(), basis.C_pinv.double()
    if not basis.folded:  # the last node layer's rotation of its raw coordinates
        return C, C_pinv
    if not basis.center:
        raise CommandError(f"--basis lib: the basis at {site} is not centred, so its "
                           "directions mix in the mean; build it with --center")  # fmt: skip
    d = C.shape[0] - 1
    return C[:d, 1:], C_pinv[1:, :d]


# ----------------------------------------------------------------------------- on the model
def _names(model: nn.Module, patterns: list[str], what: str) -> list[str]:
    from tyche.errors import InputError
    from tyche.sites import resolve_sites

    try:
        return [s.name for s in resolve_sites(model, patterns)]
    except InputError as err:
        raise CommandError(f"{what}: {err}") from None


def _widths(model: nn.Module, sites: list[str]) -> dict[str, int]:
    """Each site's width (its trailing dimensions flattened), from a two-token pass."""
    import torch

    from tyche.hooks import read_activations

    device = next(model.parameters()).device
    with torch.no_grad(), read_activations(model, sites) as acts:
        model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device))
    return {s: acts[s][0, 0].numel() for s in sites}


def _selected(model: nn.Module, cfg: SpliceConfig) -> list[str] | None:
    return _names(model, split_list(cfg.sites), "--sites") if cfg.sites else None


def _sae_sites(model: nn.Module, sources: Sources, cfg: SpliceConfig) -> list[tuple[str, str]]:
    """``(input site, output site)`` of every --sae dictionary."""
    given, out, i = split_list(cfg.sites), [], 0
    for folder, d in sources.dictionaries:
        if d.transcoder:  # reads and writes the sites its folder names
            pair = (d.hook_name, d.hook_name_out)
        else:
            site = given[i if len(given) > 1 else 0] if given else d.hook_name
            pair, i = (site, site), i + 1
        out.append((_one(model, pair[0], f"--sae {folder}"),
                    _one(model, pair[1], f"--sae {folder}")))  # fmt: skip
    return out


def _check_hashes(model: nn.Module, sources: Sources, cfg: SpliceConfig) -> list[str]:
    """Refuse bases made on another model; note a codebook model whose base differs."""
    from tyche.io import model_hash

    this, notes = model_hash(model), []
    for basis in sources.bases:
        made = [b.model_hash for b in basis.causal.values()]
        made += [basis.graph.model_hash] if basis.graph is not None else []
        if any(h is not None and h != this for h in made):
            raise CommandError(f"--basis {basis.spec.kind}:{basis.spec.folder} was made on "
                               f"another model than --model {cfg.source.model} ({this}); "
                               "make it on this one")  # fmt: skip
    if sources.codebook_hash is not None and sources.codebook_hash != this:
        notes.append(f"--codebooks {cfg.codebooks} was trained with its base model changed "
                     f"(hash {sources.codebook_hash}, --model {this}); its codebooks are "
                     "spliced into --model as they are")  # fmt: skip
    return notes


def build_bottlenecks(model: nn.Module, tokens: dict[str, torch.Tensor], sources: Sources,
                      cfg: SpliceConfig) -> tuple[list[Bottleneck], dict[str, SiteMoments],
                                                  list[str]]:  # fmt: skip
    """The bottlenecks on ``model``, the sites' moments over ``tokens`` and notes to print."""
    from tyche.frameworks import as_module
    from tyche.splice import site_moments

    model = as_module(model)
    notes = _check_hashes(model, sources, cfg)
    selected = _selected(model, cfg)
    codebook_sites = [] if sources.codebooks is None else [
        _one(model, s, f"--codebooks {cfg.codebooks}") for s in sources.codebooks]  # fmt: skip
    sae_sites = _sae_sites(model, sources, cfg)
    basis_sites = {b.spec.label: _basis_sites(model, b, selected) for b in sources.bases
                   if b.spec.kind != "pca"}  # fmt: skip
    replaced = [*codebook_sites, *(dst for _, dst in sae_sites),
                *(s for sites in basis_sites.values() for s in sites)]  # fmt: skip
    pca_sites = selected or list(dict.fromkeys(replaced))
    if any(b.spec.kind == "pca" for b in sources.bases):
        if not pca_sites:
            raise CommandError("--basis pca needs a site: give --sites")
        basis_sites["pca"] = pca_sites
    every = list(dict.fromkeys([*replaced, *(s for v in basis_sites.values() for s in v)]))
    widths = _widths(model, list(dict.fromkeys([*every, *(src for src, _ in sae_sites)])))
    ranks = _check_widths(sources, sae_sites, basis_sites, widths)
    moments = site_moments(model, tokens, every, covariance=basis_sites.get("pca", []),
                           batch_size=cfg.splice.batch_size)  # fmt: skip
    device = next(model.parameters()).device
    bottlenecks = _plain(sources, codebook_sites, sae_sites, device)
    for basis in sources.bases:
        label = basis.spec.label
        bottlenecks += _projections(basis, basis_sites[label], moments, ranks[label])
    return bottlenecks, moments, notes


def _basis_sites(model: nn.Module, basis: LoadedBasis, selected: list[str] | None) -> list[str]:
    """The sites a causal or LIB basis projects at: its own, within --sites (its bases are
    keyed by the sites' names on ``model`` from here on)."""
    what = f"--basis {basis.spec.kind}:{basis.spec.folder}"
    if basis.spec.kind == "causal":
        basis.causal = {_one(model, key, what): b for key, b in basis.causal.items()}
        names = list(basis.causal)
    else:
        basis.layers = {_one(model, key, what): b for key, b in _lib_layers(basis.graph).items()}
        names = list(basis.layers)
    chosen = [n for n in names if selected is None or n in selected]
    if not chosen:
        raise CommandError(f"--basis {basis.spec.kind}:{basis.spec.folder} has bases at "
                           f"{names}, none of them in --sites {selected}")  # fmt: skip
    return chosen


def _one(model: nn.Module, pattern: str, what: str) -> str:
    """The one site ``pattern`` names on ``model``."""
    names = _names(model, [pattern], what)
    if len(names) != 1:
        raise CommandError(f"{what}: {pattern} must name one site, not {names}")
    return names[0]


def _check_widths(sources: Sources, sae_sites: list[tuple[str, str]],
                  basis_sites: dict[str, list[str]],
                  widths: dict[str, int]) -> dict[str, list[int]]:  # fmt: skip
    """Refuse a dictionary or basis whose width is not its site's, or a --k beyond a basis;
    returns the ranks of each basis (the default ranks up to its directions)."""
    for (folder, d), (src, dst) in zip(sources.dictionaries, sae_sites):
        if d.d_in != widths[src] or d.d_out != widths[dst]:
            raise CommandError(f"--sae {folder} maps width {d.d_in} to {d.d_out}, but {src} has "
                               f"width {widths[src]} and {dst} {widths[dst]}")  # fmt: skip
    ranks = {}
    for basis in sources.bases:
        fewest = None
        for site in basis_sites[basis.spec.label]:
            available = widths[site]
            if basis.spec.kind != "pca":
                V, _ = _directions(basis, site)
                if V.shape[0] != widths[site]:
                    raise CommandError(f"--basis {basis.spec.label}: its basis at {site} has "
                                       f"width {V.shape[0]}, the site {widths[site]}")  # fmt: skip
                available = V.shape[1]
            if sources.ks_given and max(sources.ks) > available:
                raise CommandError(_too_few(basis.spec, site, available, max(sources.ks)))
            fewest = available if fewest is None else min(fewest, available)
        ranks[basis.spec.label] = [k for k in sources.ks if fewest is None or k <= fewest]
    return ranks


def _directions(basis: LoadedBasis, site: str,
                moments: dict[str, SiteMoments] | None = None) -> tuple[Any, Any]:  # fmt: skip
    """``(V, D)`` of ``basis`` at ``site`` (pca: from ``moments``)."""
    from tyche.splice import pca_directions

    if basis.spec.kind == "causal":
        V = basis.causal[site].vectors.double()
        return V, V.T
    if basis.spec.kind == "lib":
        return lib_directions(basis.layers[site], site)
    V = pca_directions(moments[site])  # type: ignore[index]
    return V, V.T


def _plain(sources: Sources, codebook_sites: list[str], sae_sites: list[tuple[str, str]],
           device: Any) -> list[Bottleneck]:  # fmt: skip
    """The codebook and dictionary bottlenecks."""
    from tyche.splice import Bottleneck, FromSite

    out = []
    if sources.codebooks is not None:
        layers = {site: layer.to(device) for site, layer in
                  zip(codebook_sites, sources.codebooks.values())}  # fmt: skip
        out.append(Bottleneck("codebooks", layers))
    names = [Path(folder).name for folder, _ in sources.dictionaries]
    for (folder, d), (src, dst), name in zip(sources.dictionaries, sae_sites, names):
        d = d.to(device)
        label = f"sae {name}" if names.count(name) == 1 else f"sae {folder}"
        if d.transcoder:
            out.append(Bottleneck(label, {dst: FromSite(src, d.reconstruct)}))
        else:
            out.append(Bottleneck(label, {dst: _reconstruction(d)}))
    return out


def _reconstruction(d: Any) -> Any:
    return lambda h: d.reconstruct(h).reshape(h.shape)


def _projections(basis: LoadedBasis, sites: list[str], moments: dict[str, SiteMoments],
                 ks: list[int]) -> list[Bottleneck]:  # fmt: skip
    """One bottleneck per rank k: the basis's rank-k projection at each of its sites."""
    from tyche.splice import Bottleneck, projection

    directions = {site: _directions(basis, site, moments) for site in sites}
    label = basis.spec.label
    return [Bottleneck(f"{label} k={k}", {site: projection(moments[site].mean, V[:, :k], D[:k])
                                          for site, (V, D) in directions.items()},
                       family=label, k=k) for k in ks]  # fmt: skip
