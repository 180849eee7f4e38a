"""Checkpoints of a causal basis extraction, so an interrupted run recomputes nothing finished.

:func:`~tyche.causal.extract_causal_bases` given a :class:`BasisCheckpoint` saves, in its
folder (safetensors + JSON through :mod:`tyche.io`, never pickle)::

    settings.json          the caller's settings (tyche.resume: a resumed run must match)
    extraction.json        what the extraction itself depends on: k, the sites, the target,
                           the seed, the search settings that change results, the model's
                           hash and the tokens' sha256 (checked the same way)
    partial/<site>/        the greedy directions found so far at a site (PartialBasis),
                           rewritten after each direction
    sites/<site>/          a finished site's CausalBasis (its partial folder is then removed)

On resume a finished site is loaded, not recomputed, and a site in progress continues from its
saved directions (the joint refinement, if asked for, is recomputed from them). Each folder is
written beside its final name and renamed into place, so a killed process leaves a whole one or
none. Under ``torchrun`` only rank 0 writes; every rank reads the same folder (a shared file
system), and the ranks check that they read the same work.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from tyche.causal.result import CausalBasis
from tyche.distributed import barrier, broadcast_, get_rank
from tyche.errors import InputError
from tyche.io import ResultIO
from tyche.resume import record_settings

__all__ = ["BasisCheckpoint", "PartialBasis"]

EXTRACTION_FILE = "extraction.json"


@dataclass(frozen=True)
class PartialBasis(ResultIO):
    """The greedy directions of one site found so far, in the order they were found.

    Attributes:
        site: the site's name.
        vectors: (d, j) orthonormal columns, direction ``i`` found ``i``-th.
        energies: (j,) energy of ablating each column alone (nats).
        n_evals: evaluation-equivalents spent on each column.
        seconds: wall-clock seconds spent on each column.
    """

    UNITS: ClassVar[dict[str, str]] = {"energies": "nats", "seconds": "s"}

    site: str
    vectors: Tensor
    energies: list[float] = field(default_factory=list)
    n_evals: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def k(self) -> int:
        """Number of directions found."""
        return self.vectors.shape[1]


def _publish(result: ResultIO, final: Path) -> None:
    """Save ``result`` to the folder ``final`` atomically (a sibling folder renamed)."""
    tmp, old = final.with_name(f".{final.name}.tmp"), final.with_name(f".{final.name}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    result.save(tmp)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


class BasisCheckpoint:
    """The finished sites and directions of one extraction, kept in ``folder``.

    Args:
        folder: the checkpoint folder (created).
        settings: the caller's identity of the run (e.g. the command line's flags), saved as
            ``settings.json``; resuming with other settings raises
            :class:`~tyche.resume.SettingsMismatch` naming them.
        resume: continue the work saved in ``folder``. Without it a folder holding saved
            work is refused (it would be overwritten unseen).

    After an extraction, ``loaded`` maps each site whose saved work was used to the number of
    directions loaded instead of computed, and ``finished`` lists the sites loaded whole.
    """

    def __init__(self, folder: str | os.PathLike[str], settings: Mapping[str, Any], *,
                 resume: bool) -> None:  # fmt: skip
        self.folder = Path(folder).expanduser()
        self.resume = resume
        self.loaded: dict[str, int] = {}
        self.finished: list[str] = []
        if not resume and self._holds_work():
            raise InputError(
                f"{self.folder} already holds the bases of an earlier extraction: resume it "
                "(resume=True, on the command line --resume) or choose an empty folder"
            )
        record_settings(self.folder, settings, resume=resume, write=get_rank() == 0)

    def _holds_work(self) -> bool:
        return any(
            (self.folder / kind).is_dir() and any((self.folder / kind).iterdir())
            for kind in ("sites", "partial")
        )

    def check(self, identity: Mapping[str, Any]) -> None:
        """Record (or, resuming, compare) what the extraction depends on
        (``extraction.json``); a difference raises :class:`~tyche.resume.SettingsMismatch`."""
        record_settings(self.folder, identity, resume=self.resume, write=get_rank() == 0,
                        file=EXTRACTION_FILE)  # fmt: skip
        barrier()

    def load(self, sites: Sequence[str]) -> dict[str, CausalBasis | PartialBasis]:
        """The saved work of each of ``sites`` (a finished basis, or the directions found so
        far); nothing unless resuming. Every rank must read what rank 0 read."""
        found: dict[str, CausalBasis | PartialBasis] = {}
        if self.resume:
            for site in sites:
                if (self.folder / "sites" / site).is_dir():
                    found[site] = CausalBasis.load(self.folder / "sites" / site)
                elif (self.folder / "partial" / site).is_dir():
                    found[site] = PartialBasis.load(self.folder / "partial" / site)
        counts = torch.tensor([_count(found.get(s)) for s in sites], dtype=torch.long)
        if not torch.equal(broadcast_(counts.clone()), counts):
            raise RuntimeError(
                f"rank {get_rank()} read other saved work from {self.folder} than rank 0; every "
                "rank needs the same checkpoint folder (a shared file system)"
            )
        barrier()  # no rank writes before every rank has read
        self.loaded = {s: w.k for s, w in found.items()}
        self.finished = [s for s, w in found.items() if isinstance(w, CausalBasis)]
        return found

    def save_direction(self, partial: PartialBasis) -> None:
        """Save the directions found so far at ``partial.site`` (rank 0 only)."""
        if get_rank() == 0:
            _publish(partial, self.folder / "partial" / partial.site)

    def save_site(self, site: str, basis: CausalBasis) -> None:
        """Save a finished site's basis and drop its partial directions (rank 0 only)."""
        if get_rank() == 0:
            _publish(basis, self.folder / "sites" / site)
            shutil.rmtree(self.folder / "partial" / site, ignore_errors=True)

    def remove(self) -> None:
        """Delete the folder and everything in it (rank 0 only)."""
        if get_rank() == 0:
            shutil.rmtree(self.folder, ignore_errors=True)


def _count(work: CausalBasis | PartialBasis | None) -> int:
    """Directions held by saved work; a finished basis counts -1 - k (told apart)."""
    if work is None:
        return 0
    return -1 - work.k if isinstance(work, CausalBasis) else work.k
