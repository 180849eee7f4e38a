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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tyche.causal.options import SCREEN_POSITIONS, CausalOptions
from tyche.cli.commandline import (
    CommandError,
    best_effort,
    check_context,
    check_number,
    check_readable_text,
    check_writable_folder,
    flat_settings,
    on_interrupt,
    parse_config,
    reworded_text_errors,
    split_list,
)
from tyche.cli.run_folder import Owned, check_unlocked, claim_folder

if TYPE_CHECKING:
    import torch

    from tyche.causal.result import CausalBasis

__all__ = ["CausalConfig", "TrainLensConfig", "main"]

PROG = "tyche causal"
#: what each sub-command writes in --out (one CausalBasis folder per site; a lens's files)
OWNED = Owned(names=("summary.json", "energies.png"), result_types=("CausalBasis",))
LENS_OWNED = Owned(names=("meta.json", "tensors.safetensors"))
#: flags that change nothing in the results
FREE = ("out", "overwrite", "plot", "batch_size", "fast", "cache_gb", "allow_long_context")


@dataclass
class DataConfig:
    """Model and data shared by both sub-commands."""

    model: str = "zoo:shakespeare-lm"
    """'zoo:NAME' (a language model) or a local save_pretrained folder"""
    data: str = "zoo:shakespeare"
    """text: 'zoo:shakespeare', 'zoo:stdlib-docs' or a local UTF-8 text file"""
    sites: str = "resid_pre.*"
    """site pattern(s), comma separated (aliases such as resid_pre.3, or module-name globs)"""
    seq_len: int = 128
    """tokens per sequence"""
    allow_long_context: bool = False
    """let --seq_len past the model's context length through (rotary positions only; a
    learned position table has no embedding past it)"""
    n_sequences: int = 64
    """sequences drawn (seeded) from the whole tokenized corpus"""
    seed: int = 0
    """seed of the sequence draw and of the extraction"""


@dataclass(frozen=True)
class SearchFlags(CausalOptions):
    """The search settings of ``tyche causal``: a :class:`CausalOptions` whose flags are checked
    in the command line's words; ``n_init`` and ``screen_positions`` keep the library defaults
    (they have no flag), ``batch_size`` is ``--batch_size`` (sequences per forward pass)."""

    n_init: int = field(default=CausalOptions.n_init, init=False)
    screen_positions: int = field(default=SCREEN_POSITIONS, init=False)
    batch_size: int = 16
    """sequences per forward pass"""

    def __post_init__(self) -> None:
        check_number(self.max_iter, "--max_iter", minimum=0, integer=True)
        check_number(self.min_energy, "--min_energy", minimum=0)
        check_number(self.tol, "--tol", above=0)
        check_number(self.n_starts, "--n_starts", minimum=1, integer=True)
        check_number(self.batch_size, "--batch_size", minimum=1, integer=True)
        check_number(self.cache_gb, "--cache_gb", minimum=0)  # None (the default) passes
        check_number(self.n_pca, "--n_pca", minimum=0, integer=True)
        super().__post_init__()


@dataclass
class CausalConfig(DataConfig):
    """Extract a causal basis at every site of a model.

    Examples:

      tyche causal --model zoo:shakespeare-lm --k 16 --sites 'resid_pre.*'
      tyche causal --target tuned --lens runs/tuned-lens --out runs/causal-tuned
      tyche causal train-lens --help                  # train a tuned lens first
    """

    k: int = 16
    """directions per site"""
    target: Literal["logit", "tuned", "model"] = "logit"
    """what maps hidden states to logits: the logit lens, a tuned lens (--lens) or the model"""
    lens: str | None = None
    """folder of a tuned lens saved by `tyche causal train-lens` (for --target tuned)"""
    search: SearchFlags = field(default_factory=SearchFlags)
    """the search settings (flat flags: --mode, --max_iter, ...)"""
    out: str = "runs/causal"
    """output folder: one CausalBasis per site, energies.png, summary.json"""
    plot: bool = True
    """write energies.png"""
    overwrite: bool = False
    """replace a run of other settings in --out (its bases are removed first)"""


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
    batch_size: int = 16
    """sequences per forward pass"""
    out: str = "runs/tuned-lens"
    """output folder of the lens (safetensors + JSON)"""
    overwrite: bool = False
    """replace a lens of other settings in --out"""


# ----------------------------------------------------------------------------- checks
def _check_data_config(cfg: DataConfig) -> None:
    """Flags shared by both sub-commands, checked before anything is loaded."""
    from tyche.zoo.catalogue import check_name

    check_number(cfg.seq_len, "--seq_len", minimum=2, integer=True)
    check_number(cfg.n_sequences, "--n_sequences", minimum=1, integer=True)
    check_number(cfg.seed, "--seed", minimum=0, integer=True)
    if not split_list(cfg.sites):
        raise CommandError("--sites is empty; give site patterns such as 'resid_pre.*'")
    if cfg.model.startswith("zoo:"):
        if check_name(cfg.model, kind="model") == "digits-mlp":
            raise CommandError("--model zoo:digits-mlp has no tokens; give a language model")
    elif not (Path(cfg.model).expanduser() / "config.json").is_file():
        raise CommandError(
            f"--model: {cfg.model!r} is not a save_pretrained folder (no config.json in it)"
        )
    if cfg.data.startswith("zoo:"):
        if check_name(cfg.data, kind="data") == "fashion-mnist":
            raise CommandError("--data: zoo:fashion-mnist is image data, not text")
    else:
        check_readable_text(cfg.data, "--data")


def validate(cfg: CausalConfig) -> None:
    """Check every flag of ``tyche causal`` without loading anything."""
    _check_data_config(cfg)
    check_number(cfg.k, "--k", minimum=1, integer=True)
    search = cfg.search  # its flags are checked as it is made (SearchFlags.__post_init__)
    if cfg.target == "model" and (not search.fast or search.cache_gb is not None):
        raise CommandError("--no-fast and --cache_gb apply to lens targets, not --target model")
    if cfg.target == "tuned":
        if not cfg.lens:
            raise CommandError(
                "--target tuned needs --lens FOLDER (train one: tyche causal train-lens)"
            )
        if not (Path(cfg.lens).expanduser() / "meta.json").is_file():
            raise CommandError(f"--lens: no tuned lens saved in {cfg.lens!r}")
    elif cfg.lens:
        raise CommandError(f"--lens is only used with --target tuned (not {cfg.target})")
    check_writable_folder(cfg.out, "--out")
    check_unlocked(cfg.out)


def validate_train_lens(cfg: TrainLensConfig) -> None:
    """Check every flag of ``tyche causal train-lens`` without loading anything."""
    _check_data_config(cfg)
    check_number(cfg.batch_size, "--batch_size", minimum=1, integer=True)
    check_number(cfg.steps, "--steps", minimum=1, integer=True)
    check_number(cfg.lr, "--lr", above=0)
    check_number(cfg.weight_decay, "--weight_decay", minimum=0)
    check_writable_folder(cfg.out, "--out")
    check_unlocked(cfg.out)


def _check_sites(model: torch.nn.Module, tokens: Mapping[str, Any], cfg: DataConfig,
                 k: int | None) -> list[str]:  # fmt: skip
    """Resolve the site patterns and, with ``k``, check it fits every site's width.

    One forward pass on a single short row reads each site's width, so a pattern that
    matches nothing or a k that is too large is reported before any real work.
    """
    import torch

    from tyche.hooks import read_activations
    from tyche.sites import resolve_sites

    names = [s.name for s in resolve_sites(model, split_list(cfg.sites))]
    if k is None:
        return names
    probe = {key: v[:1, :2] for key, v in tokens.items()}
    device = next(model.parameters()).device
    with torch.no_grad(), read_activations(model, names) as acts:
        model(**{key: v.to(device) for key, v in probe.items()})
    for name in names:
        width = acts[name].shape[-1]
        if k > width:
            raise CommandError(f"--k {k} is larger than the width {width} of site {name}")
    return names


def _load(cfg: DataConfig) -> tuple[torch.nn.Module, Any, str]:
    """The model on this rank's device, its tokenizer and the spec of the data to use."""
    from tyche.distributed import default_device
    from tyche.zoo import resolve_model

    zoo_model = resolve_model(cfg.model)
    if zoo_model.tokenizer is None:
        raise CommandError(
            f"--model {cfg.model} has no tokenizer; causal bases need a language model"
        )
    check_context(zoo_model.model, cfg.seq_len, "--seq_len",
                  allow_long=cfg.allow_long_context, name=cfg.model)  # fmt: skip
    return zoo_model.model.to(default_device()), zoo_model.tokenizer, cfg.data


def _tokens(cfg: DataConfig, tokenizer: Any) -> dict[str, torch.Tensor]:
    """``n_sequences`` token rows of the data, drawn with the seed."""
    import torch

    from tyche.data import chunk_and_tokenize
    from tyche.distributed import rank0_print
    from tyche.zoo import resolve_texts

    with reworded_text_errors("--data", cfg.data, "--seq_len"):
        tokens = chunk_and_tokenize(resolve_texts(cfg.data), tokenizer, max_seq_len=cfg.seq_len)
    n = tokens["input_ids"].shape[0]
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    pick = pick[: cfg.n_sequences].sort().values
    chosen = {k: v[pick] for k, v in tokens.items()}
    rows = chosen["input_ids"].shape[0]
    note = "" if rows == cfg.n_sequences else f" (the text has only {rows})"
    rank0_print(f"data {cfg.data}: {rows} sequences × {cfg.seq_len} tokens{note}")
    return chosen


def _load_lens(cfg: CausalConfig, model: torch.nn.Module) -> Any:
    """The tuned lens of --lens on ``model``, refused in the flags' words when it was trained
    on another model."""
    from tyche.causal.lenses import TunedLens, TunedLensWeights
    from tyche.io import model_hash

    trained_on, this = TunedLensWeights.load(cfg.lens).model_hash, model_hash(model)
    if trained_on is not None and trained_on != this:
        raise CommandError(
            f"--lens {cfg.lens} was trained on another model (hash {trained_on}), not on --model "
            f"{cfg.model} ({this}); train one on it: {PROG} train-lens --model {cfg.model}"
        )
    return TunedLens.load(cfg.lens, model, strict=False)  # the hashes were compared above


# ----------------------------------------------------------------------------- run
def _settings(cfg: DataConfig) -> dict[str, Any]:
    """The flags that make the results, ``{"--flag": value}``."""
    return {f"--{k}": v for k, v in flat_settings(cfg).items() if k not in FREE}


def run_causal(cfg: CausalConfig) -> dict:
    """Run ``tyche causal`` with a parsed config; returns ``{site: CausalBasis}``."""
    validate(cfg)
    with claim_folder(cfg.out, PROG, _settings(cfg), OWNED, overwrite=cfg.overwrite):
        return _extract(cfg)


def _extract(cfg: CausalConfig) -> dict:
    """:func:`run_causal` in its claimed --out."""
    from tyche.causal.extraction import extract_causal_bases
    from tyche.distributed import get_rank, init_distributed, rank0_print
    from tyche.io import write_json
    from tyche.plotting import causal_energies

    init_distributed()
    rank0_print("settings: " + json.dumps(flat_settings(cfg)))
    out = Path(cfg.out)
    model, tokenizer, _ = _load(cfg)
    lens = _load_lens(cfg, model) if cfg.target == "tuned" else None
    tokens = _tokens(cfg, tokenizer)
    sites = _check_sites(model, tokens, cfg, cfg.k)

    def save(site: str, basis: CausalBasis) -> None:
        if get_rank() == 0:
            basis.save(out / site)

    on_interrupt(f"the bases of finished sites are saved under {out}/")
    start = time.perf_counter()
    bases = extract_causal_bases(
        model,
        tokens,
        cfg.k,
        sites,
        cfg.search,
        target=cfg.target,
        lens=lens,
        seed=cfg.seed,
        on_basis=save,
    )
    on_interrupt(None)
    elapsed = time.perf_counter() - start
    if get_rank() == 0:
        summary = {"config": flat_settings(cfg), "seconds": elapsed,
                   "sites": {s: {"energies": b.energies.tolist(),
                                 "subspace_energies": b.subspace_energies.tolist(),
                                 "greedy_subspace_energies": None
                                 if b.greedy_subspace_energies is None
                                 else b.greedy_subspace_energies.tolist(),
                                 "pca_energies": None if b.pca_energies is None
                                 else b.pca_energies.tolist(),
                                 "n_evals": b.n_evals} for s, b in bases.items()}}  # fmt: skip
        best_effort(
            PROG, "write summary.json", lambda: write_json(out / "summary.json", summary), out
        )
        head = (
            f"\ncausal bases of {cfg.model} ({cfg.search.mode} ablation, {cfg.search.objective}, "
            f"{cfg.target} target, {tokens['input_ids'].numel()} tokens, {elapsed:.1f} s)"
        )
        best_effort(PROG, "print the table", lambda: print(head + "\n" + energy_table(bases)), out)
        if cfg.search.refine == "joint":
            best_effort(PROG, "print the joint table", lambda: print(joint_table(bases)), out)
        if cfg.plot:
            best_effort(PROG, "draw energies.png",
                    lambda: print(f"figure: {causal_energies(bases, out / 'energies.png')}"),
                    out)  # fmt: skip
        print(f"saved {len(bases)} bases under {out}/")
    return bases


def run_train_lens(cfg: TrainLensConfig):
    """Run ``tyche causal train-lens`` with a parsed config; returns the TunedLens."""
    validate_train_lens(cfg)
    with claim_folder(cfg.out, f"{PROG} train-lens", _settings(cfg), LENS_OWNED,
                      overwrite=cfg.overwrite):  # fmt: skip
        return _train_lens(cfg)


def _train_lens(cfg: TrainLensConfig):
    """:func:`run_train_lens` in its claimed --out."""
    from tyche.causal.train_lens import train_tuned_lens
    from tyche.distributed import get_rank, init_distributed, rank0_print

    init_distributed()
    rank0_print("settings: " + json.dumps(flat_settings(cfg)))
    model, tokenizer, _ = _load(cfg)
    tokens = _tokens(cfg, tokenizer)
    sites = _check_sites(model, tokens, cfg, None)
    lens = train_tuned_lens(model, tokens, sites, steps=cfg.steps, lr=cfg.lr,
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
    argv = list(argv)
    if argv and argv[0] == "train-lens":
        run_train_lens(parse_config(TrainLensConfig, argv[1:], "tyche causal train-lens"))
        return
    run_causal(parse_config(CausalConfig, argv, PROG))


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


def joint_table(bases: Mapping[str, CausalBasis]) -> str:
    """Per site, the joint energy of ablating the first i directions, greedy then refined."""
    lines = ["joint energy of the first i directions (nats), greedy basis / refined basis:"]
    width = max([len("site")] + [len(s) for s in bases])
    for site, b in bases.items():
        greedy = b.greedy_subspace_energies
        cells = ", ".join(
            f"{'-' if greedy is None else f'{float(greedy[i]):.4g}'}/{float(e):.4g}"
            for i, e in enumerate(b.subspace_energies)
        )
        lines.append(f"{site:<{width}}  {cells}")
    return "\n".join(lines)
