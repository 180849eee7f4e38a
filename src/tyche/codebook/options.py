"""The settings of a codebook training run (:class:`TrainConfig`), checked as they are made.

Torch-free, so a command line can build its flags from them before torch is imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from tyche.errors import InputError

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of a codebook training run."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    #: learning rate of the codebooks (None: ``lr``)
    code_lr: float | None = None
    weight_decay: float = 0.01
    warmup_steps: int = 50
    schedule: Literal["cosine", "constant"] = "cosine"
    #: the cosine schedule decays to ``min_lr_ratio`` × the peak
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    freeze_base: bool = False
    #: steps at the start with the codebooks passing their inputs through (a warm start of
    #: the model); the codebooks snap from this step on (after k-means, with ``kmeans_init``)
    snap_after: int = 0
    #: with ``snap_after``: the schedule restarts at the snap (a warm restart: a new linear
    #: warm-up of ``warmup_steps`` to this multiple of the peak learning rates, then the
    #: schedule over the remaining steps), instead of running on, which would leave the
    #: snapped model little learning rate to adapt with (None: the schedule runs through)
    snap_lr_factor: float | None = None
    kmeans_init: bool = False
    kmeans_tokens: int = 16384
    #: with ``kmeans_init``, fit each codebook's layer-norm affine so that codes output
    #: vectors of their inputs' scale (a snapped model then starts close to the unsnapped one;
    #: for a warm start from scratch; heavy-tailed activations of pretrained models suit
    #: ``restore_scale`` codebooks better)
    kmeans_calibrate: bool = False
    #: replace codes unused for this many steps (0: never)
    replace_dead_every: int = 0
    replace_rho: float = 1e-2
    log_every: int = 50
    checkpoint_every: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "log_every", "kmeans_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "replace_dead_every", "checkpoint_every", "snap_after"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "code_lr"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise InputError(f"{name} must be a positive number, got {value}")
        if self.schedule not in ("cosine", "constant"):
            raise InputError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        factor = self.snap_lr_factor
        if factor is not None and not (math.isfinite(factor) and factor > 0):
            raise InputError(f"snap_lr_factor must be a positive number, got {factor}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise InputError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak learning rates at ``step`` (linear warm-up, then schedule;
        with ``snap_lr_factor``, the same again from the snap on, scaled by that factor)."""
        if self.snap_lr_factor is not None and 0 < self.snap_after <= step:
            after = step - self.snap_after
            return self.snap_lr_factor * self._shape(after, self.steps - self.snap_after)
        return self._shape(step, self.steps)

    def _shape(self, step: int, steps: int) -> float:
        """Warm-up then schedule, for ``step`` of a run of ``steps`` steps."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        frac = min((step - self.warmup_steps) / max(1, steps - self.warmup_steps), 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
