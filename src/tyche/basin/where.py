"""Subsets of the evaluation data (``tyche basin --where``): the basin of one behaviour.

Syntax: one or more subsets separated by ``;``, each measured as its own basin on the same
directions::

    all                    every example or token (what a run without --where measures)
    label=3                digits whose label is 3;  label=3,5: 3 or 5;  label=each: one
                           subset per class
    play=hamlet            the lines of one Shakespeare play (play=hamlet,macbeth: either);
                           play=each: one subset per play
    mask=FILE              a boolean tensor saved in FILE (.safetensors holding one tensor,
                           or .npy): over the evaluation examples (N,) or tokens (N, T)

e.g. ``--where 'all;label=each'`` or ``--where 'play=hamlet;play=macbeth'``. With ``play=``
subsets the evaluation set is ``val_size`` sequences of each named play (so every play is
present), and ``all`` and ``mask=`` refer to that set. Only the positions the KL averages
over change; the model reads the same inputs (``ModelLoss(where=...)``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tyche.errors import InputError

KEYS = ("all", "label", "play", "mask")
MASK_SUFFIXES = (".safetensors", ".npy")


@dataclass(frozen=True)
class Subset:
    """One subset: ``key`` (all, label, play or mask) and its values (strings)."""

    key: str
    values: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """As written on the command line, e.g. ``label=3,5``."""
        return "all" if self.key == "all" else f"{self.key}={','.join(self.values)}"

    @property
    def slug(self) -> str:
        """For folder names: ``all``, ``label3+5``, ``play-hamlet``, ``mask-<file stem>``."""
        if self.key == "all":
            return "all"
        if self.key == "mask":
            return "mask-" + re.sub(r"[^A-Za-z0-9_.-]", "_", Path(self.values[0]).stem)
        sep = "" if self.key == "label" else "-"
        return f"{self.key}{sep}{'+'.join(self.values)}"


def parse_where(text: str, flag: str = "--where") -> list[Subset]:
    """Parse the subsets (see the module docstring); ValueError naming ``flag`` if malformed."""
    parts = [p.strip() for p in text.split(";") if p.strip()]
    if not parts:
        raise InputError(f"{flag} is empty; give e.g. label=3, play=hamlet, mask=FILE or all")
    out: list[Subset] = []
    for part in parts:
        key, eq, rest = part.partition("=")
        key = key.strip()
        if key == "all" and not eq:
            out.append(Subset("all"))
            continue
        if key not in KEYS or not eq:
            raise InputError(
                f"{flag}: {part!r} is not a subset; write all, label=K[,K...], "
                "play=NAME[,NAME...], mask=FILE, or several separated by ';'"
            )
        if key == "mask":
            path = rest.strip()
            if not path:
                raise InputError(f"{flag}: mask= needs a file, e.g. mask=subset.safetensors")
            out.append(Subset("mask", (path,)))
            continue
        values = tuple(v.strip() for v in rest.split(",") if v.strip())
        if not values:
            raise InputError(f"{flag}: {key}= has no values; e.g. {key}=each")
        if "each" in values and len(values) > 1:
            raise InputError(f"{flag}: {key}=each stands alone; it makes one subset per {key}")
        if len(set(values)) != len(values):
            raise InputError(f"{flag}: {part!r} names a value twice")
        if key == "label" and values != ("each",):
            bad = [v for v in values if not re.fullmatch(r"[0-9]+", v)]
            if bad:
                raise InputError(f"{flag}: label {bad[0]!r} is not a class number such as 3")
            values = tuple(str(int(v)) for v in values)
        out.append(Subset(key, values))
    seen = [s.text for s in out]
    twice = sorted({t for t in seen if seen.count(t) > 1})
    if twice:
        raise InputError(f"{flag} lists {', '.join(twice)} twice")
    return out


def check_values(subsets: Sequence[Subset], key: str, known: Sequence[str], what: str) -> None:
    """Every value of ``key`` subsets is ``each`` or one of ``known`` (else ValueError)."""
    for s in subsets:
        if s.key != key:
            continue
        unknown = [v for v in s.values if v != "each" and v not in known]
        if unknown:
            shown = ", ".join(list(known)[:12]) + (" ..." if len(known) > 12 else "")
            raise InputError(f"--where: unknown {what} {unknown[0]!r}; known: {shown}")


def expand(subsets: Sequence[Subset], key: str, values: Sequence[str]) -> list[Subset]:
    """Replace ``key=each`` by one subset per value (in order), keeping everything else."""
    out: list[Subset] = []
    for s in subsets:
        if s.key == key and s.values == ("each",):
            out.extend(Subset(key, (v,)) for v in values if Subset(key, (v,)) not in out)
        elif s not in out:
            out.append(s)
    return out


def named_plays(subsets: Sequence[Subset], titles: Sequence[str]) -> list[str]:
    """Plays the evaluation set needs, in title order (all of them for play=each)."""
    wanted = {v for s in subsets if s.key == "play" for v in s.values}
    return list(titles) if "each" in wanted else [t for t in titles if t in wanted]


def load_mask(path: str | Path) -> torch.Tensor:
    """The boolean tensor in a .safetensors file (one tensor) or a .npy file."""
    path = Path(path)
    if path.suffix == ".npy":
        import numpy as np

        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except ValueError as err:
            raise InputError(f"--where mask={path}: not a plain .npy array ({err})") from None
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if len(tensors) != 1:
        raise InputError(
            f"--where mask={path}: the file holds {len(tensors)} tensors "
            f"({', '.join(sorted(tensors)) or 'none'}); save exactly one boolean tensor"
        )
    return next(iter(tensors.values()))


def subset_mask(
    subset: Subset,
    shape: tuple[int, ...],
    *,
    labels: torch.Tensor | None = None,
    row_plays: Sequence[str] | None = None,
) -> torch.Tensor:
    """The boolean mask of ``subset`` over the evaluation examples (N,) or tokens (N, T).

    ``shape`` is the evaluation data's (N,) or (N, T); ``labels`` (N,) the classes of
    classifier examples; ``row_plays`` the play each LM row was taken from.
    """
    n = shape[0]
    if subset.key == "all":
        return torch.ones(n, dtype=torch.bool)
    if subset.key == "label":
        if labels is None:
            raise InputError("--where label= needs labelled examples (zoo:digits-mlp)")
        chosen = torch.tensor([int(v) for v in subset.values])
        mask = torch.isin(labels.cpu(), chosen)
        if not mask.any():
            raise InputError(f"--where {subset.text}: no evaluation example has that label")
        return mask
    if subset.key == "play":
        if row_plays is None:
            raise InputError("--where play= needs --data zoo:shakespeare")
        return torch.tensor([p in subset.values for p in row_plays], dtype=torch.bool)
    mask = load_mask(subset.values[0])
    if tuple(mask.shape) not in {shape[:1], tuple(shape)}:
        allowed = " or ".join(str(s) for s in dict.fromkeys([shape[:1], tuple(shape)]))
        raise InputError(
            f"--where mask={subset.values[0]}: shape {tuple(mask.shape)} does not fit the "
            f"evaluation data; it must be {allowed} (examples, or examples × tokens)"
        )
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        raise InputError(f"--where mask={subset.values[0]}: values must be boolean or 0/1")
    return mask.bool()
