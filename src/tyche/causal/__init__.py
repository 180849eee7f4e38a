"""Causal basis extraction: the directions of a site whose ablation changes the output most.

``extract_causal_basis(target, hiddens, k)`` works on tensors (any ``h -> logits`` target);
``extract_causal_bases(model, tokens, k, sites="resid_pre.*")`` does every site of a model.
Both take their search settings as one :class:`CausalOptions`; the second checkpoints every
finished site and direction in a :class:`BasisCheckpoint` and resumes from it.
Targets: :class:`LogitLens`, :class:`TunedLens` (train with :func:`train_tuned_lens`) and
:class:`ModelFromSite` (the rest of the real model). Results are :class:`CausalBasis`;
:mod:`tyche.causal.report` gives their tables and summary, :mod:`tyche.causal.plot` their
figure.
Names are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tyche._lazy import lazy_exports

__all__ = [
    "AblationObjective",
    "BasisCheckpoint",
    "CausalBasis",
    "CausalOptions",
    "FeatureOptions",
    "LatentEnergies",
    "LogitLens",
    "ModelFromSite",
    "TunedLens",
    "bases_summary",
    "energy_table",
    "extract_causal_basis",
    "extract_causal_bases",
    "feature_energies",
    "joint_table",
    "latent_energies",
    "pca_directions",
    "plot_energies",
    "train_tuned_lens",
]

if TYPE_CHECKING:  # lazy names, for IDEs and type checkers
    from tyche.causal.checkpoint import BasisCheckpoint
    from tyche.causal.extraction import extract_causal_bases, extract_causal_basis, pca_directions
    from tyche.causal.features import (
        FeatureOptions,
        LatentEnergies,
        feature_energies,
        latent_energies,
    )
    from tyche.causal.lenses import LogitLens, ModelFromSite, TunedLens
    from tyche.causal.objective import AblationObjective
    from tyche.causal.options import CausalOptions
    from tyche.causal.plot import plot_energies
    from tyche.causal.report import bases_summary, energy_table, joint_table
    from tyche.causal.result import CausalBasis
    from tyche.causal.train_lens import train_tuned_lens

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "AblationObjective": "tyche.causal.objective",
        "BasisCheckpoint": "tyche.causal.checkpoint",
        "CausalBasis": "tyche.causal.result",
        "CausalOptions": "tyche.causal.options",
        "FeatureOptions": "tyche.causal.features",
        "LatentEnergies": "tyche.causal.features",
        "feature_energies": "tyche.causal.features",
        "latent_energies": "tyche.causal.features",
        "LogitLens": "tyche.causal.lenses",
        "ModelFromSite": "tyche.causal.lenses",
        "TunedLens": "tyche.causal.lenses",
        "extract_causal_basis": "tyche.causal.extraction",
        "extract_causal_bases": "tyche.causal.extraction",
        "pca_directions": "tyche.causal.extraction",
        "train_tuned_lens": "tyche.causal.train_lens",
        "plot_energies": "tyche.causal.plot",
        "bases_summary": "tyche.causal.report",
        "energy_table": "tyche.causal.report",
        "joint_table": "tyche.causal.report",
    },
)
