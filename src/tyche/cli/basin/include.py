"""``tyche basin --include``: one basin per component of the model, in one run.

A component is a set of parameters; every other parameter stays at its trained value while
its basin is measured. ``--include`` lists components separated by ``;``, each either a
comma-separated list of parameter-name globs (``gpt_neox.layers.0.*``) or a keyword, expanded
once the model is loaded, from its parameter names alone (no table of architectures):

``layers``
    one component per element of a numbered module list: the name up to and including its
    first all-digit part (``gpt_neox.layers.3``, ``transformer.h.3``, ``model.layers.3``,
    ``blocks.3``; the digits MLP's ``nn.Sequential`` gives one per Linear layer, ``0`` and
    ``2``). Parameters outside such lists (embeddings, final norm, unembedding) are in none.
``sublayers``
    inside each of those blocks, its attention and its MLP separately: the first module
    below the block whose name holds ``attn`` or ``attention`` (``attention``, ``attn``,
    ``self_attn``), resp. ``mlp``, ``ffn``, ``feed_forward``, ``moe``, ``intermediate`` or
    ``fc<digits>`` (OPT's ``fc1`` and ``fc2`` make one MLP). Norms (a name holding ``norm``,
    or ``ln``, ``ln_1``, ``ln2``, ...) met first belong to neither.
``embedding``
    the token and position embeddings together: the parameters of ``nn.Embedding`` modules
    and of other non-Linear modules whose name holds ``embed`` (not ``unembed``), so an
    untied output layer such as GPT-NeoX's ``embed_out`` is not one.

Keywords and globs mix: ``'embedding;sublayers'``. ``--exclude`` still applies inside each
component. Each component is measured with the run's settings, seed and preconditioner kinds;
its preconditioner holds the entries the whole model's would give its parameters
(:func:`restrict`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tyche.cli.commandline import CommandError, split_list

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tyche.basin.params import ParameterLayout

__all__ = ["KEYWORDS", "Component", "expand_components", "parse_include", "restrict"]

FLAG = "--include"
KEYWORDS = ("layers", "sublayers", "embedding")
_ATTENTION = ("attn", "attention")
_MLP = ("mlp", "ffn", "feed_forward", "feedforward", "moe", "intermediate")


@dataclass(frozen=True)
class Component:
    """One component: its ``label`` (table, summary.json), the ``globs`` that select it, the
    parameter ``names`` it measures (after --exclude, in the model's order) and its size."""

    label: str
    globs: tuple[str, ...]
    names: tuple[str, ...]
    n_params: int
    slug: str


# ----------------------------------------------------------------------------- before loading
def parse_include(text: str | None) -> tuple[str, ...] | None:
    """The components of ``--include`` as written (a keyword, or globs joined by ','), in
    order; None without the flag. Checks the syntax only: nothing is loaded."""
    if text is None:
        return None
    parts = []
    for raw in text.split(";"):
        globs = split_list(raw)
        if not globs:
            continue
        keywords = [g for g in globs if g in KEYWORDS]
        if keywords and len(globs) > 1:
            raise CommandError(
                f"{FLAG}: the keyword {keywords[0]!r} is a component of its own; separate it "
                f"from {raw.strip()!r}'s globs with ';'"
            )
        part = ",".join(globs)
        if part in parts:
            raise CommandError(f"{FLAG} lists {part!r} twice")
        parts.append(part)
    if not parts:
        raise CommandError(
            f"{FLAG} is empty; give components separated by ';', each comma-separated "
            f"parameter-name globs or one of {', '.join(KEYWORDS)}"
        )
    return tuple(parts)


# ----------------------------------------------------------------------------- after loading
def _named_like(names: Sequence[str]) -> str:
    return ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")


def _blocks(names: Sequence[str]) -> dict[str, list[str]]:
    """Block prefix (the name up to its first all-digit part) -> its parameter names."""
    blocks: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part.isdigit():
                blocks.setdefault(".".join(parts[: i + 1]), []).append(name)
                break
    return blocks


def _role(segment: str) -> str | None:
    """'norm', 'attention', 'mlp' or None for one module name inside a block."""
    low = segment.lower()
    if "norm" in low or re.fullmatch(r"ln(_?\d+|_?f)?", low):
        return "norm"
    if any(word in low for word in _ATTENTION):
        return "attention"
    if any(word in low for word in _MLP) or re.fullmatch(r"fc_?\d*", low):
        return "mlp"
    return None


def _layers(names: Sequence[str], model: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    return [(prefix, (prefix + ".*",)) for prefix in _blocks(names)]


def _sublayers(names: Sequence[str], model: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    found = []
    for prefix, members in _blocks(names).items():
        roles: dict[str, list[str]] = {}
        for name in members:
            path = prefix
            for segment in name[len(prefix) + 1 :].split(".")[:-1]:
                path += "." + segment
                role = _role(segment)
                if role is not None:
                    if role != "norm" and path not in roles.setdefault(role, []):
                        roles[role].append(path)
                    break
        for role, modules in roles.items():
            label = modules[0] if len(modules) == 1 else f"{prefix}.{role}"
            found.append((label, tuple(m + ".*" for m in modules)))
    return found


def _embedding(names: Sequence[str], model: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    from torch import nn

    modules = dict(model.named_modules())
    chosen: list[str] = []
    for name in names:
        path = name.rpartition(".")[0]
        module, last = modules.get(path), path.rpartition(".")[2].lower()
        named = "embed" in last and "unembed" not in last and not isinstance(module, nn.Linear)
        if (isinstance(module, nn.Embedding) or named) and path and path not in chosen:
            chosen.append(path)
    return [("embedding", tuple(m + ".*" for m in chosen))] if chosen else []


_FINDERS = {"layers": _layers, "sublayers": _sublayers, "embedding": _embedding}
_NOT_FOUND = {
    "layers": "no numbered module list (a name part that is all digits, e.g. layers.0)",
    "sublayers": "no attention or MLP module inside a numbered block (e.g. layers.0.attn, "
    "layers.0.mlp)",
    "embedding": "no nn.Embedding (or other *embed* module that is not Linear)",
}


def _slug(label: str) -> str:
    """For folder names: the label with glob characters dropped, ',' as '+'."""
    text = re.sub(r"[*?\[\]]", "", label).replace(",", "+")
    text = re.sub(r"[^A-Za-z0-9_.+-]", "_", text)
    return re.sub(r"\.+(?=\+|$)", "", text).strip(".+") or "component"


def expand_components(
    parts: Sequence[str], model: nn.Module, exclude: Sequence[str] = ()
) -> list[Component]:
    """The components of :func:`parse_include`'s ``parts`` on ``model``, keywords expanded,
    in order. Raises CommandError (naming the model's parameters) for a glob that matches
    no parameter, a keyword that finds nothing, a component left empty by ``exclude``, or
    two components of the same parameters."""
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    sizes = {n: p.numel() for n, p in named}
    wanted: list[tuple[str, tuple[str, ...]]] = []
    for part in parts:
        if part in _FINDERS:
            found = _FINDERS[part](names, model)
            if not found:
                raise CommandError(
                    f"{FLAG} {part}: {type(model).__name__} has {_NOT_FOUND[part]}; give "
                    f"globs of its parameter names instead, named like {_named_like(names)}"
                )
            wanted += found
            continue
        globs = tuple(split_list(part))
        for glob in globs:
            if not any(fnmatch.fnmatchcase(n, glob) for n in names):
                raise CommandError(
                    f"{FLAG}: {glob!r} matches no parameter of the model; its parameters are "
                    f"named like {_named_like(names)}"
                )
        wanted.append((part, globs))
    components: list[Component] = []
    seen: dict[tuple[str, ...], str] = {}
    slugs: set[str] = set()
    for label, globs in wanted:
        chosen = tuple(n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)
                       and not any(fnmatch.fnmatchcase(n, g) for g in exclude))  # fmt: skip
        if not chosen:
            raise CommandError(
                f"{FLAG}: every parameter of {label!r} is held fixed by --exclude; drop the "
                "component or narrow --exclude"
            )
        if chosen in seen:
            raise CommandError(
                f"{FLAG}: {label!r} and {seen[chosen]!r} are the same parameters; give each "
                "component once"
            )
        seen[chosen] = label
        slug, i = _slug(label), 2
        while slug in slugs:
            slug, i = f"{_slug(label)}-{i}", i + 1
        slugs.add(slug)
        total = sum(sizes[n] for n in chosen)
        components.append(Component(label, globs, chosen, total, slug))
    return components


def restrict(
    p: torch.Tensor | None, layout: ParameterLayout, names: Sequence[str]
) -> torch.Tensor | None:
    """The entries of the whole selection's diagonal preconditioner ``p`` (layout.size,)
    that belong to the parameters ``names`` (in that order): shape (D_c,).

    These are the p entries the full-model preconditioner gives the component; the estimator
    rescales them to unit determinant, which leaves the law of the unit direction p ⊙ u /
    |p ⊙ u| unchanged: it is the full-model direction law restricted to the component's
    coordinates and normalised."""
    if p is None:
        return None
    import torch

    parts = layout.split(p)
    return torch.cat([parts[n].reshape(-1) for n in names])
