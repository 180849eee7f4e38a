"""Slow checks on real models: zoo:tokfsm's figures and codebooks in the real SmolLM2-135M."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def test_tokfsm_zoo_model_meets_the_paper_figures() -> None:
    """Trains zoo:tokfsm when it is not cached (minutes), then checks its recorded figures."""
    from tyche.zoo.catalogue import get_entry
    from tyche.zoo.resolve import ensure_prepared

    entry = get_entry("zoo:tokfsm")
    ensure_prepared(entry, progress=False)
    m = entry.metrics()
    cb, base = m["codebooks"], m["baseline"]
    assert cb["first_transition_accuracy"] >= 0.9
    assert cb["transition_accuracy"] >= 0.9 * base["transition_accuracy"]
    mlp0 = cb["purity"]["mlp_out.0"]["state"]
    assert mlp0["frac_pure_90"] >= 0.5
    forcing = cb["state_forcing"]
    # the prediction made where the codes are forced (the next state's first digit), and the
    # whole next state with the codes of the other state's run carried to its second digit
    assert forcing["next_token_success_rate"] > 0.5
    assert forcing["next_token_jsd_patched"] < forcing["next_token_jsd_unpatched"]
    assert forcing["carried_success_rate"] > 0.5


def test_frozen_smollm2_with_codebooks() -> None:
    """Codebooks on three late MLPs of the real SmolLM2-135M, base frozen: training the
    codes lowers the loss, and the model keeps most of its next-token accuracy."""
    from tyche.codebook.model import attach
    from tyche.codebook.train import TrainConfig, evaluate_lm, row_sampler, train_codebooks
    from tyche.data import chunk_and_tokenize
    from tyche.zoo.entry import ZooError
    from tyche.zoo.resolve import resolve_model, resolve_texts

    try:
        zoo = resolve_model("zoo:smollm2-135m", progress=False)
    except ZooError as err:
        pytest.skip(str(err))
    torch.manual_seed(0)
    rows = chunk_and_tokenize(resolve_texts("zoo:stdlib-docs"), zoo.tokenizer, max_seq_len=48)
    ids = rows["input_ids"][torch.randperm(rows["input_ids"].shape[0])[:72]]
    held, train_rows = ids[:8], ids[8:]
    before = evaluate_lm(zoo.model, held, batch_size=4)
    # restore_scale: the frozen layers after the codebooks get activations of their usual size
    cb = attach(zoo.model, "mlp_out.2[7-9]", num_codes=512, k=8, seed=0, restore_scale=True)
    cfg = TrainConfig(
        steps=12,
        batch_size=4,
        code_lr=3e-3,
        freeze_base=True,
        kmeans_init=True,
        kmeans_tokens=2048,
        warmup_steps=2,
        log_every=4,
    )
    result = train_codebooks(
        cb,
        row_sampler(train_rows, 4),
        cfg,
        progress=False,
        eval_fn=lambda m: evaluate_lm(m, held, batch_size=4),
    )
    after = result.evaluation
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    # measured on 16 held-out rows: 0.313 -> 0.275 (and 0.068 with calibrated layer norms
    # instead); 0.1 leaves a 2.5x margin for these 8 rows and fewer steps
    assert after["accuracy"] > before["accuracy"] - 0.1
    assert all(not p.requires_grad for p in cb.base.parameters())
