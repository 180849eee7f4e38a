"""The zoo's catalogue: every entry by name.

This is the only module that imports the entry modules; they import only
:mod:`tyche.zoo.entry`, so the zoo has no import circle. A new entry is one line in
:func:`_all_entries`.
"""

from __future__ import annotations

from tyche.zoo.digits import DigitsMLPEntry
from tyche.zoo.entry import UnknownEntryError, ZooEntry
from tyche.zoo.fashion_mlp import FashionMLPEntry
from tyche.zoo.fashion_mnist import FashionMNISTEntry
from tyche.zoo.modadd import ModAddEntry
from tyche.zoo.shakespeare_lm import ShakespeareLMEntry
from tyche.zoo.smollm2 import SmolLM2Entry
from tyche.zoo.text import ShakespeareEntry, StdlibDocsEntry

__all__ = ["entries", "get_entry"]


def _all_entries() -> list[ZooEntry]:
    """Every entry, models first, in the order ``tyche zoo list`` shows them."""
    return [
        DigitsMLPEntry(),
        ShakespeareLMEntry(),
        SmolLM2Entry(),
        ModAddEntry(),
        FashionMLPEntry(),
        ShakespeareEntry(),
        StdlibDocsEntry(),
        FashionMNISTEntry(),
    ]


_CATALOGUE: dict[str, ZooEntry] = {}


def entries() -> dict[str, ZooEntry]:
    """All entries by name, models first."""
    if not _CATALOGUE:
        _CATALOGUE.update({entry.name: entry for entry in _all_entries()})
    return dict(_CATALOGUE)


def get_entry(name: str, kind: str | None = None) -> ZooEntry:
    """The entry called ``name`` (a leading ``zoo:`` is allowed), optionally of one kind.

    Raises :class:`UnknownEntryError` listing the known names (of that kind) otherwise.
    """
    bare = name.removeprefix("zoo:")
    known = entries()
    entry = known.get(bare)
    if entry is None or (kind is not None and entry.kind != kind):
        names = [n for n, e in known.items() if kind is None or e.kind == kind]
        what = f"zoo {kind}" if kind else "zoo entry"
        raise UnknownEntryError(
            f"unknown {what} {bare!r}; known: {', '.join(names)} (see `tyche zoo list`)"
        )
    return entry
