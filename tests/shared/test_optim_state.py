"""The one optimizer-state reader: a real HF Trainer ``optimizer.pt`` and a bare torch Adam."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import build_gpt2
from tyche.optim_state import (
    adam_state_by_name,
    read_optimizer_state,
    save_optimizer_state,
)


def _assert_same_state(got: dict, expected: dict) -> None:
    """Exact: the reader maps stored tensors by name and does no arithmetic on them."""
    assert sorted(got) == sorted(expected)
    for name, moments in expected.items():
        for moment, tensor in moments.items():
            assert torch.equal(got[name][moment], tensor), (name, moment)


def test_hf_trainer_optimizer_pt(tmp_path: Path) -> None:
    """Two steps of a real ``transformers.Trainer``; its checkpoint maps back to every name."""
    from transformers import Trainer, TrainingArguments

    model = build_gpt2()
    ids = torch.randint(
        0, model.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0)
    )
    rows = [{"input_ids": r, "labels": r} for r in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, save_steps=2,
        weight_decay=0.1, report_to=[], use_cpu=True, logging_steps=1000, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2" / "optimizer.pt"
    assert checkpoint.is_file()
    expected = adam_state_by_name(model, trainer.optimizer)
    assert len(expected) == len([p for p in model.parameters() if p.requires_grad])
    raw = torch.load(checkpoint, weights_only=True)
    assert all("param_names" not in g for g in raw["param_groups"])  # so the order is guessed
    assert len(raw["param_groups"]) == 2  # decay group, then biases and norms
    _assert_same_state(read_optimizer_state(checkpoint, model), expected)
    # no model and no names: the slots cannot be named, and the message says what to pass
    with pytest.raises(ValueError, match="pass the model"):
        read_optimizer_state(checkpoint)


def test_bare_torch_adam_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    expected = adam_state_by_name(model, opt)
    state = opt.state_dict()
    _assert_same_state(read_optimizer_state(state, model), expected)
    torch.save(state, tmp_path / "adam.pt")
    _assert_same_state(read_optimizer_state(tmp_path / "adam.pt", model), expected)
    # explicit names, and the same state through our safetensors format
    names = [n for n, _ in model.named_parameters()]
    _assert_same_state(read_optimizer_state(state, param_names=names), expected)
    save_optimizer_state(expected, tmp_path / "adam.safetensors")
    _assert_same_state(read_optimizer_state(tmp_path / "adam.safetensors"), expected)
    # a state saved for another model is refused, not silently mis-mapped
    other = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    with pytest.raises(ValueError, match="could not match"):
        read_optimizer_state(state, other)
    with pytest.raises(FileNotFoundError):
        read_optimizer_state(tmp_path / "missing.pt", model)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="could not be read"):
        read_optimizer_state(tmp_path / "junk.pt", model)
