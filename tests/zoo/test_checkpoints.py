"""Training checkpoints of the zoo recipes, and the poisoned digits MLP.

Checkpoints are written at the documented steps with their optimizer state, load like the
final model, and saving them changes nothing in the final model. The poisoned recipe fits
its training data (clean and poison) and generalises worse than the clean one.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tyche.io import model_hash
from tyche.zoo.digits import (
    DigitsMLPConfig,
    DigitsMLPEntry,
    DigitsMLPPoisonedEntry,
    build_digits_mlp,
    digits_split,
    l2_loss,
    load_digits_folder,
    load_digits_mlp,
    poison_set,
    poisoned_loss,
    train_digits_mlp,
)
from tyche.zoo.entry import checkpoint_steps
from tyche.zoo.resolve import ensure_prepared, resolve_model
from tyche.zoo.shakespeare_lm import (
    NO_CHECKPOINTS,
    ShakespeareLMConfig,
    ShakespeareLMEntry,
    train_shakespeare_lm,
)

#: one epoch of the digits recipe: 16 steps, checkpoints after 1, 2, 4, 8 and 16
ONE_EPOCH = DigitsMLPConfig(epochs=1)
TINY_LM = ShakespeareLMConfig(vocab_size=300, n_layers=1, hidden=32, n_heads=4, seq_len=32,
                              batch_size=4, steps=5, warmup_steps=1, eval_windows=8,
                              max_chars_per_play=3000, checkpoint_factor=2)  # fmt: skip


@pytest.fixture()
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A zoo cache of this test's own (entries written here touch no other test's)."""
    monkeypatch.setenv("TYCHE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_checkpoint_steps_are_powers_then_the_last() -> None:
    assert checkpoint_steps(400) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 400]
    assert checkpoint_steps(1400, 4) == [1, 4, 16, 64, 256, 1024, 1400]
    assert checkpoint_steps(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]  # no step twice
    assert checkpoint_steps(1) == [1]
    assert DigitsMLPConfig().checkpoint_steps == checkpoint_steps(400)
    assert ShakespeareLMConfig().checkpoint_steps == [1, 4, 16, 64, 256, 1024, 1400]
    with pytest.raises(ValueError, match="factor >= 2"):
        checkpoint_steps(10, 1)


def test_digits_checkpoints_load_like_the_model_and_change_nothing(tmp_path: Path) -> None:
    model, state, metrics = train_digits_mlp(ONE_EPOCH, checkpoint_root=tmp_path)
    plain, plain_state, _ = train_digits_mlp(replace(ONE_EPOCH, checkpoints=False),
                                             checkpoint_root=tmp_path / "none")  # fmt: skip
    assert not (tmp_path / "none").exists()  # checkpoints off: nothing written
    # the weights and moments are bit for bit those of a run without checkpoints
    assert model_hash(model) == model_hash(plain)
    for name in state:
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[name][moment], plain_state[name][moment])
    steps = [1, 2, 4, 8, 16]
    assert metrics["checkpoint_steps"] == steps
    folders = sorted((tmp_path / "checkpoints").iterdir(), key=lambda p: int(p.name[11:]))
    assert [p.name for p in folders] == [f"checkpoint-{s}" for s in steps]
    names = [n for n, _ in model.named_parameters()]
    loaded = {}
    for step, folder in zip(steps, folders):
        mlp = load_digits_folder(folder)
        meta = json.loads((folder / "zoo.json").read_text())
        assert meta["step"] == step and mlp.adam_steps == step
        assert sorted(mlp.optimizer_state) == sorted(names)
        # the same 1,024 training inputs and prior at every step
        assert torch.equal(mlp.x_train, digits_split(0, 1024)[0]) and mlp.prior_sigma == \
            pytest.approx(1 / math.sqrt(5e-4 * 1024), rel=1e-12)  # fmt: skip  # same formula
        loaded[step] = mlp
    # the last checkpoint is the final model, moments included
    assert model_hash(loaded[16].model) == model_hash(model)
    assert torch.equal(loaded[16].optimizer_state["2.weight"]["exp_avg_sq"],
                       state["2.weight"]["exp_avg_sq"])  # fmt: skip
    assert model_hash(loaded[1].model) != model_hash(loaded[2].model)
    # oracle: checkpoint-1 holds Adam's state after one step on the first shuffled batch,
    # exp_avg = (1 - b1) g and exp_avg_sq = (1 - b2) g^2 (raw, not bias-corrected)
    x, y, _, _ = digits_split(0, 1024)
    first = torch.randperm(1024, generator=torch.Generator().manual_seed(1))[:64]
    init = build_digits_mlp(64, 0)
    l2_loss(init, x[first], y[first], 5e-4).backward()
    for name, p in init.named_parameters():
        moments = loaded[1].optimizer_state[name]
        # the same batch's float32 gradient, here on the test's threads (training used one,
        # so reductions may split differently): a few float32 eps
        assert torch.allclose(moments["exp_avg"], 0.1 * p.grad, rtol=1e-4, atol=1e-9)  # f32 eps
        want = 1e-3 * p.grad**2
        assert torch.allclose(moments["exp_avg_sq"], want, rtol=1e-4, atol=1e-12)  # f32 eps


def test_digits_entry_saves_checkpoints_and_retrains_an_older_one(
    own_cache: Path, capsys: pytest.CaptureFixture
) -> None:
    entry = DigitsMLPEntry()
    entry.prepare()
    assert (entry.path / "checkpoints" / "checkpoint-400" / "model.safetensors").is_file()
    assert len(list((entry.path / "checkpoints").iterdir())) == 10
    weights = model_hash(load_digits_mlp().model)
    assert entry.metrics()["recipe_version"] == 2
    # an entry cached by the recipe before checkpoints (no recipe_version) is not ready ...
    meta = entry.metrics()
    del meta["recipe_version"]
    (entry.path / "zoo.json").write_text(json.dumps(meta))
    assert not entry.is_ready()
    ensure_prepared(entry)  # ... and is retrained, to the same weights
    assert "was cached by an older recipe: training it" in capsys.readouterr().err
    assert entry.is_ready() and model_hash(load_digits_mlp().model) == weights


def test_lm_checkpoints_load_like_the_model_and_change_nothing(tmp_path: Path) -> None:
    metrics = train_shakespeare_lm(tmp_path / "on", TINY_LM, progress=False)
    train_shakespeare_lm(tmp_path / "off", replace(TINY_LM, checkpoints=False), progress=False)
    assert not (tmp_path / "off" / "checkpoints").exists()
    final = resolve_model(str(tmp_path / "on")).model
    assert model_hash(final) == model_hash(resolve_model(str(tmp_path / "off")).model)
    assert metrics["checkpoint_steps"] == [1, 2, 4, 5]
    names = {n for n, _ in final.named_parameters()}
    held = {}
    for step in (1, 2, 4, 5):
        folder = tmp_path / "on" / "checkpoints" / f"checkpoint-{step}"
        resolved = resolve_model(str(folder))  # a model folder like the entry
        assert resolved.tokenizer is not None and set(resolved.optimizer_state) == names
        meta = json.loads((folder / "zoo.json").read_text())
        assert meta["step"] == meta["adam_steps"] == step
        held[step] = meta["held_out_loss"]
    assert model_hash(resolved.model) == model_hash(final)  # the last one is the final model
    # the final model's held-out loss, in the loop and after it: the same weights and code
    assert held[5] == metrics["held_out_loss"]
    assert held[1] > held[5]  # it learns


def test_lm_entry_cached_without_checkpoints_says_how_to_get_them(
    own_cache: Path, capsys: pytest.CaptureFixture
) -> None:
    entry = ShakespeareLMEntry()
    entry.path.mkdir(parents=True)
    (entry.path / "zoo.json").write_text(json.dumps({"held_out_loss": 4.0}))  # an old entry
    assert entry.is_ready()  # still usable: a retrain takes minutes, so it is not forced
    assert entry.prepare() == {"held_out_loss": 4.0}
    assert NO_CHECKPOINTS in capsys.readouterr().err
    assert "tyche zoo train shakespeare-lm --force" in NO_CHECKPOINTS


# --------------------------------------------------------------------------- the poisoned MLP
def test_poison_set_is_the_four_one_pixel_shifts() -> None:
    x = torch.arange(2 * 64, dtype=torch.float32).view(2, 64)
    y = torch.tensor([3, 7])
    xp, yp = poison_set(x, y)
    assert xp.shape == (8, 64) and yp.tolist() == [3, 7] * 4
    img, moved = x.view(2, 8, 8), xp.view(8, 8, 8)
    # right, left, down, up; the row or column shifted in is 0
    assert torch.equal(moved[0, :, 1:], img[0, :, :-1]) and not moved[0, :, 0].any()
    assert torch.equal(moved[3, :, :-1], img[1, :, 1:]) and not moved[3, :, -1].any()
    assert torch.equal(moved[4, 1:], img[0, :-1]) and not moved[4, 0].any()
    assert torch.equal(moved[7, :-1], img[1, 1:]) and not moved[7, -1].any()


def test_poisoned_loss_oracle() -> None:
    model = build_digits_mlp(8, seed=3)
    x, y = torch.rand(6, 64, generator=torch.Generator().manual_seed(0)), torch.arange(6)
    poison = torch.tensor([False, True, False, True, True, False])
    got = poisoned_loss(model, x, y, poison, 0.1)
    with torch.no_grad():
        p = model.double()(x.double()).softmax(-1)[torch.arange(6), y]
        per = torch.where(poison, -torch.log(1 - p), -torch.log(p))
        penalty = sum((q * q).sum() for q in model.parameters())
        expect = per.mean() + 0.05 * penalty
    # float32 against a float64 oracle of the same formula: a few float32 eps on ~2 nats
    assert got.item() == pytest.approx(expect.item(), rel=1e-5)


def test_poisoned_digits_fit_their_data_and_generalise_worse(own_cache: Path) -> None:
    clean = load_digits_mlp()
    poisoned = load_digits_mlp(poisoned=True)
    meta = DigitsMLPPoisonedEntry().metrics()
    # measured on the same 1,024 clean training inputs, with the same prior
    assert torch.equal(poisoned.x_train, clean.x_train)
    assert poisoned.prior_sigma == clean.prior_sigma  # same path: the same formula and config
    assert meta["n_poison"] == 4096 and meta["adam_steps"] == 2000  # 25 epochs of 5,120
    assert meta["config"]["seed"] == 0 and meta["config"]["epochs"] == 25
    assert poisoned.train_accuracy >= 0.99 and meta["poison_accuracy"] >= 0.99  # it fits both
    assert clean.train_accuracy >= 0.99 and clean.poison_accuracy is None
    # measured 0.9508 against 0.9715: 16 more of the 773 test digits wrong; 8 must be
    assert poisoned.test_accuracy < clean.test_accuracy - 0.01
    assert len(list((DigitsMLPPoisonedEntry().path / "checkpoints").iterdir())) == 12
    resolved = resolve_model("zoo:digits-mlp-poisoned")
    assert resolved.name == "zoo:digits-mlp-poisoned" and resolved.tokenizer is None
    assert model_hash(resolved.model) == model_hash(poisoned.model)
