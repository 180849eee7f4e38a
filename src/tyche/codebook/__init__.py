"""Codebook features: sparse, discrete bottlenecks inside any transformer.

- :func:`attach` puts codebooks (:class:`CodebookLayer`, :class:`GroupedCodebookLayer` per
  attention head) at sites of a model and returns a :class:`CodebookModel`
  (``save_pretrained`` / ``from_pretrained``);
- :func:`train_codebooks` trains them (and the model, unless frozen);
- :func:`build_cache` / :func:`load_cache` store every token's code ids, :func:`search`
  ranks codes for a regex against the best neuron, :func:`code_contexts` shows where a code
  fires;
- :func:`intervene` forces, replaces, appends or blocks codes; :func:`generate` samples under
  interventions;
- :mod:`tyche.codebook.tokfsm` is the paper's finite-state-machine task and its metrics.

Submodules load on first use.
"""

from __future__ import annotations

from tyche._lazy import lazy_exports

_LAZY: dict[str, str] = {
    "CodebookLayer": "tyche.codebook.layer",
    "GroupedCodebookLayer": "tyche.codebook.layer",
    "kmeans": "tyche.codebook.layer",
    "CodebookModel": "tyche.codebook.model",
    "attach": "tyche.codebook.model",
    "TrainConfig": "tyche.codebook.train",
    "TrainResult": "tyche.codebook.train",
    "train_codebooks": "tyche.codebook.train",
    "evaluate_lm": "tyche.codebook.train",
    "row_sampler": "tyche.codebook.train",
    "CodeCache": "tyche.codebook.cache",
    "build_cache": "tyche.codebook.cache",
    "load_cache": "tyche.codebook.cache",
    "search": "tyche.codebook.code_search",
    "code_contexts": "tyche.codebook.code_search",
    "SearchResult": "tyche.codebook.code_search",
    "Intervention": "tyche.codebook.interventions",
    "intervene": "tyche.codebook.interventions",
    "generate": "tyche.codebook.interventions",
    "next_token_jsd": "tyche.codebook.interventions",
    "FSM": "tyche.codebook.tokfsm",
    "state_forcing": "tyche.codebook.steering",
    "topic_codes": "tyche.codebook.steering",
    "topic_steering": "tyche.codebook.steering",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
