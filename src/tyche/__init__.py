"""Tyche: measure and map the inside of trained networks.

Four methods share one set of pieces (sites and hooks, data, divergence, ablation,
distributed helpers, result I/O):

- ``tyche.basin``: basin volume, the log-probability that a random parameter vector keeps
  the model's behaviour within a KL cutoff.
- ``tyche.causal``: causal bases, directions whose ablation changes the output most.
- ``tyche.codebook``: codebook features, sparse discrete bottlenecks to train, search, steer.
- ``tyche.zoo``: real models and data that work offline (``zoo:NAME``).

Heavy submodules (transformers, matplotlib) are imported lazily on first use.
"""

from __future__ import annotations

from tyche._lazy import lazy_exports
from tyche._version import __version__

#: public name -> module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    "VolumeConfig": "tyche.basin.config",
    "VolumeEstimator": "tyche.basin.estimator",
    "VolumeResult": "tyche.basin.result",
    "estimate_basin": "tyche.basin.core",
    "model_loss": "tyche.basin.loss",
    "remove_subspace": "tyche.ablation",
    "extract_causal_basis": "tyche.causal.extraction",
    "extract_causal_bases": "tyche.causal.extraction",
    "CausalBasis": "tyche.causal.result",
    "LogitLens": "tyche.causal.lenses",
    "TunedLens": "tyche.causal.lenses",
    "ModelFromSite": "tyche.causal.lenses",
    "train_tuned_lens": "tyche.causal.train_lens",
    "CodebookModel": "tyche.codebook.model",
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

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
