"""Tyche: measure and map the inside of trained networks.

Four methods (the registry, :mod:`tyche.methods`, lists them) share one set of pieces
(sites and hooks, data, divergence, ablation, distributed helpers, result I/O):

- ``tyche.basin``: basin volume, the log-probability that a random parameter vector keeps
  the model's behaviour within a KL cutoff.
- ``tyche.codebook``: codebook features, sparse discrete bottlenecks to train, search, steer.
- ``tyche.interaction``: the local interaction basis, the relevant directions of each layer
  and the graph of their interactions across layers.
- ``tyche.causal``: causal bases, directions whose ablation changes the output most.

Two faces sit on top: ``tyche.cli`` (the ``tyche`` command) and ``tyche.zoo`` (real models and
data that work offline, ``zoo:NAME``).

Heavy submodules (transformers, matplotlib) are imported lazily on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tyche._lazy import lazy_exports
from tyche._version import __version__

#: public name -> module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    "VolumeConfig": "tyche.basin.config",
    "VolumeEstimator": "tyche.basin.estimator",
    "VolumeResult": "tyche.basin.result",
    "BasinOptions": "tyche.basin.options",
    "estimate_basin": "tyche.basin.core",
    "model_loss": "tyche.basin.loss",
    "remove_subspace": "tyche.ablation",
    "extract_causal_basis": "tyche.causal.extraction",
    "extract_causal_bases": "tyche.causal.extraction",
    "CausalOptions": "tyche.causal.options",
    "CausalBasis": "tyche.causal.result",
    "LogitLens": "tyche.causal.lenses",
    "TunedLens": "tyche.causal.lenses",
    "ModelFromSite": "tyche.causal.lenses",
    "train_tuned_lens": "tyche.causal.train_lens",
    "CodebookModel": "tyche.codebook.model",
    "build_interaction_graph": "tyche.interaction.graph",
    "InteractionGraph": "tyche.interaction.result",
    "InteractionBasis": "tyche.interaction.basis",
    "ablate_nodes": "tyche.interaction.ablate",
    "ablate_edges": "tyche.interaction.ablate",
    "GraphOptions": "tyche.interaction.options",
    "AblationOptions": "tyche.interaction.options",
    "InputError": "tyche.errors",
    "chunk_and_tokenize": "tyche.data",
    "iter_batches": "tyche.data",
    "masked_kl": "tyche.divergence",
    "AnchorCache": "tyche.divergence",
    "save_result": "tyche.io",
    "load_result": "tyche.io",
    "model_hash": "tyche.io",
    "ResultIO": "tyche.io",
    "Site": "tyche.sites",
    "resolve_sites": "tyche.sites",
    "read_activations": "tyche.hooks",
    "replace_activations": "tyche.hooks",
    "n_layers": "tyche.sites",
    "blocks": "tyche.sites",
    "final_norm": "tyche.sites",
    "unembedding": "tyche.sites",
    "embedding": "tyche.sites",
}

__all__ = sorted(_LAZY) + ["__version__"]

if TYPE_CHECKING:  # lazy names, for IDEs and type checkers
    from tyche.ablation import remove_subspace
    from tyche.basin.config import VolumeConfig
    from tyche.basin.core import estimate_basin
    from tyche.basin.estimator import VolumeEstimator
    from tyche.basin.loss import model_loss
    from tyche.basin.options import BasinOptions
    from tyche.basin.result import VolumeResult
    from tyche.causal.extraction import extract_causal_bases, extract_causal_basis
    from tyche.causal.lenses import LogitLens, ModelFromSite, TunedLens
    from tyche.causal.options import CausalOptions
    from tyche.causal.result import CausalBasis
    from tyche.causal.train_lens import train_tuned_lens
    from tyche.codebook.model import CodebookModel
    from tyche.data import chunk_and_tokenize, iter_batches
    from tyche.divergence import AnchorCache, masked_kl
    from tyche.errors import InputError
    from tyche.hooks import read_activations, replace_activations
    from tyche.interaction.ablate import ablate_edges, ablate_nodes
    from tyche.interaction.basis import InteractionBasis
    from tyche.interaction.graph import build_interaction_graph
    from tyche.interaction.options import AblationOptions, GraphOptions
    from tyche.interaction.result import InteractionGraph
    from tyche.io import ResultIO, load_result, model_hash, save_result
    from tyche.sites import (
        Site,
        blocks,
        embedding,
        final_norm,
        n_layers,
        resolve_sites,
        unembedding,
    )

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
