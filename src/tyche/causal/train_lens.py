"""Train a :class:`~tyche.causal.lenses.TunedLens`: per-site translators matching final logits.

Each site ``s`` gets an affine translator ``h -> h + A_s h + b_s`` (zero at the start, so the
untrained lens is the logit lens). All translators are trained together with Adam to
minimise the mean over non-padding positions of ``KL(model's final distribution ‖ lens_s)``
in nats, summed over sites. The model is frozen and runs once per batch under ``no_grad``.
Hidden states and logits are compared in the lens's dtype (``TunedLens.dtype``: the model's,
at least float32, so a bfloat16 model's lens trains in float32).
Under torchrun each rank trains on its own rows and gradients are averaged over ranks, so
every rank holds the same lens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from tyche.causal.activations import token_inputs
from tyche.causal.lenses import TunedLens
from tyche.distributed import (
    all_reduce_sum,
    get_world_size,
    init_distributed,
    shard_range,
)
from tyche.distributed import (
    progress as progress_bar,
)
from tyche.divergence import masked_kl
from tyche.errors import InputError
from tyche.frameworks import as_module
from tyche.hooks import read_activations

__all__ = ["evaluate_lens", "train_tuned_lens"]


@torch.no_grad()
def evaluate_lens(
    lens: TunedLens, data: Mapping[str, Tensor] | Tensor, batch_size: int = 16
) -> list[float]:
    """Mean KL(model ‖ lens) in nats at each of the lens's sites over ``data`` (all ranks)."""
    init_distributed()
    model = lens._model
    tokens = token_inputs(data)
    rows = shard_range(tokens["input_ids"].shape[0])
    device = next(model.parameters()).device
    sums = torch.zeros(len(lens.sites) + 1, dtype=torch.float64)
    with read_activations(model, lens.sites) as acts:
        for start in range(rows.start, rows.stop, batch_size):
            stop = min(start + batch_size, rows.stop)
            batch = {k: v[start:stop].to(device) for k, v in tokens.items()}
            final = model(**batch).logits.to(lens.dtype).log_softmax(-1)
            mask = batch["attention_mask"] != 0
            for i, site in enumerate(lens.sites):
                kl = masked_kl(final, lens(acts[site], i).to(lens.dtype), mask, "token")
                sums[i] += kl.sum().double().cpu()
            sums[-1] += mask.sum().cpu()
    sums = all_reduce_sum(sums)
    return (sums[:-1] / sums[-1].clamp_min(1)).tolist()


def train_tuned_lens(
    model: nn.Module,
    data: Mapping[str, Tensor] | Tensor,
    sites: str | Sequence[str] = "resid_pre.*",
    *,
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 8,
    weight_decay: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> TunedLens:
    """Train a tuned lens for ``sites`` of ``model`` on token ``data`` (see module docstring).

    Args:
        model: a causal LM (frozen; its parameters get no gradients): HF, TransformerLens or
            nnsight (``tyche.frameworks.as_module``).
        data: token ids (N, T) or a dict with ``input_ids``/``attention_mask``.
        sites: site patterns the lens reads.
        steps: optimiser steps; each uses ``batch_size`` rows (per rank), cycling through
            the data in a fixed shuffled order drawn from ``seed``.
        lr: AdamW's learning rate; it decays linearly to 0.
        weight_decay: AdamW's weight decay.

    Returns:
        The trained lens, with ``lens.stats`` holding the per-site KL (nats) of the logit
        lens and of the tuned lens on ``data``.
    """
    if steps < 1 or batch_size < 1:
        raise InputError("steps and batch_size must be positive")
    model = as_module(model)
    init_distributed()
    tokens = token_inputs(data)
    lens = TunedLens(model, sites)
    rows = shard_range(tokens["input_ids"].shape[0])
    if len(rows) == 0:
        raise InputError("this rank got no data: use more rows than processes")
    device = next(model.parameters()).device
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)) + rows.start
    params = list(lens.translators.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    was_training = model.training
    model.eval()
    kl_logit = evaluate_lens(lens, tokens, batch_size)
    bar = progress_bar(range(steps), desc="tuned lens", disable=not progress)
    try:
        for step in bar:
            pick = order[torch.arange(step * batch_size, (step + 1) * batch_size) % len(order)]
            batch = {k: v[pick].to(device) for k, v in tokens.items()}
            with torch.no_grad(), read_activations(model, lens.sites) as acts:
                final = model(**batch).logits.to(lens.dtype).log_softmax(-1)
                hiddens = {s: acts[s].to(lens.dtype) for s in lens.sites}
            mask = batch["attention_mask"] != 0
            loss = sum(
                masked_kl(final, lens(hiddens[s], i).to(lens.dtype), mask)
                for i, s in enumerate(lens.sites)
            )
            grads = torch.autograd.grad(loss, params)  # the model's own weights get none
            for p, g in zip(params, grads):
                p.grad = all_reduce_sum(g) / get_world_size() if get_world_size() > 1 else g
            opt.step()
            schedule.step()
            bar.set_postfix(kl_per_site=f"{float(loss.detach()) / len(lens.sites):.4f}")
    finally:
        model.train(was_training)
    lens.stats = {
        "kl_logit_lens": kl_logit,
        "kl_tuned_lens": evaluate_lens(lens, tokens, batch_size),
        "settings": {
            "steps": steps,
            "lr": lr,
            "batch_size": batch_size,
            "weight_decay": weight_decay,
            "seed": seed,
        },
    }
    return lens
