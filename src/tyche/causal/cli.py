"""``tyche causal``: extract causal bases of a model; ``tyche causal train-lens``: a tuned lens.

Examples::

    tyche causal --model zoo:shakespeare-lm --data zoo:shakespeare --k 16 --mode mean \\
        --sites 'resid_pre.*' --out runs/causal
    tyche causal train-lens --model zoo:shakespeare-lm --out runs/tuned-lens
    tyche causal --target tuned --lens runs/tuned-lens --out runs/causal-tuned
    torchrun --nproc_per_node=2 -m tyche causal ...      # rows sharded over the processes

``tyche causal`` saves one ``CausalBasis`` folder per site under ``--out``, prints an energy
table per layer and plots each layer's energies next to those of its top PCA directions
(``--out/energies.png``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import simple_parsing
import torch

if TYPE_CHECKING:
    from tyche.causal.result import CausalBasis

__all__ = ["CausalConfig", "TrainLensConfig", "main"]


@dataclass
class DataConfig:
    """Model and data shared by both sub-commands."""

    model: str = "zoo:shakespeare-lm"
    """model: 'zoo:NAME' or a local save_pretrained folder"""
    data: str = "zoo:shakespeare"
    """text: 'zoo:shakespeare', 'zoo:stdlib-docs' or a local .txt file"""
    sites: str = "resid_pre.*"
    """site pattern(s), comma separated (aliases such as resid_pre.3, or module-name globs)"""
    seq_len: int = 128
    """tokens per sequence"""
    n_sequences: int = 64
    """sequences drawn (seeded) from the whole tokenized corpus"""
    batch_size: int = 16
    """sequences per forward pass"""
    seed: int = 0
    """seed of the sequence draw and of the extraction"""


@dataclass
class CausalConfig(DataConfig):
    """Extract a causal basis at every site of a model."""

    k: int = 16
    """directions per site"""
    mode: Literal["mean", "zero", "resample"] = "mean"
    """ablation: mean, zero or resample"""
    objective: Literal["kl", "ce"] = "kl"
    """kl: mean KL(clean || ablated); ce: increase of the next-token cross-entropy (nats)"""
    target: Literal["logit", "tuned", "model"] = "logit"
    """what maps hidden states to logits: the logit lens, a tuned lens (--lens) or the model"""
    lens: str | None = None
    """folder of a tuned lens saved by `tyche causal train-lens` (for --target tuned)"""
    max_iter: int = 100
    """L-BFGS iterations per direction"""
    min_energy: float = 0.0
    """stop at a site once a direction's energy is below this (nats)"""
    tol: float = 1e-7
    """relative energy change that ends a direction's search"""
    n_starts: int = 1
    """L-BFGS runs per direction from the best candidate starts; the best is kept"""
    n_pca: int = 16
    """top principal directions whose energies are reported for comparison"""
    out: str = "runs/causal"
    """output folder: one CausalBasis per site, energies.png, summary.json"""
    plot: bool = True
    """write energies.png"""


@dataclass
class TrainLensConfig(DataConfig):
    """Train a tuned lens (one affine translator per site) to match the final logits by KL."""

    steps: int = 300
    """optimiser steps"""
    lr: float = 1e-3
    """AdamW learning rate (linear decay to 0)"""
    weight_decay: float = 1e-3
    """AdamW weight decay"""
    n_sequences: int = 256
    """sequences drawn (seeded) from the whole tokenized corpus"""
    out: str = "runs/tuned-lens"
    """output folder of the lens (safetensors + JSON)"""


def _load(cfg: DataConfig) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model on this rank's device and ``n_sequences`` token rows of the data."""
    from tyche.data import chunk_and_tokenize
    from tyche.distributed import default_device
    from tyche.zoo import resolve_model, resolve_texts

    zoo_model = resolve_model(cfg.model)
    if zoo_model.tokenizer is None:
        raise ValueError(f"{cfg.model} has no tokenizer; causal bases need a language model")
    tokens = chunk_and_tokenize(resolve_texts(cfg.data), zoo_model.tokenizer,
                                max_seq_len=cfg.seq_len)  # fmt: skip
    n = tokens["input_ids"].shape[0]
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    pick = pick[: cfg.n_sequences].sort().values
    return zoo_model.model.to(default_device()), {k: v[pick] for k, v in tokens.items()}


def _sites(pattern: str) -> list[str]:
    return [p.strip() for p in pattern.split(",") if p.strip()]


def run_causal(cfg: CausalConfig) -> dict:
    """Run ``tyche causal`` with a parsed config; returns ``{site: CausalBasis}``."""
    from tyche.causal.extraction import extract_causal_bases
    from tyche.causal.lenses import TunedLens
    from tyche.distributed import get_rank, rank0_print
    from tyche.plotting import causal_energies

    if cfg.target == "tuned" and not cfg.lens:
        raise ValueError("--target tuned needs --lens FOLDER (train one: tyche causal train-lens)")
    model, tokens = _load(cfg)
    lens = TunedLens.load(cfg.lens, model) if cfg.target == "tuned" else None
    start = time.perf_counter()
    bases = extract_causal_bases(
        model,
        tokens,
        cfg.k,
        _sites(cfg.sites),
        target=cfg.target,
        lens=lens,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        mode=cfg.mode,
        objective=cfg.objective,
        max_iter=cfg.max_iter,
        min_energy=cfg.min_energy,
        tol=cfg.tol,
        n_pca=cfg.n_pca,
    )
    elapsed = time.perf_counter() - start
    rank0_print(
        f"\ncausal bases of {cfg.model} ({cfg.mode} ablation, {cfg.objective}, "
        f"{cfg.target} target, {tokens['input_ids'].numel()} tokens, {elapsed:.1f} s)"
    )
    rank0_print(energy_table(bases))
    if get_rank() == 0:
        out = Path(cfg.out)
        for site, basis in bases.items():
            basis.save(out / site)
        summary = {"config": asdict(cfg), "seconds": elapsed,
                   "sites": {s: {"energies": b.energies.tolist(),
                                 "subspace_energies": b.subspace_energies.tolist(),
                                 "pca_energies": None if b.pca_energies is None
                                 else b.pca_energies.tolist(),
                                 "n_evals": b.n_evals} for s, b in bases.items()}}  # fmt: skip
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        if cfg.plot:
            rank0_print(f"figure: {causal_energies(bases, out / 'energies.png')}")
        rank0_print(f"saved {len(bases)} bases under {out}/")
    return bases


def run_train_lens(cfg: TrainLensConfig):
    """Run ``tyche causal train-lens`` with a parsed config; returns the TunedLens."""
    from tyche.causal.train_lens import train_tuned_lens
    from tyche.distributed import get_rank, rank0_print

    model, tokens = _load(cfg)
    lens = train_tuned_lens(model, tokens, _sites(cfg.sites), steps=cfg.steps, lr=cfg.lr,
                            batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
                            seed=cfg.seed)  # fmt: skip
    rank0_print(f"{'site':<14} {'KL logit lens':>14} {'KL tuned lens':>14}   (nats)")
    for site, before, after in zip(lens.sites, lens.stats["kl_logit_lens"],
                                   lens.stats["kl_tuned_lens"]):  # fmt: skip
        rank0_print(f"{site:<14} {before:14.4f} {after:14.4f}")
    if get_rank() == 0:
        rank0_print(f"saved the tuned lens to {lens.save(cfg.out)}/")
    return lens


def main(argv: list[str]) -> None:
    """``tyche causal [--flags]`` or ``tyche causal train-lens [--flags]``."""
    from tyche.distributed import init_distributed

    argv = list(argv)
    if argv and argv[0] == "train-lens":
        lens_cfg = simple_parsing.parse(
            TrainLensConfig, args=argv[1:], prog="tyche causal train-lens",
            description=TrainLensConfig.__doc__,
        )  # fmt: skip
        init_distributed()
        run_train_lens(lens_cfg)
        return
    cfg = simple_parsing.parse(
        CausalConfig, args=argv, prog="tyche causal",
        description=f"{CausalConfig.__doc__} Sub-command: `tyche causal train-lens --help`.",
    )  # fmt: skip
    init_distributed()
    run_causal(cfg)


def energy_table(bases: Mapping[str, CausalBasis], n_show: int = 4) -> str:
    """A text table: per site the leading energies, the joint energy, the best PCA energy.

    Columns: ``E1..En`` single-direction energies (nats), ``joint`` the energy of ablating all
    k together, ``PCA best`` the largest energy among the top principal directions, ``E1/PCA``
    their ratio, ``evals/dir`` mean objective evaluations per direction, ``s/dir`` seconds.
    """
    n_show = max(1, min(n_show, max((b.k for b in bases.values()), default=1)))
    width = max([len("site")] + [len(s) for s in bases])
    head = [f"{'site':<{width}}"] + [f"{'E' + str(i + 1):>9}" for i in range(n_show)]
    head += [f"{'joint':>9}", f"{'PCA best':>9}", f"{'E1/PCA':>7}", f"{'evals/dir':>9}",
             f"{'s/dir':>7}"]  # fmt: skip
    lines = ["  ".join(head)]
    for site, b in bases.items():
        row = [f"{site:<{width}}"]
        row += [f"{float(b.energies[i]):9.4g}" if i < b.k else f"{'':>9}" for i in range(n_show)]
        row.append(f"{float(b.subspace_energies[-1]):9.4g}")
        if b.pca_energies is not None and b.pca_energies.numel():
            best = float(b.pca_energies.max())
            ratio = float(b.energies[0]) / best if best > 0 else math.inf
            row += [f"{best:9.4g}", f"{ratio:7.2f}"]
        else:
            row += [f"{'-':>9}", f"{'-':>7}"]
        evals = sum(b.n_evals) / max(len(b.n_evals), 1)
        secs = sum(b.seconds) / max(len(b.seconds), 1)
        row += [f"{evals:9.1f}", f"{secs:7.2f}"]
        lines.append("  ".join(row))
    unit = next(iter(bases.values())).units if bases else "nats"
    lines.append(f"(energies in {unit}: mean KL(clean ‖ ablated) per position, or CE increase)")
    return "\n".join(lines)
