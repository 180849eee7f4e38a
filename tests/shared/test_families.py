"""The shared pieces on each model family (GPT-2, GPT-NeoX, Llama): data → model → divergence,
hooks, results I/O and the single-process distributed helpers."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from conftest import BUILDERS
from tyche import distributed as dist
from tyche.data import chunk_and_tokenize, iter_batches
from tyche.divergence import AnchorCache, masked_kl
from tyche.hooks import read_activations
from tyche.io import ResultIO, model_hash


@dataclass(frozen=True)
class Activations(ResultIO):
    site: str
    values: torch.Tensor
    mask: torch.Tensor
    model_hash: str


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_pipeline_on_each_family(family, tiny_tokenizer, tiny_texts, tmp_path):
    model = BUILDERS[family]()
    tokens = chunk_and_tokenize(tiny_texts, tiny_tokenizer, max_seq_len=12, chunking=False)
    assert tokens["input_ids"].shape[1] <= 12 and tokens["attention_mask"].min() == 0
    batches = list(iter_batches(tokens, 8))
    cache = AnchorCache.from_model(model, batches)
    assert cache.nbytes == sum(b["input_ids"].numel() for b in batches) * 512 * 4
    # against its own cache: only the re-normalisation of the cached log p (float32 rounding
    # of log Σ p, ~1e-7 per row) is left; measured ≤ 2.4e-8 for the mean (also with rows
    # permuted, batches of 1-4, generic kernels): 1e-6 keeps ≥ 40×
    assert float(cache.mean_kl(model)) == pytest.approx(0.0, abs=1e-6)

    other = BUILDERS[family](seed=1)
    direct_num, direct_den = 0.0, 0.0
    for b in batches:  # slow direct oracle: explicit sums over unmasked positions
        p = torch.log_softmax(model(**b).logits.double(), -1)
        q = torch.log_softmax(other(**b).logits.double(), -1)
        kl = (p.exp() * (p - q)).sum(-1)
        direct_num += float((kl * b["attention_mask"]).sum())
        direct_den += float(b["attention_mask"].sum())
    # the same float32 logits, KL taken in float32 vs float64: a log-sum-exp over 512 words is
    # off by ≲ 511·2^-24 ≈ 3e-5 nats at worst, ~1e-7 in practice; measured ≤ 1.9e-6 relative
    # for the mean (rows permuted, batches of 1-4, generic kernels): 1e-4 keeps ≥ 50× (a wrong
    # mask or weighting is off by > 1e-2)
    assert float(cache.mean_kl(other)) == pytest.approx(direct_num / direct_den, rel=1e-4)
    b0 = batches[0]
    per_example = masked_kl(cache.logp(0), other(**b0).logits, b0["attention_mask"], "example")
    assert per_example.shape == (b0["input_ids"].shape[0],) and (per_example > 0).all()

    with read_activations(model, "resid_post.1") as acts:
        model(**b0)
    h = model_hash(model)
    assert h == model_hash(BUILDERS[family]()) and h != model_hash(other)
    saved = Activations("resid_post.1", acts["resid_post.1"], b0["attention_mask"], h)
    back = Activations.load(saved.save(tmp_path / family))
    assert torch.equal(back.values, saved.values) and back.model_hash == h  # bits round-trip

    assert not dist.is_distributed() and dist.get_world_size() == 1
    assert torch.equal(dist.all_gather_cat(back.values), back.values)  # one rank: no arithmetic
    assert torch.equal(dist.all_reduce_sum(back.mask.clone()), back.mask)
