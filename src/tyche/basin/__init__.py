"""Basin volume: the log-probability that a random parameter vector keeps a model's behaviour.

``estimate_basin`` is the generic estimator on a flat parameter vector and a batched loss;
``model_loss`` builds that loss for any module whose output is logits; ``VolumeConfig`` and
``VolumeEstimator`` are the seed-compatible interface for HuggingFace causal LMs.
"""

from tyche.basin.config import VolumeConfig
from tyche.basin.core import estimate_basin
from tyche.basin.estimator import VolumeEstimator
from tyche.basin.model_loss import ModelLoss, model_loss
from tyche.basin.result import VolumeResult

__all__ = [
    "ModelLoss",
    "VolumeConfig",
    "VolumeEstimator",
    "VolumeResult",
    "estimate_basin",
    "model_loss",
]
