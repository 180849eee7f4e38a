"""``zoo:tokfsm``: the codebook paper's TokFSM model, with codebooks, and its baseline.

Recipe (seeded, CPU, float32): the FSM of the paper's size (100 states, 10 successors each,
two digit tokens per state, seed 0); a GPT-2 of the paper's layout (4 layers, width 128,
4 heads, MLP 512, vocabulary 11; the original's TokFSM script builds GPT-NeoX and has a GPT-2
option) with k = 1 codebooks of 256 codes on every attention head and every MLP output, the
codes at 3 × the model's learning rate, trained from scratch on fresh random walks (16 × 64
tokens a step, AdamW, peak learning rate 1.5e-3, cosine); and the same model without
codebooks trained on the same batches for the same number of steps. GPT-2 because of its
learned absolute positions: they sit in the residual stream, which no codebook quantises, so
the model knows which digit of a state each token is; GPT-NeoX's rotary positions reach the
residual stream only through the heads' outputs, which the codebooks quantise. Measured
recipes, training times and the spread across CPUs: BENCHMARKS.md, TokFSM.

Until ``snap_after`` the codebook model's codebooks pass their inputs through (a warm
start: from random weights every k = 1 codebook collapses to a few codes and the model stays
at the unigram loss), so it *is* the baseline: those steps are trained once and both models
branch from them. At the snap the codebooks are initialised by k-means, site by site in
forward order, on the activations they will see (their layer norms fitted so that codes
output at the inputs' scale, which keeps the snapped model close to the unsnapped one), and
snap from then on, with unused codes moved to recent inputs every ``replace_dead_every``
steps; the learning-rate schedule restarts there (``snap_lr_factor`` × the peak, cosine
over the remaining steps) for both models. The folder holds the codebook model
(``CodebookModel.save_pretrained``: the base model loads in ``transformers`` alone),
``fsm.json`` (successor table, digit encoding, special tokens), ``baseline/`` and
``zoo.json`` with both models' metrics: first-transition accuracy over all states, sampled
transition accuracy, held-out loss, code purity, state forcing and the timing (wall and CPU
seconds of the shared steps and of each branch), and the recipe
(:meth:`TokFSMConfig.recipe`), whose hash names the cache folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tyche.codebook.model import CodebookModel, attach
from tyche.codebook.steering import state_forcing
from tyche.codebook.tokfsm import (
    FSM,
    code_purity,
    first_transition_accuracy,
    transition_accuracy,
)
from tyche.codebook.train import TrainConfig, evaluate_lm, train_codebooks
from tyche.errors import InputError
from tyche.zoo.entry import (
    METRICS_FILE,
    ZooEntry,
    ZooError,
    atomic_folder,
    cache_root,
    read_json,
    write_json,
)


@dataclass(frozen=True)
class TokFSMConfig:
    """Settings of ``zoo:tokfsm`` (defaults: the cached model)."""

    seed: int = 0
    #: ``"gpt2"`` (learned absolute positions, in the residual stream, which no codebook
    #: quantises) or ``"gpt_neox"`` (rotary: a token's position reaches the residual stream only
    #: through the attention heads' outputs, quantised by their codebooks)
    arch: str = "gpt2"
    n_states: int = 100
    n_edges: int = 10
    n_layers: int = 4
    hidden: int = 128
    n_heads: int = 4
    mlp: int = 512
    #: GPT-NeoX only: the share of each head's dimensions rotated
    rotary_pct: float = 1.0
    #: GPT-NeoX only: parallel attention and MLP; with False each MLP reads its block's
    #: attention output, so the first MLP can already see a whole state (GPT-2's blocks are
    #: sequential)
    parallel_residual: bool = False
    seq_len: int = 64
    batch_size: int = 16
    steps: int = 4400
    lr: float = 1.5e-3
    #: learning rate of the codes (None: ``lr``)
    code_lr: float | None = 4.5e-3
    warmup_steps: int = 50
    num_codes: int = 256
    k: int = 1
    #: steps before the codebooks snap (then k-means initialised); the baseline trains on
    #: the same batches for the same total number of steps
    snap_after: int = 1000
    #: at the snap the schedule restarts for both models: a new warm-up to this multiple of
    #: the peak learning rates, then cosine over the remaining steps (None: the cosine runs on)
    snap_lr_factor: float | None = 0.7
    replace_dead_every: int = 100
    sites: tuple[str, ...] = ("attn_heads.*", "mlp_out.*")
    eval_samples: int = 100
    eval_sequences: int = 64
    #: trials of the state-forcing intervention
    forcing_trials: int = 100
    threads: int | None = 1
    #: train the two models at the same time in two processes (same results as one by one)
    parallel: bool = True

    def recipe(self) -> dict[str, Any]:
        """The settings that decide the trained models (all but how the work is run)."""
        return {k: v for k, v in asdict(self).items() if k not in EXECUTION_SETTINGS}

    def recipe_key(self) -> str:
        """A short hash of :meth:`recipe`: the cache folder of the entry is named after it."""
        text = json.dumps(self.recipe(), sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


#: settings of :class:`TokFSMConfig` that change how the training runs, not its results
EXECUTION_SETTINGS = ("threads", "parallel")


def build_base(cfg: TokFSMConfig, fsm: FSM) -> torch.nn.Module:
    """A freshly initialised GPT-NeoX or GPT-2 for the FSM's tokens (seeded)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(cfg.seed)
    if cfg.arch == "gpt2":
        return GPT2LMHeadModel(
            GPT2Config(
                vocab_size=fsm.vocab_size,
                # learned positions: room for generation past the training length and for
                # the evaluations' 64-token walks (state codes, purity) however short seq_len
                n_positions=max(2 * cfg.seq_len, 128),
                n_embd=cfg.hidden,
                n_layer=cfg.n_layers,
                n_head=cfg.n_heads,
                n_inner=cfg.mlp,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=fsm.bos_id,
                eos_token_id=fsm.bos_id,
                pad_token_id=fsm.bos_id,
                tie_word_embeddings=False,
            )
        )
    if cfg.arch != "gpt_neox":
        raise InputError(f"arch must be 'gpt_neox' or 'gpt2', got {cfg.arch!r}")
    config = GPTNeoXConfig(
        vocab_size=fsm.vocab_size,
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.mlp,
        max_position_embeddings=2 * cfg.seq_len,
        rotary_pct=cfg.rotary_pct,
        use_parallel_residual=cfg.parallel_residual,
        bos_token_id=fsm.bos_id,
        eos_token_id=fsm.bos_id,
        pad_token_id=fsm.bos_id,
        tie_word_embeddings=False,
    )
    return GPTNeoXForCausalLM(config)


def _evaluate(model: CodebookModel, fsm: FSM, cfg: TokFSMConfig, held: torch.Tensor) -> dict:
    model.eval()
    out = {
        "first_transition_accuracy": first_transition_accuracy(model, fsm),
        **transition_accuracy(model, fsm, n=cfg.eval_samples, seq_len=cfg.seq_len),
        **{f"held_out_{k}": v for k, v in evaluate_lm(model, held).items()},
    }
    return out


def _train_config(cfg: TokFSMConfig) -> TrainConfig:
    return TrainConfig(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        code_lr=cfg.code_lr,
        warmup_steps=cfg.warmup_steps,
        snap_lr_factor=cfg.snap_lr_factor,
        seed=cfg.seed,
        snap_after=cfg.snap_after,
        kmeans_init=True,
        kmeans_calibrate=True,
        replace_dead_every=cfg.replace_dead_every,
        log_every=max(1, cfg.steps // 20),
    )


def _batch_fn(cfg: TokFSMConfig, fsm: FSM):
    def batches(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        return fsm.batch(cfg.batch_size, cfg.seq_len, g)

    return batches


def _fresh_model(cfg: TokFSMConfig, fsm: FSM) -> CodebookModel:
    """The codebook model as initialised (the baseline is this model never snapping)."""
    model = attach(build_base(cfg, fsm), list(cfg.sites), cfg.num_codes, cfg.k, seed=cfg.seed)
    model.tokenizer = fsm.tokenizer()
    return model


def train_prefix(cfg: TokFSMConfig, work: Path, progress: bool = True) -> dict:
    """Train the steps both models share (until ``snap_after`` the codebook model passes its
    inputs through: it *is* the baseline) and checkpoint them into ``work``; returns the
    wall and CPU seconds."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    fsm = FSM.random(cfg.n_states, cfg.n_edges, seed=cfg.seed)
    model = _fresh_model(cfg, fsm)
    wall, cpu = time.perf_counter(), time.process_time()
    train_codebooks(
        model,
        _batch_fn(cfg, fsm),
        _train_config(cfg),
        out=work,
        stop_at=cfg.snap_after,
        progress=progress,
        desc="shared steps",
    )
    return {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}


def train_one(
    name: str, cfg: TokFSMConfig, folder: Path, work: Path | None = None, progress: bool = True
) -> dict:
    """Train, evaluate and save one of the two models (``"codebooks"`` or ``"baseline"``)
    into ``folder``, continuing from the shared steps checkpointed in ``work`` (None: from
    the start); returns its metrics. Both see the same batches."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    fsm = FSM.random(cfg.n_states, cfg.n_edges, seed=cfg.seed)
    held = fsm.batch(cfg.eval_sequences, cfg.seq_len, torch.Generator().manual_seed(2**31 - 1))
    model = _fresh_model(cfg, fsm)
    if name == "baseline":
        model.set_snap(False)  # its codebooks pass their inputs through for good
    cpu = time.process_time()
    result = train_codebooks(
        model,
        _batch_fn(cfg, fsm),
        _train_config(cfg),
        out=work,
        resume=work is not None,
        progress=progress,
        desc=name,
    )
    cpu = time.process_time() - cpu
    report = _evaluate(model, fsm, cfg, held)
    report.update(
        train_seconds=result.seconds,
        train_cpu_seconds=cpu,
        trained_steps=cfg.steps - (cfg.snap_after if work is not None else 0),
        steps_per_second=result.steps_per_second,
        history=result.history,
        torch_threads=torch.get_num_threads(),
    )
    if name == "codebooks":
        report["purity"] = code_purity(model, fsm, seq_len=cfg.seq_len)
        report["state_forcing"] = state_forcing(
            model, fsm, sites="mlp_out.*", n_trials=cfg.forcing_trials
        )
        model.save_pretrained(folder)
    else:
        model.base.save_pretrained(folder)
        model.tokenizer.save_pretrained(folder)
    fsm.save(folder)
    return report


def train_tokfsm(
    out_dir: Path, config: TokFSMConfig | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """Train the shared steps once, then the codebook model and the baseline from there (in
    two processes when ``cfg.parallel``); save both atomically; return the metrics."""
    cfg = config or TokFSMConfig()
    metrics: dict[str, Any] = {"config": asdict(cfg)}
    start = time.perf_counter()
    with atomic_folder(Path(out_dir)) as tmp:
        folders = {"codebooks": tmp, "baseline": tmp / "baseline"}
        scratch = tmp / ".training"
        works: dict[str, Path | None] = {name: None for name in folders}
        threads = torch.get_num_threads()
        try:
            if cfg.snap_after > 0:
                metrics["shared"] = train_prefix(cfg, scratch / "shared", progress)
                metrics["shared"]["steps"] = cfg.snap_after
                for name in folders:
                    works[name] = scratch / name
                    shutil.copytree(scratch / "shared", scratch / name)
            if cfg.parallel:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                context = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(2, mp_context=context) as pool:
                    jobs = {
                        n: pool.submit(train_one, n, cfg, f, works[n], progress)
                        for n, f in folders.items()
                    }
                    reports = {n: job.result() for n, job in jobs.items()}
            else:
                reports = {n: train_one(n, cfg, f, works[n], progress) for n, f in folders.items()}
        finally:
            torch.set_num_threads(threads)
            shutil.rmtree(scratch, ignore_errors=True)
        metrics.update(reports)
        metrics["loss_floor"] = FSM.random(cfg.n_states, cfg.n_edges, seed=cfg.seed).loss_floor
        metrics["transition_ratio"] = metrics["codebooks"]["transition_accuracy"] / max(
            metrics["baseline"]["transition_accuracy"], 1e-9
        )
        metrics["step_time_ratio"] = (
            metrics["baseline"]["steps_per_second"] / metrics["codebooks"]["steps_per_second"]
        )
        shared = metrics.get("shared", {"seconds": 0.0, "cpu_seconds": 0.0})
        metrics["train_cpu_seconds_both"] = shared["cpu_seconds"] + sum(
            reports[n]["train_cpu_seconds"] for n in reports
        )
        metrics["wall_seconds"] = time.perf_counter() - start
        write_json(tmp / METRICS_FILE, metrics)
    return metrics


class TokFSMEntry(ZooEntry):
    """Zoo entry that trains and caches the TokFSM codebook model and its baseline.

    The cache folder is named after the recipe (``tokfsm-<recipe key>``), so a model trained
    with other settings is never taken for this one; ``zoo.json`` stores the recipe and a
    folder whose stored recipe differs from the one its name promises is refused.
    """

    name = "tokfsm"
    kind = "model"
    description = "TokFSM GPT-2 (4x128) with k=1 codebooks on every head and MLP + baseline"
    default_data = "fsm:zoo:tokfsm"
    config = TokFSMConfig()

    @property
    def path(self) -> Path:
        return cache_root() / f"{self.name}-{self.config.recipe_key()}"

    def is_ready(self) -> bool:
        if not (self.path / METRICS_FILE).is_file():
            return False
        self.check_recipe()
        return True

    def check_recipe(self) -> None:
        """Raise :class:`ZooError` when the cached folder was trained with another recipe."""
        stored = read_json(self.path / METRICS_FILE).get("config", {})
        stored = {k: v for k, v in stored.items() if k not in EXECUTION_SETTINGS}
        expected = json.loads(json.dumps(self.config.recipe(), default=list))
        if stored != expected:
            keys = set(stored) | set(expected)
            diff = sorted(k for k in keys if stored.get(k) != expected.get(k))
            raise ZooError(
                f"{self.path} holds a TokFSM model trained with another recipe (differs in "
                f"{diff}); move that folder away and run `tyche zoo train tokfsm` to retrain"
            )

    def prepare(self, *, force: bool = False, progress: bool = True) -> dict[str, Any]:
        if not force and self.is_ready():
            return self.metrics()
        start = time.perf_counter()
        metrics = train_tokfsm(self.path, self.config, progress=progress)
        metrics["total_seconds"] = time.perf_counter() - start
        write_json(self.path / METRICS_FILE, metrics)
        return metrics
