"""Lazy re-exports for package ``__init__`` modules, so importing a package stays cheap.

``tyche.cli.basin`` imports ``tyche.basin`` first; with eager re-exports that would pull in
torch before a single flag is checked. A package instead writes::

    __getattr__, __dir__ = lazy_exports(__name__, {"estimate_basin": "tyche.basin.core"})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, names: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` importing ``names[attr]`` on first access of ``attr``."""
    table = dict(names)

    def __getattr__(attr: str) -> Any:
        if attr in table:
            return getattr(importlib.import_module(table[attr]), attr)
        raise AttributeError(f"module {package!r} has no attribute {attr!r}")

    def __dir__() -> list[str]:
        return sorted(table)

    return __getattr__, __dir__
