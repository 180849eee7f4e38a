"""``model_loss(where=...)``: the mask changes which examples or tokens count, and nothing else."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from tyche.basin import BasinOptions, estimate_basin, model_loss
from tyche.basin.loss import ModelLoss
from tyche.divergence import masked_kl


def classifier() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).eval()
    x = torch.randn(40, 8)
    labels = torch.arange(40) % 4
    return model, x, labels


@pytest.mark.parametrize("strategy", ["vmap", "loop", "inplace"])
def test_an_example_mask_counts_those_examples_and_changes_nothing_else(strategy):
    model, x, labels = classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    where = labels == 2
    full = ModelLoss(model, x, strategy=strategy)
    sub = model_loss(model, x, where=where, strategy=strategy)
    alone = ModelLoss(model, x[where], strategy=strategy)
    # nothing else: the same parameters, anchor and layout
    assert sub.n_params == full.n_params and sub.layout == full.layout
    assert torch.equal(sub.anchor, full.anchor)
    assert sub.n_positions == int(where.sum()) == 10 and full.n_positions == 40
    offsets = 0.5 * torch.randn(3, full.n_params, generator=torch.Generator().manual_seed(1))
    got = sub(offsets)
    # the same rows through the same operations: identical to a loss on those examples
    assert torch.equal(got, alone(offsets))
    # the KL over other examples: O(0.1) apart, far outside allclose's 1e-5 / 1e-8
    assert not torch.allclose(got, full(offsets), rtol=1e-5, atol=1e-8)
    # integer 0/1 masks mean the same
    assert torch.equal(model_loss(model, x, where=where.long(), strategy=strategy)(offsets), got)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_token_mask_against_a_direct_masked_kl(neox_model, token_batch):
    g = torch.Generator().manual_seed(2)
    where = torch.rand(4, 16, generator=g) < 0.4
    where[3] = False  # a row with nothing selected is not run at all
    where[1, -3:] = True  # padding positions never count, even when selected
    loss = ModelLoss(neox_model, token_batch, where=where, strategy="loop")
    assert loss.n_positions == int((where & token_batch["attention_mask"].bool()).sum())
    assert len(loss.cache.batches[0]["input_ids"]) == 3
    offsets = 0.02 * torch.randn(2, loss.n_params, generator=g)
    got = loss(offsets)
    # oracle: every row through the perturbed model, the KL averaged over where ∧ attention
    params = dict(neox_model.named_parameters())
    with torch.no_grad():
        anchor = neox_model(**token_batch).logits.log_softmax(-1)
        expect = []
        for off in offsets:
            pert, start = {}, 0
            for name, p in params.items():
                pert[name] = p + off[start : start + p.numel()].reshape(p.shape)
                start += p.numel()
            logits = functional_call(neox_model, pert, (), token_batch).logits
            mask = where & token_batch["attention_mask"].bool()
            expect.append(masked_kl(anchor, logits, mask, "mean"))
    # the oracle runs all 4 rows, the loss 3: float32 forwards of the same rows in batches
    # of another size differ by a few ulps (measured ≤ 3e-7 relative); 1e-5 is 30× that
    torch.testing.assert_close(got, torch.stack(expect), rtol=1e-5, atol=1e-9)
    # a whole-row mask (N,) is the token mask with whole rows
    rows = torch.tensor([True, False, True, False])
    by_row = ModelLoss(neox_model, token_batch, where=rows, strategy="loop")(offsets)
    by_token = ModelLoss(neox_model, token_batch, where=rows[:, None].expand(4, 16),
                         strategy="loop")(offsets)  # fmt: skip
    # exact: the same two rows through the same ops; their token mask is their attention mask
    assert torch.equal(by_row, by_token)
    padding = torch.zeros(4, 16, dtype=torch.bool)
    padding[1, -3:] = True
    with pytest.raises(ValueError, match="only padding"):
        ModelLoss(neox_model, token_batch, where=padding)


def test_a_subset_basin_uses_the_same_directions():
    model, x, labels = classifier()
    full = ModelLoss(model, x)
    sub = ModelLoss(model, x, where=labels == 1)
    opts, kw = BasinOptions(cutoff=1e-2, n_samples=6, seed=3), dict(progress=False)
    a = estimate_basin(full, full.anchor, opts, **kw)
    b = estimate_basin(sub, sub.anchor, opts, **kw)
    assert torch.equal(a.props, b.props)  # same draws (props = 1 exactly here)
    assert not torch.equal(a.radii, b.radii)  # another loss, other radii


def test_bad_masks_are_refused():
    model, x, labels = classifier()
    with pytest.raises(ValueError, match=r"where has shape \(39,\); it must be \(40,\)"):
        ModelLoss(model, x, where=labels[:39] == 1)
    with pytest.raises(ValueError, match="boolean"):
        ModelLoss(model, x, where=torch.full((40,), 0.5))
    with pytest.raises(ValueError, match="boolean"):
        ModelLoss(model, x, where=torch.full((40,), 2))
    with pytest.raises(ValueError, match="selects nothing"):
        ModelLoss(model, x, where=labels == 9)
    ids = torch.randint(3, 100, (2, 5))
    lm = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    with pytest.raises(ValueError, match=r"must be \(2,\) or \(2, 5\)"):
        ModelLoss(nn.Embedding(100, 4), lm, where=torch.ones(2, 4, dtype=torch.bool))
