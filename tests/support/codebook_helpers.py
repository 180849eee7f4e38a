"""Small codebook models shared by the codebook tests."""

from __future__ import annotations

import torch

from conftest import build_neox
from tyche.codebook.model import CodebookModel, attach


def tiny_cb_model(num_codes: int = 16, k: int = 2, seed: int = 0) -> CodebookModel:
    """The tiny GPT-NeoX of conftest with codebooks on every head and MLP (untrained)."""
    model = attach(
        build_neox(seed), ["attn_heads.*", "mlp_out.*"], num_codes=num_codes, k=k, seed=seed
    )
    torch.manual_seed(seed)
    return model.eval()
