"""Train a model with codebooks: :class:`TrainConfig` and :func:`train_codebooks`.

The optimiser (AdamW) is built *after* the codebooks are attached, from the
:class:`~tyche.codebook.CodebookModel`'s own parameters, in two groups: the codebooks
(``code_lr``, no weight decay) and the base model (``lr``, ``weight_decay``; left out with
``freeze_base``). Every parameter that requires a gradient is trained.

Data is a function ``batches(step) -> input_ids (B, T)``, deterministic in ``step`` (see
:func:`row_sampler`), so a resumed run sees the same batches as an uninterrupted one. Under
``torchrun`` every rank takes its rows of each batch and gradients are averaged over ranks
(one all-reduce per step): N processes take the same steps as one.

Logged every ``log_every`` steps: the loss, the reconstruction error ‖y − x̂‖² (mean over
tokens and codebooks), the dead-code fraction and the code-usage entropy (nats; mean over
codebooks, of the usage in the logging window; ``ln(num_codes)`` when all codes are used
equally). With ``out``, checkpoints (model, optimiser, history) are written every
``checkpoint_every`` steps and at the end; ``resume=True`` continues from the last one and
refuses (:class:`SettingsMismatch`, naming them) a checkpoint written with other settings:
any field of :class:`TrainConfig` but ``log_every`` and ``checkpoint_every``, the codebook
layout (sites, ``num_codes``, ``k``, similarity, loss, ``beta``, ``restore_scale``, widths)
and the caller's ``extra_settings`` (e.g. the command line's model and data).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from tyche.codebook.layer import usage_stats
from tyche.codebook.model import CodebookModel
from tyche.codebook.options import TrainConfig
from tyche.distributed import (
    all_reduce_sum,
    average_gradients,
    broadcast_,
    get_rank,
    get_world_size,
    init_distributed,
    shard_range,
)
from tyche.distributed import (
    progress as progress_bar,
)
from tyche.errors import InputError
from tyche.frameworks import as_module
from tyche.io import ResultIO, json_text
from tyche.resume import SettingsMismatch, compare_settings

__all__ = [
    "SettingsMismatch",
    "TrainConfig",
    "TrainResult",
    "codebook_layout",
    "evaluate_lm",
    "row_sampler",
    "train_codebooks",
]

BatchFn = Callable[[int], torch.Tensor]
CHECKPOINT = "checkpoint"
#: settings that may change when a run is resumed (they change neither the model nor its data)
RESUMABLE = ("log_every", "checkpoint_every")
#: the per-codebook settings that make a codebook layout (``snap`` is not one: a run may be
#: branched from a checkpoint with its codebooks passing their inputs through)
LAYOUT_KEYS = ("grouped", "n_groups", "dim", "num_codes", "k", "similarity", "loss", "beta",
               "restore_scale")  # fmt: skip


@dataclass(frozen=True)
class TrainResult(ResultIO):
    """What a run did: its settings, the logged history and timing."""

    config: dict[str, Any]
    history: list[dict[str, float]]
    seconds: float
    steps_per_second: float
    world_size: int
    n_params_model: int
    n_params_codebooks: int
    fingerprint: str
    evaluation: dict[str, float] = field(default_factory=dict)
    UNITS: ClassVar[dict[str, str]] = {
        "loss": "nats/token",
        "mse": "squared L2 per token and codebook (layer-norm space)",
        "entropy": "nats",
        "seconds": "s (training loop only)",
    }


def row_sampler(tokens: torch.Tensor, batch_size: int, seed: int = 0) -> BatchFn:
    """``batches(step)``: ``batch_size`` random rows of ``tokens`` ``(N, T)``, seeded by step."""
    if tokens.dim() != 2 or tokens.shape[0] == 0:
        raise InputError(f"tokens must be a non-empty (N, T) tensor, got {tuple(tokens.shape)}")

    def batches(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return tokens[torch.randint(tokens.shape[0], (batch_size,), generator=g)]

    return batches


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 32) -> dict:
    """Mean next-token loss (nats) and accuracy over ``tokens`` ``(N, T)``; ``model`` maps
    ``input_ids`` to ``.logits`` (or is a TransformerLens / nnsight model)."""
    model = as_module(model)
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, correct, count = 0.0, 0, 0
    for i in range(0, tokens.shape[0], batch_size):
        batch = tokens[i : i + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        target = batch[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), target.flatten(), reduction="sum"
        ).item()
        correct += int((logits.argmax(-1) == target).sum())
        count += target.numel()
    model.train(was)
    return {"loss": total / count, "accuracy": correct / count, "n_tokens": count}


def _optimizer(model: CodebookModel, cfg: TrainConfig) -> torch.optim.AdamW:
    if cfg.freeze_base:
        for p in model.model_parameters():
            p.requires_grad_(False)
    codes = [p for p in model.codebook_parameters() if p.requires_grad]
    ids = {id(p) for p in codes}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": codes, "lr": cfg.code_lr or cfg.lr, "weight_decay": 0.0}] if codes else []
    if rest:
        groups.append({"params": rest, "lr": cfg.lr, "weight_decay": cfg.weight_decay})
    if not groups:
        raise InputError("nothing to train: the model has no trainable parameters")
    return torch.optim.AdamW(groups, betas=(0.9, 0.95))


def _settings(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE}


def codebook_layout(model: CodebookModel) -> dict[str, Any]:
    """The codebooks' sites and settings: ``{"sites": [...], key: value}`` for each of
    :data:`LAYOUT_KEYS`, one value when every codebook shares it, else ``{site: value}``."""
    entries = model.settings()["codebooks"]
    layout: dict[str, Any] = {"sites": [e["site"] for e in entries]}
    for key in LAYOUT_KEYS:
        values = {e["site"]: e.get(key) for e in entries}
        distinct = list(dict.fromkeys(json.dumps(v) for v in values.values()))
        layout[key] = next(iter(values.values())) if len(distinct) == 1 else values
    return layout


def _identity(model: CodebookModel, cfg: TrainConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """Everything a resumed run must share with its checkpoint, as it reads back from JSON."""
    return json.loads(json.dumps({**_settings(cfg), **codebook_layout(model), **extra}))


def _save_checkpoint(
    model: CodebookModel,
    opt: torch.optim.Optimizer,
    step: int,
    cfg: TrainConfig,
    history: list,
    out: Path,
    extra: dict[str, Any],
) -> None:
    from safetensors.torch import save_file, save_model

    tmp = out / f".{CHECKPOINT}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    names = {id(p): n for n, p in model.named_parameters()}
    flat, steps = {}, {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if key == "step":
                    steps[names[id(p)]] = float(value)
                else:
                    flat[f"{names[id(p)]}/{key}"] = value.detach().cpu().contiguous()
    save_file(flat, str(tmp / "optimizer.safetensors"))
    state = {"step": step, "config": asdict(cfg), "history": history, "adam_steps": steps,
             "codebooks": codebook_layout(model), "extra_settings": extra}  # fmt: skip
    (tmp / "trainer_state.json").write_text(json_text(state, indent=1, sort_keys=False))
    final = out / CHECKPOINT
    with _ctrl_c_deferred():  # between the two, the run would have no checkpoint at all
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives in the block until the block is done (main
    thread only; elsewhere signals are not delivered to Python code anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list[tuple[Any, Any]] = []
    previous = signal.signal(signal.SIGINT, lambda *received: pressed.append(received))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
        if pressed and callable(previous):
            previous(*pressed[0])


def _load_checkpoint(
    model: CodebookModel,
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    out: Path,
    extra: dict[str, Any],
) -> tuple[int, list]:
    from safetensors.torch import load_file, load_model

    folder = out / CHECKPOINT
    if not (folder / "trainer_state.json").is_file():
        raise FileNotFoundError(f"resume: no checkpoint in {folder}; start without resume")
    state = json.loads((folder / "trainer_state.json").read_text())
    now = _identity(model, cfg, extra)
    # a setting added since the checkpoint was written counts with its default; a checkpoint
    # of an older version, with no layout or extra settings, is compared on what it has
    saved = {**_settings(TrainConfig()), **state["config"], **state.get("codebooks", {}),
             **state.get("extra_settings", {})}  # fmt: skip
    keys = [*now, *(k for k in state.get("extra_settings", {}) if k not in now)]
    if "codebooks" not in state:
        keys = [k for k in keys if k not in ("sites", *LAYOUT_KEYS)]
    if "extra_settings" not in state:
        keys = [k for k in keys if k not in extra]
    diff = compare_settings({k: saved.get(k) for k in keys}, {k: now.get(k) for k in keys})
    if diff:  # checked before any tensor is loaded: a changed layout never meets the weights
        raise SettingsMismatch(folder, diff)
    load_model(model, str(folder / "model.safetensors"), device=str(model.device))
    moments = load_file(str(folder / "optimizer.safetensors"), device=str(model.device))
    params = dict(model.named_parameters())
    for name, step in state["adam_steps"].items():
        p = params[name]
        opt.state[p] = {"step": torch.tensor(step)}
        for key in ("exp_avg", "exp_avg_sq"):
            opt.state[p][key] = moments[f"{name}/{key}"].to(p.dtype)
    return int(state["step"]), list(state["history"])


def compute_gradients(model: CodebookModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Forward and backward on this rank's rows of ``input_ids`` (B, T); gradients are
    averaged over ranks. Returns the loss averaged over ranks (nats/token)."""
    init_distributed()
    rows = shard_range(input_ids.shape[0])
    batch = input_ids[rows.start : rows.stop].to(model.device)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    average_gradients(p for p in model.parameters() if p.requires_grad)
    return all_reduce_sum(loss.detach()) / get_world_size()


@torch.no_grad()
def _replace_dead(
    model: CodebookModel, opt: torch.optim.Optimizer, cfg: TrainConfig, step: int
) -> int:
    replaced = 0
    for i, layer in enumerate(model.codebooks.values()):
        layer.usage.copy_(all_reduce_sum(layer.usage))
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step * 31 + i)
        dead = layer.replace_dead_codes(rho=cfg.replace_rho, generator=gen)
        broadcast_(layer.codebook.data)
        state = opt.state.get(layer.codebook, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][dead] = 0.0
        replaced += int(dead.sum())
    return replaced


def _window_stats(model: CodebookModel, before: dict[str, torch.Tensor]) -> dict[str, float]:
    mses, dead, ent = [], [], []
    for site, layer in model.layers().items():
        window = all_reduce_sum(layer.usage - before[site])
        stats = usage_stats(window)
        mses.append(layer.take_metrics()["mse"])
        dead.append(stats["dead_fraction"])
        ent.append(stats["entropy"])
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"mse": mean(mses), "dead_fraction": mean(dead), "entropy": mean(ent)}


def train_codebooks(
    model: CodebookModel,
    batches: BatchFn,
    cfg: TrainConfig,
    *,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    eval_fn: Callable[[CodebookModel], dict[str, float]] | None = None,
    progress: bool = True,
    desc: str = "codebooks",
    stop_at: int | None = None,
    extra_settings: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` (codebooks, and the base unless ``freeze_base``) on ``batches``.

    With ``out`` a checkpoint goes to ``out/checkpoint`` every ``checkpoint_every`` steps
    and at the end (rank 0 writes). ``eval_fn(model)`` runs at the end (in eval mode) and its
    numbers are stored in the result. ``stop_at`` ends the run after that many steps (of
    ``cfg.steps``, the schedule unchanged) with a checkpoint in ``out``: a run resumed from
    it continues exactly, so several runs can branch from one shared start (e.g. a model
    and its codebook version, which is the same model until ``snap_after``).
    ``extra_settings`` (JSON values) are stored with the checkpoint and must match on resume,
    like ``cfg`` and the codebook layout; a mismatch raises :class:`SettingsMismatch` before
    anything is loaded. Returns a :class:`TrainResult`.
    """
    if not isinstance(model, CodebookModel):
        raise TypeError("train_codebooks needs a CodebookModel (use tyche.codebook.model)")
    init_distributed()
    world = get_world_size()
    if cfg.batch_size % world:
        raise InputError(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    out_path = Path(out) if out is not None else None
    if resume and out_path is None:
        raise InputError("resume=True needs the output folder of the run (out=...)")
    end = cfg.steps if stop_at is None else stop_at
    if not 0 < end <= cfg.steps:
        raise InputError(f"stop_at must be in [1, steps={cfg.steps}], got {stop_at}")
    if stop_at is not None and out_path is None:
        raise InputError("stop_at needs an output folder (out=...) for its checkpoint")
    extra = json.loads(json.dumps(dict(extra_settings or {}), allow_nan=False))
    opt = _optimizer(model, cfg)
    peaks = [group["lr"] for group in opt.param_groups]
    start, history = 0, []
    if resume:
        start, history = _load_checkpoint(model, opt, cfg, out_path, extra)
    snapping = {s: layer.snap for s, layer in model.layers().items()}
    if start <= cfg.snap_after:
        model.set_snap(False)
    replacing = cfg.replace_dead_every > 0
    for layer in model.codebooks.values():
        layer.keep_recent = replacing
        if not resume:  # a resumed run keeps the usage counted since the last replacement
            layer.reset_usage()
        layer.take_metrics()
    model.train()
    cuda = [model.device] if model.device.type == "cuda" else []
    before = {s: layer.usage.clone() for s, layer in model.layers().items()}
    losses: list[torch.Tensor] = []
    began = time.perf_counter()
    bar = progress_bar(
        range(start, end),
        total=cfg.steps,
        initial=start,
        desc=desc,
        unit="step",
        disable=not progress,
    )
    for step in bar:
        if step == cfg.snap_after:
            if cfg.kmeans_init and any(snapping.values()):
                model.kmeans_init(
                    (batches(-1 - i) for i in range(10_000)),
                    max_tokens=cfg.kmeans_tokens,
                    seed=cfg.seed,
                    calibrate=cfg.kmeans_calibrate,
                )
            for site, on in snapping.items():
                model.codebook(site).snap = on
            before = {s: layer.usage.clone() for s, layer in model.layers().items()}
        for group, peak in zip(opt.param_groups, peaks):
            group["lr"] = peak * cfg.lr_factor(step)
        opt.zero_grad(set_to_none=True)
        # dropout draws from the global RNG: seed it by step (and rank), so a resumed run
        # takes exactly the steps an uninterrupted one would; the caller's RNG is restored
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + get_rank())
            losses.append(compute_gradients(model, batches(step)))
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], cfg.grad_clip
            )
        opt.step()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            row = {
                "step": done,
                "loss": float(torch.stack(losses).mean()),
                "lr": opt.param_groups[-1]["lr"],
                **_window_stats(model, before),
                "seconds": time.perf_counter() - began,
            }
            before = {s: layer.usage.clone() for s, layer in model.layers().items()}
            losses = []
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", dead=f"{row['dead_fraction']:.2f}")
        if replacing and done % cfg.replace_dead_every == 0 and done < cfg.steps:
            _replace_dead(model, opt, cfg, step)
            before = {s: layer.usage.clone() for s, layer in model.layers().items()}
        if (
            out_path is not None
            and get_rank() == 0
            and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == end)
        ):
            _save_checkpoint(model, opt, done, cfg, history, out_path, extra)
    bar.close()
    seconds = time.perf_counter() - began
    for site, on in snapping.items():
        model.codebook(site).snap = on
    for layer in model.codebooks.values():
        layer.keep_recent, layer.recent = False, None
    model.eval()
    evaluation = eval_fn(model) if eval_fn is not None else {}
    n_code = sum(p.numel() for p in model.codebook_parameters())
    return TrainResult(
        config=asdict(cfg),
        history=history,
        seconds=seconds,
        steps_per_second=(end - start) / seconds if seconds > 0 else float("nan"),
        world_size=world,
        n_params_model=sum(p.numel() for p in model.model_parameters()),
        n_params_codebooks=n_code,
        fingerprint=model.fingerprint(),
        evaluation=dict(evaluation),
    )


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from a dict (unknown keys are an error)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"unknown training settings {unknown}")
    return TrainConfig(**data)
