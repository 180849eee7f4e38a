"""`VolumeConfig`: the settings of a basin-volume run on a HuggingFace causal LM.

Field names follow the original basin-volume README, so its snippet works as written
(``VolumeConfig(model, tokenizer, dataset, text_key, n_samples, cutoff, max_seq_len,
val_size, cache_mode, chunking)``); everything after those is Tyche's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


@dataclass
class VolumeConfig:
    model: Any = None
    """A causal LM (``transformers`` model or any module returning logits), a TransformerLens
    ``HookedTransformer`` or an nnsight wrapper of one."""
    tokenizer: Any = None
    """Its tokenizer (needs a pad or an eos token)."""
    dataset: Any = None
    """Evaluation texts: a ``datasets.Dataset``, list of strings, dict, or text-file path."""
    text_key: str = "text"
    """Column of ``dataset`` holding the text."""
    n_samples: int = 100
    """Number of Monte Carlo directions."""
    cutoff: float = 1e-2
    """KL cutoff in nats (mean per token) that defines the basin."""
    max_seq_len: int = 2048
    """Sequence length for truncation (``chunking=False``) or chunking."""
    val_size: int | None = 10
    """Number of sequences (or chunks) used; None uses all."""
    cache_mode: Literal["cpu", "gpu"] | None = None
    """Where the anchor's log-probs are cached: "cpu", "gpu" (the model's device) or None
    (the model's device). They are computed once in every mode."""
    chunking: bool = False
    """Join texts and cut them into ``max_seq_len``-token chunks instead of padding."""
    sigma: float | None = None
    """Prior standard deviation; None uses the RMS of the selected parameters (recorded)."""
    prior: Literal["gaussian", "uniform"] = "gaussian"
    seed: int = 42
    rtol: float = 1e-2
    """Every reported delta lies within rtol·cutoff of the cutoff."""
    model_batch_size: int | None = None
    """Directions evaluated together (default: as many as ``max_memory`` holds, at most 16
    and at most 2^25 parameters' worth; see ``tyche.basin.memory``)."""
    max_memory: int | str | None = None
    """Memory the batch of directions may use: bytes or a size such as "4GiB" (default: half
    the memory free on the model's device)."""
    data_batch_size: int | None = None
    """Sequences per forward pass (default: all of them)."""
    include: str | list[str] = "*"
    """Globs over parameter names that define the basin's parameters."""
    exclude: str | list[str] | None = None
    """Globs over parameter names kept fixed (e.g. "*embed*", "*norm*")."""
    strategy: Literal["auto", "vmap", "loop", "inplace"] = "auto"
    """How perturbed models are evaluated (see ``tyche.basin.loss``)."""
    implicit_vectors: bool = False
    """Original's name for the low-memory path: same as strategy="inplace"."""
    l2_reg: float = 0.0
    """Adds ½·l2_reg·|δ|² to the loss (the original's explicit L2 term)."""
    preconditioner_type: Literal["adam", "fisher"] | None = None
    """Diagonal preconditioner from Adam moments ("adam") or a Fisher estimate ("fisher")."""
    optimizer_state: Any = None
    """Adam state for preconditioner_type="adam": a torch.optim state dict, a mapping name ->
    {"exp_avg", "exp_avg_sq"}, or a path to a HF Trainer ``optimizer.pt``."""
    preconditioner: Any = None
    """A user preconditioner: positive (D,) vector or (D, D) positive-definite matrix."""
    preconditioner_eps: float = 1e-5
    preconditioner_exponent: float = 0.5
    adam_order: int = 2
    """2: second moments (exp_avg_sq); 1: first moments."""
    tqdm: bool = True
    checkpoint: str | Path | None = None
    """Folder where finished samples are saved; with ``resume=True`` a run continues."""
    resume: bool = False
