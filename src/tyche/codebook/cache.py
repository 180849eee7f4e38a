"""Activation caches: the code ids of every token of a data set, with the text, on disk.

:func:`build_cache` runs a :class:`~tyche.codebook.CodebookModel` over token rows and writes a
folder:

==========================  ===============================================================
``manifest.json``           model name and fingerprint, sites, shapes, settings, data
``codes.safetensors``       per site: int32 ``(n, T, G, k)`` code ids, best first (G = 1 for
                            a single codebook, the number of heads for per-head codebooks)
``tokens.safetensors``      ``input_ids`` ``(n, T)`` and ``offsets`` ``(n, T + 1)``: token t of
                            row i is ``texts[i][offsets[i, t]:offsets[i, t + 1]]``
``texts.json``              the decoded text of every row (token pieces joined)
``neurons.safetensors``     optional: per site the dense activation entering the codebook,
                            float16 ``(n, T, D)`` (D = G × width), for the neuron baseline
``model/``                  optional: the codebook model itself (``save_pretrained``)
==========================  ===============================================================

No pickle anywhere. :func:`load_cache` reads it back; :meth:`CodeCache.check_model` raises if
a model is not the one the cache was built with.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from tyche.codebook.model import CodebookModel
from tyche.distributed import progress as progress_bar
from tyche.errors import InputError
from tyche.frameworks import framework_of
from tyche.io import json_text

__all__ = ["CodeCache", "build_cache", "load_cache", "token_pieces"]

MANIFEST = "manifest.json"
CODES = "codes.safetensors"
TOKENS = "tokens.safetensors"
TEXTS = "texts.json"
NEURONS = "neurons.safetensors"
MODEL_DIR = "model"
FORMAT = "tyche-codebook-cache"
FORMAT_VERSION = 1


def token_pieces(tokenizer: Any, ids: torch.Tensor) -> list[list[str]]:
    """The text of every token of ``ids`` ``(n, T)``, such that joining a row's pieces gives
    its text.

    A token's piece is what it adds to the decoded text after the previous token:
    ``decode([prev, t])`` minus ``decode([prev])`` (so word-level and SentencePiece
    tokenizers keep the spaces between words), or ``decode([t])`` for the first token and
    where the decoded pair does not extend the previous token's text. Each distinct pair is
    decoded once. Without a tokenizer a token is shown as ``<id>``.
    """
    rows = ids.tolist()
    if tokenizer is None:
        return [[f"<{t}>" for t in row] for row in rows]
    singles = sorted({t for row in rows for t in row})
    alone = dict(
        zip(
            singles,
            tokenizer.batch_decode([[t] for t in singles], clean_up_tokenization_spaces=False),
        )
    )
    pairs = sorted({(a, b) for row in rows for a, b in zip(row, row[1:])})
    joined = tokenizer.batch_decode([list(p) for p in pairs], clean_up_tokenization_spaces=False)
    after: dict[tuple[int, int], str] = {}
    for (a, b), text in zip(pairs, joined):
        head = alone[a]
        after[(a, b)] = text[len(head) :] if text.startswith(head) else alone[b]
    return [[alone[row[0]]] + [after[(a, b)] for a, b in zip(row, row[1:])] for row in rows]


@dataclass
class CodeCache:
    """A cache folder in memory (see the module docstring). ``codes[site]`` is
    ``(n, T, G, k)`` int32; ``neurons`` is loaded on first use."""

    folder: Path
    manifest: dict[str, Any]
    input_ids: torch.Tensor
    offsets: torch.Tensor
    texts: list[str]
    codes: dict[str, torch.Tensor]
    _counts: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    @property
    def n_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def layout(self, site: str) -> dict[str, int]:
        """``{"n_groups", "num_codes", "k"}`` of the codebook at ``site``."""
        if site not in self.manifest["codebooks"]:
            raise InputError(f"the cache has no codebook at {site!r}; it has {self.sites}")
        return self.manifest["codebooks"][site]

    def counts(self, site: str) -> torch.Tensor:
        """How many tokens chose each code (any of the k slots): ``(G, num_codes)`` long."""
        if site not in self._counts:
            lay = self.layout(site)
            ids = self.codes[site].long()  # (n, T, G, k)
            g, n_codes = lay["n_groups"], lay["num_codes"]
            flat = (ids + torch.arange(g).view(1, 1, g, 1) * n_codes).reshape(-1)
            counts = torch.bincount(flat, minlength=g * n_codes).view(g, n_codes)
            self._counts[site] = counts
        return self._counts[site]

    @cached_property
    def neurons(self) -> dict[str, torch.Tensor]:
        """Dense activations per site, float16 ``(n, T, D)`` (empty if none were stored)."""
        from safetensors.torch import load_file

        path = self.folder / NEURONS
        return load_file(str(path)) if path.is_file() else {}

    def token_text(self, row: int, pos: int) -> str:
        return self.texts[row][int(self.offsets[row, pos]) : int(self.offsets[row, pos + 1])]

    def check_model(self, model: CodebookModel) -> None:
        """Raise ``ValueError`` unless ``model`` is the model this cache was built with."""
        mine = self.manifest["model_fingerprint"]
        theirs = model.fingerprint()
        if mine != theirs:
            raise InputError(
                f"the cache in {self.folder} was built with another model (fingerprint {mine}, "
                f"this model {theirs}, model {self.manifest.get('model_name')!r}); build a cache "
                "with this model (tyche codebook cache) or load the cache's own model"
            )

    @property
    def model_dir(self) -> Path | None:
        """The folder of the cached model (None if the cache holds no model)."""
        path = self.folder / MODEL_DIR
        return path if (path / "config.json").is_file() else None

    def load_model(self, **kwargs: Any) -> CodebookModel:
        """The codebook model stored in the cache (checked against the fingerprint)."""
        if self.model_dir is None:
            raise FileNotFoundError(
                f"the cache in {self.folder} holds no model (it was built with copy_model=False: "
                "tyche codebook cache --no-copy_model); build it again with copy_model=True "
                "(the command's default, --copy_model)"
            )
        model = CodebookModel.from_pretrained(self.model_dir, **kwargs).eval()
        self.check_model(model)
        return model


@torch.no_grad()
def build_cache(
    model: CodebookModel,
    input_ids: torch.Tensor,
    out: str | os.PathLike[str],
    *,
    tokenizer: Any | None = None,
    batch_size: int = 32,
    neurons: bool = True,
    copy_model: bool = True,
    provenance: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> CodeCache:
    """Run ``model`` over ``input_ids`` ``(n, T)`` and write a cache folder to ``out``.

    ``tokenizer`` (default ``model.tokenizer``) decodes the text. ``neurons`` stores the
    dense activations entering each codebook (float16), ``copy_model`` the model itself (so
    the folder alone serves the app and interventions; a base model without
    ``save_pretrained``, such as a TransformerLens model, is refused: pass False).
    ``provenance`` says where the model and the data came from, for the manifest: its
    ``"model_name"`` and ``"data_name"`` (each None when absent) become the manifest's entries
    of those names, any other keys its ``"extra"``; e.g.
    ``provenance={"model_name": "runs/cb", "data_name": "zoo:shakespeare"}``.
    ``progress`` shows a progress bar over the batches.
    """
    from safetensors.torch import save_file

    model_name, data_name, extra = _split_provenance(provenance)
    if not isinstance(model, CodebookModel) or not model.sites:
        raise InputError("build_cache needs a CodebookModel with at least one codebook")
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise InputError(f"input_ids must be a non-empty (n, T) tensor, got {input_ids.shape}")
    if copy_model and not hasattr(model.base, "save_pretrained"):
        what = ("a TransformerLens model" if framework_of(model.base) == "transformer_lens"
                else f"the base model {type(model.base).__name__}")  # fmt: skip
        raise InputError(
            f"copy_model=True stores the model in the cache, but {what} has no "
            "save_pretrained; build the cache with copy_model=False and keep the model yourself"
        )
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    layers = model.layers()
    was = model.training
    model.eval()
    codes: dict[str, list[torch.Tensor]] = {s: [] for s in layers}
    dense: dict[str, list[torch.Tensor]] = {s: [] for s in layers}
    for layer in layers.values():
        layer.keep_input = neurons
    try:
        batches = range(0, input_ids.shape[0], batch_size)
        for i in progress_bar(batches, desc="cache", unit="batch", disable=not progress):
            model(input_ids=input_ids[i : i + batch_size].to(model.device))
            for site, layer in layers.items():
                ids = layer.last_ids
                ids = ids if ids.dim() == 4 else ids.unsqueeze(-2)  # (B, T, G, k)
                codes[site].append(ids.to("cpu", torch.int32))
                if neurons:
                    x = layer.last_input
                    dense[site].append(x.reshape(*x.shape[:2], -1).to("cpu", torch.float16))
    finally:
        for layer in layers.values():
            layer.keep_input, layer.last_input = False, None
        model.train(was)
    code_tensors = {s: torch.cat(v).contiguous() for s, v in codes.items()}
    save_file(code_tensors, str(out / CODES))
    if neurons:
        save_file({s: torch.cat(v).contiguous() for s, v in dense.items()}, str(out / NEURONS))
    elif (out / NEURONS).exists():
        (out / NEURONS).unlink()
    texts, offsets = [], torch.zeros(input_ids.shape[0], input_ids.shape[1] + 1, dtype=torch.long)
    for r, parts in enumerate(token_pieces(tokenizer, input_ids)):
        lengths = torch.tensor([len(p) for p in parts], dtype=torch.long)
        offsets[r, 1:] = lengths.cumsum(0)
        texts.append("".join(parts))
    save_file({"input_ids": input_ids.contiguous(), "offsets": offsets}, str(out / TOKENS))
    (out / TEXTS).write_text(json.dumps(texts) + "\n", encoding="utf-8")
    if copy_model:
        model.save_pretrained(out / MODEL_DIR, tokenizer=tokenizer)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "model_fingerprint": model.fingerprint(),
        "data_name": data_name,
        "sites": list(layers),
        "codebooks": {
            s: {"n_groups": l.n_groups, "num_codes": l.num_codes, "k": l.k, "dim": l.dim}
            for s, l in layers.items()
        },
        "n_sequences": int(input_ids.shape[0]),
        "seq_len": int(input_ids.shape[1]),
        "neurons": neurons,
        "has_model": copy_model,
        "seconds": time.perf_counter() - start,
        "extra": extra,
    }
    (out / MANIFEST).write_text(json_text(manifest, indent=1, sort_keys=False))
    return load_cache(out)


def _split_provenance(
    provenance: Mapping[str, Any] | None,
) -> tuple[Any, Any, dict[str, Any]]:
    """(model_name, data_name, the other keys) of ``build_cache``'s ``provenance``."""
    if provenance is None:
        return None, None, {}
    if not isinstance(provenance, Mapping) or not all(isinstance(k, str) for k in provenance):
        raise InputError(
            "provenance must be a mapping with text keys, e.g. {'model_name': ..., "
            f"'data_name': ...}}, got {type(provenance).__name__}"
        )
    rest = {k: v for k, v in provenance.items() if k not in ("model_name", "data_name")}
    return provenance.get("model_name"), provenance.get("data_name"), rest


def load_cache(folder: str | os.PathLike[str]) -> CodeCache:
    """Read a cache folder written by :func:`build_cache`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(
            f"{folder} is not a codebook cache (no {MANIFEST}); build one "
            "with `tyche codebook cache`"
        )
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version", 99) > FORMAT_VERSION:
        raise InputError(f"{folder / MANIFEST} is not a cache format this tyche reads")
    tokens = load_file(str(folder / TOKENS))
    texts = json.loads((folder / TEXTS).read_text(encoding="utf-8"))
    codes = load_file(str(folder / CODES))
    missing = [s for s in manifest["sites"] if s not in codes]
    if missing:
        raise InputError(f"{folder / CODES} lacks the sites {missing} listed in the manifest")
    return CodeCache(folder, manifest, tokens["input_ids"], tokens["offsets"], texts, codes)


def sites_of(cache: CodeCache, sites: Sequence[str] | None) -> list[str]:
    """The cache's sites, or the given ones checked against it."""
    if sites is None:
        return cache.sites
    unknown = [s for s in sites if s not in cache.sites]
    if unknown:
        raise InputError(f"the cache has no codebooks at {unknown}; it has {cache.sites}")
    return list(sites)
