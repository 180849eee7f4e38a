"""Checkpoints of finished basin samples, so an interrupted run resumes and loses none.

Each rank owns one safetensors file in the checkpoint folder, rewritten atomically after
every batch; ``settings.json`` guards against resuming with different settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tyche.errors import InputError
from tyche.io import write_safetensors
from tyche.resume import SettingsMismatch, record_settings

__all__ = ["FIELDS", "SampleCheckpoint", "SettingsMismatch", "field_dtype"]

#: the per-sample fields a checkpoint keeps, indexed like ``index`` along dim 0 (radii, deltas,
#: logabsint and estimates have one column per cutoff)
FIELDS = ("index", "radii", "deltas", "props", "logabsint", "estimates", "n_evals")


def field_dtype(field: str) -> torch.dtype:
    return torch.long if field in ("index", "n_evals") else torch.float64


class SampleCheckpoint:
    """Finished samples of one run, kept in ``folder``."""

    def __init__(self, folder: str | Path, settings: dict[str, Any], *, resume: bool, rank: int):
        self.folder = Path(folder)
        self.rank = rank
        self.records: dict[str, list[torch.Tensor]] = {k: [] for k in FIELDS}
        if not resume and any(self.folder.glob("samples-rank*.safetensors")):
            raise InputError(
                f"{self.folder} already holds samples of an earlier run: resume it (resume=True, "
                "on the command line --resume) or choose an empty folder"
            )
        # resuming: the saved settings.json must match (SettingsMismatch names what differs)
        record_settings(self.folder, settings, resume=resume, write=rank == 0)
        self.path = self.folder / f"samples-rank{rank}.safetensors"
        if resume and self.path.exists():  # keep what this rank wrote before
            old = load_file(str(self.path))
            self.records = {k: [old[k]] for k in FIELDS}

    def load_finished(self) -> dict[str, torch.Tensor]:
        """Every sample finished by any rank of an earlier run, sorted by index."""
        parts = [load_file(str(p)) for p in sorted(self.folder.glob("samples-rank*.safetensors"))]
        if not parts:
            return {k: torch.empty(0, dtype=field_dtype(k)) for k in FIELDS}
        merged = {k: torch.cat([p[k] for p in parts]) for k in FIELDS}
        order = torch.argsort(merged["index"])
        merged = {k: v[order] for k, v in merged.items()}
        keep = torch.ones_like(merged["index"], dtype=torch.bool)
        keep[1:] = merged["index"][1:] != merged["index"][:-1]
        return {k: v[keep] for k, v in merged.items()}

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        """Record one finished batch and rewrite this rank's file atomically."""
        for k in FIELDS:
            self.records[k].append(batch[k].detach().cpu())
        data = {k: torch.cat(v).contiguous() for k, v in self.records.items()}
        write_safetensors(data, self.path)
