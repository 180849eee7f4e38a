"""Names for places inside a model: sites, their aliases, and resolving patterns to them.

A *site* is one tensor of a forward pass: the input or the output of one module. Sites are
named in two ways.

* **Aliases**, found by structure (not by class name) in transformer language models whose
  blocks sit in an ``nn.ModuleList`` at a common path (``transformer.h`` for GPT-2,
  ``gpt_neox.layers`` for GPT-NeoX, ``model.layers`` for Llama, or ``h``/``layers``/``blocks``
  under other usual prefixes). With ``i`` the block index, ``B`` batch, ``T`` positions, ``D`` the
  model width:

  ==================  ===========================================================  =============
  alias               tensor                                                       shape
  ==================  ===========================================================  =============
  ``embed``           output of the token embedding (GPT-2: ``wte``, before the    (B, T, D)
                      position embedding is added)
  ``resid_pre.i``     hidden state entering block ``i`` (its first input)          (B, T, D)
  ``attn_heads.i``    input of the attention output projection (``c_proj`` /       (B, T, H, d)
                      ``dense`` / ``o_proj``), viewed per head
  ``attn_out.i``      output of the attention submodule (first element of a tuple) (B, T, D)
  ``mlp_out.i``       output of the MLP submodule                                  (B, T, D)
  ``resid_post.i``    output of block ``i`` (first element of a tuple)             (B, T, D)
  ``unembed``         input of the unembedding (``lm_head``), i.e. after the       (B, T, D)
                      final norm
  ==================  ===========================================================  =============

  On a TransformerLens model (``tyche.frameworks.HookedLM``) the aliases are its hook points
  (``resid_pre.i`` is ``blocks.i.hook_resid_pre``, ``attn_heads.i`` is ``blocks.i.attn.hook_z``,
  already per head); TransformerLens hook names and nnsight paths also resolve on HF models
  (:mod:`tyche.hook_names`).

* **Module names** from ``model.named_modules()``: ``transformer.h.0.mlp`` is that module's
  output, ``transformer.h.0.mlp:input`` its first input. On a TransformerLens model a hook
  point whose output is per head (``blocks.i.attn.hook_z``) is per head by its own name too,
  and an alias wins over a module of the same name (``unembed``, ``embed``).

Patterns are globs over both kinds of name: ``*`` and ``?`` stay inside one dotted segment,
``**`` crosses dots, ``[0-3]`` is a character class. So ``resid_pre.*`` is every block's
input and ``transformer.h.*.mlp`` every MLP, while ``transformer.h.*`` is the blocks only.
Resolved sites come in the order of a depth-first walk of the module tree (a module's input
before its submodules, its output after them), which puts blocks in layer order.

The hooks that read or replace the tensors at sites (``read_activations``,
``replace_activations``, ``Activations``) live in :mod:`tyche.hooks`, which imports this
module; this module imports nothing of Tyche.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from tyche.errors import InputError
from tyche.hook_names import envoy_path, translations

__all__ = [
    "Site",
    "alias_sites",
    "blocks",
    "context_field",
    "context_length",
    "embedding",
    "final_norm",
    "learned_positions",
    "n_layers",
    "resolve_sites",
    "unembedding",
]

_PREFIXES = ("transformer", "gpt_neox", "model", "model.decoder", "model.language_model", "")
_BLOCK_LEAVES = ("h", "layers", "blocks", "layer", "block")
_ATTN_NAMES = ("attn", "self_attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "ff")
_OUT_PROJ_NAMES = ("c_proj", "o_proj", "dense", "out_proj", "wo")
_NORM_NAMES = ("ln_f", "norm", "final_layer_norm", "final_norm", "norm_f", "ln_final")
_EMBED_NAMES = ("wte", "embed_tokens", "embed_in", "tok_embeddings", "token_embedding", "embed")
_UNEMBED_NAMES = ("lm_head", "embed_out", "unembed")
_HEAD_COUNT_ATTRS = ("num_attention_heads", "n_head", "num_heads", "n_heads")

Where = Literal["input", "output"]


@dataclass(frozen=True)
class Site:
    """One tensor of a forward pass: the first input or the (first) output of ``module``.

    ``n_heads`` set means the tensor's last dimension is read as ``(n_heads, d_head)``: reads
    give ``(..., n_heads, d_head)`` and replacement functions receive and return that view.
    ``heads_native`` says the module already outputs that view (TransformerLens' ``hook_z``),
    so nothing is split or merged.
    """

    name: str
    module_name: str
    module: nn.Module = field(repr=False)
    where: Where = "output"
    n_heads: int | None = None
    heads_native: bool = False

    def __post_init__(self) -> None:
        if self.where not in ("input", "output"):
            raise InputError(f"Site.where must be 'input' or 'output', got {self.where!r}")
        if self.n_heads is not None and self.n_heads < 1:
            raise InputError(f"Site.n_heads must be a positive int or None, got {self.n_heads}")


# ----------------------------------------------------------------------------- structure
def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _child(module: nn.Module, names: Sequence[str]) -> tuple[str, nn.Module] | None:
    children = dict(module.named_children())
    return next(((n, children[n]) for n in names if n in children), None)


def _prefixes(model: nn.Module) -> list[str]:
    first = getattr(model, "base_model_prefix", None)
    return list(dict.fromkeys(([first] if isinstance(first, str) else []) + list(_PREFIXES)))


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    for prefix in _prefixes(model):
        for leaf in _BLOCK_LEAVES:
            found = _submodule(model, _join(prefix, leaf))
            if isinstance(found, nn.ModuleList) and len(found) > 0:
                return _join(prefix, leaf), found
    return None


def _not_recognised(model: nn.Module, what: str) -> InputError:
    return InputError(
        f"could not find the {what} of {type(model).__name__}: tyche looks for an nn.ModuleList "
        "of blocks at common paths (transformer.h, gpt_neox.layers, model.layers, layers, h, "
        "blocks, ...) and for the usual names of embeddings and norms next to it. For other "
        "models pass raw module names from model.named_modules() as site patterns, e.g. "
        "'encoder.layer.*' or 'encoder.layer.0.output:input'."
    )


def blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (``transformer.h``, ``model.layers``, ...)."""
    found = _find_blocks(model)
    if found is None:
        raise _not_recognised(model, "transformer blocks")
    return found[1]


def n_layers(model: nn.Module) -> int:
    """Number of transformer blocks."""
    return len(blocks(model))


def _search(model: nn.Module, names: Sequence[str]) -> nn.Module | None:
    found = _find_blocks(model)
    prefixes = [found[0].rpartition(".")[0]] if found else []
    for prefix in dict.fromkeys(prefixes + _prefixes(model)):
        parent = _submodule(model, prefix)
        hit = _child(parent, names) if parent is not None else None
        if hit is not None:
            return hit[1]
    return None


def _hf_embeddings(model: nn.Module, getter: str) -> nn.Module | None:
    try:
        module = getattr(model, getter)() if callable(getattr(model, getter, None)) else None
    except (NotImplementedError, AttributeError):
        return None
    return module if isinstance(module, nn.Module) else None


def _embedding_or_none(model: nn.Module) -> nn.Module | None:
    module = _hf_embeddings(model, "get_input_embeddings")
    return module if module is not None else _search(model, _EMBED_NAMES)


def _unembedding_or_none(model: nn.Module) -> nn.Module | None:
    module = _hf_embeddings(model, "get_output_embeddings")
    return module if module is not None else _search(model, _UNEMBED_NAMES)


def embedding(model: nn.Module) -> nn.Module:
    """The token embedding (``wte``, ``embed_in``, ``embed_tokens``, ...)."""
    module = _embedding_or_none(model)
    if module is None:
        raise _not_recognised(model, "token embedding")
    return module


def unembedding(model: nn.Module) -> nn.Module:
    """The unembedding (``lm_head``) mapping the final hidden state to logits."""
    module = _unembedding_or_none(model)
    if module is None:
        raise _not_recognised(model, "unembedding (lm_head)")
    return module


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last block (``ln_f``, ``final_layer_norm``, ``norm``)."""
    module = _search(model, _NORM_NAMES)
    if module is None:
        raise _not_recognised(model, "final norm")
    return module


#: config fields that give a model's context length (tokens), in order of preference
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx")
#: names of learned tables of absolute position embeddings (GPT-2, BERT, OPT, TransformerLens)
_POSITION_TABLE = re.compile(r"(?:^|\.)(?:wpe|pos_embed|position_embeddings|embed_positions)$")


def context_field(model: nn.Module) -> tuple[str, int] | None:
    """``(field, tokens)``: the config field that gives the context length of ``model`` and its
    value (the HF ``config``, or TransformerLens' ``cfg``); None when the config names none."""
    for holder in (getattr(model, "config", None), getattr(model, "cfg", None)):
        for name in CONTEXT_FIELDS:
            value = getattr(holder, name, None) if holder is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return name, value
    return None


def context_length(model: nn.Module) -> int | None:
    """The longest sequence (tokens) ``model`` was built for: its config's
    ``max_position_embeddings``, ``n_positions`` or ``n_ctx``; None when unknown."""
    found = context_field(model)
    return None if found is None else found[1]


def learned_positions(model: nn.Module) -> bool:
    """Whether ``model`` adds a learned table of absolute position embeddings (GPT-2's
    ``wpe``, BERT's ``position_embeddings``, OPT's ``embed_positions``): a position past the
    table has no embedding at all. Rotary (GPT-NeoX, Llama) and ALiBi models have none."""
    return any(
        _POSITION_TABLE.search(name) and next(module.parameters(recurse=False), None) is not None
        for name, module in model.named_modules()
    )


def _head_count(model: nn.Module, attention: nn.Module) -> int | None:
    for owner in (getattr(model, "config", None), attention, getattr(attention, "config", None)):
        for attr in _HEAD_COUNT_ATTRS:
            value = getattr(owner, attr, None) if owner is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def alias_sites(model: nn.Module) -> dict[str, Site]:
    """Every alias the model supports, in layer order (empty when no blocks are found)."""
    names = {id(m): n for n, m in model.named_modules()}
    sites: dict[str, Site] = {}

    def add(alias: str, module: nn.Module | None, where: Where, heads: int | None = None) -> None:
        if module is not None and id(module) in names:
            sites[alias] = Site(alias, names[id(module)], module, where, heads)

    found = _find_blocks(model)
    if found is None:
        return sites
    if _has_hook_points(model, found):
        return _hook_point_sites(model, found[0], len(found[1]))
    add("embed", _embedding_or_none(model), "output")
    for i, block in enumerate(found[1]):
        attention = _child(block, _ATTN_NAMES)
        mlp = _child(block, _MLP_NAMES)
        out_proj = _child(attention[1], _OUT_PROJ_NAMES) if attention else None
        add(f"resid_pre.{i}", block, "input")
        if attention and out_proj:
            heads = _head_count(model, attention[1])
            add(f"attn_heads.{i}", out_proj[1] if heads else None, "input", heads)
        add(f"attn_out.{i}", attention[1] if attention else None, "output")
        add(f"mlp_out.{i}", mlp[1] if mlp else None, "output")
        add(f"resid_post.{i}", block, "output")
    add("unembed", _unembedding_or_none(model), "input")
    return sites


#: the order in which a TransformerLens model computes its children's outputs
_HOOK_POINT_ORDER = tuple(
    """embed hook_embed pos_embed hook_pos_embed blocks ln_final unembed
    hook_resid_pre hook_attn_in hook_q_input hook_k_input hook_v_input ln1
    hook_q hook_k hook_v hook_rot_q hook_rot_k hook_attn_scores hook_pattern hook_z hook_result
    attn hook_attn_out hook_resid_mid hook_mlp_in ln2 hook_pre hook_pre_linear hook_post mlp
    hook_mlp_out hook_resid_post hook_in hook_scale hook_normalized hook_out""".split()
)


def _forward_rank(children: list[tuple[str, nn.Module]]) -> dict[str, tuple[int, int]]:
    """Each child's place in forward order: by :data:`_HOOK_POINT_ORDER`, then as registered."""
    last = len(_HOOK_POINT_ORDER)
    return {
        name: (_HOOK_POINT_ORDER.index(name) if name in _HOOK_POINT_ORDER else last, i)
        for i, (name, _) in enumerate(children)
    }


def _has_hook_points(model: nn.Module, found: tuple[str, nn.ModuleList] | None) -> bool:
    """Whether ``model`` is a TransformerLens model: its first block has ``hook_resid_pre``
    (``found`` is :func:`_find_blocks`'s answer)."""
    return found is not None and _submodule(model, _join(found[0], "0.hook_resid_pre")) is not None


def _hook_point_sites(model: nn.Module, blocks_path: str, n: int) -> dict[str, Site]:
    """The aliases of a TransformerLens model: its hook points (``tyche.hook_names``)."""
    cfg = getattr(model, "cfg", None)
    heads = getattr(cfg, "n_heads", None)
    points = [("embed", "hook_embed")]
    for i in range(n):
        block = _join(blocks_path, str(i))
        points += [
            (f"resid_pre.{i}", f"{block}.hook_resid_pre"),
            (f"attn_heads.{i}", f"{block}.attn.hook_z"),
            (f"attn_out.{i}", f"{block}.hook_attn_out"),
            (f"mlp_out.{i}", f"{block}.hook_mlp_out"),
            (f"resid_post.{i}", f"{block}.hook_resid_post"),
        ]
    points.append(("unembed", "unembed.hook_in"))
    sites: dict[str, Site] = {}
    for alias, path in points:
        module = _submodule(model, path)
        if module is None and alias == "unembed":  # an Unembed without hook points
            unembed = _submodule(model, "unembed")
            if unembed is not None:
                sites[alias] = Site(alias, "unembed", unembed, "input")
            continue
        if module is None:
            continue
        per_head = alias.startswith("attn_heads") and isinstance(heads, int)
        sites[alias] = Site(
            alias, path, module, "output", heads if per_head else None, heads_native=per_head
        )
    return sites


# ----------------------------------------------------------------------------- patterns
def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if ch == "*":
            out.append(r"[^.]*")
        elif ch == "?":
            out.append(r"[^.]")
        elif ch == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out) + r"\Z")


class _Catalog:
    """Everything pattern resolution needs to know about one model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.aliases = alias_sites(model)
        self.modules = [(n, m) for n, m in model.named_modules() if n]
        self.ids = {id(m) for m in model.modules()}
        found = _find_blocks(model)
        self.n_layers = len(found[1]) if found else 0
        self.hook_points = _has_hook_points(model, found)
        # a depth-first walk: a module's input comes before its submodules, its output after
        self.events: dict[tuple[str, str], int] = {}
        self._walk("", model, set())

    def _walk(self, name: str, module: nn.Module, seen: set[int]) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        self.events[(name, "input")] = len(self.events)
        children = list(module.named_children())
        if self.hook_points:  # TransformerLens registers hook points after the layers they follow
            rank = _forward_rank(children)
            children.sort(key=lambda item: rank[item[0]])
        for child_name, child in children:
            self._walk(_join(name, child_name), child, seen)
        self.events[(name, "output")] = len(self.events)

    def order_key(self, site: Site) -> tuple[int, str]:
        return self.events.get((site.module_name, site.where), len(self.events)), site.name

    def match(self, pattern: str) -> list[Site]:
        """Sites named by ``pattern``; failing that, by its TransformerLens/nnsight spelling."""
        hits = self._match(pattern)
        for other in translations(pattern) if not hits else ():
            hits = self._match(other)
            if hits:
                break
        return hits

    def _match(self, pattern: str) -> list[Site]:
        base, _, suffix = pattern.rpartition(":")
        if not base or suffix not in ("input", "output"):
            base, suffix = pattern, ""
        regex = _glob_regex(base)
        hits = [] if suffix else [s for n, s in self.aliases.items() if regex.match(n)]
        where: Where = "input" if suffix == "input" else "output"
        # a hook point that outputs per-head tensors (TransformerLens' hook_z) is per head by
        # its own name too, as by its alias
        heads = {id(s.module): s.n_heads for s in self.aliases.values() if s.heads_native}
        taken = {s.name for s in hits}  # an alias wins over a module of its name (TL's unembed)
        for name, module in self.modules:
            if regex.match(name) and name not in taken:
                n_heads = heads.get(id(module)) if where == "output" else None
                label = name + (":input" if where == "input" else "")
                hits.append(Site(label, name, module, where, n_heads, n_heads is not None))
        return hits

    def no_match_error(self, pattern: str) -> InputError:
        base = pattern.rsplit(":", 1)[0] if pattern.endswith((":input", ":output")) else pattern
        candidates = list(self.aliases) + [n for n, _ in self.modules]
        close = difflib.get_close_matches(base, candidates, n=8, cutoff=0.5)
        families = sorted({n.split(".")[0] for n in self.aliases})
        if families:
            aliases = f"aliases {', '.join(families)} (layers .0 to .{self.n_layers - 1})"
        else:
            aliases = "no aliases (no transformer blocks found)"
        return InputError(
            f"site pattern {pattern!r} matches nothing in {type(self.model).__name__}. "
            f"Close matches: {close or 'none'}. This model has {aliases}. Globs: '*' stays in one "
            "dotted segment, '**' crosses dots; append ':input' for a module's input. "
            "See model.named_modules() for module names."
        )


def _as_list(patterns: Any) -> list[str | Site]:
    path = envoy_path(patterns)
    if path is not None:  # an nnsight Envoy: its module name
        return [path]
    if isinstance(patterns, str | Site):
        return [patterns]
    if isinstance(patterns, Sequence | set | frozenset):
        items = [p if envoy_path(p) is None else envoy_path(p) for p in patterns]
        if not all(isinstance(p, str | Site) for p in items):
            raise TypeError(f"site patterns must be str or Site, got {[type(p) for p in items]}")
        return items
    raise TypeError(f"site patterns must be a str, a Site or a sequence of them, got {patterns!r}")


def _resolve(catalog: _Catalog, patterns: Any) -> list[Site]:
    items = _as_list(patterns)
    if not items:
        raise InputError("no site patterns given: pass e.g. 'resid_pre.*' or a module name")
    sites: dict[Site, None] = {}
    for item in items:
        if isinstance(item, Site):
            if id(item.module) not in catalog.ids:
                raise InputError(f"{item} belongs to another model; resolve it on this one")
            sites[item] = None
            continue
        if not item.strip():
            raise InputError("empty site pattern: pass an alias such as 'resid_pre.0' or a glob")
        hits = catalog.match(item)
        if not hits:
            raise catalog.no_match_error(item)
        sites.update(dict.fromkeys(hits))
    return sorted(sites, key=catalog.order_key)


def resolve_sites(model: nn.Module, patterns: str | Site | Sequence[str | Site]) -> list[Site]:
    """Resolve alias/module-name globs (or Site objects) to sites in layer order.

    Raises ``ValueError`` naming close matches when a pattern matches nothing.
    """
    return _resolve(_Catalog(model), patterns)
