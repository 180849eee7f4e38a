"""The training loop: parameter groups, freezing, metrics, checkpoint/resume, torchrun."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import SUPPORT
from tyche.codebook.model import attach
from tyche.codebook.train import TrainConfig, _optimizer, row_sampler, train_codebooks

WORKER = SUPPORT / "codebook_dist_worker.py"


def _rows(n: int = 16, t: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture()
def cb(gpt2_model):
    return attach(copy.deepcopy(gpt2_model), ["attn_heads.*", "mlp_out.*"], num_codes=16, seed=0)


def test_groups_have_their_learning_rates(cb) -> None:
    opt = _optimizer(cb, TrainConfig(lr=1e-3, code_lr=5e-3, weight_decay=0.1))
    codes, model = opt.param_groups
    assert (codes["lr"], codes["weight_decay"]) == (5e-3, 0.0)
    assert (model["lr"], model["weight_decay"]) == (1e-3, 0.1)
    assert {id(p) for p in codes["params"]} == {id(p) for p in cb.codebook_parameters()}
    assert len(model["params"]) == len(list(cb.base.parameters()))


def test_freeze_base_trains_codebooks_only(cb) -> None:
    before = {n: p.detach().clone() for n, p in cb.named_parameters()}
    cfg = TrainConfig(steps=2, batch_size=4, freeze_base=True, warmup_steps=0, log_every=1)
    result = train_codebooks(cb, row_sampler(_rows(), 4), cfg, progress=False)
    for name, p in cb.named_parameters():
        assert torch.equal(p, before[name]) == name.startswith("base."), name
    assert result.n_params_codebooks == sum(p.numel() for p in cb.codebook_parameters())


def test_metrics_are_logged(cb) -> None:
    cfg = TrainConfig(steps=4, batch_size=4, log_every=2, warmup_steps=1)
    result = train_codebooks(
        cb, row_sampler(_rows(), 4), cfg, progress=False, eval_fn=lambda m: {"probe": 1.0}
    )
    assert [h["step"] for h in result.history] == [2, 4]
    for h in result.history:
        assert h["loss"] > 0 and h["mse"] > 0
        assert 0 <= h["dead_fraction"] < 1
        assert 0 < h["entropy"] <= float(torch.log(torch.tensor(16.0))) + 1e-6
    assert result.evaluation == {"probe": 1.0}
    assert result.steps_per_second > 0


def test_dead_codes_are_replaced_during_training(cb) -> None:
    cfg = TrainConfig(steps=4, batch_size=4, replace_dead_every=2, log_every=4, warmup_steps=0)
    layer = cb.codebook("mlp_out.0")
    train_codebooks(cb, row_sampler(_rows(), 4), cfg, progress=False)
    assert layer.recent is None and not layer.keep_recent  # cleaned up after training


def test_resume_gives_the_same_model(gpt2_model, tmp_path) -> None:
    """Interrupted after 3 of 5 steps and resumed: the same model as 5 steps in one go
    (GPT-2's dropout, dead-code replacement and the cosine schedule included)."""
    rows = _rows()
    cfg = TrainConfig(
        steps=5, batch_size=4, log_every=1, warmup_steps=1, replace_dead_every=2, checkpoint_every=1
    )

    def fresh():
        return attach(copy.deepcopy(gpt2_model), ["attn_heads.0", "mlp_out.1"], num_codes=8, seed=1)

    def interrupted(step: int) -> torch.Tensor:
        if step == 3:
            raise KeyboardInterrupt
        return row_sampler(rows, 4)(step)

    straight = fresh()
    train_codebooks(straight, row_sampler(rows, 4), cfg, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_codebooks(fresh(), interrupted, cfg, out=tmp_path, progress=False)
    resumed = fresh()
    result = train_codebooks(
        resumed, row_sampler(rows, 4), cfg, out=tmp_path, resume=True, progress=False
    )
    assert [h["step"] for h in result.history] == [1, 2, 3, 4, 5]
    # exact: the same steps on the same batches in one process, the state restored bit for bit
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="other settings"):
        other = TrainConfig(**{**cfg.__dict__, "lr": 5e-4})
        train_codebooks(
            fresh(), row_sampler(rows, 4), other, out=tmp_path, resume=True, progress=False
        )


def test_runs_branch_from_a_shared_start(gpt2_model, tmp_path) -> None:
    """``stop_at`` checkpoints a run part-way; resumed, it ends as the run in one go. A copy
    that never snaps continues from the same start as the baseline (no k-means, codebooks
    untouched)."""
    rows = _rows()
    cfg = TrainConfig(
        steps=5, batch_size=4, log_every=1, warmup_steps=1, snap_after=2, kmeans_init=True
    )

    def fresh():
        return attach(copy.deepcopy(gpt2_model), ["attn_heads.0", "mlp_out.1"], num_codes=8, seed=1)

    # stopped right after a dead-code replacement of snapped codebooks (step 3), then resumed
    snapped = TrainConfig(**{**cfg.__dict__, "snap_after": 1, "replace_dead_every": 3})
    straight = fresh()
    train_codebooks(straight, row_sampler(rows, 4), snapped, progress=False)
    part = train_codebooks(
        fresh(), row_sampler(rows, 4), snapped, out=tmp_path / "s", stop_at=3, progress=False
    )
    assert [h["step"] for h in part.history] == [1, 2, 3]
    branched = fresh()
    train_codebooks(
        branched,
        row_sampler(rows, 4),
        snapped,
        out=tmp_path / "s",
        resume=True,
        progress=False,
    )
    # exact, as above: the same steps on the same batches, the state restored bit for bit
    for (name, a), b in zip(straight.state_dict().items(), branched.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    train_codebooks(
        fresh(), row_sampler(rows, 4), cfg, out=tmp_path / "b", stop_at=2, progress=False
    )
    baseline = fresh()
    codes_before = [p.clone() for p in baseline.codebook_parameters()]
    baseline.set_snap(False)
    train_codebooks(
        baseline, row_sampler(rows, 4), cfg, out=tmp_path / "b", resume=True, progress=False
    )
    assert not any(layer.snap for layer in baseline.codebooks.values())
    for before, after in zip(codes_before, baseline.codebook_parameters()):
        assert torch.equal(before, after)  # never snapped: no k-means, no gradient
    assert not torch.equal(baseline.base.lm_head.weight, fresh().base.lm_head.weight)
    with pytest.raises(ValueError, match="stop_at"):
        train_codebooks(fresh(), row_sampler(rows, 4), cfg, stop_at=2, progress=False)
    with pytest.raises(ValueError, match="stop_at"):
        train_codebooks(fresh(), row_sampler(rows, 4), cfg, out=tmp_path / "c", stop_at=9)


def test_bad_settings_raise(cb) -> None:
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="resume=True needs"):
        train_codebooks(
            cb, row_sampler(_rows(), 4), TrainConfig(steps=1, batch_size=4), resume=True
        )
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_codebooks(
            cb,
            row_sampler(_rows(), 4),
            TrainConfig(steps=1, batch_size=4),
            out="/nonexistent-folder",
            resume=True,
        )


def test_schedule() -> None:
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    # float64 closed forms of a cosine and ≤ 4 roundings: ≲ 1e-15 off; rel 1e-12 (a wrong step
    # or phase is ≳ 1e-3 off)
    assert cfg.lr_factor(0) == pytest.approx(0.1, rel=1e-12)
    assert cfg.lr_factor(9) == pytest.approx(1.0, rel=1e-12)  # as above
    assert cfg.lr_factor(10) == pytest.approx(1.0, rel=1e-12)  # as above
    assert cfg.lr_factor(60) == pytest.approx(0.55, rel=1e-12)  # as above
    assert cfg.lr_factor(110) == pytest.approx(0.1, rel=1e-12)  # as above
    snapped = TrainConfig(steps=110, warmup_steps=10, snap_after=50, snap_lr_factor=0.5)
    # same path: the schedule until the snap is the one without it, on the same step
    assert snapped.lr_factor(49) == pytest.approx(cfg.lr_factor(49))
    # float64 closed forms, as above
    assert snapped.lr_factor(50) == pytest.approx(0.05, rel=1e-12)  # a new warm-up from the snap
    assert snapped.lr_factor(59) == pytest.approx(0.5, rel=1e-12)  # as above
    # then a cosine of 50 steps (as above)
    assert snapped.lr_factor(85) == pytest.approx(0.5 * 0.55, rel=1e-12)
    assert snapped.lr_factor(110) == pytest.approx(0.05, rel=1e-12)  # as above
    flat = TrainConfig(**{**snapped.__dict__, "schedule": "constant"})
    assert flat.lr_factor(109) == pytest.approx(0.5, rel=1e-12)  # as above
    assert flat.lr_factor(5) == pytest.approx(0.6, rel=1e-12)  # as above
    with pytest.raises(ValueError, match="snap_lr_factor"):
        TrainConfig(snap_lr_factor=0.0)


@pytest.mark.distributed
def test_two_ranks_give_one_process_gradients(neox_model, tmp_path) -> None:
    """GPT-NeoX (no dropout): the 2-rank gradients are the one-process gradients."""
    from conftest import run_torchrun
    from tyche.codebook.train import compute_gradients

    rows = _rows(8, 12, seed=3)
    torch.save(rows, tmp_path / "rows.pt")
    cb = attach(copy.deepcopy(neox_model), ["attn_heads.*", "mlp_out.*"], num_codes=16, seed=0)
    cb.train()
    loss = compute_gradients(cb, rows)
    run_torchrun(WORKER, str(tmp_path))
    got = torch.load(tmp_path / "grads.pt")
    assert abs(float(got["__loss__"]) - float(loss)) < 1e-5  # mean of 2 half-means: rounding
    for name, p in cb.named_parameters():
        # the halves' gradients summed in another order than one batch: float32 rounding
        # relative to the gradient's size (measured ~1e-7; 100x margin)
        scale = float(p.grad.abs().max()) + 1e-12
        assert float((got[name] - p.grad).abs().max()) <= 1e-5 * scale, name
    assert torch.load(tmp_path / "same.pt"), "ranks ended training with different parameters"
