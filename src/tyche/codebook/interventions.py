"""Interventions on codes: force, replace, append or block code ids, and measure the effect.

An :class:`Intervention` names a codebook (its site, and the head for per-head codebooks), a
code id and what to do with it:

- ``"force"``: every one of the k slots takes the code (several forced codes at one codebook
  and the same positions share the slots round robin, so k forced codes replace the top k);
- ``"replace"``: slot ``slot`` takes the code (successive replace interventions at a codebook
  without a slot take the slots k-1, k-2, ...: the weakest first);
- ``"append"``: the code is added as an extra slot (the mean then divides by k + 1);
- ``"block"``: the code is never chosen; with ``refill`` the next best unblocked code takes
  its place, without it the slot outputs zero but still counts in the mean. Where refilling
  blocks leave fewer than k codes unblocked, the slots beyond them are empty in the same way
  (id -1, a zero vector counted in the mean; every code blocked: the output is zero).

``positions`` index the sequence of each forward pass (negative from the end); None is every
position. Inside ``with intervene(model, [...])`` every forward pass (and so ``generate``)
runs with the edits; the layer recomputes its output from the patched ids. A position the
sequence of a forward pass does not have (``p >= T`` or ``p < -T``) raises ``ValueError``
rather than doing nothing. :func:`generate` samples under interventions (positions are then
absolute in the growing sequence, so the KV cache is turned off when positions are given): a
position is refused up front only when no forward pass of the generation reaches it (the
longest has the prompt's T tokens plus ``max_new_tokens - 1``: the last token generated is
never fed back), and shorter passes skip it. :func:`next_token_jsd` and :func:`target_rate`
measure the effect.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from tyche.codebook.layer import CodebookLayer, CodeEdit, out_of_range
from tyche.codebook.model import CodebookModel
from tyche.divergence import token_jsd
from tyche.errors import InputError

__all__ = [
    "Intervention",
    "beyond_horizon",
    "generate",
    "check_horizon",
    "intervene",
    "longest_pass",
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
            raise InputError(f"intervention mode must be one of {MODES}, got {self.mode!r}")
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
            if not self.positions:
                raise InputError(
                    f"intervention at {self.site}: positions is empty, so it would change "
                    "nothing; give positions=None for every position"
                )

    @property
    def spec(self) -> str:
        """The intervention as :func:`parse_interventions` reads it, with its mode first:
        ``"force mlp_out.1:3@99"``."""
        head = "" if self.head is None else f"/h{self.head}"
        where = "" if self.positions is None else "@" + ";".join(map(str, self.positions))
        return f"{self.mode} {self.site}{head}:{self.code}{where}"


def beyond_horizon(
    interventions: Iterable[Intervention], horizon: int
) -> tuple[Intervention, int] | None:
    """The first intervention with a position that no forward pass of at most ``horizon``
    tokens has (``p >= horizon`` or ``p < -horizon``), and that position; None if none."""
    for iv in interventions:
        p = out_of_range(iv.positions, horizon)
        if p is not None:
            return iv, p
    return None


def check_horizon(interventions: Iterable[Intervention], horizon: int) -> None:
    """Raise ``ValueError`` for an intervention with a position that no forward pass of at
    most ``horizon`` tokens has (see :func:`beyond_horizon`)."""
    found = beyond_horizon(interventions, horizon)
    if found is not None:
        iv, p = found
        raise InputError(
            f"intervention {iv.spec}: position {p} can never apply: the longest forward "
            f"pass has {horizon} tokens (positions {-horizon} to {horizon - 1})"
        )


def _edit(model: CodebookModel, iv: Intervention) -> tuple[Any, CodeEdit]:
    layer = model.codebook(iv.site)  # ValueError naming the codebook sites
    if not isinstance(iv.code, int) or not 0 <= iv.code < layer.num_codes:
        raise InputError(
            f"code id {iv.code!r} is out of range for the codebook at {iv.site} "
            f"(it has {layer.num_codes} codes: 0 to {layer.num_codes - 1})"
        )
    grouped = not isinstance(layer, CodebookLayer)
    if iv.head is not None and not (grouped and 0 <= iv.head < layer.n_groups):
        what = f"heads 0 to {layer.n_groups - 1}" if grouped else "one codebook (no heads)"
        raise InputError(f"head {iv.head} does not exist at {iv.site}: it has {what}")
    if grouped and iv.head is None and layer.n_groups > 1 and iv.mode != "block":
        raise InputError(
            f"{iv.site} has one codebook per head ({layer.n_groups}); say which head "
            f"(Intervention(head=H), or {iv.site}/hH:{iv.code} in an intervention spec): "
            "code ids differ between heads"
        )
    if iv.mode == "replace" and not -layer.k <= iv.slot < layer.k:
        raise InputError(f"slot {iv.slot} is out of range for k={layer.k} at {iv.site}")
    group = iv.head if grouped else 0
    slot, label = iv.slot % layer.k, f"intervention {iv.spec}"
    return layer, CodeEdit(iv.mode, iv.code, group, iv.positions, slot, iv.refill, label)


@contextmanager
def intervene(
    model: CodebookModel, interventions: Iterable[Intervention], *, horizon: int | None = None
) -> Iterator[CodebookModel]:
    """Apply ``interventions`` to every forward pass inside the ``with`` block.

    Everything is validated first (unknown site, code id out of range, missing or unknown
    head, slot out of range raise ``ValueError`` and nothing is changed). A forward pass
    whose sequence lacks a position raises ``ValueError``. With ``horizon`` (tokens: the
    longest forward pass the positions are meant for, as in generation) positions are checked
    against it here instead, and shorter passes skip the positions past their end. The
    previous edits come back on exit, also after an error.
    """
    planned: dict[int, tuple[Any, list[CodeEdit]]] = {}
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise TypeError(f"expected Intervention objects, got {type(iv).__name__}")
        if horizon is not None:
            check_horizon([iv], horizon)
        layer, edit = _edit(model, iv)
        if iv.mode == "replace" and iv.slot == -1:  # let the layer pick successive slots
            edit = replace(edit, slot=-1)
        if horizon is not None:
            edit = replace(edit, horizon=horizon)
        planned.setdefault(id(layer), (layer, []))[1].append(edit)
    saved = {key: layer.edits for key, (layer, _) in planned.items()}
    try:
        for layer, edits in planned.values():
            layer.edits = tuple(layer.edits) + tuple(edits)
        yield model
    finally:
        for key, (layer, _) in planned.items():
            layer.edits = saved[key]


def longest_pass(model: CodebookModel, prompt_len: int, kwargs: dict[str, Any]) -> int | None:
    """Tokens in the longest forward pass of ``model.generate(**kwargs)`` without a KV cache
    on a prompt of ``prompt_len`` tokens: the prompt plus ``max_new_tokens - 1`` (the last
    token generated is never fed back). From ``max_new_tokens`` or ``max_length`` in
    ``kwargs``, else the model's generation config; None when neither says."""
    config = kwargs.get("generation_config") or getattr(model.base, "generation_config", None)
    new = kwargs.get("max_new_tokens")
    if new is None and kwargs.get("max_length") is not None:
        new = kwargs["max_length"] - prompt_len
    if new is None and config is not None:
        new = getattr(config, "max_new_tokens", None)
        if new is None and getattr(config, "max_length", None) is not None:
            new = config.max_length - prompt_len
    return None if new is None else prompt_len + max(int(new), 1) - 1


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

    With positions in any intervention the KV cache is off, so positions stay absolute: a
    position no forward pass reaches (past the prompt's T tokens plus ``max_new_tokens - 1``)
    raises ``ValueError`` before anything is generated. Returns the generated ids
    ``(B, T + new)`` on the CPU.
    """
    kwargs = dict(generate_kwargs)
    horizon = None
    if any(iv.positions is not None for iv in interventions):
        kwargs["use_cache"] = False
        horizon = longest_pass(model, input_ids.shape[-1], kwargs)
    input_ids = input_ids.to(model.device)
    kwargs.setdefault("attention_mask", torch.ones_like(input_ids))
    devices = [model.device] if model.device.type == "cuda" else []
    steered = intervene(model, interventions, horizon=horizon)
    with torch.random.fork_rng(devices=devices), steered:
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
    horizon: int | None = None,
) -> torch.Tensor:
    """JSD (nats) between the next-token distributions at ``position`` without and with the
    interventions, per row of ``input_ids`` ``(B, T)``: shape ``(B,)``.

    A position of an intervention past the T tokens raises ``ValueError``; with ``horizon``
    (the longest sequence the positions are meant for, e.g. :func:`longest_pass` of a
    generation from this prompt) they are checked against it and those past T skipped."""
    ids = input_ids.to(model.device)
    clean = model(input_ids=ids).logits[:, position]
    with intervene(model, interventions, horizon=horizon):
        patched = model(input_ids=ids).logits[:, position]
    return token_jsd(clean, patched).cpu()


def target_rate(texts: Sequence[str], pattern: str, *, ignore_case: bool = True) -> float:
    """Fraction of ``texts`` in which the regex ``pattern`` occurs."""
    if not texts:
        raise InputError("target_rate needs at least one text")
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
            raise InputError(
                f"cannot parse intervention {piece!r}: expected SITE[/hHEAD]:CODE[@POS;POS], "
                "e.g. mlp_out.1:42 or attn_heads.0/h3:7@-1"
            )
        positions = tuple(int(p) for p in m["pos"].split(";")) if m["pos"] else None
        head = int(m["head"]) if m["head"] is not None else None
        out.append(Intervention(m["site"], int(m["code"]), mode, head, positions))
    return out
