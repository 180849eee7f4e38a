"""What a resumed ``tyche basin`` run must match: the flags that change a sample, in the
words of the command line, and the messages that refuse a mismatch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tyche.cli.commandline import CommandError

#: settings recorded with every sample -> the words a user of this command knows them by
CLI_WORDS = {
    "model": "--model",
    "model_hash": "--model (its weights changed)",
    "data": "--data",
    "data_hash": "--data (its tokens changed)",
    "val_size": "--val_size",
    "max_seq_len": "--max_seq_len",
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
}


RUN_FILE = "run.json"


def flag_identity(cmd: Any, plan: Any) -> dict[str, Any]:
    """Every flag that changes a sample, as the user gave it (defaults filled in)."""
    return {
        "--model": cmd.model,
        "--data": plan.data,
        "--val_size": None if plan.is_digits else plan.val_size,
        "--max_seq_len": None if plan.is_digits else plan.max_seq_len,
        "--exclude": list(plan.exclude),
        "--preconditioners": list(plan.kinds),
        "--eps": cmd.eps,
        "--exponent": cmd.exponent,
        "--sigma": cmd.sigma,
        "--cutoffs": list(plan.cutoffs),
        "--seed": cmd.seed,
        "--n_samples": cmd.n_samples,
        "--where": None if plan.subsets is None else [s.text for s in plan.subsets],
    }


def refuse_mixing(saved: dict[str, Any], now: dict[str, Any], folder: Path) -> None:
    differ = [
        f"{key} (saved {plain(saved.get(key))}, now {plain(now.get(key))})"
        for key in dict.fromkeys([*saved, *now])
        if saved.get(key) != now.get(key)
    ]
    if differ:
        raise CommandError(
            f"cannot --resume the run in {folder}: these settings differ from it: "
            f"{'; '.join(differ)}. Resume with the saved settings, or drop --resume and "
            "choose another --out to start afresh"
        )


def mismatch_message(err: Any) -> str:
    differ = []
    for key, (saved, now) in err.differences.items():
        words = CLI_WORDS.get(key, key)
        if key.endswith("_hash"):
            differ.append(words)
        else:
            differ.append(f"{words} (saved {plain(saved)}, now {plain(now)})")
    return (
        f"cannot --resume the run in {err.folder}: these settings differ from it: "
        f"{'; '.join(dict.fromkeys(differ))}. Resume with the saved settings, or drop --resume "
        "and choose another --out to start afresh"
    )


def plain(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)
