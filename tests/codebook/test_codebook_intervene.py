"""Interventions on code ids: their effect at the site, generation, JSD, errors."""

from __future__ import annotations

import pytest
import torch

from tyche.codebook.interventions import (
    Intervention,
    generate,
    intervene,
    next_token_jsd,
    parse_interventions,
    target_rate,
)
from tyche.divergence import token_jsd


@pytest.fixture(scope="module")
def model():
    from codebook_helpers import tiny_cb_model

    return tiny_cb_model(num_codes=16, k=2)


@pytest.fixture()
def ids() -> torch.Tensor:
    return torch.randint(3, 512, (3, 10), generator=torch.Generator().manual_seed(0))


def test_force_sets_the_site_to_the_code(model, ids) -> None:
    from tyche.hooks import read_activations

    clean = model(input_ids=ids).logits
    layer = model.codebook("mlp_out.0")
    ivs = [Intervention("mlp_out.0", 5, positions=(4,))]
    with intervene(model, ivs), read_activations(model.base, "mlp_out.0") as acts:
        patched = model(input_ids=ids).logits
    want = layer.codebook[0, 5].expand(3, -1)
    # exact: both k = 2 slots hold code 5, and (c + c) / 2 = c in binary floating point
    torch.testing.assert_close(acts["mlp_out.0"][:, 4], want, rtol=0, atol=0)
    assert (layer.last_ids[:, 4] == 5).all()
    # causal model: positions before the intervention are untouched (exact: the same shapes,
    # so the same kernels, on the same values in those rows), later ones change by O(0.1)
    torch.testing.assert_close(patched[:, :4], clean[:, :4], rtol=0, atol=0)
    # the later positions: O(0.1) apart, far beyond these tolerances
    assert not torch.allclose(patched[:, 4:], clean[:, 4:], rtol=1e-5, atol=1e-3)
    assert layer.edits == ()  # restored on exit
    # exact: without edits the same model runs the same batch again
    torch.testing.assert_close(model(input_ids=ids).logits, clean, rtol=0, atol=0)


def test_per_head_intervention_touches_one_head(model, ids) -> None:
    from tyche.hooks import read_activations

    with read_activations(model.base, "attn_heads.1") as acts:
        model(input_ids=ids)
    clean = acts["attn_heads.1"].clone()
    ivs = [Intervention("attn_heads.1", 3, head=2)]
    with intervene(model, ivs), read_activations(model.base, "attn_heads.1") as acts:
        model(input_ids=ids)
    layer = model.codebook("attn_heads.1")
    # exact: both k = 2 slots of head 2 hold code 3, and (c + c) / 2 = c
    torch.testing.assert_close(
        acts["attn_heads.1"][:, :, 2], layer.codebook[2, 3].expand(3, 10, -1), rtol=0, atol=0
    )
    untouched = acts["attn_heads.1"][:, :, [0, 1, 3]]
    # untouched heads: the same ids, and the mean of their k = 2 codes rounds a + b once with
    # or without edits (measured 0 over the 4 portable settings); 1e-6 is a few ulps, while a
    # leaked edit would move them by O(1)
    torch.testing.assert_close(untouched, clean[:, :, [0, 1, 3]], rtol=1e-6, atol=1e-6)


def test_block_append_replace_at_model_level(model, ids) -> None:
    layer = model.codebook("mlp_out.1")
    model(input_ids=ids)
    top = int(layer.last_ids[0, 0, 0])
    with intervene(model, [Intervention("mlp_out.1", top, "block")]):
        model(input_ids=ids)
        assert not (layer.last_ids == top).any()
    with intervene(model, [Intervention("mlp_out.1", 7, "append")]):
        model(input_ids=ids)
        assert layer.last_ids.shape[-1] == 3 and (layer.last_ids[..., 2] == 7).all()
    with intervene(
        model, [Intervention("mlp_out.1", 7, "replace"), Intervention("mlp_out.1", 8, "replace")]
    ):
        model(input_ids=ids)
        assert (layer.last_ids[..., 1] == 7).all() and (layer.last_ids[..., 0] == 8).all()


def test_generation_and_effect_measures(model, ids) -> None:
    ivs = [Intervention("mlp_out.1", 2), Intervention("attn_heads.0", 1, head=0)]
    kwargs = {"do_sample": True, "max_new_tokens": 6, "pad_token_id": 1}
    a = generate(model, ids[:, :4], ivs, seed=5, **kwargs)
    b = generate(model, ids[:, :4], ivs, seed=5, **kwargs)
    assert torch.equal(a, b) and a.shape == (3, 10)
    plain = generate(model, ids[:, :4], (), seed=5, **kwargs)
    assert not torch.equal(a, plain)
    positioned = [Intervention("mlp_out.1", 2, positions=(1,))]
    assert generate(model, ids[:, :4], positioned, seed=5, **kwargs).shape == (3, 10)
    jsd = next_token_jsd(model, ids, ivs)
    assert jsd.shape == (3,) and (jsd > 0).all() and (jsd <= torch.log(torch.tensor(2.0))).all()
    # the last layer's MLP at position 0 cannot reach the last position; the first layer's can
    early = next_token_jsd(model, ids, [Intervention("mlp_out.1", 2, positions=(0,))])
    # exact: the last position's logits are bit-identical (same shapes, same kernels, rows the
    # edit cannot reach), and token_jsd(x, x) is 0 when, as for this untrained model's
    # near-uniform logits, every log-prob lies in [-8, -4.7): (lp + ln 2) - ln 2 rounds to lp
    assert (early == 0).all()
    assert (next_token_jsd(model, ids, [Intervention("mlp_out.0", 2, positions=(0,))]) > 0).all()
    # same path: 2 texts of 3 match, and both sides are the one float division 2 / 3
    assert target_rate(["a king", "no", "KING me"], r"\bking\b") == pytest.approx(2 / 3)


def test_token_jsd_against_the_definition() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(4, 7, generator=g, dtype=torch.float64),
        torch.randn(4, 7, generator=g, dtype=torch.float64),
    )
    p, q = a.softmax(-1), b.softmax(-1)
    m = (p + q) / 2
    want = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    # float64 sums of 7 terms by two formulas (measured 6e-17): rtol 1e-10 is ≳ 1e5 ulps, while
    # a wrong formula (a lost 1/2, KL(p‖q) for KL(p‖m)) is ≳ 1e-2 off
    torch.testing.assert_close(token_jsd(a, b), want, rtol=1e-10, atol=1e-12)
    # swapping p and q swaps kl_p and kl_q (logaddexp and + are symmetric): measured 0
    torch.testing.assert_close(token_jsd(a, b), token_jsd(b, a), rtol=1e-12, atol=1e-15)
    assert token_jsd(a, a).abs().max() < 1e-12


def test_errors_leave_nothing_behind(model, ids) -> None:
    layer = model.codebook("mlp_out.0")
    with (
        pytest.raises(ValueError, match="out of range"),
        intervene(model, [Intervention("mlp_out.0", 1), Intervention("mlp_out.0", 16)]),
    ):
        pass
    assert layer.edits == ()
    with (
        pytest.raises(ValueError, match="no codebook at site"),
        intervene(model, [Intervention("mlp_out.5", 1)]),
    ):
        pass
    with (
        pytest.raises(ValueError, match="say which head"),
        intervene(model, [Intervention("attn_heads.0", 1)]),
    ):
        pass
    with (
        pytest.raises(ValueError, match="head 9 does not exist"),
        intervene(model, [Intervention("attn_heads.0", 1, head=9)]),
    ):
        pass
    with (
        pytest.raises(ValueError, match="slot"),
        intervene(model, [Intervention("mlp_out.0", 1, "replace", slot=5)]),
    ):
        pass
    with pytest.raises(ValueError, match="mode"):
        Intervention("mlp_out.0", 1, "flip")  # type: ignore[arg-type]
    with (
        pytest.raises(RuntimeError, match="boom"),
        intervene(model, [Intervention("mlp_out.0", 1)]),
    ):
        raise RuntimeError("boom")
    assert layer.edits == ()


def test_a_position_past_the_input_is_an_error_not_a_no_op(model, ids) -> None:
    """A forced position the forward pass does not have raises, naming the position, the
    length and the intervention; -T .. T-1 apply."""
    past = [Intervention("mlp_out.0", 5, positions=(99,))]
    with (
        pytest.raises(ValueError, match=r"force mlp_out.0:5@99: position 99 .* 10-token"),
        intervene(model, past),
    ):
        model(input_ids=ids)
    assert model.codebook("mlp_out.0").edits == ()
    with pytest.raises(ValueError, match="position -11 is outside the 10-token"):
        next_token_jsd(model, ids, [Intervention("mlp_out.0", 5, positions=(3, -11))])
    blocked = [Intervention("mlp_out.0", 5, "block", positions=(10,))]
    with pytest.raises(ValueError, match="position 10 "), intervene(model, blocked):
        model.codebook("mlp_out.0").codes(torch.randn(3, 10, 64))
    for p in (-10, 9):
        with intervene(model, [Intervention("mlp_out.0", 5, positions=(p,))]):
            model(input_ids=ids)
            assert (model.codebook("mlp_out.0").last_ids[:, p] == 5).all()
    with pytest.raises(ValueError, match="positions is empty"):
        Intervention("mlp_out.0", 5, positions=())


def test_generation_refuses_only_positions_no_forward_pass_reaches(model, ids) -> None:
    """Generating 6 tokens from 4: the passes have 4 .. 9 tokens (the last token is never fed
    back), so positions -9 .. 8 apply, in the passes long enough for them."""
    kwargs = {"do_sample": False, "max_new_tokens": 6, "pad_token_id": 1}
    layer = model.codebook("mlp_out.1")
    for p in (8, -9):
        out = generate(model, ids[:, :4], [Intervention("mlp_out.1", 2, positions=(p,))], **kwargs)
        assert out.shape == (3, 10)
        assert (layer.last_ids[:, p] == 2).all()  # the last pass (9 tokens) had it
    for p in (9, -10):
        with pytest.raises(ValueError, match=rf"position {p} can never apply: .* 9 tokens"):
            generate(model, ids[:, :4], [Intervention("mlp_out.1", 2, positions=(p,))], **kwargs)
    assert layer.edits == ()
    with pytest.raises(ValueError, match="position 9 can never apply"):  # max_length = T + new
        generate(model, ids[:, :4], [Intervention("mlp_out.1", 2, positions=(9,))], max_length=10)
    # the next token after the prompt, for positions meant for a generation: those past the
    # prompt cannot change it, those before it do
    late = [Intervention("mlp_out.0", 2, positions=(6,))]
    # exact, as for ``early`` in test_generation_and_effect_measures (a skipped edit: the same
    # logits bit for bit, and near-uniform log-probs make token_jsd(x, x) exactly 0)
    assert (next_token_jsd(model, ids[:, :4], late, horizon=9) == 0).all()
    both = [*late, Intervention("mlp_out.0", 2, positions=(1,))]
    assert (next_token_jsd(model, ids[:, :4], both, horizon=9) > 0).all()
    with pytest.raises(ValueError, match="position 9 can never apply"):
        next_token_jsd(model, ids[:, :4], [Intervention("mlp_out.0", 2, positions=(9,))], horizon=9)


def test_parse_interventions() -> None:
    got = parse_interventions("mlp_out.1:42, attn_heads.0/h3:7@-1;2", "block")
    assert got == [
        Intervention("mlp_out.1", 42, "block"),
        Intervention("attn_heads.0", 7, "block", head=3, positions=(-1, 2)),
    ]
    with pytest.raises(ValueError, match="cannot parse"):
        parse_interventions("mlp_out.1=42")
