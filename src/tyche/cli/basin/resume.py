"""What a resumed ``tyche basin`` run must match: the flags that change a sample, in the
words of the command line, and the messages that refuse a mismatch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tyche.cli.run_folder import resume_refusal
from tyche.resume import compare_settings

#: settings recorded with every sample -> the words a user of this command knows them by
CLI_WORDS = {
    "model": "--model",
    "model_hash": "--model (its weights changed)",
    "data": "--data",
    "data_hash": "--data (its tokens changed)",
    "n_sequences": "--n_sequences",
    "seq_len": "--seq_len",
    "input_ids_sha256": "--data (its token rows changed)",
    "exclude": "--exclude",
    "n_params": "--exclude (the number of measured parameters)",
    "preconditioner_kind": "--preconditioners",
    "preconditioner": "--preconditioners",
    "preconditioner_hash": "the preconditioner's values (--eps, --exponent or the optimizer state)",
    "eps": "--eps",
    "exponent": "--exponent",
    "sigma": "--sigma",
    "cutoff": "--cutoffs",
    "cutoffs": "--cutoffs",
    "seed": "--seed",
    "n_samples": "--n_samples",
    "max_radius": "--sigma (the search's radius bound)",
    "where": "--where",
    "where_hash": "--where (its mask changed)",
    "include": "--include",
    "adapt": "--adapt",
}


RUN_FILE = "run.json"


def flag_identity(cmd: Any, plan: Any) -> dict[str, Any]:
    """Every flag that changes a sample, as the user gave it (defaults filled in)."""
    return {
        "--model": cmd.source.model,
        "--data": plan.rows.data,
        "--n_sequences": None if plan.is_digits else plan.rows.n_sequences,
        "--seq_len": None if plan.is_digits else plan.rows.seq_len,
        "--exclude": list(plan.exclude),
        "--preconditioners": list(plan.kinds),
        "--eps": cmd.eps,
        "--exponent": cmd.exponent,
        "--sigma": cmd.sigma,
        "--cutoffs": list(plan.cutoffs),
        "--seed": cmd.rows.seed,
        "--n_samples": cmd.n_samples,
        "--where": None if plan.subsets is None else [s.text for s in plan.subsets],
        "--include": None if plan.include is None else list(plan.include),
        # recorded when on, so that a run of before --adapt existed reads the same
        **({"--adapt": cmd.adapt} if cmd.adapt else {}),
        "--checkpoints": cmd.checkpoints,
    }


def refuse_mixing(saved: dict[str, Any], now: dict[str, Any], folder: Path) -> None:
    """Refuse a --resume whose flags differ from the interrupted run's, naming them."""
    changed = compare_settings(saved, now)
    if changed:
        raise resume_refusal(folder, changed)


def mismatch_message(err: Any) -> str:
    """A :class:`tyche.resume.SettingsMismatch` of the estimator in the flags' words."""
    return str(resume_refusal(err.folder, err.differences, CLI_WORDS))
