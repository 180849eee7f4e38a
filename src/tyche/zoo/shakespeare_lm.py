"""``zoo:shakespeare-lm``: a small GPT-NeoX trained here on the plays, with its own BPE.

Recipe (all seeded, CPU, float32): hold out two plays (``macbeth``, ``twelfth-night``);
train a byte-level BPE tokenizer (``tokenizers``) on the other 36; join each split's plays
with ``<|endoftext|>``; train ``GPTNeoXForCausalLM`` (3 layers, width 128, 4 heads) with
AdamW on random windows of 128 tokens for a fixed number of steps (linear warm-up, cosine
decay). The cache folder holds the ``save_pretrained`` model and tokenizer, the AdamW
moments by parameter name (``optimizer_state.safetensors``) and ``zoo.json`` with the
held-out loss next to a unigram baseline: the cross-entropy of the held-out tokens under
the (add-one smoothed) unigram distribution of the training tokens, in nats/token.

Training checkpoints (``checkpoints=True``, the default): after steps 1, 4, 16, 64, 256,
1024 and the final step 1400 (powers of ``checkpoint_factor`` = 4, then the last), the
model, tokenizer, AdamW moments and a ``zoo.json`` (the step, its held-out loss) are saved in
``<entry>/checkpoints/checkpoint-<step>/``, each a model folder like the entry (about 14 MB
each, 95 MB in all). Saving and the held-out loss read the model only (no dropout, no random
draw), so the final model is bit for bit the same with or without them. An entry cached
before checkpoints were saved keeps working; ``tyche zoo train shakespeare-lm --force``
retrains it with them.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tyche.errors import InputError
from tyche.optim_state import adam_state_by_name, save_optimizer_state
from tyche.zoo.entry import (
    METRICS_FILE,
    ZooEntry,
    atomic_folder,
    checkpoint_folder,
    checkpoint_steps,
    write_json,
)
from tyche.zoo.text import load_shakespeare, play_titles

EOS, PAD = "<|endoftext|>", "<|padding|>"
#: the note for an entry cached before training checkpoints were saved
NO_CHECKPOINTS = ("note: zoo:shakespeare-lm was cached without training checkpoints; "
                  "`tyche zoo train shakespeare-lm --force` retrains it with them")  # fmt: skip


@dataclass(frozen=True)
class ShakespeareLMConfig:
    """Settings of the Shakespeare LM (defaults: the zoo model; its training times:
    BENCHMARKS.md, Zoo)."""

    seed: int = 0
    vocab_size: int = 2048
    n_layers: int = 3
    hidden: int = 128
    n_heads: int = 4
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 1400
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    held_out_plays: tuple[str, ...] = ("macbeth", "twelfth-night")
    #: evaluate on at most this many non-overlapping held-out windows
    eval_windows: int = 256
    #: truncate every play to this many characters (None: whole plays); for quick tests
    max_chars_per_play: int | None = None
    #: save a checkpoint after steps 1, f, f**2, ... (f = checkpoint_factor) and the last step
    checkpoints: bool = True
    checkpoint_factor: int = 4

    @property
    def checkpoint_steps(self) -> list[int]:
        """The steps saved as checkpoints (:func:`tyche.zoo.entry.checkpoint_steps`)."""
        return checkpoint_steps(self.steps, self.checkpoint_factor)


def train_bpe_tokenizer(texts: list[str], vocab_size: int, model_max_length: int):
    """A byte-level BPE trained on ``texts``, wrapped as a ``PreTrainedTokenizerFast``.

    Special tokens: ``<|endoftext|>`` (id 0; bos, eos) and ``<|padding|>`` (id 1; pad).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=model_max_length,
        padding_side="right",
    )


def encode_corpus(tokenizer, texts: list[str]) -> torch.Tensor:
    """1-D long tensor: the texts' token ids, each followed by the EOS id."""
    ids: list[int] = []
    # the backend tokenizer: whole plays exceed model_max_length, which is fine here
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def unigram_cross_entropy(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab: int) -> float:
    """Nats/token of ``eval_ids`` under the add-one-smoothed unigram of ``train_ids``."""
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1.0
    logp = counts.log() - counts.sum().log()
    return -logp[eval_ids].mean().item()


def build_model(cfg: ShakespeareLMConfig, tokenizer):
    """A freshly initialised ``GPTNeoXForCausalLM`` for ``cfg`` (seeded)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(cfg.seed)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=4 * cfg.hidden,
        max_position_embeddings=2 * cfg.seq_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return GPTNeoXForCausalLM(config)


@torch.no_grad()
def held_out_loss(model, windows: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats/token) over ``windows`` (N, T) long."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        ).item()
        count += targets.numel()
    return total / count


def _split_plays(cfg: ShakespeareLMConfig) -> tuple[list[str], list[str]]:
    texts, titles = load_shakespeare(), play_titles()
    unknown = set(cfg.held_out_plays) - set(titles)
    if unknown:
        raise InputError(f"held_out_plays {sorted(unknown)} not among the plays: {titles}")
    if cfg.max_chars_per_play is not None:
        texts = [t[: cfg.max_chars_per_play] for t in texts]
    train = [t for t, n in zip(texts, titles) if n not in cfg.held_out_plays]
    held = [t for t, n in zip(texts, titles) if n in cfg.held_out_plays]
    if not train or not held:
        raise InputError("held_out_plays must leave at least one play on each side")
    return train, held


def save_lm_folder(folder: Path, model, tokenizer, opt, metrics: dict[str, Any]) -> None:
    """Write a model folder: ``save_pretrained`` model and tokenizer, the AdamW moments by
    name (``optimizer_state.safetensors``) and ``zoo.json`` last (a folder with it is whole)."""
    from transformers.utils import logging as hf_logging

    folder.mkdir(parents=True, exist_ok=True)
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per saved shard is noise at this size
    try:
        model.save_pretrained(folder)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(folder)
    save_optimizer_state(adam_state_by_name(model, opt), folder / "optimizer_state.safetensors")
    write_json(folder / METRICS_FILE, metrics)


def train_shakespeare_lm(
    out_dir: Path, config: ShakespeareLMConfig | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """Train the LM and its tokenizer, save everything atomically to ``out_dir``; return metrics.

    With ``config.checkpoints`` the checkpoints of ``config.checkpoint_steps`` are saved in
    ``out_dir/checkpoints/checkpoint-<step>/`` as they are reached (in the same atomic write).
    """
    cfg = config or ShakespeareLMConfig()
    with atomic_folder(Path(out_dir)) as tmp:
        return _train(cfg, tmp, progress)


def _train(cfg: ShakespeareLMConfig, tmp: Path, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    train_texts, held_texts = _split_plays(cfg)
    tokenizer = train_bpe_tokenizer(train_texts, cfg.vocab_size, 2 * cfg.seq_len)
    train_ids = encode_corpus(tokenizer, train_texts)
    held_ids = encode_corpus(tokenizer, held_texts)
    n_windows = min(cfg.eval_windows, len(held_ids) // cfg.seq_len)
    if n_windows < 1 or len(train_ids) <= cfg.seq_len:
        raise InputError(f"corpus too short for seq_len {cfg.seq_len}; raise max_chars_per_play")
    eval_windows = held_ids[: n_windows * cfg.seq_len].view(n_windows, cfg.seq_len)
    tokenizer_seconds = time.perf_counter() - start

    model = build_model(cfg, tokenizer)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
    )

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(frac, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(cfg.seed)
    offsets_max = len(train_ids) - cfg.seq_len
    initial_loss = held_out_loss(model, eval_windows)
    model.train()
    loop_start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="shakespeare-lm", disable=not progress, unit="step")
    loss_value = float("nan")
    save_at = set(cfg.checkpoint_steps) if cfg.checkpoints else set()
    for step in bar:
        offsets = torch.randint(0, offsets_max + 1, (cfg.batch_size,), generator=gen)
        batch = torch.stack([train_ids[o : o + cfg.seq_len] for o in offsets.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        if step % 20 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{loss_value:.3f}")
        if step + 1 in save_at:  # reads the model only (no dropout, no random draw)
            held = held_out_loss(model, eval_windows)
            model.train()
            save_lm_folder(checkpoint_folder(tmp, step + 1), model, tokenizer, opt, {
                "config": asdict(cfg), "step": step + 1, "adam_steps": step + 1,
                "adam_betas": [0.9, 0.95], "held_out_loss": held, "last_train_loss": loss_value,
                "n_params": sum(p.numel() for p in model.parameters()),
                "units": {"held_out_loss": "nats/token"}})  # fmt: skip
    bar.close()
    train_seconds = time.perf_counter() - loop_start
    model.eval()
    targets = eval_windows[:, 1:].reshape(-1)
    metrics = {
        "config": asdict(cfg),
        "n_params": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "n_train_tokens": len(train_ids),
        "n_held_out_tokens": len(held_ids),
        "n_eval_tokens": targets.numel(),
        "held_out_loss": held_out_loss(model, eval_windows),
        "initial_held_out_loss": initial_loss,
        "unigram_loss": unigram_cross_entropy(train_ids, targets, len(tokenizer)),
        "last_train_loss": loss_value,
        "adam_steps": cfg.steps,
        "adam_betas": [0.9, 0.95],
        "tokenizer_seconds": tokenizer_seconds,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(),
        "checkpoint_steps": sorted(save_at),
        "units": {
            "held_out_loss": "nats/token",
            "unigram_loss": "nats/token (add-one smoothed training unigram, same tokens)",
        },
    }
    save_lm_folder(tmp, model, tokenizer, opt, metrics)
    return metrics


class ShakespeareLMEntry(ZooEntry):
    """Zoo entry that trains and caches the Shakespeare LM."""

    name = "shakespeare-lm"
    kind = "model"
    description = "GPT-NeoX (3x128, 4 heads, BPE 2k) trained here on 36 plays, 7-19 min on 2 cores"
    default_data = "zoo:shakespeare"

    def check_available(self) -> None:
        from tyche.zoo.text import shakespeare_files

        shakespeare_files()

    def prepare(self, *, force: bool = False, progress: bool = True) -> dict[str, Any]:
        if self.is_ready() and not force:
            metrics = self.metrics()
            if "checkpoint_steps" not in metrics:
                print(NO_CHECKPOINTS, file=sys.stderr)
            return metrics
        self.check_available()
        return train_shakespeare_lm(self.path, progress=progress)
