"""Other frameworks' names for sites: TransformerLens hook names and nnsight module paths.

Tyche names a site by alias (``resid_pre.3``) or by module name (``transformer.h.3.mlp``),
see :mod:`tyche.sites`. Researchers arrive with two more vocabularies, and both resolve:

* **TransformerLens hook names.** On a ``HookedTransformer`` they are module names already
  (every ``HookPoint`` is a module), so they resolve as such. On a HuggingFace model of a
  family Tyche knows, they translate to the alias of the same tensor:

  ============================  ================  =========================================
  TransformerLens hook          Tyche alias       GPT-2 / GPT-NeoX / Llama module
  ============================  ================  =========================================
  ``hook_embed``                ``embed``         ``transformer.wte`` / ``gpt_neox.embed_in``
                                                  / ``model.embed_tokens``
  ``blocks.i.hook_resid_pre``   ``resid_pre.i``   block ``i``'s input (``transformer.h.i``,
                                                  ``gpt_neox.layers.i``, ``model.layers.i``)
  ``blocks.i.attn.hook_z``      ``attn_heads.i``  the attention output projection's input,
                                                  per head (``attn.c_proj`` /
                                                  ``attention.dense`` / ``self_attn.o_proj``)
  ``blocks.i.hook_attn_out``    ``attn_out.i``    the attention submodule's output
  ``blocks.i.hook_mlp_out``     ``mlp_out.i``     the MLP submodule's output
  ``blocks.i.hook_resid_post``  ``resid_post.i``  block ``i``'s output
  ``unembed.hook_in``           ``unembed``       the unembedding's input (``lm_head``)
  ============================  ================  =========================================

  :data:`TRANSFORMER_LENS` is this table as data, :func:`hook_name` and
  :func:`alias_of_hook` translate one way and the other. Globs translate too:
  ``blocks.*.hook_resid_pre`` is ``resid_pre.*``.

  Three cautions, all about TransformerLens, not about the translation. Its
  ``ln_final.hook_normalized`` is the residual stream normalised *before* the final norm's
  gain and bias, a tensor the HF model never holds, so it has no alias. On GPT-NeoX (parallel
  attention and MLP) ``resid_mid`` does not exist in the HF model either. And a
  HookedTransformer loaded with ``fold_ln``/``center_writing_weights`` (the default of
  ``from_pretrained``) computes the same outputs with other weights: its ``hook_resid_pre``
  is the HF residual stream minus its mean over the width, not the HF tensor itself.

* **nnsight module paths.** An nnsight ``Envoy``'s ``path`` is ``model.<module name>``
  (``model.transformer.h.0.mlp``), and users write ``transformer.h[0].mlp``. Both resolve:
  :func:`module_path` drops the root ``model.`` and turns ``[i]`` into ``.i``.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["TRANSFORMER_LENS", "alias_of_hook", "hook_name", "module_path", "translations"]

#: TransformerLens hook name (``{i}`` the layer) -> the Tyche alias of the same tensor
TRANSFORMER_LENS: dict[str, str] = {
    "hook_embed": "embed",
    "blocks.{i}.hook_resid_pre": "resid_pre.{i}",
    "blocks.{i}.attn.hook_z": "attn_heads.{i}",
    "blocks.{i}.hook_attn_out": "attn_out.{i}",
    "blocks.{i}.hook_mlp_out": "mlp_out.{i}",
    "blocks.{i}.hook_resid_post": "resid_post.{i}",
    "unembed.hook_in": "unembed",
}

# a layer index as written in a pattern: digits, a glob, or a character class
_INDEX = r"(\d+|\*\*?|\?+|\[[^\]]+\])"


def _pattern(template: str) -> re.Pattern[str]:
    head, sep, tail = template.partition("{i}")
    body = re.escape(head) + (_INDEX + re.escape(tail) if sep else "")
    return re.compile(body + r"\Z")


_HOOK_TO_ALIAS = [(_pattern(hook), alias) for hook, alias in TRANSFORMER_LENS.items()]
_ALIAS_TO_HOOK = [(_pattern(alias), hook) for hook, alias in TRANSFORMER_LENS.items()]


def _translate(name: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for regex, template in table:
        hit = regex.match(name)
        if hit:
            return template.replace("{i}", hit.group(1)) if hit.groups() else template
    return None


def alias_of_hook(hook: str) -> str | None:
    """The Tyche alias (or alias glob) of a TransformerLens hook name; None if it has none.

    ``alias_of_hook("blocks.3.hook_mlp_out") == "mlp_out.3"``,
    ``alias_of_hook("blocks.*.attn.hook_z") == "attn_heads.*"``.
    """
    return _translate(hook, _HOOK_TO_ALIAS)


def hook_name(alias: str) -> str | None:
    """The TransformerLens hook name of a Tyche alias (or glob); None if it has none."""
    return _translate(alias, _ALIAS_TO_HOOK)


def module_path(path: str) -> str:
    """An nnsight path as a module name: ``model.transformer.h[0].mlp`` -> ``transformer.h.0.mlp``.

    Only the brackets change here; :func:`translations` also tries the path without its
    ``model.`` root (nnsight's name for the wrapped module), because a Llama's own module
    names start with ``model.`` too.
    """
    return re.sub(r"\[(\d+)\]", r".\1", path)


def translations(pattern: str) -> list[str]:
    """Other spellings of ``pattern`` to try when it matches nothing as written, in order."""
    base, colon, suffix = pattern.rpartition(":")
    if not colon or suffix not in ("input", "output"):
        base, colon, suffix = pattern, "", ""
    tail = colon + suffix
    out: list[str] = []
    alias = alias_of_hook(base)
    if alias is not None and not tail:
        out.append(alias)
    path = module_path(base)
    for candidate in (path, path[len("model.") :] if path.startswith("model.") else None):
        if candidate and candidate != base:
            out.append(candidate + tail)
    return list(dict.fromkeys(out))


def envoy_path(item: Any) -> str | None:
    """The module name of an nnsight ``Envoy`` (its ``path`` minus the root); None otherwise."""
    path = getattr(item, "path", None)
    if not isinstance(path, str) or not type(item).__module__.startswith("nnsight"):
        return None
    return module_path(path.partition(".")[2]) if "." in path else ""
