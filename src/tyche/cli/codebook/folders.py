"""The output folders of ``tyche codebook train | cache | search | steer``: what each run
owns there, the settings that make its identity, and the checks of a resumed training run.

Everything here reads files only (no torch), so a refused run ends before a model loads.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tyche.cli.codebook.args import CacheArgs, SteerArgs, TrainArgs
from tyche.cli.commandline import CommandError
from tyche.cli.run_folder import (
    Claim,
    Owned,
    check_new_file,
    check_unlocked,
    claim_folder,
    differences,
    read_record,
)

PROG = "tyche codebook"
#: flags of ``train`` that change neither the trained model nor its data: they may change
#: when a run is resumed, and a finished run of other values of them is the same run
TRAIN_FREE = ("log_every", "checkpoint_every", "resume", "out", "overwrite", "allow_long_context")
#: flags of ``cache`` that change nothing in the cache
CACHE_FREE = ("batch_size", "out", "overwrite", "allow_long_context")
#: what a save_pretrained model folder holds (the base, its tokenizer, the codebooks)
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "codebooks.json",
    "codebooks.safetensors",
)
OWNED = {
    "train": Owned(
        names=(*MODEL_FILES, "train_result", "train_args.json", "checkpoint", ".checkpoint.tmp"),
        patterns=("model-*-of-*.safetensors",),
    ),
    "cache": Owned(
        names=(
            "manifest.json",
            "codes.safetensors",
            "tokens.safetensors",
            "texts.json",
            "neurons.safetensors",
            "model",
        ),  # fmt: skip
    ),
    "search": Owned(names=("meta.json", "tensors.safetensors")),
}
#: the checkpoint's settings file (see tyche.codebook.train)
TRAINER_STATE = Path("checkpoint") / "trainer_state.json"


def settings(args: Any) -> dict[str, Any]:
    """The flags that make a run's result, ``{"--flag": value}``, defaults filled in."""
    free = {TrainArgs: TRAIN_FREE, CacheArgs: CACHE_FREE}.get(type(args), ("out", "overwrite"))
    return {f"--{k}": v for k, v in asdict(args).items() if k not in free}


def _refuse_input_inside(out: Path, spec: str, flag: str) -> None:
    """--overwrite empties --out first: refuse when the model to read lives in it."""
    if spec.startswith("zoo:"):
        return
    source, folder = Path(spec).expanduser().resolve(), out.expanduser().resolve()
    if source == folder or folder in source.parents:
        raise CommandError(
            f"--overwrite would remove {flag} {spec}, which lies in --out {out}; choose "
            "another --out"
        )


def check_train_folder(args: TrainArgs) -> None:
    """A resumed run refuses every changed flag by name; a leftover checkpoint needs
    --resume or --overwrite. Checked before anything is loaded."""
    out = Path(args.out).expanduser()
    check_unlocked(out)
    if args.resume and args.overwrite:
        raise CommandError("--overwrite discards the run that --resume continues; drop one")
    if args.overwrite:
        _refuse_input_inside(out, args.model, "--model")
    state_file = out / TRAINER_STATE
    if not state_file.is_file():
        return
    state = json.loads(state_file.read_text())
    if args.resume:
        saved = state.get("extra_settings")
        differ = differences(saved, settings(args)) if saved is not None else []
        if differ:
            raise CommandError(
                f"cannot --resume the run in {out}: these settings differ from it: "
                f"{'; '.join(differ)}. Resume with the saved settings, or drop --resume and "
                "choose another --out to start afresh"
            )
        return
    record = read_record(out)
    if not args.overwrite and record is not None and not record.get("finished"):
        raise CommandError(
            f"--out {args.out} holds an interrupted run (checkpoint at step {state.get('step')} "
            f"of {state.get('config', {}).get('steps')}): add --resume to continue it, or pass "
            "--overwrite to start afresh (or choose another --out)"
        )


def check_output_file(args: SteerArgs) -> None:
    """steer --out: never replace an earlier table without --overwrite."""
    if args.out:
        check_new_file(args.out, "--out", args.overwrite, "table")


def check_cache_folder(args: CacheArgs) -> None:
    check_unlocked(args.out)
    if args.overwrite:
        _refuse_input_inside(Path(args.out), args.model, "--model")


@contextlib.contextmanager
def claim(name: str, args: Any) -> Iterator[Claim | None]:
    """Claim the output folder of sub-command ``name`` (lock, record; see
    :mod:`tyche.cli.run_folder`); a no-op for the sub-commands that write none."""
    out = getattr(args, "out", None)
    if name not in OWNED or not out:
        yield None
        return
    resume = bool(getattr(args, "resume", False))
    with claim_folder(out, f"{PROG} {name}", settings(args), OWNED[name],
                      overwrite=args.overwrite, resume=resume) as held:  # fmt: skip
        yield held


def mismatch_message(err: Any) -> str:
    """A :class:`tyche.codebook.train.SettingsMismatch` in the words of the command line."""
    fields = set(TrainArgs.__dataclass_fields__)
    differ = []
    for key, (saved, now) in err.differences.items():
        if key in ("dim", "n_groups", "grouped"):
            words = "--model (the widths of its codebook sites)"
        else:
            words = key if key.startswith("--") or key not in fields else f"--{key}"
        differ.append(differences({words: saved}, {words: now})[0])
    return (
        f"cannot --resume the run in {err.folder.parent}: these settings differ from it: "
        f"{'; '.join(differ)}. Resume with the saved settings, or drop --resume and choose "
        "another --out to start afresh"
    )
