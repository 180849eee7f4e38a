"""``build_interaction_graph``: the local interaction basis of every node layer and its edges.

Three stages, each of which can be resumed from the previous one's saved result:

1. **grams**: one forward pass over the data reads every node layer; means and covariances
   accumulate in float64 (:mod:`tyche.interaction.gram`).
2. **bases**: from the last node layer backwards. The last one gets its PCA basis
   (``rotate_final=True``) or stays in raw coordinates; each earlier one gets its basis
   relative to the next one's (:mod:`tyche.interaction.basis`), from the integrated
   gradients of the section after it (:mod:`tyche.interaction.moments`).
3. **edges**: between consecutive node layers (:mod:`tyche.interaction.edges`). With the
   ``jacobian`` basis the gradients of stage 2 are reused when they fit in ``cache_gb``, so
   each section is differentiated once.

With ``checkpoint=`` every finished section (its basis and edges) is saved as soon as it is
done, and ``resume=True`` computes only the sections not finished
(:mod:`tyche.interaction.checkpoint`).

Under ``torchrun`` the data is split over the ranks (``split="data"``) or every rank takes
all the data and a share of the output features (``split="outputs"``); sums are reduced with
``torch.distributed`` and every rank ends with the same graph.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tyche.distributed import all_reduce_sum, init_distributed, rank0_print
from tyche.distributed import progress as progress_bar
from tyche.errors import InputError
from tyche.frameworks import as_module
from tyche.interaction.basis import (
    LIB_FORMULAS,
    InteractionBasis,
    final_pca_basis,
    lib_basis,
    neuron_basis,
    pca,
    svd_basis,
    unrotated_basis,
)
from tyche.interaction.checkpoint import SavedSection, SectionCheckpoint, section_digest
from tyche.interaction.edges import edges_from_cache, section_edges
from tyche.interaction.gram import GramAccumulator
from tyche.interaction.integrate import rule_for_layers
from tyche.interaction.jacobian import SectionPlan, position_weights
from tyche.interaction.moments import lib_moments
from tyche.interaction.options import GraphOptions
from tyche.interaction.result import InteractionGrams, InteractionGraph
from tyche.interaction.sections import (
    Batch,
    ModelRunner,
    make_batches,
    prepared_model,
    resolve_node_layers,
)
from tyche.io import model_hash
from tyche.memory import free_memory_share
from tyche.resume import SettingsMismatch, compare_settings

__all__ = ["GraphOptions", "build_grams", "build_interaction_graph", "collect_grams"]

#: share of the free memory the jacobian basis may keep for the edges by default
AUTO_CACHE_SHARE = 0.5

#: settings that stage 1 (grams) depends on, and those stage 2 (bases) adds
GRAM_KEYS = ("node_layers", "dtype", "gram_dtype", "n_rows", "rotate_final", "inputs")
BASIS_KEYS = (*GRAM_KEYS, "basis", "integration", "n_intervals", "center",
              "truncation_threshold", "n_stochastic_sources", "n_stochastic_sources_hidden",
              "seed")  # fmt: skip


def collect_grams(
    runner: ModelRunner,
    batches: list[Batch],
    *,
    skip_last: bool,
    dtype: torch.dtype = torch.float64,
    settings: dict | None = None,
    progress: bool = True,
) -> InteractionGrams:
    """Stage 1: counts, means and covariances of every node layer (one forward per batch).

    ``skip_last``: do not accumulate the last node layer's covariance (an unrotated final
    layer needs none; for a language model's logits it would be vocabulary squared).
    """
    start = time.perf_counter()
    names = [n.name for n in runner.node_layers]
    accs: list[GramAccumulator | None] = [None] * len(names)
    dims = [0] * len(names)
    for batch in progress_bar(batches, desc="grams", disable=not progress, leave=False):
        acts = runner.read(batch)
        for i, name in enumerate(names):
            a = acts[name]
            dims[i] = a.shape[-1]
            if skip_last and i == len(names) - 1:
                continue
            if accs[i] is None:
                accs[i] = GramAccumulator(a.shape[-1], dtype, device=a.device)
            accs[i].update(a.reshape(-1, a.shape[-1]), position_weights(batch, a).reshape(-1))
    dims_t = all_reduce_sum(torch.tensor(dims, dtype=torch.float64))  # ranks with no batch: 0
    counts, means, covs = [], [], []
    for i in range(len(names)):
        acc = accs[i]
        if acc is None and not (skip_last and i == len(names) - 1):
            acc = GramAccumulator(int(dims_t[i]) // max(1, _nonzero_ranks(dims[i])), dtype)
        if acc is None:
            counts.append(0.0), means.append(None), covs.append(None)
            continue
        acc.all_reduce()
        counts.append(float(acc.n))
        means.append(acc.mean.double().cpu())
        covs.append(acc.covariance.double().cpu())
    settings = dict(settings or {})
    settings["dims"] = [int(d) for d in _dims_everywhere(dims)]
    return InteractionGrams(names, counts, means, covs, settings, None,
                            time.perf_counter() - start)  # fmt: skip


def _nonzero_ranks(dim: int) -> int:
    return int(all_reduce_sum(torch.tensor([1.0 if dim else 0.0])).item())


def _dims_everywhere(dims: list[int]) -> list[int]:
    """Every rank's view of the node widths (a rank without batches saw none)."""
    t = torch.tensor(dims, dtype=torch.float64)
    n = torch.tensor([1.0 if any(dims) else 0.0])
    return (all_reduce_sum(t) / all_reduce_sum(n).clamp_min(1)).round().long().tolist()


def _read_once(inputs: Any) -> Any:
    """An iterator of batches as a list (the build passes over the data several times and
    hashes it); anything else as it is."""
    if isinstance(inputs, Tensor | Mapping | str | bytes) or not isinstance(inputs, Iterable):
        return inputs
    return list(inputs)


def inputs_digest(inputs: Any) -> str | None:
    """16 hex characters of a sha256 over the rows of ``inputs`` in order (a tensor, a dict of
    tensors, or a list of them: the same rows in other batches give the same digest), so a
    resumed build can tell other data with as many rows; None for inputs of another kind
    (they are not checked)."""
    items = inputs if isinstance(inputs, list | tuple) else [inputs]
    streams: dict[str, Any] = {}
    for item in items:
        fields = item if isinstance(item, Mapping) else {"": item}
        for key, value in fields.items():
            if not isinstance(value, Tensor):
                return None
            value = value.detach().to("cpu").contiguous()
            head = f"{key}|{tuple(value.shape[1:])}|{value.dtype}"
            stream = streams.setdefault(head, hashlib.sha256())
            stream.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    if not streams:
        return None
    whole = hashlib.sha256()
    for head in sorted(streams):
        whole.update(f"{head}|{streams[head].hexdigest()}\n".encode())
    return whole.hexdigest()[:16]


def _check_resume(saved: dict, settings: dict, keys: Sequence[str], what: str) -> None:
    # a result saved before its inputs were hashed (no "inputs") is checked on the rest
    keys = [k for k in keys if k != "inputs" or saved.get(k) is not None]
    diffs = compare_settings({k: saved.get(k) for k in keys}, {k: settings.get(k) for k in keys})
    if diffs:
        detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diffs.items())
        raise SettingsMismatch(None, diffs, message=(
            f"the saved {what} were computed with other settings ({detail}); compute them "
            "again or build with the saved settings"
        ))  # fmt: skip


def build_interaction_graph(
    model: nn.Module,
    inputs: Any,
    node_layers: Sequence[str],
    options: GraphOptions | None = None,
    *,
    grams: InteractionGrams | None = None,
    bases: InteractionGraph | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
) -> InteractionGraph:
    """Build the local interaction graph of ``model`` on ``inputs``.

    Args:
        model: any ``nn.Module`` (an HF model, an MLP, ...), a TransformerLens
            ``HookedTransformer`` or an nnsight model (:func:`tyche.frameworks.as_module`). It
            is run in eval mode, in ``options.dtype``, with frozen parameters; all of that is
            restored afterwards.
        inputs: a tensor, a dict of model keyword arguments (``input_ids``,
            ``attention_mask``...), or an iterable of them (each one batch).
        node_layers: site patterns in forward order (aliases such as ``resid_pre.1``, module
            names, ``name:input``) and optionally ``"output"`` (the logits) last.
        options: the basis and edge formulas, the integration rule, dtypes, batching, the
            stochastic sources... (:class:`~tyche.interaction.options.GraphOptions`; None:
            its defaults).
        grams: the Gram matrices of an earlier stage to resume from (checked against the
            settings).
        bases: the bases of an earlier stage to resume from (checked likewise).
        progress: progress bars and the line naming the resumed sections (rank 0 only).
        checkpoint: folder where each finished section (its basis, and its edges when asked
            for) is saved as soon as it is done (:mod:`tyche.interaction.checkpoint`); the
            folder is kept afterwards. Under ``torchrun`` rank 0 writes it.
        resume: continue the build saved in ``checkpoint``: the contiguous run of finished
            sections at the end is loaded (its settings and model hash must match) and only
            the rest is computed. A loaded section without the edges asked for gets them
            computed (by one pass, as with ``bases=``).
    """
    model = as_module(model)
    o = _options(options)
    if resume and checkpoint is None:
        raise InputError("resume=True needs the checkpoint folder of the build to continue")
    init_distributed()
    store = None if checkpoint is None else SectionCheckpoint(checkpoint, resume=resume)
    layers = resolve_node_layers(model, node_layers)
    names = [n.name for n in layers]
    rules = rule_for_layers(o.integration, o.n_intervals, names)
    mhash = model_hash(model)
    inputs = _read_once(inputs)
    digest = inputs_digest(inputs)
    seconds: dict[str, float] = {}
    with prepared_model(model, o.dtype) as prepared:
        runner = ModelRunner(prepared, layers, o.dtype)
        batches = make_batches(inputs, o.batch_size, shard=True)
        n_rows = int(all_reduce_sum(torch.tensor(float(sum(b.n for b in batches)))).item())
        settings = _settings(o, names, runner.dtype, n_rows, digest)
        done = _resumed_sections(store, settings, mhash, bases, progress)
        if grams is None:
            grams = collect_grams(runner, batches, skip_last=not o.rotate_final,
                                  dtype=o.gram_dtype, settings=settings,
                                  progress=progress)  # fmt: skip
            grams = InteractionGrams(grams.node_layers, grams.counts, grams.means,
                                     grams.covariances, grams.settings, mhash,
                                     grams.seconds)  # fmt: skip
        else:
            _check_resume(grams.settings, settings, GRAM_KEYS, "grams")
            _check_model(grams.model_hash, mhash, "grams")
        seconds["grams"] = grams.seconds
        sweep_batches = batches if o.split == "data" else make_batches(inputs, o.batch_size,
                                                                        shard=False)  # fmt: skip
        if o.check_cuts and sweep_batches:
            for i in range(len(layers) - 1):
                runner.check_cut(sweep_batches[0], i, 1e-6 if runner.dtype == torch.float64
                                 else 1e-3)  # fmt: skip
        if bases is not None:
            _check_resume(bases.settings, settings, BASIS_KEYS, "bases")
            _check_model(bases.model_hash, mhash, "bases")
        # float32 Grams are rounded at ~1e-7 of their largest eigenvalue: no finer threshold
        floor = 1e-6 if o.gram_dtype == torch.float32 else 0.0
        graph_bases, graph_edges, t_bases, t_edges = _sweep(
            runner, sweep_batches, grams, rules, settings, bases, progress,
            _cache_bytes(o.cache_gb, runner),
            max(o.truncation_threshold, floor), _Sections(store, done, mhash),
        )  # fmt: skip
    seconds["bases"], seconds["edges"] = t_bases, t_edges
    return InteractionGraph(names, graph_bases, graph_edges, settings, mhash,
                            list(grams.counts), seconds)  # fmt: skip


def _settings(o: GraphOptions, names: list[str], dtype: torch.dtype, n_rows: int,
              digest: str | None) -> dict[str, Any]:  # fmt: skip
    """The settings a graph records (and a resumed build must match): the options but
    ``cache_gb`` and ``check_cuts`` (they change the time taken, never the result), with the
    node layers, the dtype the model ran in, the number of rows and the inputs' digest."""
    return {
        "node_layers": names, "basis": o.basis, "edges": o.edges,
        "integration": dict(o.integration) if isinstance(o.integration, Mapping)
        else o.integration,
        "n_intervals": o.n_intervals, "center": o.center, "dtype": str(dtype),
        "rotate_final": o.rotate_final, "n_stochastic_sources": o.n_stochastic_sources,
        "n_stochastic_sources_hidden": o.n_stochastic_sources_hidden,
        "truncation_threshold": o.truncation_threshold, "gram_dtype": str(o.gram_dtype),
        "seed": o.seed, "split": o.split, "n_rows": n_rows, "batch_size": o.batch_size,
        "inputs": digest,
    }  # fmt: skip


def build_grams(
    model: nn.Module,
    inputs: Any,
    node_layers: Sequence[str],
    options: GraphOptions | None = None,
    *,
    progress: bool = True,
) -> InteractionGrams:
    """Stage 1 alone: the means and covariances of the node layers, to save and resume from
    (``build_interaction_graph(..., grams=...)`` with the same options). Of ``options`` only
    ``dtype``, ``rotate_final``, ``batch_size`` and ``gram_dtype`` matter here."""
    model = as_module(model)
    o = _options(options)
    init_distributed()
    layers = resolve_node_layers(model, node_layers)
    mhash = model_hash(model)
    inputs = _read_once(inputs)
    digest = inputs_digest(inputs)
    with prepared_model(model, o.dtype) as prepared:
        runner = ModelRunner(prepared, layers, o.dtype)
        batches = make_batches(inputs, o.batch_size, shard=True)
        n_rows = int(all_reduce_sum(torch.tensor(float(sum(b.n for b in batches)))).item())
        settings = {"node_layers": [n.name for n in layers], "dtype": str(runner.dtype),
                    "gram_dtype": str(o.gram_dtype), "n_rows": n_rows,
                    "rotate_final": o.rotate_final, "inputs": digest}  # fmt: skip
        grams = collect_grams(runner, batches, skip_last=not o.rotate_final, dtype=o.gram_dtype,
                              settings=settings, progress=progress)  # fmt: skip
    return InteractionGrams(grams.node_layers, grams.counts, grams.means, grams.covariances,
                            grams.settings, mhash, grams.seconds)  # fmt: skip


def _options(options: GraphOptions | None) -> GraphOptions:
    if options is None:
        return GraphOptions()
    if not isinstance(options, GraphOptions):
        raise InputError(f"options must be a GraphOptions (or None), got {type(options).__name__}")
    return options


def _check_model(saved: str | None, now: str, what: str) -> None:
    if saved is not None and saved != now:
        raise InputError(
            f"the saved {what} belong to another model (hash {saved}, this one {now}); "
            "compute them again for this model"
        )


def _cache_bytes(cache_gb: float | None, runner: ModelRunner) -> float:
    """Bytes the jacobian basis may keep for the edges (``cache_gb`` None: half the free memory)."""
    if cache_gb is None:
        return float(free_memory_share(runner.device, AUTO_CACHE_SHARE))
    return cache_gb * 2**30


def _sweep(runner, batches, grams, rules, settings, given, show, cache_bytes, threshold,  # noqa: ANN001
           sections):  # fmt: skip
    """Stages 2 and 3: bases from the last node layer backwards, edges section by section.

    ``sections`` (:class:`_Sections`): the sections loaded to resume from (their bases and
    edges are taken as they are) and where each newly finished section is saved.
    """
    n = len(runner.node_layers)
    formula, edge_formula = settings["basis"], settings["edges"]
    center = settings["center"]
    out: list[InteractionBasis | None] = [None] * n
    edges: list[Tensor | None] = [None] * (n - 1)
    t_bases = t_edges = 0.0
    start = time.perf_counter()
    last = n - 1
    if given is not None:
        out = list(given.bases)
    elif settings["rotate_final"]:
        if grams.covariances[last] is None:
            raise InputError("the saved grams lack the last node layer (built without "
                             "rotate_final); compute the grams again")  # fmt: skip
        out[last] = final_pca_basis(grams.node_layers[last], grams.means[last],
                                    grams.covariances[last], threshold)  # fmt: skip
    else:
        out[last] = unrotated_basis(grams.node_layers[last], grams.settings["dims"][last],
                                    grams.means[last])  # fmt: skip
    t_bases += time.perf_counter() - start
    for i in reversed(range(n - 1)):
        start = time.perf_counter()
        plan = SectionPlan(i, rules[i], out[i + 1].C, settings["n_stochastic_sources"],
                           settings["n_stochastic_sources_hidden"], settings["seed"],
                           settings["split"] == "outputs")  # fmt: skip
        cache, n_pos = None, grams.counts[i]
        saved = sections.done.get(i)
        if saved is not None and given is None:
            out[i] = saved.basis
        elif given is None:
            p = _pca(grams, i, center, threshold)
            if formula in LIB_FORMULAS:
                keep = cache_bytes if edge_formula == "squared" else 0.0
                mom = lib_moments(runner, batches, plan, p, formula, cache_bytes=keep,
                                  progress=show)  # fmt: skip
                out[i] = lib_basis(grams.node_layers[i], p, mom.M, mom.lambda_dash, formula,
                                   threshold)  # fmt: skip
                cache, n_pos = mom.cache, mom.n_positions
            elif formula == "svd":
                out[i] = svd_basis(grams.node_layers[i], p)
            else:
                out[i] = neuron_basis(grams.node_layers[i], p)
        t_bases += time.perf_counter() - start
        start = time.perf_counter()
        if edge_formula is not None:
            if saved is not None and saved.edges is not None \
                    and saved.settings.get("edges") == edge_formula:  # fmt: skip
                edges[i] = saved.edges
            elif cache is not None:
                edges[i] = edges_from_cache(cache, out[i], n_pos)
            else:
                edges[i] = section_edges(runner, batches, plan, out[i], edge_formula,
                                         out[i + 1].dim, progress=show)  # fmt: skip
        t_edges += time.perf_counter() - start
        if saved is None or (edges[i] is not None and edges[i] is not saved.edges):
            sections.save(i, out[i], edges[i], settings)
    return out, [e for e in edges if e is not None], t_bases, t_edges


@dataclass(frozen=True)
class _Sections:
    """The section checkpoint of a build (None: none), the sections loaded from it and the
    model hash every saved section records."""

    store: SectionCheckpoint | None
    done: dict[int, SavedSection]
    model_hash: str

    def save(self, i: int, basis: InteractionBasis, edges: Tensor | None, settings: dict) -> None:
        """Save section ``i`` (node layer ``i``'s basis and the section's edges)."""
        if self.store is not None:
            digest = section_digest(basis, edges)
            self.store.save(SavedSection(i, basis.node_layer, basis, edges, settings,
                                         self.model_hash, digest))  # fmt: skip


def _resumed_sections(
    store: SectionCheckpoint | None,
    settings: dict,
    mhash: str,
    given: InteractionGraph | None,
    show: bool,
) -> dict[int, SavedSection]:
    """The finished sections to resume from, checked against the settings and the model
    (a mismatch is refused by name) and, with ``given`` bases, against those bases."""
    if store is None:
        return {}
    names = settings["node_layers"]
    done = store.finished(len(names) - 1)
    what = f"sections in {store.folder}"
    for i, section in sorted(done.items()):
        _check_resume(section.settings, settings, BASIS_KEYS, what)
        _check_model(section.model_hash, mhash, what)
        if given is not None and section_digest(section.basis, None) != section_digest(
            given.bases[i], None
        ):
            raise InputError(
                f"the saved {what} were built on other bases than the given ones (node layer "
                f"{names[i]}); resume with the bases they were built on or an empty folder"
            )
    if done and show:
        shown = ", ".join(f"{i} ({names[i]} -> {names[i + 1]})" for i in sorted(done))
        rank0_print(f"resuming from the finished sections {shown} in {store.folder}")
    return done


def _pca(grams: InteractionGrams, i: int, center: bool, threshold: float):  # noqa: ANN202
    return pca(grams.means[i], grams.covariances[i], center=center, threshold=threshold)
