"""Basin volume: the log-probability that a random parameter vector keeps a model's behaviour.

``estimate_basin`` is the generic estimator on a flat parameter vector and a batched loss,
its settings one ``BasinOptions`` (one cutoff, or a ``BasinCurve`` over several, from which
``learning_coefficient`` fits λ);
``model_loss`` builds that loss for any module whose output is logits; ``VolumeConfig`` and
``VolumeEstimator`` are the seed-compatible interface for HuggingFace causal LMs;
:mod:`tyche.basin.report` builds the results table and summary rows, :mod:`tyche.basin.plot`
the figures. Names are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tyche._lazy import lazy_exports

__all__ = [
    "BasinCurve",
    "BasinOptions",
    "LearningCoefficient",
    "ModelLoss",
    "VolumeConfig",
    "VolumeEstimator",
    "VolumeResult",
    "estimate_basin",
    "learning_coefficient",
    "model_loss",
    "plot_cutoff_scan",
    "plot_histogram",
    "results_table",
    "summary_rows",
]

if TYPE_CHECKING:  # lazy names, for IDEs and type checkers
    from tyche.basin.config import VolumeConfig
    from tyche.basin.core import estimate_basin
    from tyche.basin.curve import BasinCurve
    from tyche.basin.estimator import VolumeEstimator
    from tyche.basin.lambda_fit import LearningCoefficient, learning_coefficient
    from tyche.basin.loss import ModelLoss, model_loss
    from tyche.basin.options import BasinOptions
    from tyche.basin.plot import plot_cutoff_scan, plot_histogram
    from tyche.basin.report import results_table, summary_rows
    from tyche.basin.result import VolumeResult

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "BasinCurve": "tyche.basin.curve",
        "BasinOptions": "tyche.basin.options",
        "LearningCoefficient": "tyche.basin.lambda_fit",
        "ModelLoss": "tyche.basin.loss",
        "VolumeConfig": "tyche.basin.config",
        "VolumeEstimator": "tyche.basin.estimator",
        "VolumeResult": "tyche.basin.result",
        "estimate_basin": "tyche.basin.core",
        "learning_coefficient": "tyche.basin.lambda_fit",
        "model_loss": "tyche.basin.loss",
        "plot_cutoff_scan": "tyche.basin.plot",
        "plot_histogram": "tyche.basin.plot",
        "results_table": "tyche.basin.report",
        "summary_rows": "tyche.basin.report",
    },
)
