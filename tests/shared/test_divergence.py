"""Tests for tyche.divergence against a slow double-loop oracle and the maths' invariances."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tyche.divergence import AnchorCache, forward_logits, masked_kl, token_kl

#: float32 KL against the float64 oracle: a log-softmax of 11 logits |x| ≲ 10 rounds each
#: log-probability by ≲ 11·2^-24·10 ≈ 7e-6 at worst, so ATOL covers the worst case whatever
#: the KL's size. Measured at most 3.9e-7 absolute (1/2 threads, generic kernels, 30
#: permutations of the vocabulary): ≥ 25× inside. The former ATOL of 1e-6 kept only 6×
#: under the generic kernels. A wrong direction or normalisation of the KL is off by O(0.1).
RTOL, ATOL = 1e-5, 1e-5


def slow_kl(anchor_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Oracle: KL(p||q) at each position by explicit loops in float64 with math.log."""
    a = anchor_logits.double().reshape(-1, anchor_logits.shape[-1])
    b = logits.double().reshape(-1, logits.shape[-1])
    out = []
    for row_a, row_b in zip(a.tolist(), b.tolist()):
        za = math.log(sum(math.exp(x) for x in row_a))
        zb = math.log(sum(math.exp(x) for x in row_b))
        total = 0.0
        for xa, xb in zip(row_a, row_b):
            p = math.exp(xa - za)
            total += p * ((xa - za) - (xb - zb))
        out.append(total)
    return torch.tensor(out, dtype=torch.float64).reshape(anchor_logits.shape[:-1])


@pytest.fixture()
def pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    anchor = 2 * torch.randn(3, 5, 11, generator=g)
    other = anchor + torch.randn(3, 5, 11, generator=g)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 0] = False
    return anchor, other, mask


def test_token_kl_matches_double_loop_and_kl_div(pair):
    anchor, other, _ = pair
    oracle = slow_kl(anchor, other)
    got = token_kl(torch.log_softmax(anchor, -1), other)
    assert got.dtype == torch.float32 and got.shape == (3, 5)
    # float32 against the float64 oracle: RTOL/ATOL's log-softmax rounding bound (above)
    torch.testing.assert_close(got.double(), oracle, rtol=RTOL, atol=ATOL)
    via_kl_div = F.kl_div(
        torch.log_softmax(other, -1),
        torch.log_softmax(anchor, -1),
        reduction="none",
        log_target=True,
    ).sum(-1)
    # float32 against float32 by other formulas: the same bound applies (measured ≤ 2.1e-7)
    torch.testing.assert_close(got, via_kl_div, rtol=RTOL, atol=ATOL)
    # raw logits for the anchor give the same answer (re-normalised)
    torch.testing.assert_close(token_kl(anchor, other), got, rtol=RTOL, atol=ATOL)


def test_reductions_against_oracle_and_each_other(pair):
    anchor, other, mask = pair
    oracle = slow_kl(anchor, other)
    logp = torch.log_softmax(anchor, -1)
    tok = masked_kl(logp, other, mask, reduction="token")
    assert tok.shape == (3, 5)
    assert torch.all(tok[~mask] == 0)
    # float32 against the float64 oracle here and below: RTOL/ATOL's rounding bound (above)
    torch.testing.assert_close(tok[mask].double(), oracle[mask], rtol=RTOL, atol=ATOL)
    mean = masked_kl(logp, other, mask)
    assert mean.shape == ()
    torch.testing.assert_close(mean.double(), oracle[mask].mean(), rtol=RTOL, atol=ATOL)  # ditto
    per_example = masked_kl(logp, other, mask.long(), reduction="example")
    assert per_example.shape == (3,)
    want = torch.stack([oracle[i][mask[i]].mean() for i in range(3)])
    torch.testing.assert_close(per_example.double(), want, rtol=RTOL, atol=ATOL)  # as above
    # example means weighted by their counts give back the overall mean
    counts = mask.sum(-1)
    weighted = (per_example * counts).sum() / counts.sum()
    # float32 sums of 13 terms ≲ 2 in another order: ≲ 13·2^-24·2 ≈ 1.6e-6, inside the float32
    # default (atol 1e-5 + rtol 1.3e-6), passed explicitly
    torch.testing.assert_close(weighted, mean, rtol=1.3e-6, atol=1e-5)
    # no mask: plain mean of every position, against the oracle within RTOL/ATOL (above)
    torch.testing.assert_close(masked_kl(logp, other).double(), oracle.mean(), rtol=RTOL, atol=ATOL)


def test_kl_of_distribution_with_itself_is_zero_and_kl_is_nonnegative():
    g = torch.Generator().manual_seed(1)
    logits = 5 * torch.randn(4, 7, 50, generator=g)
    # both sides are the same log-softmax of the same tensor, so every term p·(log p - log p)
    # is exactly 0 (measured 0); a KL that is not 0 here is a bug
    assert masked_kl(logits, logits, reduction="token").abs().max() < 1e-6
    for _ in range(5):
        other = 5 * torch.randn(4, 7, 50, generator=g)
        assert (masked_kl(logits, other, reduction="token") >= 0).all()


def test_masked_positions_do_not_matter(pair):
    anchor, other, mask = pair
    logp = torch.log_softmax(anchor, -1)
    scrambled = other.clone()
    scrambled[~mask] = torch.randn_like(scrambled[~mask]) * 100
    scrambled[1, 4, 0] = float("nan")  # even NaN in a masked position does not leak
    # same path: masked positions are replaced by exact zeros before any sum, so every sum
    # adds the same float32 values in the same shape (measured identical)
    for reduction in ("mean", "example", "token"):
        torch.testing.assert_close(
            masked_kl(logp, scrambled, mask, reduction), masked_kl(logp, other, mask, reduction)
        )


def test_zero_probabilities_give_zero_not_nan():
    anchor = torch.tensor([[0.0, -math.inf, 1.0], [-math.inf, -math.inf, 0.0]])
    other = torch.tensor([[0.5, -math.inf, 0.0], [3.0, -math.inf, 1.0]])
    got = token_kl(anchor, other)
    assert torch.isfinite(got).all()
    p = torch.softmax(anchor, -1)
    log_q = torch.log_softmax(other, -1)
    want0 = sum(p[0, v] * (torch.log(p[0, v]) - log_q[0, v]) for v in (0, 2))
    want1 = -log_q[1, 2]
    # float32, 2-term sums: a few 2^-24 of |log q| ≲ 3 (≲ 1e-6), inside the float32 default
    # (atol 1e-5, rtol 1.3e-6) passed explicitly
    torch.testing.assert_close(got, torch.stack([want0, want1]), rtol=1.3e-6, atol=1e-5)
    # q = 0 where p > 0 is an infinite divergence, reported as +inf (not NaN)
    assert token_kl(torch.zeros(1, 3), other[:1])[0] == math.inf


def test_half_inputs_are_upcast_and_float64_kept(pair):
    anchor, other, mask = pair
    half = masked_kl(torch.log_softmax(anchor, -1).half(), other.half(), mask)
    assert half.dtype == torch.float32
    full = masked_kl(torch.log_softmax(anchor, -1), other, mask)
    # float16 inputs: logits |x| ≲ 10 rounded at 2^-11 relative (≲ 5e-3 absolute), mostly
    # cancelling in the p-weighted sums; measured ≤ 4.2e-5 absolute (also with the vocabulary
    # permuted), ≥ 90× inside
    torch.testing.assert_close(half, full, rtol=1e-2, atol=1e-3)
    bf = masked_kl(anchor.bfloat16(), other.bfloat16(), mask)
    assert bf.dtype == torch.float32 and torch.isfinite(bf)
    assert masked_kl(anchor.double(), other, mask).dtype == torch.float64


def test_classifier_inputs():
    g = torch.Generator().manual_seed(2)
    anchor, other = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    oracle = slow_kl(anchor, other)
    torch.testing.assert_close(  # float32 vs the float64 oracle: RTOL/ATOL's bound (above)
        masked_kl(anchor, other).double(), oracle.mean(), rtol=RTOL, atol=ATOL
    )
    per = masked_kl(anchor, other, reduction="example")
    assert per.shape == (6,)
    torch.testing.assert_close(per.double(), oracle, rtol=RTOL, atol=ATOL)  # as above


def test_bad_inputs_raise(pair):
    anchor, other, mask = pair
    with pytest.raises(ValueError, match=r"\(3, 5, 11\).*\(3, 5, 10\)"):
        masked_kl(anchor, other[..., :10])
    with pytest.raises(ValueError, match=r"mask has shape \(3, 4\)"):
        masked_kl(anchor, other, mask[:, :4])
    with pytest.raises(ValueError, match="selects no positions"):
        masked_kl(anchor, other, torch.zeros_like(mask))
    empty_row = mask.clone()
    empty_row[0] = False
    with pytest.raises(ValueError, match=r"examples \[\[0\]\] have no unmasked"):
        masked_kl(anchor, other, empty_row, reduction="example")
    with pytest.raises(ValueError, match="only 0 and 1"):
        masked_kl(anchor, other, mask.float() * 0.5)
    with pytest.raises(ValueError, match="reduction must be"):
        masked_kl(anchor, other, reduction="sum")
    with pytest.raises(TypeError, match="floating-point"):
        masked_kl(anchor.long(), other)


def test_vmap_over_perturbations(pair):
    anchor, other, mask = pair
    stack = torch.stack([other, anchor, other * 2])
    got = torch.func.vmap(lambda lg: masked_kl(anchor, lg, mask))(stack)
    want = torch.stack([masked_kl(anchor, s, mask) for s in stack])
    # vmap runs each op once on the stack, whose reductions may add in another order than
    # per item's (measured identical here): float32 sums of ≲ 15·11 terms, within RTOL/ATOL
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def _batches(token_batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [{k: v[:2] for k, v in token_batch.items()}, {k: v[2:] for k, v in token_batch.items()}]


def test_anchor_cache_matches_direct_computation(gpt2_model, token_batch):
    batches = _batches(token_batch)
    cache = AnchorCache.from_model(gpt2_model, batches)
    assert len(cache) == 2
    with torch.no_grad():
        logits = [forward_logits(gpt2_model, b) for b in batches]
    for i, lg in enumerate(logits):
        # same path: the cache runs the same forward and float32 log-softmax on the same batch
        torch.testing.assert_close(cache.logp(i), torch.log_softmax(lg, -1))
        assert cache.logp(i).device.type == "cpu"
    assert cache.nbytes == 4 * 16 * 512 * 4
    assert cache.describe() == "anchor cache: 0.1 MiB on cpu, float32, 2 batches"
    assert cache.n_positions == int(token_batch["attention_mask"].sum()) == 61
    # the model against its own cache: the same forward on the same batches, but the cached
    # log p is re-normalised (log_softmax again), which shifts each row by the float32 rounding
    # of log Σ p over 512 words (~1e-7, ≲ 512·2^-24 ≈ 3e-5 at worst); measured ≤ 2.4e-8 for
    # the mean (also with rows permuted and batches of 1-4). 1e-6 keeps ≥ 40× and is 1e-2 of
    # the KL of any real change (test below)
    assert cache.mean_kl(gpt2_model).abs() < 1e-6


def test_anchor_cache_mean_kl_is_token_weighted(gpt2_model, token_batch):
    batches = _batches(token_batch)
    cache = AnchorCache.from_model(gpt2_model, batches, device="same", dtype=torch.float16)
    assert cache.logp(0).dtype == torch.float16 and cache.nbytes == 4 * 16 * 512 * 2
    assert "float16" in cache.describe()
    perturbed = type(gpt2_model)(gpt2_model.config).eval()
    perturbed.load_state_dict(gpt2_model.state_dict())
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.05 * torch.randn_like(p))
        full = masked_kl(
            torch.log_softmax(gpt2_model(**token_batch).logits, -1),
            perturbed(**token_batch).logits,
            token_batch["attention_mask"],
        )
    got = cache.mean_kl(perturbed)
    assert full > 1e-4
    # float16 storage of log p (|log p| ≲ 8, rounded at 2^-11 relative) whose errors average
    # out in the mean KL: measured 1.3e-5 relative, 150× inside rtol 2e-3
    torch.testing.assert_close(got, full, rtol=2e-3, atol=1e-6)


def test_anchor_cache_classifier_and_warnings():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))
    xs = [torch.randn(5, 4), torch.randn(3, 4)]
    with pytest.warns(UserWarning, match="training mode"):
        AnchorCache.from_model(net, xs)
    net.eval()
    cache = AnchorCache.from_model(net, xs)
    assert cache.mask(0) is None and cache.n_positions == 8
    assert cache.mean_kl(net).abs() < 1e-6  # as above, 3 classes: measured 3.9e-9
    with pytest.raises(ValueError, match="at least one batch"):
        AnchorCache.from_model(net, [])
