"""Token batches and activations for causal basis extraction on a model."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from tyche.causal.objective import IGNORE_INDEX
from tyche.errors import InputError
from tyche.frameworks import as_module
from tyche.hooks import read_activations, replace_activations

__all__ = ["next_token_labels", "per_position", "read_site_activations", "token_inputs"]


def token_inputs(data: Any) -> dict[str, Tensor]:
    """``input_ids`` (N, T) and ``attention_mask`` (N, T) from a token dict or tensor."""
    if isinstance(data, Tensor):
        data = {"input_ids": data}
    if not isinstance(data, Mapping) or "input_ids" not in data:
        raise TypeError(
            "data must be a LongTensor (N, T) of token ids or a dict with "
            "'input_ids' (and 'attention_mask'), e.g. from tyche.data.chunk_and_tokenize"
        )
    ids = data["input_ids"]
    if ids.ndim != 2 or ids.is_floating_point() or ids.shape[0] == 0:
        raise InputError(f"input_ids must be a non-empty integer tensor (N, T), got {ids.shape}")
    mask = data.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    if mask.shape != ids.shape:
        raise InputError(
            f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(ids.shape)}"
        )
    return {"input_ids": ids, "attention_mask": mask}


def next_token_labels(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Labels (N, T) for position t = the token at t + 1 (``-100`` at the end and padding)."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    valid = torch.zeros_like(attention_mask, dtype=torch.bool)
    valid[:, :-1] = (attention_mask[:, 1:] != 0) & (attention_mask[:, :-1] != 0)
    return torch.where(valid, labels, IGNORE_INDEX)


class _Enough(Exception):
    """Raised by a hook once every site of the batch is recorded (the rest is not needed)."""


@torch.no_grad()
def read_site_activations(
    model: nn.Module, tokens: Mapping[str, Tensor], sites: list[str], batch_size: int
) -> dict[str, Tensor]:
    """Activations (N, T, d) in float32 at each site, read in batches of ``batch_size`` rows.

    Each forward pass stops as soon as every site is recorded: the layers after the last
    site, the final norm and the unembedding (the largest product for big vocabularies) are
    not run. ``model``: anything ``tyche.frameworks.as_module`` takes.
    """
    model = as_module(model)
    device = next(model.parameters()).device
    pieces: dict[str, list[Tensor]] = {s: [] for s in sites}
    n = tokens["input_ids"].shape[0]
    with read_activations(model, sites) as acts:

        def stop_when_complete(tensor: Tensor) -> Tensor:
            if all(s in acts for s in sites):
                raise _Enough
            return tensor

        with replace_activations(model, {s: stop_when_complete for s in sites}):
            for start in range(0, n, batch_size):
                acts.clear()
                batch = {k: v[start : start + batch_size].to(device) for k, v in tokens.items()}
                with contextlib.suppress(_Enough):
                    model(**batch)
                for s in sites:
                    pieces[s].append(acts[s].float())
    return {s: torch.cat(p) if p else torch.empty(0) for s, p in pieces.items()}


def per_position(name: str, h: Tensor, shape: tuple[int, ...], target: str) -> Tensor:
    """Site ``name``'s activations ``h`` as (B, T, d) for inputs of ``shape`` (B, T): a per-head
    tensor (B, T, H, d_head) with its heads concatenated (d = H·d_head), for ``target="model"``
    only (a lens reads the residual stream). Raises ``InputError`` for a tensor that is not
    one per position (e.g. attention patterns (B, H, T, T))."""
    if h.ndim < 3 or tuple(h.shape[:2]) != shape:
        raise InputError(
            f"site {name} holds a tensor of shape {tuple(h.shape)}, not one per position "
            f"(B, T, ...) with (B, T) = {shape}; causal bases need per-position activations "
            "such as resid_pre.0 or attn_heads.0"
        )
    if h.ndim == 3:
        return h
    if target != "model":
        raise InputError(
            f"site {name} is per head {tuple(h.shape)} but the {target} lens reads the "
            "residual stream; use target='model' there, or a residual site"
        )
    return h.flatten(2)
