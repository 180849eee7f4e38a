"""Interventions on codes: force, replace, append or block code ids, and measure the effect.

An :class:`Intervention` names a codebook (its site, and the head for per-head codebooks), a
code id and what to do with it:

- ``"force"``: every one of the k slots takes the code (several forced codes at one codebook
  and the same positions share the slots round robin, so k forced codes replace the top k);
- ``"replace"``: slot ``slot`` takes the code (successive replace interventions at a codebook
  without a slot take the slots k-1, k-2, ...: the weakest first);
- ``"append"``: the code is added as an extra slot (the mean then divides by k + 1);
- ``"block"``: the code is never chosen; with ``refill`` the next best code takes its place,
  without it the slot outputs zero but still counts in the mean.

``positions`` index the sequence of each forward pass (negative from the end); None is every
position. Inside ``with intervene(model, [...])`` every forward pass (and so ``generate``)
runs with the edits; the layer recomputes its output from the patched ids.
:func:`generate` samples under interventions (positions are then absolute in the growing
sequence, so the KV cache is turned off when positions are given); :func:`next_token_jsd`
and :func:`target_rate` measure the effect.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from tyche.codebook.layer import CodebookLayer, CodeEdit
from tyche.codebook.model import CodebookModel
from tyche.divergence import token_jsd

__all__ = [
    "Intervention",
    "generate",
    "intervene",
    "next_token_jsd",
    "parse_interventions",
    "target_rate",
]

Mode = Literal["force", "replace", "append", "block"]
MODES: tuple[str, ...] = ("force", "replace", "append", "block")


@dataclass(frozen=True)
class Intervention:
    """One edit of the code ids chosen at one codebook (see the module docstring)."""

    site: str
    code: int
    mode: Mode = "force"
    head: int | None = None
    positions: tuple[int, ...] | None = None
    slot: int = -1
    refill: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"intervention mode must be one of {MODES}, got {self.mode!r}")
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))


def _edit(model: CodebookModel, iv: Intervention) -> tuple[Any, CodeEdit]:
    layer = model.codebook(iv.site)  # ValueError naming the codebook sites
    if not isinstance(iv.code, int) or not 0 <= iv.code < layer.num_codes:
        raise ValueError(
            f"code id {iv.code!r} is out of range for the codebook at {iv.site} "
            f"(it has {layer.num_codes} codes: 0 to {layer.num_codes - 1})"
        )
    grouped = not isinstance(layer, CodebookLayer)
    if iv.head is not None and not (grouped and 0 <= iv.head < layer.n_groups):
        what = f"heads 0 to {layer.n_groups - 1}" if grouped else "one codebook (no heads)"
        raise ValueError(f"head {iv.head} does not exist at {iv.site}: it has {what}")
    if grouped and iv.head is None and layer.n_groups > 1 and iv.mode != "block":
        raise ValueError(
            f"{iv.site} has one codebook per head ({layer.n_groups}); say which with head=H "
            "(code ids differ between heads)"
        )
    if iv.mode == "replace" and not -layer.k <= iv.slot < layer.k:
        raise ValueError(f"slot {iv.slot} is out of range for k={layer.k} at {iv.site}")
    group = iv.head if grouped else 0
    return layer, CodeEdit(iv.mode, iv.code, group, iv.positions, iv.slot % layer.k, iv.refill)


@contextmanager
def intervene(
    model: CodebookModel, interventions: Iterable[Intervention]
) -> Iterator[CodebookModel]:
    """Apply ``interventions`` to every forward pass inside the ``with`` block.

    Everything is validated first (unknown site, code id out of range, missing or unknown
    head, slot out of range raise ``ValueError`` and nothing is changed). The previous edits
    come back on exit, also after an error.
    """
    planned: dict[int, tuple[Any, list[CodeEdit]]] = {}
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise TypeError(f"expected Intervention objects, got {type(iv).__name__}")
        layer, edit = _edit(model, iv)
        if iv.mode == "replace" and iv.slot == -1:  # let the layer pick successive slots
            edit = CodeEdit("replace", edit.code, edit.group, edit.positions, -1, edit.refill)
        planned.setdefault(id(layer), (layer, []))[1].append(edit)
    saved = {key: layer.edits for key, (layer, _) in planned.items()}
    try:
        for layer, edits in planned.values():
            layer.edits = tuple(layer.edits) + tuple(edits)
        yield model
    finally:
        for key, (layer, _) in planned.items():
            layer.edits = saved[key]


@torch.no_grad()
def generate(
    model: CodebookModel,
    input_ids: torch.Tensor,
    interventions: Sequence[Intervention] = (),
    *,
    seed: int | None = None,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """``model.generate`` under ``interventions`` (sampling seeded by ``seed`` if given).

    With positions in any intervention the KV cache is off, so positions stay absolute.
    Returns the generated ids ``(B, T + new)`` on the CPU.
    """
    kwargs = dict(generate_kwargs)
    if any(iv.positions is not None for iv in interventions):
        kwargs["use_cache"] = False
    input_ids = input_ids.to(model.device)
    kwargs.setdefault("attention_mask", torch.ones_like(input_ids))
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), intervene(model, interventions):
        if seed is not None:
            torch.manual_seed(seed)
        return model.generate(input_ids=input_ids, **kwargs).cpu()


@torch.no_grad()
def next_token_jsd(
    model: CodebookModel,
    input_ids: torch.Tensor,
    interventions: Sequence[Intervention],
    *,
    position: int = -1,
) -> torch.Tensor:
    """JSD (nats) between the next-token distributions at ``position`` without and with the
    interventions, per row of ``input_ids`` ``(B, T)``: shape ``(B,)``."""
    ids = input_ids.to(model.device)
    clean = model(input_ids=ids).logits[:, position]
    with intervene(model, interventions):
        patched = model(input_ids=ids).logits[:, position]
    return token_jsd(clean, patched).cpu()


def target_rate(texts: Sequence[str], pattern: str, *, ignore_case: bool = True) -> float:
    """Fraction of ``texts`` in which the regex ``pattern`` occurs."""
    if not texts:
        raise ValueError("target_rate needs at least one text")
    regex = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    return sum(1 for t in texts if regex.search(t)) / len(texts)


_SPEC = re.compile(
    r"^(?P<site>[^/@]+?)(?:/h(?:ead)?(?P<head>\d+))?:(?P<code>-?\d+)"
    r"(?:@(?P<pos>-?\d+(?:;-?\d+)*))?$"
)


def parse_interventions(spec: str, mode: Mode = "force") -> list[Intervention]:
    """Parse ``"SITE[/hHEAD]:CODE[@P1;P2],..."`` (comma separated) into interventions.

    E.g. ``"mlp_out.1:42"``, ``"attn_heads.0/h3:7@-1"``. Raises ``ValueError`` naming the
    piece that does not parse.
    """
    out = []
    for piece in (p.strip() for p in spec.split(",")):
        if not piece:
            continue
        m = _SPEC.match(piece)
        if m is None:
            raise ValueError(
                f"cannot parse intervention {piece!r}: expected SITE[/hHEAD]:CODE[@POS;POS], "
                "e.g. mlp_out.1:42 or attn_heads.0/h3:7@-1"
            )
        positions = tuple(int(p) for p in m["pos"].split(";")) if m["pos"] else None
        head = int(m["head"]) if m["head"] is not None else None
        out.append(Intervention(m["site"], int(m["code"]), mode, head, positions))
    return out
