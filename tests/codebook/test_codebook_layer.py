"""Codebook layers against direct computations: top-k, outputs, gradients, k-means, usage."""

from __future__ import annotations

import pytest
import torch

from tyche.codebook.kmeans import kmeans
from tyche.codebook.layer import (
    LOSSES,
    SIMILARITIES,
    CodebookLayer,
    CodeEdit,
    GroupedCodebookLayer,
    _argmax_last,
    usage_stats,
)


def _brute_scores(xhat: torch.Tensor, codes: torch.Tensor, similarity: str) -> torch.Tensor:
    """Similarity of one vector to every code, one code at a time (the oracle)."""
    out = []
    for c in codes:
        if similarity == "inner_product":
            out.append(float(xhat @ c) / float(c.norm()))
        elif similarity == "cosine":
            out.append(float(xhat @ c) / (float(c.norm()) * float(xhat.norm())))
        else:
            out.append(-float((xhat - c).norm()))
    return torch.tensor(out, dtype=torch.float64)


@torch.no_grad()
def _brute_layer(layer: GroupedCodebookLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids (n, G, k) and outputs (n, G, d) of a grouped layer by loops over tokens and groups."""
    g, d = layer.n_groups, layer.dim
    xs = x.reshape(-1, g, d)
    ids = torch.empty(xs.shape[0], g, layer.k, dtype=torch.long)
    ys = torch.empty_like(xs)
    for t in range(xs.shape[0]):
        for h in range(g):
            v = xs[t, h]
            xhat = (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5)
            xhat = xhat * layer.ln_weight[h] + layer.ln_bias[h]
            scores = _brute_scores(xhat, layer.codebook[h], layer.similarity)
            order = sorted(range(len(scores)), key=lambda j: -float(scores[j]))[: layer.k]
            ids[t, h] = torch.tensor(order)
            ys[t, h] = layer.codebook[h][order].mean(0)
    return ids, ys


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("k", [1, 3])
def test_topk_and_output_match_brute_force(similarity: str, k: int) -> None:
    torch.manual_seed(0)
    layer = GroupedCodebookLayer(3, 6, 20, k, similarity=similarity).double()
    with torch.no_grad():  # a non-trivial layer-norm affine
        layer.ln_weight.uniform_(0.5, 1.5)
        layer.ln_bias.normal_(0, 0.3)
    x = torch.randn(2, 5, 3, 6, dtype=torch.float64)
    ids, ys = _brute_layer(layer, x)
    # float64 throughout: a tie or near-tie (score gap < 1e-12) between random codes has
    # negligible probability, so the orders must agree exactly
    assert torch.equal(layer.codes(x).reshape(-1, 3, k), ids)
    out = layer(x)
    # the same few float64 terms summed in another order: rounding ~1e-15
    torch.testing.assert_close(out.reshape(-1, 3, 6), ys, rtol=1e-12, atol=1e-12)
    assert torch.equal(layer.last_ids.reshape(-1, 3, k), ids)
    # the public similarity is the oracle's too
    xhat = layer.normalise(x).detach()
    ref = torch.stack([_brute_scores(xhat.reshape(-1, 3, 6)[0, 1], layer.codebook[1], similarity)])
    got = layer.similarities(xhat).reshape(-1, 3, 20)[0, 1]
    # 6-term dot products in float64 against the oracle's loop: rounding ~1e-15 (measured
    # 4e-16); 1e-12 still catches a wrong norm or sign (O(0.1))
    torch.testing.assert_close(got, ref[0], rtol=1e-12, atol=1e-12)


def test_single_codebook_shapes_and_flat_grouped_input() -> None:
    torch.manual_seed(1)
    layer = CodebookLayer(8, 10, k=2)
    x = torch.randn(4, 7, 8)
    assert layer(x).shape == x.shape
    assert layer.codes(x).shape == (4, 7, 2)
    assert layer.last_ids.shape == (4, 7, 2)
    grouped = GroupedCodebookLayer(2, 4, 10, 1)
    flat = torch.randn(3, 8)
    # same path: the layer unflattens (3, 8) to the same (3, 2, 4) values first
    torch.testing.assert_close(grouped(flat), grouped(flat.view(3, 2, 4)).reshape(3, 8))
    with pytest.raises(ValueError, match="expects inputs"):
        grouped(torch.randn(3, 5))


def test_groups_are_independent_codebooks() -> None:
    torch.manual_seed(2)
    grouped = GroupedCodebookLayer(3, 4, 12, 2)
    x = torch.randn(5, 3, 4)
    for h in range(3):
        single = CodebookLayer(4, 12, 2)
        with torch.no_grad():
            single.codebook.copy_(grouped.codebook[h : h + 1])
            single.ln_weight.copy_(grouped.ln_weight[h : h + 1])
            single.ln_bias.copy_(grouped.ln_bias[h : h + 1])
        # batched vs single-group scores (bmm, layer norm then affine vs the fused one): the
        # same ids (a flip needs a score tie within ulps), and the mean of k = 2 codes rounds
        # a + b once in both (measured 0); 1e-6 is a few ulps, a wrong group is O(1) off
        torch.testing.assert_close(grouped(x)[:, h], single(x[:, h]), rtol=1e-6, atol=1e-6)


def test_bad_settings_raise() -> None:
    with pytest.raises(ValueError, match="k=11 > num_codes=10"):
        CodebookLayer(4, 10, k=11)
    with pytest.raises(ValueError, match="similarity"):
        CodebookLayer(4, 10, similarity="manhattan")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss"):
        CodebookLayer(4, 10, loss="mse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_codes"):
        CodebookLayer(4, 0)
    with pytest.raises(ValueError, match="beta"):
        CodebookLayer(4, 10, beta=float("nan"))


def _manual_losses(layer, x, loss, weights):
    """Oracle: the task loss and the auxiliary terms written out with detach()."""
    xhat = layer.normalise(x).reshape(-1, layer.n_groups, layer.dim)
    ids = layer.codes(x).reshape(-1, layer.n_groups, layer.k)
    codes = torch.stack([layer.codebook[h][ids[:, h]] for h in range(layer.n_groups)], 1)
    y = codes.mean(-2)  # (n, G, d), differentiable in the codes
    n = xhat.shape[0]
    task_y = y.detach() if loss == "vqvae" else y
    out = task_y + xhat - xhat.detach()  # straight-through to x̂
    total = (out * weights).sum()
    if loss != "base":
        total = total + ((y - xhat.detach()) ** 2).sum() / n
    if loss in ("fullaeloss", "vqvae"):
        total = total + layer.beta * ((xhat - y.detach()) ** 2).sum() / n
    return total


@pytest.mark.parametrize("loss", LOSSES)
def test_gradients_match_the_written_out_objective(loss: str) -> None:
    torch.manual_seed(3)
    layer = GroupedCodebookLayer(2, 5, 9, 2, loss=loss, beta=0.3).double()
    x = torch.randn(3, 4, 2, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(12, 2, 5, dtype=torch.float64)
    (layer(x).reshape(12, 2, 5) * weights).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    _manual_losses(layer, x, loss, weights).backward()
    want = [x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(got, want):
        # float64, a handful of terms in another order: rounding ~1e-14
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # only chosen codes get gradients
    chosen = torch.zeros(2, 9, dtype=torch.bool)
    for h in range(2):
        chosen[h, layer.codes(x)[..., h, :].reshape(-1)] = True
    assert (got[1].abs().sum(-1)[~chosen] == 0).all()
    assert (got[1].abs().sum(-1)[chosen] > 0).all()


def test_straight_through_gradient_reaches_the_input_unchanged() -> None:
    torch.manual_seed(4)
    layer = CodebookLayer(6, 7, loss="aeloss")
    with torch.no_grad():
        layer.ln_weight.fill_(1.0)
        layer.ln_bias.zero_()
    x = torch.randn(10, 6, requires_grad=True)
    g = torch.randn(10, 6)
    (layer(x) * g).sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    xhat = torch.nn.functional.layer_norm(ref, (6,), eps=1e-5)
    (xhat * g).sum().backward()  # d/dx of <LN(x), g>: the gradient passed straight through
    # the layer norm's backward with a unit affine vs without one: the same 6-term float32
    # reductions, a few ulps apart at most (measured 0); a lost or doubled straight-through
    # gradient is O(1) off
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-6)


def test_usage_counts_tokens_in_training_only() -> None:
    layer = CodebookLayer(4, 6, k=2)
    x = torch.randn(3, 5, 4)
    layer.eval()
    layer(x)
    assert layer.usage.sum() == 0
    layer.train()
    layer(x)
    layer(x[:1])
    assert int(layer.usage.sum()) == (15 + 5) * 2  # tokens × k, not forward calls
    stats = layer.take_metrics()
    assert 0 <= stats["dead_fraction"] <= 1 and stats["mse"] > 0
    assert 0 < stats["entropy"] <= torch.log(torch.tensor(6.0)) + 1e-6


def test_usage_stats_against_hand_computed_values() -> None:
    stats = usage_stats(torch.tensor([[2, 2, 0, 0]]))
    assert stats["dead_fraction"] == 0.5
    # float64 entropy of (1/2, 1/2) against float32 ln 2 (2e-9 off): rel 1e-6 (a wrong count
    # is ≥ 1e-2 off)
    assert stats["entropy"] == pytest.approx(float(torch.log(torch.tensor(2.0))), rel=1e-6)


def test_kmeans_recovers_separated_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [-5.0, -5.0, 0]])
    x = centres.repeat_interleave(50, 0) + 0.1 * torch.randn(200, 3, generator=g)
    found = kmeans(x, 4, generator=g)
    dist = torch.cdist(found, centres)
    assert (dist.min(0).values < 0.1).all()  # each true centre has a found centre nearby
    assert kmeans(x[:2], 4, generator=g).shape == (4, 3)  # fewer points than clusters


def test_grouped_kmeans_initialises_every_head() -> None:
    """The original's per-head (group) k-means left the codes at their random init."""
    g = torch.Generator().manual_seed(1)
    layer = GroupedCodebookLayer(2, 4, 3, 1)
    centres = torch.randn(2, 3, 4, generator=g) * 3  # head h has its own 3 clusters
    data = centres.repeat_interleave(100, 1) + 0.01 * torch.randn(2, 300, 4, generator=g)
    layer.init_codes(data.transpose(0, 1), seed=0)
    expected = layer.normalise(centres.transpose(0, 1)).transpose(0, 1).detach()  # (2, 3, 4)
    for h in range(2):
        dist = torch.cdist(layer.codebook[h].detach(), expected[h])
        # noise 0.01 on points of norm ~6, after layer norm: centres move by < 0.05
        assert (dist.min(0).values < 0.05).all(), f"head {h}: {dist}"


def test_dead_codes_move_to_recent_inputs() -> None:
    torch.manual_seed(5)
    layer = CodebookLayer(4, 8)
    layer.keep_recent = True
    layer.train()
    x = torch.randn(64, 4)
    layer(x)
    used = layer.usage[0] > 0
    before = layer.codebook.detach().clone()
    dead = layer.replace_dead_codes(rho=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dead[0], ~used)
    assert torch.equal(layer.codebook[0][used], before[0][used])
    recent = layer.normalise(x).detach().reshape(-1, 4)
    for row in layer.codebook[0][~used]:  # rho=0: exactly one of the recent inputs
        # exact: the code is x̂ + 0 · noise, x̂ from the same normalise of the same x
        assert torch.isclose(recent, row, rtol=0, atol=0).all(-1).any()
    assert layer.usage.sum() == 0


def _layer_with_known_ids() -> tuple[GroupedCodebookLayer, torch.Tensor]:
    torch.manual_seed(6)
    layer = GroupedCodebookLayer(2, 4, 10, 2)
    return layer, torch.randn(2, 5, 2, 4)


def test_edit_force_replace_append_block() -> None:
    layer, x = _layer_with_known_ids()
    clean_ids = layer.codes(x)
    c = layer.codebook
    layer.edits = (CodeEdit("force", 7, group=1, positions=(-1,)),)
    y = layer(x)
    # edited outputs are means of ≤ 3 stored float32 codes (≤ 2 roundings in the sum, one in
    # the division; measured 0): 1e-6 is a few ulps, while a wrong code is O(1) off
    torch.testing.assert_close(y[:, -1, 1], c[1, 7].expand(2, 4), rtol=1e-6, atol=1e-6)
    want = _unedited(layer)(x)[:, :-1]
    torch.testing.assert_close(y[:, :-1], want, rtol=1e-6, atol=1e-6)  # as above
    layer.edits = (CodeEdit("replace", 3, group=0, slot=1),)
    y = layer(x)
    want = (c[0, clean_ids[..., 0, 0]] + c[0, 3]) / 2
    torch.testing.assert_close(y[..., 0, :], want, rtol=1e-6, atol=1e-6)  # as above
    layer.edits = (CodeEdit("append", 4, group=0, positions=(0,)),)
    y = layer(x)
    want0 = (c[0, clean_ids[:, 0, 0, 0]] + c[0, clean_ids[:, 0, 0, 1]] + c[0, 4]) / 3
    torch.testing.assert_close(y[:, 0, 0], want0, rtol=1e-6, atol=1e-6)  # as above
    want1 = c[0, clean_ids[:, 1, 0]].mean(-2)  # other positions: the mean of the k codes
    torch.testing.assert_close(y[:, 1, 0], want1, rtol=1e-6, atol=1e-6)  # as above
    target = int(clean_ids[0, 0, 0, 0])
    layer.edits = (CodeEdit("block", target, group=0, refill=True),)
    layer(x)
    assert not (layer.last_ids[..., 0, :] == target).any()
    layer.edits = (CodeEdit("block", target, group=0, refill=False),)
    y = layer(x)
    keep = clean_ids[0, 0, 0, 1]
    # as above; the blocked slot counts as zero
    torch.testing.assert_close(y[0, 0, 0], c[0, keep] / 2, rtol=1e-6, atol=1e-6)


def _unedited(layer: GroupedCodebookLayer) -> GroupedCodebookLayer:
    import copy

    clone = copy.deepcopy(layer)
    clone.edits = ()
    return clone


@pytest.mark.parametrize(
    ("k", "n_blocked"),
    [(10, 6), (10, 15), (1, 15), (1, 14), (3, 13)],
    ids=["k10-9-left", "k10-none-left", "k1-none-left", "k1-one-left", "k3-2-left"],
)
def test_a_blocked_code_is_never_chosen_even_when_too_few_are_left(k, n_blocked) -> None:
    """Refilling blocks of codes 0..n_blocked-1 of 15: slots beyond the unblocked codes are
    empty (-1, a zero vector counted in the mean), for the argmax (k = 1) and top-k paths."""
    torch.manual_seed(0)
    layer = CodebookLayer(4, 15, k).double()
    x = torch.randn(2, 10, 4, dtype=torch.float64)  # 20 tokens
    layer.edits = tuple(CodeEdit("block", c, refill=True) for c in range(n_blocked))
    layer.count_usage = True
    ids = layer.codes(x)  # (2, 10, k)
    scores = layer.similarities(layer.normalise(x).detach()).squeeze(-2)  # (2, 10, 15)
    left = min(k, 15 - n_blocked)
    # oracle: the unblocked codes in order of similarity, then empty slots
    want = scores[..., n_blocked:].argsort(-1, descending=True)[..., :left] + n_blocked
    assert torch.equal(ids[..., :left], want)
    assert (ids[..., left:] == -1).all()
    y = layer(x)
    assert torch.equal(layer.last_ids, ids)
    c = layer.codebook[0].detach()
    want_y = c[want].sum(-2) / k if left else torch.zeros_like(x)
    # a mean of ≤ 10 float64 code vectors, summed in another order: rounding ~1e-15
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)  # float64, as above
    if not left:
        assert torch.equal(y, torch.zeros_like(x))  # every code blocked: nothing comes out
    assert int(layer.usage.sum()) == 20 * left  # empty slots are not counted as usage
    assert int(layer.usage[0, :n_blocked].sum()) == 0


def test_a_blocked_code_is_never_chosen_by_one_head_of_a_grouped_layer() -> None:
    """A grouped layer with every code of head 1 blocked: head 1 is empty, head 0 untouched."""
    torch.manual_seed(1)
    layer = GroupedCodebookLayer(2, 3, 5, 2).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    clean = layer.codes(x)
    layer.edits = tuple(CodeEdit("block", c, group=1, refill=True) for c in range(5))
    ids = layer.codes(x)
    assert torch.equal(ids[:, 0], clean[:, 0]) and (ids[:, 1] == -1).all()
    y = layer(x)
    assert torch.equal(y[:, 1], torch.zeros(4, 3, dtype=torch.float64))
    # exact: the same ids, and the edited lookup's sum / 2 and the plain mean of k = 2 codes
    # both round a + b once
    assert torch.equal(y[:, 0], _unedited(layer)(x)[:, 0])


def test_blockwise_argmax_is_argmax() -> None:
    """The blockwise argmax of k = 1 layers against ``torch.argmax``: ties (first index
    wins), NaN (counts as largest), maxima at block edges, and lengths it leaves to argmax."""
    torch.manual_seed(0)
    s = torch.randn(3, 50, 256)
    s[0, 0] = 1.0  # all tied
    s[0, 1, 31] = s[0, 1, 200] = 99.0  # tie across blocks
    s[0, 2, 32] = s[0, 2, 33] = 99.0  # tie inside a block
    s[1, 0, 255] = 99.0
    s[1, 1, 7] = float("nan")
    s[1, 2, 100] = float("inf")
    assert torch.equal(_argmax_last(s), s.argmax(-1))
    for n in (20, 32, 100):  # too short or not a multiple of the block: plain argmax
        t = torch.randn(4, n)
        assert torch.equal(_argmax_last(t), t.argmax(-1))


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_fast_paths_train_like_the_plain_formulas(gpt2_model, monkeypatch, similarity) -> None:
    """A few training steps with the layer's fast paths (batched scores, blockwise argmax,
    fused layer-norm affine, fused metric) give the losses and weights of the same steps with
    the plain formulas (:meth:`similarities`, ``argmax``, layer norm then affine)."""
    import copy

    from tyche.codebook import layer as layer_module
    from tyche.codebook.model import attach
    from tyche.codebook.train import TrainConfig, row_sampler, train_codebooks

    rows = torch.randint(3, 512, (16, 12), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=4, batch_size=4, log_every=1, warmup_steps=1, replace_dead_every=2)

    def run() -> tuple[list[float], dict]:
        model = copy.deepcopy(gpt2_model).double()
        sites = ["attn_heads.*", "mlp_out.*"]
        cb = attach(model, sites, num_codes=64, seed=0, similarity=similarity)
        result = train_codebooks(cb, row_sampler(rows, 4), cfg, progress=False)
        return [h["loss"] for h in result.history], cb.state_dict()

    fast_losses, fast_state = run()
    plain = GroupedCodebookLayer

    def plain_scores(self, flat):
        return self.similarities(flat).transpose(0, 1)  # (G, n, N)

    def plain_normalise(self, grouped):
        normed = torch.nn.functional.layer_norm(grouped, (self.dim,), eps=1e-5)
        return normed * self.ln_weight + self.ln_bias

    monkeypatch.setattr(plain, "_ranking_scores", plain_scores)
    monkeypatch.setattr(plain, "_normalise", plain_normalise)
    monkeypatch.setattr(layer_module, "_argmax_last", lambda s: s.argmax(-1))
    plain_losses, plain_state = run()
    # float64: the two computations differ only in rounding (~1e-16 per operation); a code
    # chosen differently would change a loss by ~1e-2. 4 steps of AdamW amplify rounding by
    # at most ~1/eps_adam = 1e8 in the worst case, so 1e-6 still separates the two cases
    torch.testing.assert_close(fast_losses, plain_losses, rtol=1e-6, atol=1e-6)
    # the weights after the same steps: as above
    for name, value in fast_state.items():
        torch.testing.assert_close(value, plain_state[name], rtol=1e-6, atol=1e-6, msg=name)
