"""The output folders of ``tyche codebook train | cache | search | topics | steer``: what each run
owns there, the settings that make its identity, and the checks of a resumed training run.

Everything here reads files only (no torch), so a refused run ends before a model loads.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tyche.cli.codebook.args import CacheConfig, CodebookTrainConfig, SteerConfig
from tyche.cli.commandline import CommandError, flat_settings
from tyche.cli.run_folder import (
    Claim,
    Owned,
    check_new_file,
    check_unlocked,
    claim_folder,
    read_record,
    resume_refusal,
)
from tyche.resume import compare_settings

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
        names=(*MODEL_FILES, "train_result", "train_args.json", "training.png", "checkpoint",
               ".checkpoint.tmp"),  # fmt: skip
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
    "topics": Owned(names=("meta.json", "tensors.safetensors")),
}
#: the checkpoint's settings file (see tyche.codebook.train)
TRAINER_STATE = Path("checkpoint") / "trainer_state.json"


def settings(args: Any) -> dict[str, Any]:
    """The flags that make a run's result, ``{"--flag": value}``, defaults filled in."""
    owned = {CodebookTrainConfig: TRAIN_FREE, CacheConfig: CACHE_FREE}
    free = owned.get(type(args), ("out", "overwrite"))
    return {f"--{k}": v for k, v in flat_settings(args).items() if k not in free}


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


def check_train_folder(args: CodebookTrainConfig) -> None:
    """A resumed run refuses every changed flag by name; a leftover checkpoint needs
    --resume or --overwrite. Checked before anything is loaded."""
    out = Path(args.out).expanduser()
    check_unlocked(out)
    if args.resume and args.overwrite:
        raise CommandError("--overwrite discards the run that --resume continues; drop one")
    if args.overwrite:
        _refuse_input_inside(out, args.source.model, "--model")
    state_file = out / TRAINER_STATE
    if not state_file.is_file():
        return
    state = json.loads(state_file.read_text())
    if args.resume:
        saved = state.get("extra_settings")
        changed = compare_settings(saved, settings(args)) if saved is not None else {}
        if changed:
            raise resume_refusal(out, changed)
        return
    record = read_record(out)
    if not args.overwrite and record is not None and not record.get("finished"):
        raise CommandError(
            f"--out {args.out} holds an interrupted run (checkpoint at step {state.get('step')} "
            f"of {state.get('config', {}).get('steps')}): add --resume to continue it, or pass "
            "--overwrite to start afresh (or choose another --out)"
        )


def check_output_file(args: SteerConfig) -> None:
    """steer --out: never replace an earlier table without --overwrite."""
    if args.out:
        check_new_file(args.out, "--out", args.overwrite, "table")


def check_cache_folder(args: CacheConfig) -> None:
    check_unlocked(args.out)
    if args.overwrite:
        _refuse_input_inside(Path(args.out), args.source.model, "--model")


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
    """A :class:`tyche.resume.SettingsMismatch` of the trainer in the words of the command
    line (the folder named is the run's --out, not its checkpoint folder)."""
    fields = set(flat_settings(CodebookTrainConfig()))
    words = {key: "--model (the widths of its codebook sites)" if key in WIDTH_KEYS
             else key if key.startswith("--") or key not in fields else f"--{key}"
             for key in err.differences}  # fmt: skip
    return str(resume_refusal(err.folder.parent, err.differences, words))


#: the trainer's layout keys that only the codebook model's site widths change
WIDTH_KEYS = ("dim", "n_groups", "grouped")
