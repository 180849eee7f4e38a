"""The zoo's catalogue: every entry by name, and checking a name without loading anything.

This is the only module that knows the entry modules; they import only
:mod:`tyche.zoo.entry`, so the zoo has no import circle. The table below names each entry's
kind and class, so a command line can check ``zoo:NAME`` before torch is imported; the entry
classes are imported on first use of :func:`entries` or :func:`get_entry` (a test checks the
table agrees with the classes). A new entry is one line in ``_TABLE``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from tyche.zoo.entry import UnknownEntryError

if TYPE_CHECKING:
    from tyche.zoo.entry import ZooEntry

__all__ = ["check_name", "entries", "get_entry", "names"]

#: name -> (kind, "module:Class"), models first, in the order ``tyche zoo list`` shows them
_TABLE: dict[str, tuple[str, str]] = {
    "digits-mlp": ("model", "tyche.zoo.digits:DigitsMLPEntry"),
    "digits-mlp-poisoned": ("model", "tyche.zoo.digits:DigitsMLPPoisonedEntry"),
    "shakespeare-lm": ("model", "tyche.zoo.shakespeare_lm:ShakespeareLMEntry"),
    "smollm2-135m": ("model", "tyche.zoo.smollm2:SmolLM2Entry"),
    "tokfsm": ("model", "tyche.zoo.tokfsm:TokFSMEntry"),
    "modadd": ("model", "tyche.zoo.modadd:ModAddEntry"),
    "fashion-mlp": ("model", "tyche.zoo.fashion_mlp:FashionMLPEntry"),
    "shakespeare": ("data", "tyche.zoo.text:ShakespeareEntry"),
    "stdlib-docs": ("data", "tyche.zoo.text:StdlibDocsEntry"),
    "fashion-mnist": ("data", "tyche.zoo.fashion_mnist:FashionMNISTEntry"),
}

_CATALOGUE: dict[str, ZooEntry] = {}


def names(kind: str | None = None) -> list[str]:
    """Entry names (of one kind, if given), in catalogue order; imports nothing."""
    return [n for n, (k, _) in _TABLE.items() if kind is None or k == kind]


def check_name(name: str, kind: str | None = None) -> str:
    """The bare name of ``name`` (``zoo:`` allowed) if it is an entry (of that kind).

    Raises :class:`UnknownEntryError` listing the known names otherwise. Imports nothing.
    """
    bare = name.removeprefix("zoo:")
    known = _TABLE.get(bare)
    if known is None or (kind is not None and known[0] != kind):
        what = f"zoo {kind}" if kind else "zoo entry"
        raise UnknownEntryError(
            f"unknown {what} {bare!r}; known: {', '.join(names(kind))} (see `tyche zoo list`)"
        )
    return bare


def _load(target: str) -> ZooEntry:
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)()


def entries() -> dict[str, ZooEntry]:
    """All entries by name, models first (imports every entry module once)."""
    if not _CATALOGUE:
        _CATALOGUE.update({name: _load(target) for name, (_, target) in _TABLE.items()})
    return dict(_CATALOGUE)


def get_entry(name: str, kind: str | None = None) -> ZooEntry:
    """The entry called ``name`` (a leading ``zoo:`` is allowed), optionally of one kind.

    Raises :class:`UnknownEntryError` listing the known names (of that kind) otherwise.
    """
    return entries()[check_name(name, kind)]
