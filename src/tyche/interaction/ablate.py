"""Ablations: keep the top directions of a basis, or the strongest edges, and measure.

* :func:`ablate_nodes`: at one node layer at a time, the activation ``[f, 1]`` is replaced by
  its projection ``[f, 1] C_n C+_n`` on the first ``n`` directions of the basis (LIB and PCA
  directions come sorted by importance, the constant direction first, so dropped directions
  are set to their mean; neuron bases are ordered by each neuron's second moment, the constant
  coordinate always kept). ``n`` counts in the layer's full folded width, so curves of bases
  that dropped different numbers of null directions line up.
* :func:`ablate_edges`: between node layers ``l`` and ``l + 1`` only the ``n`` strongest
  edges are kept: every feature of ``l + 1`` is recomputed from the features of ``l`` it keeps
  an edge to (the others zeroed), one section pass per distinct set of kept inputs. Edges out
  of the constant direction are always kept and not counted.

Both return :class:`AblationCurve` objects: accuracy and mean cross-entropy (nats) against
the number kept, on an ``exponential`` schedule (every count up to ``cutoff``, then
geometric steps of ``base``) or by ``bisect`` (the fewest kept with the score within
``tolerance`` of the unablated model, assuming the curve is monotone).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from tyche.distributed import all_reduce_sum, init_distributed, progress
from tyche.errors import InputError
from tyche.frameworks import as_module
from tyche.hooks import replace_activations
from tyche.interaction.fold import append_constant
from tyche.interaction.jacobian import feature_matrix
from tyche.interaction.options import AblationOptions
from tyche.interaction.result import InteractionGraph
from tyche.interaction.sections import (
    Batch,
    ModelRunner,
    make_batches,
    model_output,
    prepared_model,
    resolve_node_layers,
)
from tyche.io import ResultIO

__all__ = ["AblationCurve", "AblationOptions", "ablate_edges", "ablate_nodes", "schedule_points"]

IGNORE = -100


@dataclass(frozen=True)
class AblationCurve(ResultIO):
    """Accuracy and loss of the model with all but ``n_kept[i]`` directions (or edges) ablated.

    ``where``: the node layer, or ``"a -> b"`` for the edges between two node layers;
    ``n_total``: directions (folded width) or edges that could be kept; ``n_required``: with
    ``bisect``, the fewest kept whose accuracy is within ``tolerance`` of ``baseline_accuracy``
    (None on other schedules). Points are sorted by ``n_kept``.
    """

    UNITS: ClassVar[dict[str, str]] = {"loss": "nats (mean cross-entropy)", "accuracy": "fraction"}

    kind: str
    where: str
    basis: str
    schedule: str
    n_total: int
    n_kept: list[int]
    accuracy: list[float]
    loss: list[float]
    baseline_accuracy: float
    baseline_loss: float
    n_required: int | None = None
    settings: dict = field(default_factory=dict)

    def fewest_with_accuracy(self, target: float) -> int | None:
        """Fewest kept among the points whose accuracy reaches ``target`` (None if none)."""
        ok = [n for n, a in zip(self.n_kept, self.accuracy) if a >= target]
        return min(ok) if ok else None


def schedule_points(n_total: int, cutoff: int = 16, base: float = 1.25) -> list[int]:
    """Counts ``0..cutoff`` and then ``ceil(cutoff * base^k)`` up to ``n_total`` (included)."""
    if base <= 1:
        raise InputError(f"base must be > 1, got {base}")
    points = set(range(min(cutoff, n_total) + 1))
    x = float(max(cutoff, 1))
    while x < n_total:
        x *= base
        points.add(min(n_total, math.ceil(x)))
    points.add(n_total)
    return sorted(points)


# ----------------------------------------------------------------------------- scoring
def _labels(batch: Batch, labels: Tensor | None) -> Tensor:
    if labels is not None:
        return labels[batch.offset : batch.offset + batch.n]
    data = batch.data
    if isinstance(data, dict) and "input_ids" in data:  # next-token labels
        ids = data["input_ids"]
        out = torch.full_like(ids, IGNORE)
        out[:, :-1] = ids[:, 1:]
        mask = data.get("attention_mask")
        if mask is not None:
            keep = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
            out[:, :-1] = torch.where(keep, out[:, :-1], IGNORE)
        return out
    raise InputError(
        "labels are needed to score the model on these inputs: pass labels (N,) (or (N, T), "
        "-100 ignored), or token dicts with input_ids for next-token accuracy"
    )


def _score(logits: Tensor, labels: Tensor) -> tuple[float, float, float]:
    """(correct, summed cross-entropy, count) over the labelled positions."""
    labels = labels.to(logits.device)
    if logits.shape[:-1] != labels.shape:
        if logits.ndim == 3 and labels.ndim == 1:  # a label for the last position
            logits = logits[:, -1]
        else:
            raise InputError(
                f"logits {tuple(logits.shape)} do not fit labels {tuple(labels.shape)}"
            )
    flat, lab = logits.reshape(-1, logits.shape[-1]).double(), labels.reshape(-1)
    keep = lab != IGNORE
    flat, lab = flat[keep], lab[keep]
    ce = nn.functional.cross_entropy(flat, lab, reduction="sum")
    return float((flat.argmax(-1) == lab).sum()), float(ce), float(lab.numel())


def _evaluate(runner: ModelRunner, batches: list[Batch], labels: Tensor | None,
              logits_of: Callable[[Batch], Tensor]) -> tuple[float, float]:  # fmt: skip
    totals = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for batch in batches:
            totals += torch.tensor(_score(logits_of(batch), _labels(batch, labels)))
    totals = all_reduce_sum(totals)
    if totals[2] == 0:
        raise InputError("no labelled positions to score")
    return float(totals[0] / totals[2]), float(totals[1] / totals[2])


Scores = dict[int, tuple[float, float]]


def _search(n_total: int, schedule: str, cutoff: int, base: float, tolerance: float,
            baseline: float, score: Callable[[int], tuple[float, float]],
            show: bool, desc: str,
            points: Sequence[int] = ()) -> tuple[Scores, int | None]:  # fmt: skip
    results: dict[int, tuple[float, float]] = {}
    if schedule in ("exponential", "thresholds"):
        todo = schedule_points(n_total, cutoff, base) if schedule == "exponential" else points
        for n in progress(sorted(set(todo)), desc=desc, disable=not show, leave=False):
            results[n] = score(n)
        return results, None
    if schedule != "bisect":
        raise InputError(
            f"unknown schedule {schedule!r}; choose 'exponential', 'bisect' or 'thresholds'"
        )
    lo, hi = 0, n_total  # invariant: hi passes (the unablated model does), lo - 1 ... fails
    results[0] = score(0)
    if results[0][0] >= baseline - tolerance:
        return results, 0
    lo = 1
    while lo < hi:
        mid = (lo + hi) // 2
        results[mid] = score(mid)
        if results[mid][0] >= baseline - tolerance:
            hi = mid
        else:
            lo = mid + 1
    return results, hi


def _curve(kind: str, where: str, graph: InteractionGraph, schedule: str, n_total: int,
           results: dict, baseline: tuple[float, float], required: int | None,
           settings: dict) -> AblationCurve:  # fmt: skip
    ns = sorted(results)
    return AblationCurve(kind, where, graph.settings.get("basis", "?"), schedule, n_total, ns,
                         [results[n][0] for n in ns], [results[n][1] for n in ns], baseline[0],
                         baseline[1], required, settings)  # fmt: skip


def _options(options: AblationOptions | None) -> AblationOptions:
    if options is None:
        return AblationOptions()
    if not isinstance(options, AblationOptions):
        raise InputError(
            f"options must be an AblationOptions (or None), got {type(options).__name__}"
        )
    return options


def _check_graph(model: nn.Module, graph: InteractionGraph) -> None:
    from tyche.io import model_hash

    if graph.model_hash is not None and graph.model_hash != model_hash(model):
        raise InputError(
            f"the graph was built on another model (hash {graph.model_hash}, this one "
            f"{model_hash(model)}); ablate on the model it was built on"
        )


# ----------------------------------------------------------------------------- nodes
def _node_projector(graph: InteractionGraph, index: int, n: int) -> Callable[[Tensor], Tensor]:
    """``f (..., d) -> f`` with all but the first ``n`` directions of the basis ablated."""
    basis = graph.bases[index]
    C, C_pinv = basis.C, basis.C_pinv
    if basis.formula == "neuron":
        order = torch.argsort(_neuron_importance(basis), descending=True, stable=True)
        d = C.shape[0] - 1
        order = torch.cat([torch.tensor([d]), order[order != d]])  # the constant first, free
        keep = order[: max(n, 1)]
        P = torch.zeros_like(C)
        P[keep, keep] = 1.0
    else:
        k = min(n, C.shape[1])
        P = C[:, :k] @ C_pinv[:k]
    folded, mean = basis.folded, basis.mean

    def project(f: Tensor) -> Tensor:
        if folded:
            return (append_constant(f.double()) @ P.to(f.device))[..., :-1].to(f.dtype)
        centred = f.double() - mean.to(f.device)  # the last layer's rotation: around the mean
        return (centred @ P.to(f.device) + mean.to(f.device)).to(f.dtype)

    return project


def _neuron_importance(basis: Any) -> Tensor:
    """Second moment of each folded coordinate, ``diag(W D W^T)``."""
    return (basis.W**2 * basis.eigenvalues).sum(1)


def ablate_nodes(
    model: nn.Module,
    graph: InteractionGraph,
    inputs: Any,
    labels: Tensor | None = None,
    options: AblationOptions | None = None,
    *,
    layers: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, AblationCurve]:
    """Accuracy and loss against the number of kept directions, one node layer at a time.

    ``layers``: node layers to ablate (default: every one with a basis). ``labels``: ``(N,)``
    (or ``(N, T)``) class labels for tensor inputs; token dicts are scored on next tokens.
    ``options`` (:class:`~tyche.interaction.options.AblationOptions`): the schedule (default
    ``exponential``), its ``cutoff`` and ``base``, the ``tolerance`` (default 0.01), the batch
    size and the dtype the model runs in.
    """
    model = as_module(model)
    o = _options(options)
    schedule, tolerance = o.schedule_for("exponential"), o.tolerance_for(0.01)
    init_distributed()
    _check_graph(model, graph)
    names = list(layers) if layers is not None else [
        b.node_layer for b in graph.bases if b.C is not None and b.node_layer != "output"
    ]  # fmt: skip
    unknown = [n for n in names if n not in graph.node_layers]
    if unknown:
        raise InputError(f"layers {unknown} are not node layers of the graph: {graph.node_layers}")
    resolved = resolve_node_layers(model, graph.node_layers)
    curves = {}
    with prepared_model(model, o.dtype) as m:
        runner = ModelRunner(m, resolved, o.dtype)
        batches = make_batches(inputs, o.batch_size)
        baseline = _evaluate(runner, batches, labels, lambda b: model_output(runner.call(b)))
        for name in names:
            index = graph.node_layers.index(name)
            basis = graph.bases[index]
            if basis.C is None:
                raise InputError(f"node layer {name!r} has no basis (unrotated final layer)")
            site = resolved[index].site

            def score(n: int, index=index, site=site) -> tuple[float, float]:
                project = _node_projector(graph, index, n)

                def logits_of(batch: Batch) -> Tensor:
                    with replace_activations(m, {site: project}):
                        return model_output(runner.call(batch))

                return _evaluate(runner, batches, labels, logits_of)

            results, required = _search(basis.orig_dim, schedule, o.cutoff, o.base, tolerance,
                                        baseline[0], score, progress, f"nodes {name}")  # fmt: skip
            settings = {"cutoff": o.cutoff, "base": o.base, "tolerance": tolerance}
            curves[name] = _curve("nodes", name, graph, schedule, basis.orig_dim, results,
                                  baseline, required, settings)  # fmt: skip
    return curves


# ----------------------------------------------------------------------------- edges
def _edge_masks(E: Tensor, n: int, constant: bool) -> Tensor:
    """``(K, k)`` bool: the ``n`` largest ``|E|`` (ties broken by index), constant column kept."""
    weights = E.abs().clone()
    if constant:
        weights[:, 0] = -1.0  # not counted
    order = torch.argsort(weights.flatten(), descending=True, stable=True)
    mask = torch.zeros(E.numel(), dtype=torch.bool)
    mask[order[:n]] = True
    mask = mask.view(E.shape)
    if constant:
        mask[:, 0] = True
    return mask


def _edge_logits(runner: ModelRunner, graph: InteractionGraph, index: int, mask: Tensor,
                 batch: Batch, group_chunk: int) -> Tensor:  # fmt: skip
    """Logits with section ``index`` rebuilt from the kept edges only."""
    b_in, b_out = graph.bases[index], graph.bases[index + 1]
    h, shape = runner.capture(batch, index)
    f_hat = h.double() @ b_in.C
    feats = feature_matrix(b_out.C, b_out.width)
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(mask.tolist()):
        groups.setdefault(tuple(row), []).append(i)
    fn = runner.section_fn(batch, index, shape)
    out = None
    keys = list(groups)
    for start in range(0, len(keys), group_chunk):
        chunk = keys[start : start + group_chunk]
        masks = torch.tensor(chunk, dtype=f_hat.dtype)  # (g, k)
        x = (f_hat.unsqueeze(0) * masks[:, None, None, :]) @ b_in.C_pinv  # (g, B, P, d + 1)
        x = x.to(h.dtype)
        ys = [fn(xi[..., :-1], xi[..., -1]) for xi in x]
        for key, y in zip(chunk, ys):
            f_out = y.double() @ feats.to(y.device)
            if out is None:
                out = torch.zeros_like(f_out)
            rows = groups[key]
            out[..., rows] = f_out[..., rows]
    return _finish_from(runner, graph, index + 1, out, batch)


def _finish_from(runner: ModelRunner, graph: InteractionGraph, index: int, f_hat: Tensor,
                 batch: Batch) -> Tensor:  # fmt: skip
    """Logits of the model with node layer ``index`` set from its features ``f_hat``."""
    basis = graph.bases[index]
    if basis.C is None:
        acts = f_hat
    elif basis.folded:
        acts = (f_hat @ basis.C_pinv)[..., :-1]
    else:  # the last layer's rotation, around its mean
        V, mean = basis.C, basis.mean.to(f_hat)
        acts = f_hat @ V.T + mean - (mean @ V) @ V.T
    layer = runner.node_layers[index]
    if layer.site is None:
        return acts.squeeze(1) if acts.shape[1] == 1 else acts

    def put(t: Tensor) -> Tensor:
        return acts.to(t.dtype).reshape(t.shape)

    with replace_activations(runner.model, {layer.site: put}):
        return model_output(runner.call(batch))


def ablate_edges(
    model: nn.Module,
    graph: InteractionGraph,
    inputs: Any,
    labels: Tensor | None = None,
    options: AblationOptions | None = None,
    *,
    sections: Sequence[int] | None = None,
    progress: bool = True,
) -> dict[str, AblationCurve]:
    """Accuracy and loss against the number of kept edges, one section at a time.

    ``sections``: indices ``i`` of the edge matrices (default: all). ``options``
    (:class:`~tyche.interaction.options.AblationOptions`): the schedule, ``bisect`` by
    default (the fewest edges within ``tolerance``, default 0.001, of the unablated
    accuracy), ``exponential``, or ``thresholds`` (keep the edges at or above each fraction
    of the section's largest edge), the batch size, the dtype the model runs in and
    ``group_chunk``. Needs a graph with edges.
    """
    model = as_module(model)
    o = _options(options)
    schedule, tolerance = o.schedule_for("bisect"), o.tolerance_for(0.001)
    init_distributed()
    _check_graph(model, graph)
    if not graph.has_edges:
        raise InputError("the graph has no edges; build it with edges='squared' or 'functional'")
    resolved = resolve_node_layers(model, graph.node_layers)
    indices = list(sections) if sections is not None else list(range(len(graph.edges)))
    curves = {}
    with prepared_model(model, o.dtype) as m:
        runner = ModelRunner(m, resolved, o.dtype)
        batches = make_batches(inputs, o.batch_size)
        baseline = _evaluate(runner, batches, labels, lambda b: model_output(runner.call(b)))
        for index in indices:
            E = graph.edges[index]
            constant = graph.bases[index].center
            n_total = E.numel() - (E.shape[0] if constant else 0)
            where = f"{graph.node_layers[index]} -> {graph.node_layers[index + 1]}"

            def score(n: int, index=index, E=E, constant=constant) -> tuple[float, float]:
                mask = _edge_masks(E, n, constant)
                return _evaluate(runner, batches, labels, lambda b: _edge_logits(
                    runner, graph, index, mask, b, o.group_chunk))  # fmt: skip

            counted = E[:, 1:] if constant else E
            points = [int((counted.abs() >= t * counted.abs().max()).sum())
                      for t in o.thresholds]  # fmt: skip
            results, required = _search(n_total, schedule, o.cutoff, o.base, tolerance,
                                        baseline[0], score, progress, f"edges {where}",
                                        points)  # fmt: skip
            settings = {"cutoff": o.cutoff, "base": o.base, "tolerance": tolerance,
                        "constant_edges_kept": constant,
                        "thresholds": list(o.thresholds)}  # fmt: skip
            curves[where] = _curve("edges", where, graph, schedule, n_total, results, baseline,
                                   required, settings)  # fmt: skip
    return curves
