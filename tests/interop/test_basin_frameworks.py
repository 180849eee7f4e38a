"""Basin volumes of TransformerLens and nnsight models, checked against a loss written by hand.

The oracle of Tyche's language-model path (``VolumeEstimator`` → ``ModelLoss``) is
``estimate_basin`` on a loss written here from its definition: the TransformerLens model run
by ``torch.func.functional_call`` with the selected parameters moved by δ
(``return_type="logits"``, the same attention mask), and the mean over the unpadded tokens of
KL(p_θ ‖ p_{θ+δ}) taken by hand from ``log_softmax``. With the same seed both draw the same
directions, so the per-direction estimates must agree.
"""

from __future__ import annotations

import fnmatch

import pytest
import torch
from interop_support import VOCAB, build_hooked, wrap_nnsight
from torch.func import functional_call

from conftest import build_gpt2, make_tiny_tokenizer, tiny_text_list
from tyche.basin import BasinOptions, VolumeConfig, VolumeEstimator, estimate_basin, model_loss

#: the parameters the basin is measured over (33,088 of them: a fast, non-trivial basin)
INCLUDE = "blocks.1.mlp.*"


def _config(model, **kwargs) -> VolumeConfig:
    """Four directions, cutoff 1e-2 nats, four padded sequences of the tiny texts."""
    settings = dict(
        model=model, tokenizer=make_tiny_tokenizer(), dataset=tiny_text_list(), n_samples=4,
        cutoff=1e-2, max_seq_len=16, val_size=4, include=INCLUDE, seed=3, tqdm=False,
    )  # fmt: skip
    return VolumeConfig(**{**settings, **kwargs})


class HandLoss:
    """δ (B, D) -> mean KL(p_θ ‖ p_{θ+δ}) (B,) of a HookedTransformer, from the definition.

    The selected parameters (``INCLUDE``, in ``named_parameters`` order) are flattened into
    θ; each row of δ moves them in a ``functional_call`` of the TransformerLens model itself
    (given the attention mask where it masks something). The KL is summed over the
    vocabulary in float64 and averaged over the tokens the attention mask keeps; returned in
    float64.
    """

    def __init__(self, hooked: torch.nn.Module, tokens: dict[str, torch.Tensor]) -> None:
        self.hooked, self.ids, self.mask = hooked, tokens["input_ids"], tokens["attention_mask"]
        self.params = {n: p.detach() for n, p in hooked.named_parameters()}
        self.names = [n for n in self.params if fnmatch.fnmatchcase(n, INCLUDE)]
        self.anchor = torch.cat([self.params[n].reshape(-1) for n in self.names])
        self.clean = self._logits(self.params).double().log_softmax(-1)

    def _logits(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        masks = not bool(self.mask.bool().all())
        kwargs = {"attention_mask": self.mask if masks else None, "return_type": "logits"}
        return functional_call(self.hooked, params, (self.ids,), kwargs)

    @torch.no_grad()
    def __call__(self, offsets: torch.Tensor) -> torch.Tensor:
        keep = self.mask.bool()
        out = []
        for offset in offsets:
            params, start = dict(self.params), 0
            for n in self.names:
                size = self.params[n].numel()
                piece = offset[start : start + size].reshape(self.params[n].shape)
                params[n] = self.params[n] + piece.to(self.params[n].dtype)
                start += size
            logq = self._logits(params).double().log_softmax(-1)
            kl = (self.clean.exp() * (self.clean - logq)).sum(-1)
            out.append(kl[keep].mean())
        return torch.stack(out)


def test_model_loss_of_a_hooked_transformer_is_the_hand_loss() -> None:
    hooked = build_hooked()
    ids = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    tokens = {"input_ids": ids, "attention_mask": mask}
    loss = model_loss(hooked, tokens, include=INCLUDE)
    hand = HandLoss(hooked, tokens)
    assert list(loss.layout.names) == hand.names  # TransformerLens's own parameter names
    # same path: both flatten the same parameters in named_parameters order
    torch.testing.assert_close(loss.anchor, hand.anchor, rtol=0, atol=0)
    offsets = 3e-3 * torch.randn(3, loss.n_params, generator=torch.Generator().manual_seed(1))
    got, want = loss(offsets).double(), hand(offsets)
    assert float(want.min()) > 1e-4  # a real rise, not the float32 floor (~1e-8 nats)
    # float32 KL (Tyche) against float64: each position's log-softmax normaliser (~6) rounds
    # by up to ~5e-7, a shift every term of its KL sees in full; so ~1e-7 nats per position
    # (measured 3e-9 here, 1.5e-7 in bfloat16 below)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore:effective sample size")  # 4 samples
def test_volume_estimator_on_a_hooked_transformer_matches_the_hand_loss() -> None:
    hooked = build_hooked()
    estimator = VolumeEstimator.from_config(_config(hooked))
    tokens = estimator.tokens
    assert bool((tokens["attention_mask"] == 0).any())  # padding, which the mean must skip
    result = estimator.run()
    hand = HandLoss(hooked, tokens)
    cfg = estimator.config
    options = BasinOptions(cutoff=cfg.cutoff, n_samples=cfg.n_samples, seed=cfg.seed,
                           rtol=cfg.rtol)  # fmt: skip
    want = estimate_basin(hand, hand.anchor, options, progress=False)
    assert result.n_params == want.n_params == 33_088
    assert result.sigma == pytest.approx(want.sigma, rel=1e-12)  # float64 RMS of one θ
    # the float32 KL (Tyche) carries ~1e-7 nats of rounding against the float64 one (see
    # above), ~1e-5 of the cutoff, which moves the radius where the loss reaches the cutoff
    # by ~1e-5 relative (measured 1.4e-5); an estimate is ~D log r (D = 33,088), so 1e-4
    # relative in r is 3.3 nats of ~56,000 (measured 0.45). Averaging over padding too
    # moves r by 2e-2 (650 nats).
    torch.testing.assert_close(result.radii, want.radii, rtol=1e-4, atol=0)
    torch.testing.assert_close(result.estimates, want.estimates, rtol=0, atol=4.0)  # as above
    assert result.log_prob == pytest.approx(want.log_prob, abs=4.0)  # as above


@pytest.mark.filterwarnings("ignore:effective sample size")  # 4 samples
def test_volume_estimator_on_an_nnsight_wrapper_is_the_hf_models() -> None:
    model = build_gpt2()
    hf = VolumeEstimator.from_config(_config(model, include="transformer.h.1.mlp.*")).run()
    wrapped = wrap_nnsight(model)
    estimator = VolumeEstimator.from_config(_config(wrapped, include="transformer.h.1.mlp.*"))
    assert estimator.model is model  # measured as the module it wraps
    got = estimator.run()
    # the same module runs the same ops on the same weights and directions: bitwise equal
    torch.testing.assert_close(got.estimates, hf.estimates, rtol=0, atol=0)
    torch.testing.assert_close(got.radii, hf.radii, rtol=0, atol=0)  # as above
    assert got.settings["model_hash"] == hf.settings["model_hash"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_model_loss_of_a_hooked_transformer_in_other_dtypes(dtype: torch.dtype) -> None:
    hooked = build_hooked(dtype=dtype)
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    # loop: TransformerLens's forward unbatched, as by hand (vmap's batched matmuls round
    # bfloat16 logits differently, by more than the KL of these offsets)
    loss = model_loss(hooked, {"input_ids": ids}, include=INCLUDE, strategy="loop")
    hand = HandLoss(hooked, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert loss.anchor.dtype == dtype
    draw = torch.randn(2, loss.n_params, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(1))  # fmt: skip
    offsets = (3e-3 * draw).to(dtype)
    got, want = loss(offsets), hand(offsets)
    assert float(want.min()) > 1e-4
    if dtype == torch.float64:
        # float64 logits and KL on both sides: ~1e-16 relative rounding per term
        torch.testing.assert_close(got.double(), want, rtol=1e-10, atol=1e-14)
    else:
        # the same bfloat16 logits (one TransformerLens forward on the same θ + δ); the KLs
        # differ by float32 (Tyche) vs float64 log-softmax only, ~1e-7 nats as above
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
