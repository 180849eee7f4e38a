"""Figures of codebook runs (PNG, matplotlib Agg): training curves and code usage.

:func:`plot_training` draws the logged windows of :attr:`TrainResult.history
<tyche.codebook.train.TrainResult.history>` (loss, reconstruction MSE, the fraction of dead
codes, usage entropy) against the step; :func:`plot_code_usage` the firing counts of one
codebook's codes, sorted, one line per head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from tyche.errors import InputError
from tyche.plotting import integer_ticks, log_count_ticks, pyplot, save_figure

__all__ = ["TRAINING_PANELS", "plot_code_usage", "plot_training"]

#: the history keys drawn by :func:`plot_training`, with their axis labels
TRAINING_PANELS = (
    ("loss", "training loss (nats/token)"),
    ("mse", "reconstruction MSE"),
    ("dead_fraction", "dead codes (fraction)"),
    ("entropy", "code-usage entropy (nats)"),
)


def plot_training(history: Sequence[Mapping[str, float]], path: str | Path) -> Path:
    """Four panels of the training curves against the optimiser step.

    ``history`` holds one row per logged window, each with ``step`` and the keys of
    :data:`TRAINING_PANELS` (mean loss in nats per token, mean reconstruction MSE over the
    codebooks, the fraction of codes that fired in none of the window's tokens, the entropy
    of code usage in nats). Saved as PNG at ``path``; raises ``InputError`` for an empty
    history or a row without those keys.
    """
    if not history:
        raise InputError("the training history is empty: nothing was logged to plot")
    need = {"step", *(key for key, _ in TRAINING_PANELS)}
    for i, row in enumerate(history):
        if not need <= set(row):
            raise InputError(
                f"history row {i} lacks {sorted(need - set(row))}; it has {sorted(row)}"
            )
    steps = [row["step"] for row in history]
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), squeeze=False)
    for ax, (key, label) in zip(axes.ravel(), TRAINING_PANELS):
        ax.plot(steps, [row[key] for row in history], "o-", ms=3)
        ax.set_xlabel("step")
        integer_ticks(ax.xaxis)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("Codebook training (one point per logged window)")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_code_usage(counts: torch.Tensor, path: str | Path, title: str = "code usage") -> Path:
    """Firing counts of each code, sorted high to low, one line per head (log scale).

    ``counts`` is ``(n_groups, num_codes)`` or ``(num_codes,)``: how many tokens chose each
    code (e.g. :meth:`CodeCache.counts <tyche.codebook.cache.CodeCache.counts>`). Codes that
    never fired are counted in the legend and drawn on the floor of the axes (0.5). Ticks are
    whole numbers (code ranks and counts). Saved as PNG at ``path``.
    """
    counts = torch.as_tensor(counts)
    if counts.dim() == 1:
        counts = counts[None]
    if counts.dim() != 2 or counts.numel() == 0:
        raise InputError(
            f"counts must be (n_groups, num_codes) and not empty, got {tuple(counts.shape)}"
        )
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ranks = range(1, counts.shape[1] + 1)
    for g, row in enumerate(counts.double()):
        dead = int((row == 0).sum())
        label = f"head {g}: " if counts.shape[0] > 1 else ""
        ax.semilogy(ranks, row.sort(descending=True).values.clamp_min(0.5), lw=1,
                    label=f"{label}{dead} of {len(row)} codes never fire")  # fmt: skip
    ax.set_xlabel("code rank")
    integer_ticks(ax.xaxis)
    ax.set_ylim(bottom=0.5)
    log_count_ticks(ax.yaxis, float(counts.max()))
    ax.set_ylabel("tokens choosing the code")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
