"""`tyche basin`: estimate a model's basin volume, naive and preconditioned, and plot it.

With no arguments it runs the project's main job: the digits MLP of the basin paper
(``zoo:digits-mlp``), naive against Adam-preconditioned, printed as a table, saved, plotted.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tyche import distributed as dist
from tyche.basin.core import estimate_basin
from tyche.basin.model_loss import ModelLoss
from tyche.basin.preconditioners import adam_preconditioner, diag_preconditioner, fisher_diagonal
from tyche.basin.result import VolumeResult


@dataclass
class BasinCommand:
    """Estimate log P(basin) under a Gaussian prior (nats) for a model on some data."""

    model: str = "zoo:digits-mlp"
    """A zoo model (zoo:digits-mlp, zoo:shakespeare-lm, zoo:smollm2-135m) or an HF folder."""
    data: str | None = None
    """Evaluation data for LMs: zoo:shakespeare, zoo:stdlib-docs or a text file (default:
    the model's own zoo data). Ignored for digits-mlp (its 1024 training inputs)."""
    n_samples: int = 100
    """Monte Carlo directions per preconditioner."""
    cutoff: float = 1e-2
    """KL cutoff in nats."""
    cutoffs: str | None = None
    """Comma-separated cutoffs for a log-probability-against-cutoff scan, e.g. 1e-4,1e-3,1e-2."""
    preconditioners: str = "none,adam"
    """Comma-separated from: none, adam (needs the model's optimizer state), fisher."""
    eps: float = 1e-3
    """Preconditioner eps: p = 1/(spec^exponent + eps)."""
    exponent: float = 0.5
    sigma: float | None = None
    """Prior std; default: the zoo model's L2-implied prior, else the parameters' RMS."""
    seed: int = 0
    batch_size: int = 16
    """Directions evaluated together."""
    val_size: int = 8
    """LMs: evaluation sequences."""
    max_seq_len: int = 64
    """LMs: tokens per sequence."""
    exclude: str | None = None
    """Comma-separated globs of parameter names held fixed, e.g. '*embed*,*norm*'."""
    out: str = "runs/basin"
    """Folder for results (safetensors + JSON) and PNG plots."""
    checkpoint: bool = True
    """Save finished samples after every batch under OUT/checkpoints."""
    resume: bool = False
    """Continue an interrupted run from OUT/checkpoints."""


def _setup(cmd: BasinCommand):
    """(ModelLoss, default sigma, optimizer_state, name) for the requested model."""
    from tyche.zoo import load_digits_mlp, resolve_model, resolve_texts

    if cmd.model in ("zoo:digits-mlp", "digits-mlp"):
        mlp = load_digits_mlp()
        return ModelLoss(mlp.model, mlp.x_train), mlp.prior_sigma, mlp.optimizer_state, "digits-mlp"
    from tyche.data import chunk_and_tokenize

    zm = resolve_model(cmd.model)
    data = cmd.data or zm.default_data or "zoo:stdlib-docs"
    texts = resolve_texts(data)
    tokens = chunk_and_tokenize(
        texts, zm.tokenizer, max_seq_len=cmd.max_seq_len, chunking=True, max_examples=cmd.val_size
    )
    tokens = {k: v[: cmd.val_size] for k, v in tokens.items()}
    device = next(zm.model.parameters()).device
    tokens = {k: v.to(device) for k, v in tokens.items()}
    exclude = cmd.exclude.split(",") if cmd.exclude else None
    loss = ModelLoss(zm.model, tokens, exclude=exclude)
    return loss, None, zm.optimizer_state, zm.name


def _preconditioner(kind: str, loss: ModelLoss, state, cmd: BasinCommand) -> torch.Tensor | None:
    names, shapes = list(loss.layout.names), list(loss.layout.shapes)
    if kind == "none":
        return None
    if kind == "adam":
        if state is None:
            raise ValueError(
                f"{cmd.model} has no saved optimizer state; drop 'adam' from "
                "--preconditioners or use fisher"
            )
        return adam_preconditioner(state, names, shapes, eps=cmd.eps, exponent=cmd.exponent)
    if kind == "fisher":
        x = loss.cache.batches[0]
        return diag_preconditioner(
            fisher_diagonal(loss.model, x, names=names), eps=cmd.eps, exponent=cmd.exponent
        )
    raise ValueError(f"unknown preconditioner {kind!r}: choose from none, adam, fisher")


def run(cmd: BasinCommand) -> dict[str, VolumeResult]:
    """Run the command; returns the results at ``cmd.cutoff`` by preconditioner."""
    dist.init_distributed()
    out = Path(cmd.out)
    loss, default_sigma, state, name = _setup(cmd)
    sigma = cmd.sigma or default_sigma
    kinds = [k.strip() for k in cmd.preconditioners.split(",") if k.strip()]
    cutoffs = [float(c) for c in cmd.cutoffs.split(",")] if cmd.cutoffs else [cmd.cutoff]
    if cmd.cutoff not in cutoffs:
        cutoffs.append(cmd.cutoff)
    cutoffs.sort()
    dist.rank0_print(
        f"model {name}: D = {loss.n_params:,} parameters, "
        f"anchor cache {loss.cache_bytes / 2**20:.2f} MiB"
    )
    results: dict[str, list[VolumeResult]] = {}
    rows = []
    if "adam" in kinds and state is None and len(kinds) > 1:
        dist.rank0_print(f"note: {name} has no saved optimizer state; skipping 'adam'")
        kinds.remove("adam")
    for kind in kinds:
        pre = _preconditioner(kind, loss, state, cmd)
        for c in cutoffs:
            t0 = time.perf_counter()
            ckpt = out / "checkpoints" / f"{kind}-{c:g}" if cmd.checkpoint else None
            with warnings.catch_warnings():  # the table's ESS column and footnote say it
                warnings.filterwarnings("ignore", message="effective sample size")
                res = estimate_basin(
                    loss,
                    loss.anchor,
                    cutoff=c,
                    sigma=sigma,
                    n_samples=cmd.n_samples,
                    preconditioner=pre,
                    batch_size=cmd.batch_size,
                    seed=cmd.seed,
                    checkpoint=ckpt,
                    resume=cmd.resume,
                    extra_settings={"model": name, "preconditioner_kind": kind},
                )
            seconds = time.perf_counter() - t0
            results.setdefault(kind, []).append(res)
            dist.barrier()
            if dist.get_rank() == 0:
                res.save(out / f"{kind}-cutoff{c:g}")
                if ckpt is not None:  # the finished result is saved: its checkpoint is done
                    shutil.rmtree(ckpt, ignore_errors=True)
            rows.append((kind, c, res, seconds))
    if dist.get_rank() == 0:
        _report(rows, loss.n_params, out)
        _plots(results, cutoffs, loss.n_params, out, cmd.cutoff)
    return {k: v[cutoffs.index(cmd.cutoff)] for k, v in results.items()}


def _report(rows, n_params: int, out: Path) -> None:
    head = (
        f"{'preconditioner':<14} {'cutoff':>8} {'log P (nats)':>16} {'95% CI':>27} "
        f"{'max':>12} {'ESS':>6} {'evals/dir':>9} {'time (s)':>9}"
    )
    print(head)
    print("-" * len(head))
    table = []
    for kind, c, res, seconds in rows:
        lo, hi = res.interval()
        print(
            f"{kind:<14} {c:>8.0e} {res.log_prob:>16,.1f} {f'[{lo:,.0f}, {hi:,.0f}]':>27} "
            f"{res.max:>12,.1f} {res.ess:>6.2f} {res.evals_per_direction:>9.2f} {seconds:>9.1f}"
        )
        table.append({"preconditioner": kind, "cutoff": c, **res.summary(), "seconds": seconds})
    if any(res.is_lower_bound for _, _, res, _ in rows):
        print(
            "ESS ≈ 1: the log-mean-exp is dominated by its best direction, so it is a lower "
            "bound (the paper's regime); more directions or a better preconditioner raise it."
        )
    if len(rows) > 1:
        c_small = [r for r in rows if r[0] == rows[0][0]]
        if len(c_small) > 1:
            (_, c0, r0, _), (_, c1, r1, _) = c_small[0], c_small[1]
            slope = (r1.log_prob - r0.log_prob) / (math.log(c1) - math.log(c0))
            print(
                f"slope of log P against ln(cutoff) at the smallest cutoffs: {slope:,.0f} "
                f"(D/2 = {n_params / 2:,.0f})"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(table, indent=2))
    print(f"results, plots and summary.json in {out}/")


def _plots(results, cutoffs, n_params: int, out: Path, cutoff: float) -> None:
    from tyche import plotting

    at = {k: v[cutoffs.index(cutoff)] for k, v in results.items()}
    plotting.basin_histogram(at, out / "histogram.png")
    if len(cutoffs) > 1:
        plotting.basin_cutoff_scan(cutoffs, results, n_params, out / "cutoff_scan.png")


def main(argv: list[str]) -> None:
    import simple_parsing

    parser = simple_parsing.ArgumentParser(prog="tyche basin", description=BasinCommand.__doc__)
    parser.add_arguments(BasinCommand, dest="cmd")
    cmd = parser.parse_args(argv).cmd
    dist.rank0_print("settings: " + json.dumps(asdict(cmd)))
    run(cmd)
