"""The measurement of :mod:`tyche.splice`: bottlenecks, mean-keeping projections, the sites'
moments over the rows, and :func:`splice_faithfulness` (see the package docstring for what is
measured). Knows no method: a bottleneck is ``{site: replacement function}``."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tyche.distributed import all_reduce_sum, init_distributed, shard_range
from tyche.distributed import progress as progress_bar
from tyche.divergence import AnchorCache, forward_logits, masked_kl
from tyche.errors import InputError
from tyche.frameworks import as_module
from tyche.hooks import read_activations, replace_activations
from tyche.io import model_hash
from tyche.splice.options import SpliceOptions
from tyche.splice.result import RECOVERED_EPS, SpliceResult

__all__ = [
    "Bottleneck",
    "FromSite",
    "SiteMoments",
    "pca_directions",
    "projection",
    "site_moments",
    "splice_faithfulness",
]

Replacement = Callable[[Tensor], Tensor]
Batch = dict[str, Tensor]


@dataclass(frozen=True)
class FromSite:
    """A replacement computed from another site's activation (a transcoder: ``fn`` maps the
    activation at ``source``, e.g. an MLP's input, to the target site's, e.g. its output).
    ``source`` is read as the model computes it, before a replacement at that same site."""

    source: str
    fn: Replacement


@dataclass(frozen=True)
class Bottleneck:
    """A named bottleneck: ``{site: fn(h) -> h'}`` (or :class:`FromSite`), spliced together.

    ``family`` and ``k`` group projections into curves (a basis and its rank); other
    bottlenecks leave them at ``""`` and None.
    """

    name: str
    replacements: Mapping[str, Replacement | FromSite]
    family: str = ""
    k: int | None = None

    def __post_init__(self) -> None:
        if not self.replacements:
            raise InputError(f"bottleneck {self.name!r} replaces no site; give at least one")


@dataclass(frozen=True)
class SiteMoments:
    """Statistics of a site over the non-masked positions of every row (all ranks).

    ``mean`` has the activation's trailing shape (``(d,)``; ``(n_heads, d_head)`` for
    ``attn_heads``), float64; ``covariance`` ``(d, d)`` of the flattened trailing dimensions
    (population covariance, float64), or None when not asked for.
    """

    count: int
    mean: Tensor
    covariance: Tensor | None = None


# ----------------------------------------------------------------------------- projections
def projection(mean: Tensor, vectors: Tensor, dual: Tensor | None = None) -> Replacement:
    """The rank-k projection that keeps the mean: ``h -> mean + (h - mean) @ vectors @ dual``.

    ``mean`` has the activation's trailing shape (``(d,)``, or e.g. ``(n_heads, d_head)``,
    flattened to ``d``); ``vectors`` ``(d, k)``; ``dual`` ``(k, d)`` with ``dual @ vectors =
    I_k`` (default ``vectors.T``, for orthonormal columns). ``k = 0`` maps every ``h`` to the
    mean. Computed in float64; the result has ``h``'s dtype and shape.
    """
    d = mean.numel()
    if vectors.ndim != 2 or vectors.shape[0] != d:
        raise InputError(f"vectors must be (d, k) with d = {d} (the site's width), got "
                         f"{tuple(vectors.shape)}")  # fmt: skip
    dual = vectors.T if dual is None else dual
    if tuple(dual.shape) != (vectors.shape[1], d):
        raise InputError(f"dual must be (k, d) = {(vectors.shape[1], d)}, got {tuple(dual.shape)}")
    mu, V, D = mean.double().reshape(d), vectors.double(), dual.double()
    trailing = mean.dim()

    def project(h: Tensor) -> Tensor:
        flat = h.double().flatten(-trailing) if trailing > 1 else h.double()
        dev = flat.device
        mu_d = mu.to(dev)
        out = mu_d + ((flat - mu_d) @ V.to(dev)) @ D.to(dev)
        return out.reshape(h.shape).to(h.dtype)

    return project


def pca_directions(moments: SiteMoments) -> Tensor:
    """``(d, d)``: the covariance's eigenvectors as columns, by decreasing variance (float64)."""
    if moments.covariance is None:
        raise InputError("pca_directions needs moments with a covariance (site_moments(..., "
                         "covariance=[site]))")  # fmt: skip
    values, vectors = torch.linalg.eigh(moments.covariance.double())
    order = values.argsort(descending=True, stable=True)
    return vectors[:, order]


# ----------------------------------------------------------------------------- rows
def _rows(tokens: Mapping[str, Tensor]) -> Batch:
    if not isinstance(tokens, Mapping) or "input_ids" not in tokens:
        raise InputError("tokens must be a dict with input_ids (n, T) and attention_mask")
    ids = tokens["input_ids"]
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise InputError(f"input_ids must be (n, T) with T >= 2, got {tuple(ids.shape)}")
    mask = tokens.get("attention_mask")
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else mask}


def _shard_batches(tokens: Mapping[str, Tensor], batch_size: int) -> list[Batch]:
    """This rank's rows (a contiguous block) in batches of ``batch_size``."""
    rows = _rows(tokens)
    mine = shard_range(rows["input_ids"].shape[0])
    return [{k: v[s : min(s + batch_size, mine.stop)] for k, v in rows.items()}
            for s in range(mine.start, mine.stop, batch_size)]  # fmt: skip


def _device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _on(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def site_moments(model: Any, tokens: Mapping[str, Tensor], sites: Sequence[str], *,
                 covariance: Sequence[str] = (),
                 batch_size: int = 16) -> dict[str, SiteMoments]:  # fmt: skip
    """Mean (and, for the sites in ``covariance``, covariance) of each site over the rows.

    ``tokens``: ``input_ids`` and ``attention_mask`` ``(n, T)``; the statistics run over the
    positions the mask keeps, of every rank's rows (sums in float64, all-reduced). Returns
    ``{site name: SiteMoments}`` keyed by the resolved names of ``sites``.
    """
    model = as_module(model)
    init_distributed()
    names = _resolved_names(model, list(sites))
    with_cov = set(_resolved_names(model, list(covariance))) if covariance else set()
    device, shapes = _device(model), _trailing_shapes(model, names)
    sums = {n: torch.zeros(shapes[n], dtype=torch.float64) for n in names}
    outer = {n: torch.zeros(shapes[n].numel(), shapes[n].numel(), dtype=torch.float64)
             for n in names if n in with_cov}  # fmt: skip
    count = torch.zeros((), dtype=torch.float64)
    with read_activations(model, names) as acts:
        for batch in _shard_batches(tokens, batch_size):
            model(**_on(batch, device))
            keep = batch["attention_mask"].to(device) != 0
            count += keep.sum().double().cpu()
            for name in names:
                h = acts[name][keep].double()  # (positions, *trailing)
                sums[name] += h.sum(0).cpu()
                if name in outer:
                    flat = h.flatten(1)
                    outer[name] += (flat.T @ flat).cpu()
    n = float(all_reduce_sum(count))
    if n == 0:
        raise InputError("the rows have no unmasked position to take a site's mean over")
    out = {}
    for name in names:
        mean = all_reduce_sum(sums[name]) / n
        cov = None
        if name in outer:
            flat = mean.reshape(-1)
            cov = all_reduce_sum(outer[name]) / n - torch.outer(flat, flat)
        out[name] = SiteMoments(int(n), mean, cov)
    return out


def _resolved_names(model: nn.Module, patterns: list[str]) -> list[str]:
    from tyche.sites import resolve_sites

    return [s.name for s in resolve_sites(model, patterns)]


def _trailing_shapes(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Size]:
    """Each site's activation shape after ``(B, T)``, read from a one-token forward pass."""
    with torch.no_grad(), read_activations(model, list(names)) as acts:
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=_device(model)))
    return {n: acts[n].shape[2:] for n in names}


# ----------------------------------------------------------------------------- scoring
def _log_probs(logits: Tensor) -> Tensor:
    """``log_softmax`` in at least float32 (what the anchor cache stores for clean logits)."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)


def _next_token(logp: Tensor, batch: Batch) -> Tensor:
    """``[summed CE (nats), correct, count]`` (float64) over positions ``t`` whose token and
    next token are both unmasked; ``logp`` ``(B, T, V)``."""
    ids = batch["input_ids"].to(logp.device)
    mask = batch["attention_mask"].to(logp.device) != 0
    keep = mask[:, :-1] & mask[:, 1:]
    pred, target = logp[:, :-1], ids[:, 1:]
    picked = pred.gather(-1, target.unsqueeze(-1)).squeeze(-1).double()
    ce = torch.where(keep, -picked, torch.zeros((), dtype=torch.float64, device=logp.device))
    correct = ((pred.argmax(-1) == target) & keep).sum()
    return torch.stack([ce.sum(), correct.double(), keep.sum().double()]).cpu()


@contextlib.contextmanager
def _spliced(model: nn.Module, mapping: Mapping[str, Replacement | FromSite | Tensor]):
    """Splice ``mapping`` (resolved site names) into ``model`` for the ``with`` block; the
    sources of :class:`FromSite` entries are read as the model computes them."""
    sources = {r.source: _resolved_names(model, [r.source]) for r in mapping.values()
               if isinstance(r, FromSite)}  # fmt: skip
    for source, names in sources.items():
        if len(names) != 1:
            raise InputError(f"the source {source!r} of a replacement must be one site, got "
                             f"{names}")  # fmt: skip
    with contextlib.ExitStack() as stack:
        acts = stack.enter_context(read_activations(model, [n[0] for n in sources.values()])) \
            if sources else {}  # fmt: skip

        def from_site(r: FromSite) -> Replacement:
            return lambda _h: r.fn(acts[sources[r.source][0]])

        plain = {s: from_site(r) if isinstance(r, FromSite) else r for s, r in mapping.items()}
        stack.enter_context(replace_activations(model, plain))
        yield


def _scores(model: nn.Module, cache: AnchorCache | None, batches: list[Batch],
            mapping: Mapping[str, Any] | None) -> Tensor:  # fmt: skip
    """``[KL sum, CE sum, correct]`` (float64) of this rank's rows with ``mapping`` spliced
    (None: the clean model, read from the cache)."""
    totals = torch.zeros(3, dtype=torch.float64)
    if cache is None:
        return totals
    device = _device(model)
    context = contextlib.nullcontext() if mapping is None else _spliced(model, mapping)
    with torch.no_grad(), context:
        for i, batch in enumerate(batches):
            if mapping is None:
                totals[1:] += _next_token(cache.logp(i, device), batch)[:2]
                continue
            logp = _log_probs(forward_logits(model, _on(batch, device)))
            # log-probs on both sides, re-normalised alike: a spliced model whose logits equal
            # the clean ones gives KL 0 exactly
            kl = masked_kl(cache.logp(i, device), logp, cache.kl_mask(i).to(device), "token")
            totals[0] += kl.sum().double().cpu()
            totals[1:] += _next_token(logp, batch)[:2]
    return totals


def _resolve(model: nn.Module, b: Bottleneck) -> dict[str, Any]:
    """The bottleneck's replacements keyed by resolved site name, in forward order."""
    from tyche.sites import resolve_sites

    out: dict[str, Any] = {}
    for key, fn in b.replacements.items():
        for site in resolve_sites(model, key):
            if site.name in out:
                raise InputError(f"bottleneck {b.name!r} replaces site {site.name} twice")
            out[site.name] = fn
    order = _resolved_names(model, list(out))
    return {name: out[name] for name in order}


def _configurations(model: nn.Module, bottlenecks: Sequence[Bottleneck],
                    each_site: bool) -> list[tuple[Bottleneck, dict[str, Any]]]:  # fmt: skip
    """Every (bottleneck, {site: replacement}) to measure: all its sites, then each alone."""
    names = [b.name for b in bottlenecks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"bottleneck names {repeated} are used twice; give each its own name")
    configs = []
    for b in bottlenecks:
        resolved = _resolve(model, b)
        configs.append((b, resolved))
        if each_site and len(resolved) > 1:
            configs += [(b, {site: fn}) for site, fn in resolved.items()]
    return configs


def _ablation(sites: Sequence[str], mode: str, moments: Mapping[str, SiteMoments]) -> dict:
    """``{site: tensor}``: zero, or the site's mean over the rows."""
    if mode == "zero":
        return {site: torch.zeros(()) for site in sites}
    return {site: moments[site].mean for site in sites}


def splice_faithfulness(model: Any, tokens: Mapping[str, Tensor],
                        bottlenecks: Sequence[Bottleneck], options: SpliceOptions | None = None,
                        *, moments: Mapping[str, SiteMoments] | None = None,
                        progress: bool = True) -> SpliceResult:  # fmt: skip
    """Measure every bottleneck spliced into ``model`` on the rows of ``tokens``.

    ``tokens``: ``input_ids`` and ``attention_mask`` ``(n, T)`` (split over the ranks under
    ``torchrun``); ``bottlenecks``: each replaces the activations at its sites (see
    :mod:`tyche.splice` for what is measured); ``options``: the ablation, ``each_site`` and the
    batch size; ``moments``: the sites' means over these rows when the caller has them (mean
    ablation), else they are computed here (one pass); ``progress``: a progress bar on rank 0.
    One forward pass per batch for the clean model (its log-probabilities are kept on the CPU,
    ``n x T x V`` float32), and one per batch per configuration and per distinct set of ablated
    sites. Returns a :class:`SpliceResult`, the same on every rank.
    """
    model = as_module(model)
    options = SpliceOptions() if options is None else options
    init_distributed()
    if not bottlenecks:
        raise InputError("splice_faithfulness needs at least one bottleneck")
    configs = _configurations(model, bottlenecks, options.each_site)
    sites = list(dict.fromkeys(s for _, mapping in configs for s in mapping))
    if options.ablation == "mean" and (moments is None or any(s not in moments for s in sites)):
        moments = site_moments(model, tokens, sites, batch_size=options.batch_size)
    batches = _shard_batches(tokens, options.batch_size)
    cache = AnchorCache.from_model(model, batches) if batches else None  # log-probs on the CPU
    ablated_sets = list(dict.fromkeys(tuple(mapping) for _, mapping in configs))
    ablations = [_ablation(s, options.ablation, moments or {}) for s in ablated_sets]
    todo: list[dict | None] = [None, *(m for _, m in configs), *ablations]
    sums = [_scores(model, cache, batches, m)
            for m in progress_bar(todo, desc="splice", disable=not progress)]  # fmt: skip
    counts = torch.zeros(2, dtype=torch.float64)
    for i, batch in enumerate(batches):
        counts[0] += cache.kl_mask(i).sum().double().cpu()  # type: ignore[union-attr]
        counts[1] += _next_token(cache.logp(i), batch)[2]  # type: ignore[union-attr]
    totals = all_reduce_sum(torch.cat([torch.stack(sums).reshape(-1), counts]))
    n_kl, n_ce = float(totals[-2]), float(totals[-1])
    if n_ce == 0:
        raise InputError("the rows have no position whose next token is unmasked; give rows "
                         "of at least two tokens")  # fmt: skip
    table = totals[:-2].reshape(len(todo), 3)
    return _result(model, configs, ablated_sets, table, n_kl, n_ce, options)


def _result(model: nn.Module, configs: list, ablated_sets: list, table: Tensor, n_kl: float,
            n_ce: float, options: SpliceOptions) -> SpliceResult:  # fmt: skip
    """The :class:`SpliceResult` of the summed scores (row 0 clean, then the configurations,
    then the ablations)."""
    ce_clean, acc_clean = float(table[0, 1] / n_ce), float(table[0, 2] / n_ce)
    spliced = table[1 : 1 + len(configs)]
    abl = table[1 + len(configs) :, 1] / n_ce
    ce_abl = torch.stack([abl[ablated_sets.index(tuple(m))] for _, m in configs])
    ce = spliced[:, 1] / n_ce
    gap = ce_abl - ce_clean
    ratio = (ce_abl - ce) / gap + 0.0  # + 0.0 turns -0.0 into 0.0
    recovered = torch.where(gap.abs() > RECOVERED_EPS, ratio, torch.full_like(gap, math.nan))
    return SpliceResult(
        names=[b.name for b, _ in configs],
        sites=[list(m) for _, m in configs],
        families=[b.family for b, _ in configs],
        ks=[b.k for b, _ in configs],
        kl=spliced[:, 0] / n_kl,
        ce=ce,
        ce_ablated=ce_abl,
        ce_recovered=recovered,
        accuracy=spliced[:, 2] / n_ce,
        ce_clean=ce_clean,
        accuracy_clean=acc_clean,
        n_kl_positions=int(n_kl),
        n_ce_positions=int(n_ce),
        ablation=options.ablation,
        model_hash=model_hash(model),
        settings={
            "ablation": options.ablation,
            "each_site": options.each_site,
            "batch_size": options.batch_size,
        },  # fmt: skip
    )
