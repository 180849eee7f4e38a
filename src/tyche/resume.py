"""Resuming an interrupted run: its identity, the refusal of a changed one, its checkpoint folder.

A long run (basin samples, codebook training, interaction sections, causal directions) keeps
its finished work in a checkpoint folder next to ``settings.json``: every setting that changes
its results (the run's *identity*). :func:`record_settings` writes that file when a run starts
and, when it is resumed, reads it back and compares it with the current settings
(:func:`compare_settings`: as they read back from JSON, so a tuple equals the list it was
saved as); any difference raises :class:`SettingsMismatch`, which names each setting
``saved X, now Y`` and keeps them in ``differences`` for a command line to re-word as its own
flags.

Standard library only (no torch), so a command line can check a resumed run's flags before
anything heavy loads.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tyche.errors import InputError

__all__ = [
    "SETTINGS_FILE",
    "SettingsMismatch",
    "compare_settings",
    "describe_differences",
    "read_settings",
    "record_settings",
]

#: the file of a checkpoint folder that holds the run's identity
SETTINGS_FILE = "settings.json"

Differences = dict[str, tuple[Any, Any]]


def describe_differences(differences: Mapping[str, tuple[Any, Any]]) -> str:
    """``"key: saved A, now B; ..."`` (values as ``repr``), in the order given."""
    return "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differences.items())


class SettingsMismatch(InputError):
    """A resumed run's settings differ from those its saved work was made with.

    Attributes:
        folder: the checkpoint folder (None when the saved work is not a folder).
        differences: ``{setting: (saved, now)}`` for each differing setting, in the order
            of the current settings, then the saved-only ones; a command line re-words the
            keys as its own flags.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str] | None,
        differences: Mapping[str, tuple[Any, Any]],
        *,
        message: str | None = None,
    ) -> None:
        self.folder = None if folder is None else Path(folder)
        self.differences: Differences = dict(differences)
        if message is None:
            where = "the saved run" if folder is None else str(folder)
            message = (
                f"cannot resume from {where}: its run had other settings "
                f"({describe_differences(self.differences)}); use the saved settings, or "
                "start a new run in another folder"
            )
        super().__init__(message)


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON: tuples as lists, mapping keys as strings, a
    non-finite float as None (what the project's JSON writers store), other objects as
    ``str``."""
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_json(v) for v in value]
    return json.loads(json.dumps(value, default=str))


def compare_settings(
    saved: Mapping[str, Any], now: Mapping[str, Any], *, ignore: Iterable[str] = ()
) -> Differences:
    """``{key: (saved, now)}`` for every key of either mapping whose values differ once both
    are normalised as JSON (:func:`_as_json`); keys in ``ignore`` are skipped. A key missing
    on one side reads as None there. Order: the keys of ``now``, then the saved-only ones."""
    skip = set(ignore)
    old, new = _as_json(dict(saved)), _as_json(dict(now))
    keys = [k for k in dict.fromkeys([*new, *old]) if k not in skip]
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}


def read_settings(folder: str | os.PathLike[str], file: str = SETTINGS_FILE) -> dict | None:
    """The settings saved in ``folder/file``, or None (absent or unreadable)."""
    try:
        saved = json.loads((Path(folder).expanduser() / file).read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def _write(path: Path, settings: Mapping[str, Any]) -> None:
    """Write ``settings`` as sorted, indented JSON atomically (a temp file renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_as_json(dict(settings)), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def record_settings(
    folder: str | os.PathLike[str],
    settings: Mapping[str, Any],
    *,
    resume: bool,
    write: bool = True,
    ignore: Iterable[str] = (),
    file: str = SETTINGS_FILE,
) -> None:
    """Make ``folder`` the checkpoint folder of a run of ``settings``.

    Resuming a folder whose ``file`` is saved compares the two (keys in ``ignore`` left
    out) and raises :class:`SettingsMismatch` naming every difference; the file is kept.
    Otherwise (a new run, or nothing saved to resume) the folder is created and, with
    ``write`` (under torchrun: rank 0 only), ``file`` is written with ``settings``.
    """
    path = Path(folder).expanduser()
    saved = read_settings(path, file) if resume else None
    if saved is not None:
        differ = compare_settings(saved, settings, ignore=ignore)
        if differ:
            raise SettingsMismatch(path, differ)
        return
    path.mkdir(parents=True, exist_ok=True)
    if write:
        _write(path / file, settings)
