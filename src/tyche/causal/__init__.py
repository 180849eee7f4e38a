"""Causal basis extraction: the directions of a site whose ablation changes the output most.

``extract_causal_basis(target, hiddens, k)`` works on tensors (any ``h -> logits`` target);
``extract_causal_bases(model, tokens, k, sites="resid_pre.*")`` does every site of a model.
Targets: :class:`LogitLens`, :class:`TunedLens` (train with :func:`train_tuned_lens`) and
:class:`ModelFromSite` (the rest of the real model). Results are :class:`CausalBasis`.
"""

from __future__ import annotations

from tyche.causal.extraction import extract_causal_bases, extract_causal_basis, pca_directions
from tyche.causal.lenses import LogitLens, ModelFromSite, TunedLens
from tyche.causal.objective import AblationObjective
from tyche.causal.result import CausalBasis
from tyche.causal.train_lens import train_tuned_lens

__all__ = [
    "AblationObjective",
    "CausalBasis",
    "LogitLens",
    "ModelFromSite",
    "TunedLens",
    "extract_causal_basis",
    "extract_causal_bases",
    "pca_directions",
    "train_tuned_lens",
]
