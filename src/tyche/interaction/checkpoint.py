"""Checkpoints of the finished sections of a build, so an interrupted build loses none of them.

Section ``i`` runs from node layer ``i`` to node layer ``i + 1``; it is *finished* when node
layer ``i``'s basis and, when edges are asked for, its edges ``(k_{i+1}, k_i)`` are known.
:func:`~tyche.interaction.graph.build_interaction_graph` saves each finished section to
``folder/section-<i>/`` (safetensors + JSON, :mod:`tyche.io`) together with the settings and the
model hash it depends on and a digest of its tensors. A section is written in a hidden sibling
folder and renamed into place, so a killed process leaves either a whole section or none; a
section that does not load, or whose tensors do not match their digest, is not trusted.

Bases are built from the last node layer backwards and section ``i``'s basis depends on
section ``i + 1``'s, so a build resumes from the contiguous run of finished sections at the
end (:meth:`SectionCheckpoint.finished`). Under ``torchrun`` only rank 0 writes; every rank
reads the same sections (rank 0 decides how many are trusted).
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from tyche.distributed import broadcast_, get_rank
from tyche.errors import InputError
from tyche.interaction.basis import InteractionBasis
from tyche.io import ResultIO, model_hash

__all__ = ["SavedSection", "SectionCheckpoint", "section_digest"]

PREFIX = "section-"


def section_digest(basis: InteractionBasis, edges: Tensor | None) -> str:
    """16 hex characters of a sha256 over the basis's tensors and the edges (if any)."""
    tensors = {f.name: getattr(basis, f.name) for f in fields(basis)}
    named = {k: v for k, v in tensors.items() if isinstance(v, Tensor)}
    if edges is not None:
        named["edges"] = edges
    return model_hash(named)


@dataclass(frozen=True)
class SavedSection(ResultIO):
    """One finished section of a build.

    Attributes:
        index: the section ``i`` (node layer ``i`` to ``i + 1``).
        node_layer: node layer ``i``'s name.
        basis: node layer ``i``'s basis.
        edges: ``(k_{i+1}, k_i)`` edges, or None when the build asked for bases only.
        settings: the build settings (those of ``BASIS_KEYS`` are checked on resume).
        model_hash: ``tyche.io.model_hash`` of the model.
        digest: :func:`section_digest` of ``basis`` and ``edges`` when saved.
    """

    UNITS: ClassVar[dict[str, str]] = {"edges": "squared output units per position"}

    index: int
    node_layer: str
    basis: InteractionBasis
    edges: Tensor | None
    settings: dict
    model_hash: str
    digest: str


class SectionCheckpoint:
    """The finished sections of one build, kept in ``folder``.

    ``resume=False`` refuses a folder that already holds sections (an earlier build's work
    would otherwise be overwritten unseen).
    """

    def __init__(self, folder: str | os.PathLike[str], *, resume: bool) -> None:
        self.folder = Path(folder)
        if not resume and self.saved():
            raise InputError(
                f"{self.folder} already holds sections of an earlier build: resume it "
                "(resume=True, on the command line --resume) or choose an empty folder"
            )

    def path(self, index: int) -> Path:
        return self.folder / f"{PREFIX}{index}"

    def saved(self) -> list[int]:
        """Indices of the section folders present (trusted or not), ascending."""
        if not self.folder.is_dir():
            return []
        found = [p.name.removeprefix(PREFIX) for p in self.folder.glob(f"{PREFIX}*")]
        return sorted(int(s) for s in found if s.isdigit())

    def save(self, section: SavedSection) -> None:
        """Write ``section`` atomically (rank 0 only; other ranks return at once)."""
        if get_rank() != 0:
            return
        final = self.path(section.index)
        tmp = self.folder / f".{final.name}.tmp"
        old = self.folder / f".{final.name}.old"
        for stale in (tmp, old):
            shutil.rmtree(stale, ignore_errors=True)
        section.save(tmp)
        if final.exists():  # a section recomputed after it was not trusted
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def load(self, index: int) -> SavedSection | None:
        """Section ``index`` if it is saved whole and its tensors match their digest."""
        path = self.path(index)
        if not path.is_dir():
            return None
        try:
            section = SavedSection.load(path)
            ok = section.index == index and section.digest == section_digest(
                section.basis, section.edges
            )
        except Exception as err:  # noqa: BLE001 - any unreadable file: recompute the section
            reason = f"it does not load ({type(err).__name__}: {err})"
        else:
            if ok:
                return section
            reason = "its tensors do not match their digest"
        warnings.warn(f"{path} is not trusted ({reason}); computing that section again",
                      stacklevel=3)  # fmt: skip
        return None

    def finished(self, n_sections: int) -> dict[int, SavedSection]:
        """The contiguous run of trusted sections ending at section ``n_sections - 1``.

        Rank 0 decides how many are trusted and every rank loads that many; a rank that cannot
        read a section rank 0 trusted raises (the ranks must share the folder).
        """
        found: dict[int, SavedSection] = {}
        if get_rank() == 0:
            for i in reversed(range(n_sections)):
                section = self.load(i)
                if section is None:
                    break
                found[i] = section
        count = int(broadcast_(torch.tensor([len(found)], dtype=torch.long)).item())
        if get_rank() != 0:
            for i in range(n_sections - 1, n_sections - 1 - count, -1):
                section = self.load(i)
                if section is None:
                    raise RuntimeError(
                        f"rank {get_rank()} cannot read {self.path(i)}, which rank 0 read; "
                        "every rank needs the same checkpoint folder (a shared file system)"
                    )
                found[i] = section
        return found

    def remove(self) -> None:
        """Delete the folder and every section in it (rank 0 only)."""
        if get_rank() == 0:
            shutil.rmtree(self.folder, ignore_errors=True)
