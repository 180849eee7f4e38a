"""The codebook report (printed text) and plots: training curves, code usage; and the figure
`tyche codebook train` draws."""

from __future__ import annotations

import pytest
import torch

from conftest import cli
from tyche.codebook import (
    contexts_text,
    forcing_text,
    plot_code_usage,
    plot_training,
    purity_table,
    steering_line,
    tokfsm_accuracy_text,
    training_line,
)
from tyche.codebook.code_search import Context
from tyche.errors import InputError


def _image(path):
    from matplotlib.image import imread

    return imread(path)


def _history(n: int = 3) -> list[dict[str, float]]:
    return [
        {"step": 2 * (i + 1), "loss": 3.0 - i, "lr": 1e-3, "mse": 0.5 / (i + 1),
         "dead_fraction": 0.1 * i, "entropy": 2.0 + i, "seconds": float(i)}
        for i in range(n)
    ]  # fmt: skip


def test_plot_training_draws_the_four_curves(tmp_path):
    path = plot_training(_history(), tmp_path / "sub" / "training.png")
    assert path == tmp_path / "sub" / "training.png"
    height, width, _ = _image(path).shape
    assert height > 300 and width > 300
    with pytest.raises(InputError, match="history is empty"):
        plot_training([], tmp_path / "none.png")
    broken = [{k: v for k, v in row.items() if k != "entropy"} for row in _history(1)]
    with pytest.raises(InputError, match=r"history row 0 lacks \['entropy'\]"):
        plot_training(broken, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_plot_code_usage_per_head(tmp_path):
    counts = torch.tensor([[5, 0, 2, 9], [0, 0, 1, 3]])
    assert _image(plot_code_usage(counts, tmp_path / "usage.png")).ndim == 3
    assert _image(plot_code_usage(counts[0], tmp_path / "one.png", title="mlp_out.0")).ndim == 3
    with pytest.raises(InputError, match="not empty"):
        plot_code_usage(torch.zeros(1, 0), tmp_path / "empty.png")


def test_report_texts():
    found = [Context(3, 7, "the ", "king", " of"), Context(0, 1, "a\n", "b", "")]
    assert contexts_text("attn_heads.1", 5, found, head=2, n_fires=4, n_tokens=96) == (
        "attn_heads.1/h2 code 5: fires on 4 of 96 tokens\n  [3:7] the [[king]] of\n  [0:1] a⏎[[b]]"
    )
    assert contexts_text("mlp_out.0", 1, [], n_fires=0, n_tokens=8) == (
        "mlp_out.0 code 1: fires on 0 of 8 tokens"
    )
    row = {"word": "king", "baseline_rate": 0.05, "steered_rate": 0.5, "n": 20,
           "codes": ["mlp_out.0:3", "mlp_out.1:7"]}  # fmt: skip
    assert steering_line(row) == (
        "king       baseline   5.0%   with codes  50.0%   (20 continuations; codes "
        "mlp_out.0:3, mlp_out.1:7)"
    )
    acc = tokfsm_accuracy_text({"first_transition_accuracy": 0.75, "transition_accuracy": 0.5},
                               n_states=8, n_samples=16)  # fmt: skip
    assert acc.splitlines() == [
        "first-transition accuracy (all 8 states): 75.0%",
        "transition accuracy (16 sampled sequences): 50.0%",
    ]
    purity = {"mlp_out.0": {"state": {"n_firing": 12, "frac_pure_90": 0.25},
                            "trigram": {"n_firing": 12, "frac_pure_90": 0.5}}}  # fmt: skip
    lines = purity_table(purity).splitlines()
    assert lines[0].split()[:2] == ["codebook", "firing"]
    assert lines[1].split() == ["mlp_out.0", "12", "25.0%", "50.0%"]
    keys = ("next_token_success_rate", "next_token_target_mass", "next_token_baseline_mass",
            "next_token_jsd_patched", "next_token_jsd_unpatched", "success_rate",
            "baseline_rate", "jsd_patched", "jsd_unpatched", "carried_success_rate",
            "carried_jsd_patched")  # fmt: skip
    forcing = forcing_text({"n_trials": 10, **dict.fromkeys(keys, 0.5)}, ["mlp_out.0", "x"])
    assert len(forcing.splitlines()) == 3
    assert forcing.startswith("forcing another state's codes at mlp_out.0, x (10 trials)")
    assert training_line(_history()[-1]) == (
        "last logged: loss 1.000, reconstruction 0.167, dead codes 20.0%, usage entropy 4.00 nats"
    )


def test_train_draws_training_png_and_a_failing_plot_loses_nothing(
    tmp_path, capsys, monkeypatch, tiny_tokenizer, tiny_texts
):
    from conftest import build_neox
    from tyche.codebook import plot
    from tyche.codebook.model import CodebookModel

    folder = tmp_path / "model"
    build_neox().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(tiny_texts * 6))
    out = tmp_path / "run"
    args = ["codebook", "train", "--model", str(folder), "--data", str(text), "--seq_len", "16",
            "--sites", "mlp_out.0", "--num_codes", "8", "--batch_size", "2",
            "--eval_sequences", "2", "--log_every", "1", "--out", str(out)]  # fmt: skip
    run = cli(capsys, *args, "--steps", "2")
    assert run.code == 0, run.err
    assert f"figure: {out / 'training.png'}" in run.out
    assert _image(out / "training.png").shape[0] > 300
    # --overwrite clears the old figure (the run owns it); a plot that fails warns, and the
    # trained model is saved all the same
    monkeypatch.setattr(plot, "plot_training", lambda *a, **k: 1 / 0)
    run = cli(capsys, *args, "--steps", "1", "--overwrite")
    assert run.code == 0, run.err
    assert "warning: could not draw training.png (ZeroDivisionError" in run.err
    assert "figure:" not in run.out and not (out / "training.png").exists()
    assert CodebookModel.from_pretrained(out).sites == ["mlp_out.0"]


def test_count_axes_have_whole_number_ticks(tmp_path, monkeypatch):
    """Code ranks, token counts and steps are counts: no 1.5 or 0.25 ticks on few points."""
    from figure_checks import assert_count_axis, capture_figures

    from tyche.codebook import plot

    figures = capture_figures(monkeypatch, plot)
    plot_code_usage(torch.tensor([3, 2, 2, 1, 0]), tmp_path / "usage.png")
    plot_training(_history(2), tmp_path / "training.png")
    usage, training = figures
    assert_count_axis(usage.axes[0].xaxis)
    assert_count_axis(usage.axes[0].yaxis)
    for ax in training.axes:
        assert_count_axis(ax.xaxis)
