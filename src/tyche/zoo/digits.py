"""``zoo:digits-mlp``: the one-hidden-layer MLP on sklearn's digits from the basin paper.

Recipe (EleutherAI basin-volume, ``jax-hybrid`` branch, ``MLPTrainConfig(train_size=1024,
opt="adam", lr=0.05, l2_reg=5e-4)``): the 1,797 8x8 digits with pixels divided by 16, a
seeded permutation giving 1,024 training and 773 test examples; ``Linear(64, 64) -> GELU
(tanh form, as flax's default) -> Linear(64, 10)`` with every weight and bias drawn from
N(0, 1/fan_in), so D = 4,810 parameters; 25 epochs of batch 64 (400 steps) of Adam with a
cosine decay of the learning rate from 0.05 to 0 and no decoupled weight decay; the loss is
the mean cross-entropy plus ``l2_reg / 2 * |theta|^2``. That L2 term is a Gaussian prior
with sigma = 1 / sqrt(l2_reg * N) = 1.3975 on the per-example loss scale, which the basin
estimator uses. Training takes seconds (times and load: BENCHMARKS.md, Zoo) and repeats
exactly on the same CPU (seeded init, split and shuffles, float32).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tyche.errors import InputError
from tyche.optim_state import (
    OptimizerState,
    adam_state_by_name,
    load_optimizer_state,
    save_optimizer_state,
)
from tyche.zoo.entry import METRICS_FILE, ZooEntry, ZooError, atomic_folder, write_json


@dataclass(frozen=True)
class DigitsMLPConfig:
    """Settings of the digits MLP training (defaults: the basin paper's recipe)."""

    seed: int = 0
    train_size: int = 1024
    hidden: int = 64
    epochs: int = 25
    batch_size: int = 64
    lr: float = 0.05
    l2_reg: float = 5e-4

    @property
    def steps(self) -> int:
        """Optimizer steps: ``epochs * (train_size // batch_size)`` (last partial batch dropped)."""
        return self.epochs * (self.train_size // self.batch_size)

    @property
    def prior_sigma(self) -> float:
        """Std of the Gaussian prior equivalent to the L2 term: ``1 / sqrt(l2_reg * N)``."""
        return 1.0 / math.sqrt(self.l2_reg * self.train_size)


@dataclass(frozen=True)
class DigitsMLP:
    """The trained digits MLP with its data split and Adam state.

    Shapes: ``x_train`` (1024, 64) float32 in [0, 1], ``y_train`` (1024,) int64,
    ``x_test`` (773, 64), ``y_test`` (773,). ``optimizer_state`` maps each parameter name
    (``"0.weight"``, ``"0.bias"``, ``"2.weight"``, ``"2.bias"``) to raw (not bias-corrected)
    ``{"exp_avg", "exp_avg_sq"}`` after ``adam_steps`` steps with ``adam_betas``.
    ``l2_reg`` multiplies ``|theta|^2 / 2`` in the mean per-example loss; ``prior_sigma`` is
    ``1 / sqrt(l2_reg * n_train)``.
    """

    model: nn.Sequential
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    optimizer_state: OptimizerState
    l2_reg: float
    prior_sigma: float
    train_accuracy: float
    test_accuracy: float
    adam_steps: int = 0
    adam_betas: tuple[float, float] = (0.9, 0.999)

    @property
    def n_params(self) -> int:
        """D, the number of parameters (4,810 for the default recipe)."""
        return sum(p.numel() for p in self.model.parameters())


def digits_split(seed: int = 0, train_size: int = 1024) -> tuple[torch.Tensor, ...]:
    """``(x_train, y_train, x_test, y_test)``: sklearn digits / 16, seeded random split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - sklearn is in tyche[zoo]
        raise ZooError("zoo:digits-mlp needs scikit-learn: pip install 'tyche[zoo]'") from err
    x_np, y_np = load_digits(return_X_y=True)
    if not 0 < train_size < len(x_np):
        raise InputError(f"train_size must be in 1..{len(x_np) - 1}, got {train_size}")
    x = torch.tensor(x_np, dtype=torch.float32) / 16.0
    y = torch.tensor(y_np, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = perm[:train_size], perm[train_size:]
    return x[train], y[train], x[test], y[test]


def build_digits_mlp(hidden: int = 64, seed: int = 0) -> nn.Sequential:
    """``Linear(64, hidden) -> GELU(tanh) -> Linear(hidden, 10)``, all params ~ N(0, 1/fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, 10))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            std = layer.in_features**-0.5
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * std)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * std)
    return model


def l2_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, l2_reg: float) -> torch.Tensor:
    """Mean cross-entropy (nats/example) plus ``l2_reg / 2 * |theta|^2`` (the training loss)."""
    penalty = sum((p * p).sum() for p in model.parameters())
    return nn.functional.cross_entropy(model(x), y) + 0.5 * l2_reg * penalty


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows of ``x`` whose argmax logit equals ``y``."""
    return (model(x).argmax(-1) == y).float().mean().item()


def train_digits_mlp(
    config: DigitsMLPConfig | None = None,
) -> tuple[nn.Sequential, OptimizerState, dict[str, Any]]:
    """Train the MLP (CPU, float32, deterministic); return (model, Adam state, metrics).

    Runs on one intra-op thread (restored afterwards): the matrices are 64-wide, so more
    threads only add synchronisation (8x slower on a busy 2-core machine).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(config or DigitsMLPConfig())
    finally:
        torch.set_num_threads(threads)


def _train(cfg: DigitsMLPConfig) -> tuple[nn.Sequential, OptimizerState, dict[str, Any]]:
    if cfg.train_size < cfg.batch_size:
        raise InputError(f"batch_size {cfg.batch_size} exceeds train_size {cfg.train_size}")
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = digits_split(cfg.seed, cfg.train_size)
    model = build_digits_mlp(cfg.hidden, cfg.seed)
    betas = (0.9, 0.999)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=betas, eps=1e-8, weight_decay=0.0)
    total = cfg.steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    )
    shuffle = torch.Generator().manual_seed(cfg.seed + 1)
    per_epoch = cfg.train_size // cfg.batch_size
    losses = []
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(cfg.train_size, generator=shuffle)
        for b in range(per_epoch):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            loss = l2_loss(model, x_train[idx], y_train[idx], cfg.l2_reg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final_train_loss = l2_loss(model, x_train, y_train, cfg.l2_reg).item()
    metrics = {
        "config": asdict(cfg),
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_train": len(x_train),
        "n_test": len(x_test),
        "train_accuracy": accuracy(model, x_train, y_train),
        "test_accuracy": accuracy(model, x_test, y_test),
        "train_loss": final_train_loss,
        "last_batch_loss": losses[-1] if losses else float("nan"),
        "prior_sigma": cfg.prior_sigma,
        "adam_steps": total,
        "adam_betas": list(betas),
        "train_seconds": time.perf_counter() - start,
        "units": {"train_loss": "nats/example incl. l2_reg/2*|theta|^2"},
    }
    return model, adam_state_by_name(model, opt), metrics


class DigitsMLPEntry(ZooEntry):
    """Zoo entry that trains and caches the digits MLP."""

    name = "digits-mlp"
    kind = "model"
    description = "basin-paper MLP on sklearn digits (64-64-10, GELU, D=4810), trains in seconds"

    def prepare(self, *, force: bool = False, progress: bool = True) -> dict[str, Any]:
        if self.is_ready() and not force:
            return self.metrics()
        from safetensors.torch import save_file

        model, opt_state, metrics = train_digits_mlp()
        with atomic_folder(self.path) as tmp:
            save_file(
                {k: v.contiguous() for k, v in model.state_dict().items()},
                str(tmp / "model.safetensors"),
            )
            save_optimizer_state(opt_state, tmp / "optimizer_state.safetensors")
            write_json(tmp / METRICS_FILE, metrics)
        return metrics


def load_digits_mlp(*, prepare: bool = True) -> DigitsMLP:
    """The cached digits MLP (trained on first use unless ``prepare=False``) and its data."""
    from safetensors.torch import load_file

    entry = DigitsMLPEntry()
    if not entry.is_ready():
        if not prepare:
            raise ZooError("zoo:digits-mlp is not trained yet: run `tyche zoo train digits-mlp`")
        entry.prepare()
    meta = entry.metrics()
    cfg = DigitsMLPConfig(**meta["config"])
    model = build_digits_mlp(cfg.hidden, cfg.seed)
    model.load_state_dict(load_file(str(Path(entry.path) / "model.safetensors")))
    model.eval()
    x_train, y_train, x_test, y_test = digits_split(cfg.seed, cfg.train_size)
    return DigitsMLP(
        model=model,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        optimizer_state=load_optimizer_state(entry.path / "optimizer_state.safetensors"),
        l2_reg=cfg.l2_reg,
        prior_sigma=cfg.prior_sigma,
        train_accuracy=meta["train_accuracy"],
        test_accuracy=meta["test_accuracy"],
        adam_steps=meta["adam_steps"],
        adam_betas=tuple(meta["adam_betas"]),
    )
