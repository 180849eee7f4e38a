"""``zoo:fashion-mlp``: the local-interaction-basis paper's MLP recipe, on Fashion-MNIST.

The paper's image MLPs (MNIST, CIFAR-10) are ``784 -> 100 -> 100 -> 10`` with ReLU and biases,
trained with Adam (lr 1e-3, batch 64) for 12 epochs on the cross-entropy. The same recipe runs
here on Fashion-MNIST (the only 28x28 image set that installs offline: Debian's
``dataset-fashion-mnist``), pixels scaled to [0, 1] and flattened. Layers are ``layers.0``,
``layers.1`` (Linear + ReLU) and ``layers.2`` (Linear), so the node layers are
``layers.1:input``, ``layers.2:input`` and ``output``. Seeded, float32, one intra-op thread:
about a minute on one core.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tyche.zoo.entry import METRICS_FILE, ZooEntry, atomic_folder, write_json
from tyche.zoo.fashion_mnist import FashionMNISTEntry, load_fashion_mnist

NODE_LAYERS = ("layers.1:input", "layers.2:input", "output")


@dataclass(frozen=True)
class FashionMLPConfig:
    """Settings of the Fashion-MNIST MLP (defaults: the paper's MLP recipe)."""

    seed: int = 0
    hidden: tuple[int, ...] = (100, 100)
    epochs: int = 12
    batch_size: int = 64
    lr: float = 1e-3


class MLP(nn.Module):
    """``layers.i`` = Linear + ReLU, the last Linear alone; input ``(B, 784)`` or images."""

    def __init__(self, sizes: tuple[int, ...] = (784, 100, 100, 10)) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            last = i == len(sizes) - 2
            blocks.append(nn.Linear(a, b) if last else nn.Sequential(nn.Linear(a, b), nn.ReLU()))
        self.layers = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers:
            x = layer(x)
        return x


def fashion_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: pixels / 255 as float32 ``(N, 784)``."""
    data = load_fashion_mnist()
    return (data.x_train.flatten(1).float() / 255, data.y_train,
            data.x_test.flatten(1).float() / 255, data.y_test)  # fmt: skip


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in
               zip(x.split(4096), y.split(4096))) / len(y)  # fmt: skip


def train_fashion_mlp(
    config: FashionMLPConfig | None = None, *, progress: bool = True
) -> tuple[MLP, dict[str, Any]]:
    """Train the MLP (CPU, float32, one thread, seeded); return it and its metrics."""
    from tqdm.auto import tqdm

    cfg = config or FashionMLPConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        x_train, y_train, x_test, y_test = fashion_tensors()
        torch.manual_seed(cfg.seed)
        model = MLP((784, *cfg.hidden, 10))
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        steps = cfg.epochs * (len(x_train) // cfg.batch_size)
        bar = tqdm(total=steps, desc="fashion-mlp", disable=not progress, unit="step")
        for _ in range(cfg.epochs):
            order = torch.randperm(len(x_train), generator=gen)
            for b in range(len(x_train) // cfg.batch_size):
                idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
        bar.close()
        model.eval()
        metrics = {
            "config": asdict(cfg),
            "n_params": sum(p.numel() for p in model.parameters()),
            "train_accuracy": _accuracy(model, x_train, y_train),
            "test_accuracy": _accuracy(model, x_test, y_test),
            "steps": steps,
            "train_seconds": time.perf_counter() - start,
        }
        return model, metrics
    finally:
        torch.set_num_threads(threads)


class FashionMLPEntry(ZooEntry):
    """Zoo entry that trains and caches the Fashion-MNIST MLP (needs the Debian package)."""

    name = "fashion-mlp"
    kind = "model"
    description = "LIB paper's MLP recipe (784-100-100-10, ReLU) on Fashion-MNIST, trained here"

    def check_available(self) -> None:
        FashionMNISTEntry().check_available()

    def prepare(self, *, force: bool = False, progress: bool = True) -> dict[str, Any]:
        if self.is_ready() and not force:
            return self.metrics()
        self.check_available()
        from safetensors.torch import save_file

        model, metrics = train_fashion_mlp(progress=progress)
        with atomic_folder(self.path) as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                      str(tmp / "model.safetensors"))  # fmt: skip
            write_json(tmp / METRICS_FILE, metrics)
        return metrics


def load_fashion_mlp(*, prepare: bool = True) -> MLP:
    """The cached MLP in eval mode (trained on first use unless ``prepare=False``)."""
    from safetensors.torch import load_file

    from tyche.zoo.entry import ZooError

    entry = FashionMLPEntry()
    if not entry.is_ready():
        if not prepare:
            raise ZooError("zoo:fashion-mlp is not trained yet: run `tyche zoo train fashion-mlp`")
        entry.prepare()
    cfg = FashionMLPConfig(**{**entry.metrics()["config"],
                              "hidden": tuple(entry.metrics()["config"]["hidden"])})  # fmt: skip
    model = MLP((784, *cfg.hidden, 10))
    model.load_state_dict(load_file(str(Path(entry.path) / "model.safetensors")))
    return model.eval()
