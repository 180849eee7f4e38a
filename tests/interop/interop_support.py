"""Builders for the frameworks' tests: a tiny TransformerLens model and an nnsight wrapper.

The libraries come with the ``[interop]`` extra. Without it these tests skip, except where
``TYCHE_REQUIRE_INTEROP=1`` (CI) makes a missing library a failure.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Any

import pytest
import torch

#: vocabulary of the tiny models (the tiny tokenizer's size; keeps imports and runs fast)
VOCAB = 512


def require(module: str) -> Any:
    """Import ``module`` or skip (fail under ``TYCHE_REQUIRE_INTEROP=1``)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if os.environ.get("TYCHE_REQUIRE_INTEROP") == "1":
            raise AssertionError(f"{module} is missing; install the [interop] extra") from err
        pytest.skip(f"{module} not installed (the [interop] extra)")


def build_hooked(
    seed: int = 0,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    normalization_type: str | None = "LN",
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """A random TransformerLens ``HookedTransformer`` built from a config (no download):
    ``n_layers`` blocks of width ``d_model``, ``n_heads`` heads, MLP width 4·d_model,
    vocabulary :data:`VOCAB`, context 128, GELU."""
    tl = require("transformer_lens")
    cfg = tl.HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_ctx=128,
        d_head=d_model // n_heads,
        n_heads=n_heads,
        d_mlp=4 * d_model,
        d_vocab=VOCAB,
        act_fn="gelu_new",
        normalization_type=normalization_type,
        seed=seed,
        dtype=dtype,
        device="cpu",
    )
    with warnings.catch_warnings():  # HookedTransformer's deprecation notice
        warnings.simplefilter("ignore")
        model = tl.HookedTransformer(cfg)
    return model.eval()


def wrap_nnsight(model: torch.nn.Module) -> Any:
    """``nnsight.NNsight(model)``: the wrapper users hold."""
    return require("nnsight").NNsight(model)
