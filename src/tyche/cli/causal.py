"""``tyche causal``: extract causal bases of a model; ``tyche causal train-lens``: a tuned lens.

Examples::

    tyche causal --model zoo:shakespeare-lm --data zoo:shakespeare --k 16 --mode mean \\
        --sites 'resid_pre.*' --out runs/causal
    tyche causal train-lens --model zoo:shakespeare-lm --out runs/tuned-lens
    tyche causal --target tuned --lens runs/tuned-lens --out runs/causal-tuned
    torchrun --nproc_per_node=2 -m tyche causal ...      # rows sharded over the processes

``tyche causal`` saves one ``CausalBasis`` folder per site under ``--out``, prints an energy
table per layer and plots each layer's energies next to those of its top PCA directions
(``--out/energies.png``). Every finished site and every finished direction is checkpointed in
``--out/checkpoints/`` (removed when the run finishes); after Ctrl-C, ``--resume`` continues
the run, loading what was finished instead of computing it again, and gives the bases an
uninterrupted run gives. A resumed run must have the same flags that change results, the same
model weights and the same tokens; it is refused, naming what differs, otherwise.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tyche.causal.options import SCREEN_POSITIONS, CausalOptions
from tyche.cli.causal_features import FEATURES, check_feature_flags
from tyche.cli.commandline import (
    CommandError,
    Subcommand,
    best_effort,
    check_number,
    check_writable_folder,
    config_flags,
    flat_settings,
    on_interrupt,
    resume_command,
    route,
    split_list,
)
from tyche.cli.inputs import ModelSource, Rows, TextRows
from tyche.cli.run_folder import Owned, check_unlocked, claim_folder, resume_refusal

if TYPE_CHECKING:
    import torch

    from tyche.causal.result import CausalBasis

__all__ = ["CausalConfig", "TrainLensConfig", "main"]

PROG = "tyche causal"
#: the checkpoint folder in --out (finished sites and directions of a run in progress)
CHECKPOINTS = "checkpoints"
#: what each sub-command writes in --out (one CausalBasis folder per site; a lens's files)
OWNED = Owned(names=("summary.json", "energies.png", "checkpoints", "features"),
              result_types=("CausalBasis",))
LENS_OWNED = Owned(names=("meta.json", "tensors.safetensors"))
#: flags that change nothing in the results
FREE = ("out", "overwrite", "resume", "plot", "batch_size", "fast", "cache_gb",
        "allow_long_context", "features_top")


@dataclass
class DataConfig:
    """Model and data shared by both sub-commands."""

    source: ModelSource = field(default_factory=ModelSource)
    """the language model (--model, --allow_long_context)"""
    rows: TextRows = field(default_factory=lambda: TextRows(n_sequences=64, seq_len=128))
    """the token rows (--data, --n_sequences, --seq_len, --seed: also the extraction's seed)"""
    sites: str = "resid_pre.*"
    """site pattern(s), comma separated (aliases such as resid_pre.3, or module-name globs)"""


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
    resume: bool = False
    """continue the interrupted run in --out from its checkpoints (--out/checkpoints/): its
    finished sites and directions are loaded, not computed again"""
    features: str | None = None
    """a SAELens or sparsify dictionary folder: after the extraction, rank its latents by
    causal energy (the --target's mean KL when a latent is removed where it fires) at the site
    it writes, one of --sites, and compare their decoder span with that site's causal basis
    (saved as --out/features)"""
    features_top: int = 10
    """latents listed in the --features table"""
    coverage_m: str = ""
    """with --features: sizes m, comma separated, of the top-m latents whose decoder span is
    compared with the causal basis (empty: k,2k,4k)"""


@dataclass
class TrainLensConfig(DataConfig):
    """Train a tuned lens (one affine translator per site) to match the final logits by KL."""

    steps: int = 300
    """optimiser steps"""
    lr: float = 1e-3
    """AdamW learning rate (linear decay to 0)"""
    weight_decay: float = 1e-3
    """AdamW weight decay"""
    rows: TextRows = field(default_factory=lambda: TextRows(n_sequences=256, seq_len=128))
    """the token rows (--data, --n_sequences, --seq_len, --seed)"""
    batch_size: int = 16
    """sequences per forward pass"""
    out: str = "runs/tuned-lens"
    """output folder of the lens (safetensors + JSON)"""
    overwrite: bool = False
    """replace a lens of other settings in --out"""


# ----------------------------------------------------------------------------- checks
def _check_data_config(cfg: DataConfig) -> None:
    """Flags shared by both sub-commands, checked before anything is loaded."""
    cfg.rows.check()
    if cfg.rows.n_sequences is None or cfg.rows.seq_len is None:
        raise CommandError("--n_sequences and --seq_len need a value")
    if not split_list(cfg.sites):
        raise CommandError("--sites is empty; give site patterns such as 'resid_pre.*'")
    cfg.source.check()


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
    check_feature_flags(cfg.features, cfg.features_top, cfg.coverage_m, cfg.k)
    check_writable_folder(cfg.out, "--out")
    check_unlocked(cfg.out)
    _check_resume(cfg)


def _check_resume(cfg: CausalConfig) -> None:
    """--resume needs an interrupted run of the same flags in --out/checkpoints; an
    interrupted run there needs --resume or --overwrite."""
    from tyche.resume import compare_settings, read_settings

    checkpoints = Path(cfg.out).expanduser() / CHECKPOINTS
    if cfg.resume and cfg.overwrite:
        raise CommandError("--overwrite discards the run that --resume continues; drop one")
    saved = read_settings(checkpoints)
    if cfg.resume and saved is None:
        raise CommandError(f"--resume: no interrupted run under {checkpoints}; drop --resume")
    if not cfg.resume and not cfg.overwrite and saved is not None:
        raise CommandError(
            f"{checkpoints} holds an interrupted run: add --resume to continue it, or pass "
            "--overwrite (or choose another --out) to start afresh"
        )
    if cfg.resume and saved is not None:
        _refuse_changes(compare_settings(saved, _settings(cfg)), checkpoints)


#: what the extraction's own record of a run names, in the command line's words
CLI_WORDS = {
    "model_hash": "--model (its weights changed)",
    "lens_hash": "--lens (its weights changed)",
    "input_ids_sha256": "--data (its tokens changed)",
    "attention_mask_sha256": "--data (its tokens changed)",
}


def _refuse_changes(differ: Mapping[str, tuple[Any, Any]], folder: Path) -> None:
    """Refuse a resumed run whose settings differ from the saved ones, naming each flag."""
    if differ:
        raise resume_refusal(folder, differ, CLI_WORDS)


def _refuse_message(err: Any) -> str:
    """A :class:`tyche.resume.SettingsMismatch` of the extraction in the flags' words."""
    return str(resume_refusal(err.folder, err.differences, CLI_WORDS))


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


def _load(cfg: DataConfig) -> tuple[torch.nn.Module, Rows]:
    """The model on this rank's device and the token rows it reads (announced)."""
    from tyche.distributed import rank0_print

    zoo_model = cfg.source.load(cfg.rows.seq_len)
    rows = cfg.rows.load(zoo_model.tokenizer, zoo_model.default_data)
    rank0_print(f"data {rows.note(cfg.rows.n_sequences)}")
    return zoo_model.model, rows


def _load_lens(cfg: CausalConfig, model: torch.nn.Module) -> Any:
    """The tuned lens of --lens on ``model``, refused in the flags' words when it was trained
    on another model."""
    from tyche.causal.lenses import TunedLens, TunedLensWeights
    from tyche.io import model_hash

    trained_on, this = TunedLensWeights.load(cfg.lens).model_hash, model_hash(model)
    if trained_on is not None and trained_on != this:
        raise CommandError(
            f"--lens {cfg.lens} was trained on another model (hash {trained_on}), not on --model "
            f"{cfg.source.model} ({this}); train one on it: {PROG} train-lens --model "
            f"{cfg.source.model}"
        )
    return TunedLens.load(cfg.lens, model, strict=False)  # the hashes were compared above


# ----------------------------------------------------------------------------- run
def _settings(cfg: DataConfig) -> dict[str, Any]:
    """The flags that make the results, ``{"--flag": value}``."""
    return {f"--{k}": v for k, v in flat_settings(cfg).items() if k not in FREE}


def run_causal(cfg: CausalConfig, argv: list[str] | None = None) -> dict:
    """Run ``tyche causal`` with a parsed config; returns ``{site: CausalBasis}``. ``argv``
    (the flags as given; default: those of ``cfg``) makes the Ctrl-C resume line."""
    validate(cfg)
    with claim_folder(cfg.out, PROG, _settings(cfg), OWNED, overwrite=cfg.overwrite,
                      resume=cfg.resume):  # fmt: skip
        return _extract(cfg, config_flags(cfg) if argv is None else argv)


def _checkpoint(cfg: CausalConfig, out: Path) -> Any:
    """The run's :class:`~tyche.causal.checkpoint.BasisCheckpoint` in --out/checkpoints, which
    also saves each finished site's basis as --out/<site> at once."""
    from tyche.causal.checkpoint import BasisCheckpoint
    from tyche.distributed import get_rank

    class SavingCheckpoint(BasisCheckpoint):
        def save_site(self, site: str, basis: CausalBasis) -> None:
            if get_rank() == 0:
                basis.save(out / site)
            super().save_site(site, basis)

    return SavingCheckpoint(out / CHECKPOINTS, _settings(cfg), resume=cfg.resume)


def _extract(cfg: CausalConfig, argv: list[str]) -> dict:
    """:func:`run_causal` in its claimed --out."""
    from tyche.causal import report
    from tyche.causal.extraction import extract_causal_bases
    from tyche.causal.plot import plot_energies
    from tyche.distributed import get_rank, init_distributed, rank0_print
    from tyche.io import model_hash, write_json

    init_distributed()
    rank0_print("settings: " + json.dumps(flat_settings(cfg)))
    out = Path(cfg.out)
    model, rows = _load(cfg)
    lens = _load_lens(cfg, model) if cfg.target == "tuned" else None
    tokens = rows.tokens
    sites = _check_sites(model, tokens, cfg, cfg.k)
    plan = None
    if cfg.features:
        from tyche.cli.causal_features import plan_features

        plan = plan_features(cfg.features, cfg.coverage_m, cfg.k, model, tokens, sites)

    from tyche.resume import SettingsMismatch

    checkpoint = _checkpoint(cfg, out)
    on_interrupt(f"finished sites and directions are saved under {out / CHECKPOINTS}/; resume "
                 f"with:\n  {resume_command(PROG, argv)}")  # fmt: skip
    start = time.perf_counter()
    try:
        bases = extract_causal_bases(
            model,
            tokens,
            cfg.k,
            sites,
            cfg.search,
            target=cfg.target,
            lens=lens,
            seed=cfg.rows.seed,
            checkpoint=checkpoint,
        )
    except SettingsMismatch as err:  # the model's weights or the data's tokens changed
        raise CommandError(_refuse_message(err)) from None
    on_interrupt(None)
    if checkpoint.loaded:
        rank0_print(f"resumed: {sum(checkpoint.loaded.values())} directions "
                    f"({len(checkpoint.finished)} finished sites) loaded from "
                    f"{out / CHECKPOINTS}/, not computed again")  # fmt: skip
    elapsed = time.perf_counter() - start
    features = None
    if plan is not None:
        from tyche.cli.causal_features import run_features

        features = run_features(plan, model, tokens, cfg.target, lens, bases[plan.site],
                                cfg.search.batch_size)  # fmt: skip
    if get_rank() == 0:
        summary = report.bases_summary(bases, elapsed, flat_settings(cfg),
                                       {"model": cfg.source.model, "model_hash": model_hash(model),
                                        **rows.record(cfg.rows)})  # fmt: skip
        best_effort(
            PROG, "write summary.json", lambda: write_json(out / "summary.json", summary), out
        )
        head = (
            f"\ncausal bases of {cfg.source.model} ({cfg.search.mode} ablation, "
            f"{cfg.search.objective}, {cfg.target} target, {tokens['input_ids'].numel()} "
            f"tokens, {elapsed:.1f} s)"
        )
        table = lambda: head + "\n" + report.energy_table(bases)  # noqa: E731
        best_effort(PROG, "print the table", lambda: print(table()), out)
        if cfg.search.refine == "joint":
            joint = lambda: report.joint_table(bases)  # noqa: E731
            best_effort(PROG, "print the joint table", lambda: print(joint()), out)
        if cfg.plot:
            best_effort(PROG, "draw energies.png",
                    lambda: print(f"figure: {plot_energies(bases, out / 'energies.png')}"),
                    out)  # fmt: skip
        if features is not None:
            from tyche.cli.causal_features import report_features

            features.save(out / FEATURES)
            text = report_features(features, cfg.features_top)
            best_effort(PROG, "print the features table", lambda: print(text), out)
            print(f"saved the latent energies to {out / FEATURES}/")
        print(f"saved {len(bases)} bases under {out}/")
    checkpoint.remove()  # the run is finished: its bases are in --out
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
    model, rows = _load(cfg)
    tokens = rows.tokens
    sites = _check_sites(model, tokens, cfg, None)
    lens = train_tuned_lens(model, tokens, sites, steps=cfg.steps, lr=cfg.lr,
                            batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
                            seed=cfg.rows.seed)  # fmt: skip
    rank0_print(f"{'site':<14} {'KL logit lens':>14} {'KL tuned lens':>14}   (nats)")
    for site, before, after in zip(lens.sites, lens.stats["kl_logit_lens"],
                                   lens.stats["kl_tuned_lens"]):  # fmt: skip
        rank0_print(f"{site:<14} {before:14.4f} {after:14.4f}")
    if get_rank() == 0:
        rank0_print(f"saved the tuned lens to {lens.save(cfg.out)}/")
    return lens


SUBCOMMANDS = {
    "extract": Subcommand(CausalConfig, run_causal,
                          "extract a causal basis at every site (the default: no name needed)"),
    "train-lens": Subcommand(TrainLensConfig, lambda cfg, argv: run_train_lens(cfg)),
}


def main(argv: list[str]) -> Any:
    """``tyche causal [extract] [--flags]`` or ``tyche causal train-lens [--flags]``."""
    return route(PROG, SUBCOMMANDS, argv, default="extract")

