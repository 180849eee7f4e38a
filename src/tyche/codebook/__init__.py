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
- :func:`topic_codes` finds the codes active throughout a set of documents (rows) and rarely
  elsewhere, :func:`topic_interventions` forces several of them in one codebook's weakest slots;
- :mod:`tyche.codebook.tokfsm` is the paper's finite-state-machine task and its metrics;
- :mod:`tyche.codebook.report` formats what the command prints, :mod:`tyche.codebook.plot`
  draws the training curves (:func:`plot_training`) and code usage.

Submodules load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tyche._lazy import lazy_exports

_LAZY: dict[str, str] = {
    "CodebookLayer": "tyche.codebook.layer",
    "GroupedCodebookLayer": "tyche.codebook.layer",
    "kmeans": "tyche.codebook.kmeans",
    "init_from_dictionary": "tyche.codebook.dictionary_init",
    "CodebookModel": "tyche.codebook.model",
    "attach": "tyche.codebook.model",
    "TrainConfig": "tyche.codebook.options",
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
    "TopicResult": "tyche.codebook.topics",
    "topic_codes": "tyche.codebook.topics",
    "topic_interventions": "tyche.codebook.topics",
    "topic_steering": "tyche.codebook.steering",
    "plot_code_usage": "tyche.codebook.plot",
    "plot_training": "tyche.codebook.plot",
    "contexts_text": "tyche.codebook.report",
    "forcing_text": "tyche.codebook.report",
    "purity_table": "tyche.codebook.report",
    "steering_line": "tyche.codebook.report",
    "tokfsm_accuracy_text": "tyche.codebook.report",
    "training_line": "tyche.codebook.report",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # lazy names, for IDEs and type checkers
    from tyche.codebook.cache import CodeCache, build_cache, load_cache
    from tyche.codebook.code_search import SearchResult, code_contexts, search
    from tyche.codebook.dictionary_init import init_from_dictionary
    from tyche.codebook.interventions import Intervention, generate, intervene, next_token_jsd
    from tyche.codebook.kmeans import kmeans
    from tyche.codebook.layer import CodebookLayer, GroupedCodebookLayer
    from tyche.codebook.model import CodebookModel, attach
    from tyche.codebook.options import TrainConfig
    from tyche.codebook.plot import plot_code_usage, plot_training
    from tyche.codebook.report import (
        contexts_text,
        forcing_text,
        purity_table,
        steering_line,
        tokfsm_accuracy_text,
        training_line,
    )
    from tyche.codebook.steering import state_forcing, topic_steering
    from tyche.codebook.tokfsm import FSM
    from tyche.codebook.topics import TopicResult, topic_codes, topic_interventions
    from tyche.codebook.train import (
        TrainResult,
        evaluate_lm,
        row_sampler,
        train_codebooks,
    )

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
