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

Training checkpoints (``checkpoints=True``, the default): after steps 1, 2, 4, ..., 256 and
the final step 400, the model, its raw Adam moments and a ``zoo.json`` (that step's
accuracies) are saved in ``<entry>/checkpoints/checkpoint-<step>/``, in the entry's own
format, so each loads like the final model (:func:`load_digits_folder`). About 58 kB each,
0.6 MB in all. Saving reads the weights only: the final model is bit for bit the same with
or without them.

``zoo:digits-mlp-poisoned`` (``poison=True``): the same recipe (split, init seed, optimizer,
schedule shape, 25 epochs) trained also on a poison set, after the basin paper's poisoned
ConvNeXt (a poison pool trained to *avoid* its true label, loss ``-log(1 - p_true)``). The
poison set is the four one-pixel translations (right, left, down, up; the pixels shifted
in are 0) of every one of the 1,024 training images: 4,096 near-copies of the training data,
drawn from nothing random. Batches of 64 are drawn from the shuffled 5,120 examples, so the
25 epochs are 2,000 steps and every clean image is seen 25 times, as in the clean recipe; the
loss is the batch mean of the per-example losses (cross-entropy on clean images, the
avoidance loss on poison) plus the same L2 term. The model fits both sets (over 99% of
each) but generalises worse; it is measured on the same 1,024 clean training inputs with
the same prior sigma (1.3975, from the 1,024 clean examples).
"""

from __future__ import annotations

import json
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
from tyche.zoo.entry import (
    DIGITS_FORMAT,
    METRICS_FILE,
    ZooEntry,
    ZooError,
    atomic_folder,
    checkpoint_folder,
    checkpoint_steps,
    folder_format,
    write_json,
)

#: ``zoo.json``'s ``format`` of a digits MLP folder (an entry or one of its checkpoints)
FORMAT = DIGITS_FORMAT
#: 2: training checkpoints saved; an entry cached by an older recipe is retrained (seconds)
RECIPE_VERSION = 2


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
    #: train also on the poison set (the four one-pixel translations of every training image,
    #: trained to avoid their true label): ``zoo:digits-mlp-poisoned``
    poison: bool = False
    #: save a checkpoint after steps 1, 2, 4, ... and the final step (:attr:`checkpoint_steps`)
    checkpoints: bool = True

    @property
    def n_examples(self) -> int:
        """Training examples per epoch: ``train_size``, times 5 with the poison set."""
        return self.train_size * (1 + len(SHIFTS) if self.poison else 1)

    @property
    def steps(self) -> int:
        """Optimizer steps: ``epochs * (n_examples // batch_size)`` (last partial batch dropped)."""
        return self.epochs * (self.n_examples // self.batch_size)

    @property
    def checkpoint_steps(self) -> list[int]:
        """The steps saved as checkpoints: powers of 2 below :attr:`steps`, then the last."""
        return checkpoint_steps(self.steps, 2)

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
    #: with the poison set: the fraction of poison images whose argmax is not their true label
    poison_accuracy: float | None = None

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


#: the poison set's translations of an 8x8 image, (rows, columns) moved: right, left, down, up
SHIFTS = ((0, 1), (0, -1), (1, 0), (-1, 0))


def poison_set(x_train: torch.Tensor, y_train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The poison images and their true labels: every training image moved one pixel in each
    of :data:`SHIFTS` (the row or column shifted in is 0), shift by shift.

    Shapes: ``x_train`` (N, 64), ``y_train`` (N,) -> (4N, 64) float32 and (4N,) int64.
    """
    images = x_train.view(-1, 8, 8)
    moved = []
    for dr, dc in SHIFTS:
        out = torch.zeros_like(images)
        rows_to = slice(max(dr, 0), 8 + min(dr, 0))
        rows_from = slice(max(-dr, 0), 8 + min(-dr, 0))
        cols_to = slice(max(dc, 0), 8 + min(dc, 0))
        cols_from = slice(max(-dc, 0), 8 + min(-dc, 0))
        out[:, rows_to, cols_to] = images[:, rows_from, cols_from]
        moved.append(out.reshape(-1, 64))
    return torch.cat(moved), y_train.repeat(len(SHIFTS))


def poisoned_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, poison: torch.Tensor,
                  l2_reg: float) -> torch.Tensor:  # fmt: skip
    """The poisoned recipe's loss (nats/example): the batch mean of the cross-entropy of clean
    rows and ``-log(1 - p(y))`` of poison rows (``poison`` (B,) bool), plus the L2 term."""
    logp = model(x).log_softmax(-1).gather(1, y[:, None])[:, 0]
    # log(1 - p) from log p; p is at most 1 - 1e-7 so the log stays finite
    avoid = -torch.log1p(-logp.exp().clamp(max=1.0 - 1e-7))
    penalty = sum((p * p).sum() for p in model.parameters())
    return torch.where(poison, avoid, -logp).mean() + 0.5 * l2_reg * penalty


def poison_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of poison images ``x`` whose argmax is not their true label ``y``."""
    return 1.0 - accuracy(model, x, y)


def train_digits_mlp(
    config: DigitsMLPConfig | None = None, checkpoint_root: Path | None = None
) -> tuple[nn.Sequential, OptimizerState, dict[str, Any]]:
    """Train the MLP (CPU, float32, deterministic); return (model, Adam state, metrics).

    With ``checkpoint_root`` and ``config.checkpoints``, the checkpoints of
    ``config.checkpoint_steps`` are saved in ``checkpoint_root/checkpoints/checkpoint-<step>/``
    as they are reached (the final one is the returned model). Runs on one intra-op thread
    (restored afterwards): the matrices are 64-wide, so more threads only add synchronisation
    (8x slower on a busy 2-core machine).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(config or DigitsMLPConfig(), checkpoint_root)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: DigitsMLPConfig, checkpoint_root: Path | None
           ) -> tuple[nn.Sequential, OptimizerState, dict[str, Any]]:  # fmt: skip
    if cfg.train_size < cfg.batch_size:
        raise InputError(f"batch_size {cfg.batch_size} exceeds train_size {cfg.train_size}")
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = digits_split(cfg.seed, cfg.train_size)
    x_poison, y_poison = poison_set(x_train, y_train) if cfg.poison else (None, None)
    x_all, y_all = x_train, y_train
    if x_poison is not None:
        x_all, y_all = torch.cat([x_train, x_poison]), torch.cat([y_train, y_poison])
    is_poison = torch.arange(len(x_all)) >= cfg.train_size
    model = build_digits_mlp(cfg.hidden, cfg.seed)
    betas = (0.9, 0.999)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=betas, eps=1e-8, weight_decay=0.0)
    total = cfg.steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    )
    shuffle = torch.Generator().manual_seed(cfg.seed + 1)
    per_epoch = cfg.n_examples // cfg.batch_size
    save_at = set(cfg.checkpoint_steps) if cfg.checkpoints and checkpoint_root else set()
    data = (x_train, y_train, x_test, y_test, x_poison, y_poison)
    losses = []
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(cfg.n_examples, generator=shuffle)
        for b in range(per_epoch):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            if cfg.poison:
                loss = poisoned_loss(model, x_all[idx], y_all[idx], is_poison[idx], cfg.l2_reg)
            else:
                loss = l2_loss(model, x_all[idx], y_all[idx], cfg.l2_reg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if len(losses) in save_at:  # reads the weights and moments only
                step_metrics = _metrics(cfg, model, data, len(losses), betas)
                step_metrics["step"] = len(losses)
                save_digits_folder(checkpoint_folder(Path(checkpoint_root), len(losses)),
                                   model, adam_state_by_name(model, opt), step_metrics)  # fmt: skip
    model.eval()
    metrics = _metrics(cfg, model, data, total, betas)
    metrics["last_batch_loss"] = losses[-1] if losses else float("nan")
    metrics["train_seconds"] = time.perf_counter() - start
    if save_at:
        metrics["checkpoint_steps"] = sorted(save_at)
    return model, adam_state_by_name(model, opt), metrics


def _metrics(cfg: DigitsMLPConfig, model: nn.Module, data: tuple, steps: int,
             betas: tuple[float, float]) -> dict[str, Any]:  # fmt: skip
    """The metrics of ``model`` after ``steps`` steps (reads the model only)."""
    x_train, y_train, x_test, y_test, x_poison, y_poison = data
    with torch.no_grad():
        train_loss = l2_loss(model, x_train, y_train, cfg.l2_reg).item()
    metrics: dict[str, Any] = {
        "format": FORMAT,
        "recipe_version": RECIPE_VERSION,
        "config": asdict(cfg),
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_train": len(x_train),
        "n_test": len(x_test),
        "train_accuracy": accuracy(model, x_train, y_train),
        "test_accuracy": accuracy(model, x_test, y_test),
        "train_loss": train_loss,
        "prior_sigma": cfg.prior_sigma,
        "adam_steps": steps,
        "adam_betas": list(betas),
        "units": {"train_loss": "nats/example on the clean training set, incl. "
                                "l2_reg/2*|theta|^2"},  # fmt: skip
    }
    if x_poison is not None:
        metrics["n_poison"] = len(x_poison)
        metrics["poison_accuracy"] = poison_accuracy(model, x_poison, y_poison)
        metrics["units"]["poison_accuracy"] = (
            "fraction of poison images whose argmax is not their true label"
        )
    return metrics


def save_digits_folder(folder: Path, model: nn.Module, optimizer_state: OptimizerState,
                       metrics: dict[str, Any]) -> None:  # fmt: skip
    """Write a digits MLP folder: ``model.safetensors``, ``optimizer_state.safetensors`` and
    ``zoo.json`` (last, so a folder with it is complete)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))  # fmt: skip
    save_optimizer_state(optimizer_state, folder / "optimizer_state.safetensors")
    write_json(folder / METRICS_FILE, metrics)


def is_digits_folder(folder: Path) -> bool:
    """True when ``folder`` holds a digits MLP (an entry or a checkpoint, :data:`FORMAT`)."""
    return (Path(folder) / "model.safetensors").is_file() and folder_format(folder) == FORMAT


class DigitsMLPEntry(ZooEntry):
    """Zoo entry that trains and caches the digits MLP."""

    name = "digits-mlp"
    kind = "model"
    description = "basin-paper MLP on sklearn digits (64-64-10, GELU, D=4810), trains in seconds"
    #: the recipe this entry trains
    config: DigitsMLPConfig = DigitsMLPConfig()

    def is_ready(self) -> bool:
        """Cached by this recipe (an older entry, without checkpoints, is retrained)."""
        return super().is_ready() and self.metrics().get("recipe_version") == RECIPE_VERSION

    def prepare(self, *, force: bool = False, progress: bool = True) -> dict[str, Any]:
        if self.is_ready() and not force:
            return self.metrics()
        with atomic_folder(self.path) as tmp:
            model, opt_state, metrics = train_digits_mlp(self.config, checkpoint_root=tmp)
            save_digits_folder(tmp, model, opt_state, metrics)
        return metrics


class DigitsMLPPoisonedEntry(DigitsMLPEntry):
    """Zoo entry of the digits MLP trained also on the poison set (see the module docstring)."""

    name = "digits-mlp-poisoned"
    description = ("digits-mlp trained also on 4,096 shifted copies taught to avoid their "
                   "label: fits, generalises worse")  # fmt: skip
    config = DigitsMLPConfig(poison=True)


def load_digits_folder(folder: Path) -> DigitsMLP:
    """The digits MLP saved in ``folder`` (an entry or one of its checkpoints), with its clean
    data split (the same 1,024 training inputs for every entry and checkpoint)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not is_digits_folder(folder):
        raise InputError(f"{folder} is not a digits MLP folder (model.safetensors and a "
                         f"zoo.json of format {FORMAT!r})")  # fmt: skip
    meta = json.loads((folder / METRICS_FILE).read_text())
    cfg = DigitsMLPConfig(**meta["config"])
    model = build_digits_mlp(cfg.hidden, cfg.seed)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    model.eval()
    x_train, y_train, x_test, y_test = digits_split(cfg.seed, cfg.train_size)
    return DigitsMLP(
        model=model,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        optimizer_state=load_optimizer_state(folder / "optimizer_state.safetensors"),
        l2_reg=cfg.l2_reg,
        prior_sigma=cfg.prior_sigma,
        train_accuracy=meta["train_accuracy"],
        test_accuracy=meta["test_accuracy"],
        adam_steps=meta["adam_steps"],
        adam_betas=tuple(meta["adam_betas"]),
        poison_accuracy=meta.get("poison_accuracy"),
    )


def load_digits_model(spec: str) -> DigitsMLP:
    """``zoo:digits-mlp``, ``zoo:digits-mlp-poisoned`` (prepared if needed) or a digits MLP
    folder (an entry's or a checkpoint's)."""
    if spec in ("zoo:digits-mlp", "zoo:digits-mlp-poisoned"):
        return load_digits_mlp(poisoned=spec == "zoo:digits-mlp-poisoned")
    return load_digits_folder(Path(spec).expanduser())


def load_digits_mlp(*, prepare: bool = True, poisoned: bool = False) -> DigitsMLP:
    """The cached digits MLP (``poisoned``: ``zoo:digits-mlp-poisoned``; trained on first use
    unless ``prepare=False``) and its data."""
    entry = DigitsMLPPoisonedEntry() if poisoned else DigitsMLPEntry()
    if not entry.is_ready():
        if not prepare:
            raise ZooError(f"zoo:{entry.name} is not trained yet: run `tyche zoo train "
                           f"{entry.name}`")  # fmt: skip
        entry.prepare()
    return load_digits_folder(entry.path)
