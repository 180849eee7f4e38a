"""`tyche basin`: estimate a model's basin volume, naive and preconditioned, and plot it.

With no arguments it runs the project's main job: the digits MLP of the basin paper
(``zoo:digits-mlp``), naive against Adam-preconditioned, printed as a table, saved, plotted.

Every flag is checked before anything is loaded, the model's own settings (parameter
globs, optimizer state) right after it loads. Each preconditioner × cutoff result is saved
as soon as it is finished, then ``summary.json``, then the table and the plots; a failing
plot never loses a result. Finished directions are checkpointed after every batch, and a
resumed run refuses any setting that would change a sample.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tyche.commandline import (
    CommandError,
    best_effort,
    check_number,
    check_readable_text,
    check_writable_folder,
    on_interrupt,
    parse_choices,
    parse_config,
    parse_numbers,
    resume_command,
    split_list,
)

if TYPE_CHECKING:
    import torch

    from tyche.basin.loss import ModelLoss
    from tyche.basin.result import VolumeResult

PROG = "tyche basin"
PRECONDITIONERS = ("none", "adam", "fisher")
DEFAULT_PRECONDITIONERS = "none,adam"
DEFAULT_CUTOFF = 1e-2
DEFAULT_VAL_SIZE = 8
DEFAULT_MAX_SEQ_LEN = 64
DIGITS = "zoo:digits-mlp"


@dataclass
class BasinCommand:
    """Estimate log P(basin) under a Gaussian prior (nats) for a model on some data.

    The basin is the region around the trained parameters where the mean KL from the trained
    model stays below the cutoff; P is its prior probability, estimated by Monte Carlo over
    directions. Examples:

      tyche basin                                    # the digits MLP, naive vs Adam
      tyche basin --cutoffs 1e-5,1e-4,1e-3,1e-2,1e-1 # and log P against the cutoff
      tyche basin --model zoo:shakespeare-lm --data zoo:shakespeare --n_samples 16
      tyche basin --resume                           # continue an interrupted run
    """

    model: str = DIGITS
    """zoo:digits-mlp, zoo:shakespeare-lm, zoo:smollm2-135m, or a save_pretrained folder"""
    data: str | None = None
    """language models' evaluation text: zoo:shakespeare, zoo:stdlib-docs or a UTF-8 text
    file (default: the model's own zoo data, else zoo:stdlib-docs); not for the digits MLP,
    which is measured on its 1,024 training inputs"""
    n_samples: int = 100
    """Monte Carlo directions per preconditioner and cutoff"""
    cutoff: float | None = None
    """KL cutoff in nats (default 1e-2); with --cutoffs, the one whose histogram is drawn
    (default: the largest of them)"""
    cutoffs: str | None = None
    """comma-separated cutoffs (nats) for a log P against cutoff scan, e.g. 1e-4,1e-3,1e-2"""
    preconditioners: str | None = None
    """comma-separated from none, adam, fisher (default none,adam; adam is then skipped with
    a note when the model has no saved optimizer state)"""
    eps: float = 1e-3
    """adam and fisher: p = 1/(s^exponent + eps), s the second moment or Fisher diagonal"""
    exponent: float = 0.5
    """adam and fisher: the exponent of s in p = 1/(s^exponent + eps) (0.5 ≈ F^-1/2)"""
    sigma: float | None = None
    """prior standard deviation (default: the zoo model's L2-implied prior, else the RMS of
    the measured parameters)"""
    seed: int = 0
    """seed of the directions (direction i comes from the seed and i alone)"""
    batch_size: int = 16
    """directions searched together (results do not depend on it)"""
    val_size: int | None = None
    """language models: evaluation sequences (default 8)"""
    max_seq_len: int | None = None
    """language models: tokens per sequence (default 64)"""
    exclude: str | None = None
    """comma-separated globs of parameter names held fixed, e.g. 'transformer.wte.*,*ln*';
    each must match a parameter"""
    out: str = "runs/basin"
    """folder for results (safetensors + JSON), summary.json and PNG plots"""
    checkpoint: bool = True
    """save finished directions after every batch under OUT/checkpoints"""
    resume: bool = False
    """continue the interrupted run saved under OUT/checkpoints (its settings must match)"""


@dataclass(frozen=True)
class Plan:
    """The checked command: what to run, with every default filled in."""

    kinds: tuple[str, ...]
    kinds_given: bool
    cutoffs: tuple[float, ...]
    cutoff: float
    exclude: tuple[str, ...]
    out: Path
    is_digits: bool
    data: str | None
    val_size: int
    max_seq_len: int


#: settings recorded with every sample -> the words a user of this command knows them by
CLI_WORDS = {
    "model": "--model",
    "model_hash": "--model (its weights changed)",
    "data": "--data",
    "data_hash": "--data (its tokens changed)",
    "val_size": "--val_size",
    "max_seq_len": "--max_seq_len",
    "exclude": "--exclude",
    "n_params": "--exclude (the number of measured parameters)",
    "preconditioner_kind": "--preconditioners",
    "preconditioner": "--preconditioners",
    "preconditioner_hash": "the preconditioner's values (--eps, --exponent or the optimizer state)",
    "eps": "--eps",
    "exponent": "--exponent",
    "sigma": "--sigma",
    "cutoff": "--cutoff",
    "seed": "--seed",
    "n_samples": "--n_samples",
    "max_radius": "--sigma (the search's radius bound)",
}


RUN_FILE = "run.json"


def _flag_identity(cmd: BasinCommand, plan: Plan) -> dict[str, Any]:
    """Every flag that changes a sample, as the user gave it (defaults filled in)."""
    return {
        "--model": cmd.model,
        "--data": plan.data,
        "--val_size": None if plan.is_digits else plan.val_size,
        "--max_seq_len": None if plan.is_digits else plan.max_seq_len,
        "--exclude": list(plan.exclude),
        "--preconditioners": list(plan.kinds),
        "--eps": cmd.eps,
        "--exponent": cmd.exponent,
        "--sigma": cmd.sigma,
        "--cutoffs": list(plan.cutoffs),
        "--seed": cmd.seed,
        "--n_samples": cmd.n_samples,
    }


def _refuse_mixing(saved: dict[str, Any], now: dict[str, Any], folder: Path) -> None:
    differ = [
        f"{key} (saved {_plain(saved.get(key))}, now {_plain(now.get(key))})"
        for key in dict.fromkeys([*saved, *now])
        if saved.get(key) != now.get(key)
    ]
    if differ:
        raise CommandError(
            f"cannot --resume the run in {folder}: these settings differ from it: "
            f"{'; '.join(differ)}. Resume with the saved settings, or drop --resume and "
            "choose another --out to start afresh"
        )


# ----------------------------------------------------------------------------- checks
def _check_model_spec(spec: str) -> bool:
    """True for the digits MLP; raises for an unknown zoo name or a folder without a model."""
    from tyche.zoo.catalogue import check_name

    if spec.startswith("zoo:"):
        return check_name(spec, kind="model") == "digits-mlp"
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise CommandError(
            f"--model: no folder {spec!r}; give zoo:NAME or a save_pretrained folder"
        )
    if not (folder / "config.json").is_file():
        raise CommandError(f"--model: {spec!r} has no config.json; is it a save_pretrained folder?")
    return False


def _check_data_spec(spec: str) -> None:
    from tyche.zoo.catalogue import check_name

    if spec.startswith("zoo:"):
        name = check_name(spec, kind="data")
        if name == "fashion-mnist":
            raise CommandError("--data: zoo:fashion-mnist is image data, not text")
        return
    check_readable_text(spec, "--data")


def validate(cmd: BasinCommand) -> Plan:
    """Check every flag and combination without loading anything; the filled-in plan."""
    check_number(cmd.n_samples, "--n_samples", minimum=1, integer=True)
    check_number(cmd.batch_size, "--batch_size", minimum=1, integer=True)
    check_number(cmd.seed, "--seed", minimum=0, integer=True)
    check_number(cmd.eps, "--eps", minimum=0)
    check_number(cmd.exponent, "--exponent", minimum=0)
    check_number(cmd.sigma, "--sigma", above=0)
    check_number(cmd.cutoff, "--cutoff", above=0)
    check_number(cmd.val_size, "--val_size", minimum=1, integer=True)
    check_number(cmd.max_seq_len, "--max_seq_len", minimum=2, integer=True)
    kinds_given = cmd.preconditioners is not None
    kinds = parse_choices(cmd.preconditioners or DEFAULT_PRECONDITIONERS, "--preconditioners",
                          PRECONDITIONERS)  # fmt: skip
    if cmd.cutoffs is not None:
        cutoffs = sorted(parse_numbers(cmd.cutoffs, "--cutoffs"))
        if cmd.cutoff is not None and cmd.cutoff not in cutoffs:
            raise CommandError(
                f"--cutoff {cmd.cutoff:g} is not among --cutoffs {cmd.cutoffs}; add it there or "
                "drop --cutoff (the histogram is then drawn at the largest cutoff)"
            )
        cutoff = cmd.cutoff if cmd.cutoff is not None else cutoffs[-1]
    else:
        cutoff = cmd.cutoff if cmd.cutoff is not None else DEFAULT_CUTOFF
        cutoffs = [cutoff]
    exclude = split_list(cmd.exclude)
    if cmd.exclude is not None and not exclude:
        raise CommandError("--exclude is empty; give globs of parameter names or drop the flag")
    is_digits = _check_model_spec(cmd.model)
    if is_digits:
        for flag, value in (("--data", cmd.data), ("--val_size", cmd.val_size),
                            ("--max_seq_len", cmd.max_seq_len)):  # fmt: skip
            if value is not None:
                raise CommandError(
                    f"{flag} does not apply to {DIGITS}: it is measured on its 1,024 training "
                    "inputs; drop the flag"
                )
    if cmd.data is not None:
        _check_data_spec(cmd.data)
    if cmd.resume and not cmd.checkpoint:
        raise CommandError("--resume needs the checkpoints: drop --no-checkpoint")
    out = check_writable_folder(cmd.out, "--out")
    checkpoints = out / "checkpoints"
    saved = list(checkpoints.glob("*/samples-rank*.safetensors")) if checkpoints.is_dir() else []
    if cmd.resume and not (checkpoints / RUN_FILE).is_file():
        raise CommandError(f"--resume: no interrupted run under {checkpoints}; drop --resume")
    if not cmd.resume and cmd.checkpoint and (saved or (checkpoints / RUN_FILE).is_file()):
        raise CommandError(
            f"{checkpoints} holds an interrupted run: add --resume to continue it, or choose "
            "another --out (or delete that folder) to start afresh"
        )
    plan = Plan(
        kinds=tuple(kinds),
        kinds_given=kinds_given,
        cutoffs=tuple(cutoffs),
        cutoff=cutoff,
        exclude=tuple(exclude),
        out=out,
        is_digits=is_digits,
        data=cmd.data,
        val_size=cmd.val_size or DEFAULT_VAL_SIZE,
        max_seq_len=cmd.max_seq_len or DEFAULT_MAX_SEQ_LEN,
    )
    if cmd.resume:
        saved_run = json.loads((checkpoints / RUN_FILE).read_text())
        _refuse_mixing(saved_run["flags"], _flag_identity(cmd, plan), checkpoints)
    return plan


def _record_run(cmd: BasinCommand, plan: Plan, setup: Setup) -> None:
    """Write OUT/checkpoints/run.json, or, resuming, refuse a changed model or data."""
    from tyche.distributed import barrier, get_rank
    from tyche.io import write_json

    folder = plan.out / "checkpoints"
    hashes = {"model_hash": setup.identity["model_hash"], "data_hash": setup.identity["data_hash"]}
    if cmd.resume:
        saved = json.loads((folder / RUN_FILE).read_text())
        changed = [CLI_WORDS[k] for k, v in hashes.items() if saved.get(k) != v]
        if changed:
            raise CommandError(
                f"cannot --resume the run in {folder}: {' and '.join(changed)} since it was "
                "interrupted; resume with the same model and data, or drop --resume and choose "
                "another --out"
            )
    elif get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / RUN_FILE, {"flags": _flag_identity(cmd, plan), **hashes})
    barrier()


# ----------------------------------------------------------------------------- setup
@dataclass
class Setup:
    """The loaded model's loss and everything a sample depends on."""

    loss: ModelLoss
    default_sigma: float | None
    optimizer_state: Any
    name: str
    data: str
    data_note: str
    identity: dict[str, Any]


def _setup(cmd: BasinCommand, plan: Plan) -> Setup:
    """Load the model and data, check the model's own settings; no estimation yet."""
    from tyche.basin.loss import ModelLoss
    from tyche.io import model_hash

    if plan.is_digits:
        from tyche.zoo import load_digits_mlp

        mlp = load_digits_mlp()
        _check_globs(mlp.model, plan.exclude)
        loss = ModelLoss(mlp.model, mlp.x_train, exclude=list(plan.exclude) or None)
        data, note = "digits training inputs", f"{len(mlp.x_train):,} digits training inputs"
        data_hash = model_hash({"x": mlp.x_train})
        sigma, state, name = mlp.prior_sigma, mlp.optimizer_state, "zoo:digits-mlp"
        model = mlp.model
    else:
        from tyche.data import chunk_and_tokenize
        from tyche.zoo import resolve_model, resolve_texts

        zm = resolve_model(cmd.model)
        if zm.tokenizer is None:
            raise CommandError(f"--model {cmd.model} has no tokenizer; a language model is needed")
        model, name, sigma, state = zm.model, zm.name, None, zm.optimizer_state
        _check_globs(model, plan.exclude)
        data = plan.data or zm.default_data or "zoo:stdlib-docs"
        tokens = chunk_and_tokenize(resolve_texts(data), zm.tokenizer,
                                    max_seq_len=plan.max_seq_len, chunking=True,
                                    max_examples=plan.val_size)  # fmt: skip
        tokens = {k: v[: plan.val_size] for k, v in tokens.items()}
        rows, width = tokens["input_ids"].shape
        note = f"{data}: {rows} sequences × {width} tokens"
        if rows < plan.val_size:
            note += f" (the text has only {rows} of the {plan.val_size} asked for)"
        data_hash = model_hash(tokens)
        device = next(model.parameters()).device
        loss = ModelLoss(model, {k: v.to(device) for k, v in tokens.items()},
                         exclude=list(plan.exclude) or None)  # fmt: skip
    identity = {
        "model": name,
        "model_hash": model_hash(model),
        "data": data,
        "data_hash": data_hash,
        "val_size": None if plan.is_digits else plan.val_size,
        "max_seq_len": None if plan.is_digits else plan.max_seq_len,
        "exclude": list(plan.exclude),
        "eps": cmd.eps,
        "exponent": cmd.exponent,
    }
    return Setup(loss, sigma, state, name, data, note, identity)


def _check_globs(model: torch.nn.Module, globs: tuple[str, ...]) -> None:
    import fnmatch

    names = [n for n, _ in model.named_parameters()]
    for glob in globs:
        if not any(fnmatch.fnmatchcase(n, glob) for n in names):
            shown = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
            raise CommandError(
                f"--exclude: {glob!r} matches no parameter of the model; its parameters are "
                f"named like {shown}"
            )


def _preconditioner(kind: str, setup: Setup, cmd: BasinCommand) -> torch.Tensor | None:
    from tyche.basin.preconditioners import (
        adam_preconditioner,
        diag_preconditioner,
        fisher_diagonal,
    )

    loss = setup.loss
    names, shapes = list(loss.layout.names), list(loss.layout.shapes)
    if kind == "none":
        return None
    if kind == "adam":
        return adam_preconditioner(setup.optimizer_state, names, shapes, eps=cmd.eps,
                                   exponent=cmd.exponent, model=loss.model)  # fmt: skip
    import torch

    # the sampled labels are seeded, so every rank and every resumed run get the same p
    generator = torch.Generator(loss.anchor.device).manual_seed(cmd.seed)
    fisher = fisher_diagonal(loss.model, loss.cache.batches[0], names=names, generator=generator)
    return diag_preconditioner(fisher, eps=cmd.eps, exponent=cmd.exponent)


def _kinds(plan: Plan, setup: Setup) -> list[str]:
    kinds = list(plan.kinds)
    if "adam" in kinds and setup.optimizer_state is None:
        if plan.kinds_given:
            raise CommandError(
                f"--preconditioners adam: {setup.name} has no saved optimizer state "
                "(optimizer.pt or optimizer_state.safetensors); use none or fisher"
            )
        from tyche.distributed import rank0_print

        rank0_print(f"note: {setup.name} has no saved optimizer state; skipping 'adam'")
        kinds.remove("adam")
    return kinds


# ----------------------------------------------------------------------------- run
def run(cmd: BasinCommand, argv: list[str] | None = None) -> dict[str, VolumeResult]:
    """Run the command; returns the results at the histogram's cutoff by preconditioner."""
    plan = validate(cmd)
    from tyche import distributed as dist
    from tyche.basin.checkpoint import SettingsMismatch
    from tyche.basin.core import estimate_basin

    dist.init_distributed()
    dist.rank0_print("settings: " + json.dumps(asdict(cmd)))
    setup = _setup(cmd, plan)
    kinds = _kinds(plan, setup)
    if cmd.checkpoint:
        _record_run(cmd, plan, setup)
    loss = setup.loss
    sigma = cmd.sigma if cmd.sigma is not None else setup.default_sigma
    dist.rank0_print(
        f"model {setup.name}: D = {loss.n_params:,} parameters; data {setup.data_note}; "
        f"anchor cache {loss.cache_bytes / 2**20:.2f} MiB"
    )
    checkpoints = plan.out / "checkpoints"
    if cmd.checkpoint:
        again = resume_command(PROG, argv if argv is not None else sys.argv[1:])
        on_interrupt(f"finished directions are saved under {checkpoints}/; resume with:\n  {again}")
    else:
        on_interrupt("nothing was saved (--no-checkpoint)")
    rows: list[tuple[str, float, VolumeResult, float]] = []
    for kind in kinds:
        pre = _preconditioner(kind, setup, cmd)
        for c in plan.cutoffs:
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():  # the ESS column and footnote say it
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
                        checkpoint=checkpoints / f"{kind}-cutoff{c:g}" if cmd.checkpoint else None,
                        resume=cmd.resume,
                        extra_settings={**setup.identity, "preconditioner_kind": kind},
                    )
            except SettingsMismatch as err:
                raise CommandError(_mismatch_message(err)) from None
            seconds = time.perf_counter() - t0
            if dist.get_rank() == 0:
                res.save(plan.out / f"{kind}-cutoff{c:g}")
            rows.append((kind, c, res, seconds))
    if dist.get_rank() == 0:
        _finish(rows, loss.n_params, plan)
        if cmd.checkpoint:
            shutil.rmtree(checkpoints, ignore_errors=True)
    on_interrupt(None)
    dist.barrier()
    return {kind: res for kind, c, res, _ in rows if c == plan.cutoff}


def _mismatch_message(err: Any) -> str:
    differ = []
    for key, (saved, now) in err.differences.items():
        words = CLI_WORDS.get(key, key)
        if key.endswith("_hash"):
            differ.append(words)
        else:
            differ.append(f"{words} (saved {_plain(saved)}, now {_plain(now)})")
    return (
        f"cannot --resume the run in {err.folder}: these settings differ from it: "
        f"{'; '.join(dict.fromkeys(differ))}. Resume with the saved settings, or drop --resume "
        "and choose another --out to start afresh"
    )


def _plain(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _finish(rows: list, n_params: int, plan: Plan) -> None:
    """summary.json, the table, the plots: each one's failure is reported, not fatal."""
    from tyche.io import write_json

    table = [{"preconditioner": k, "cutoff": c, **r.summary(), "seconds": s} for k, c, r, s in rows]
    best_effort(PROG, "write summary.json", lambda: write_json(plan.out / "summary.json", table),
                plan.out)  # fmt: skip
    best_effort(PROG, "print the table", lambda: print(report(rows, n_params)), plan.out)
    best_effort(PROG, "draw the plots", lambda: _plots(rows, n_params, plan), plan.out)
    print(f"results in {plan.out}/ (one folder per preconditioner and cutoff)")


def report(rows: list, n_params: int) -> str:
    """The results table, its footnote and, over several cutoffs, the slope of log P."""
    head = (
        f"{'preconditioner':<14} {'cutoff':>8} {'log P (nats)':>16} {'95% CI':>27} "
        f"{'max':>12} {'ESS':>6} {'evals/dir':>9} {'time (s)':>9}"
    )
    lines = [head, "-" * len(head)]
    for kind, c, res, seconds in rows:
        lo, hi = res.interval()
        lines.append(
            f"{kind:<14} {c:>8.0e} {res.log_prob:>16,.1f} {f'[{lo:,.0f}, {hi:,.0f}]':>27} "
            f"{res.max:>12,.1f} {res.ess:>6.2f} {res.evals_per_direction:>9.2f} {seconds:>9.1f}"
        )
    if any(res.is_lower_bound for _, _, res, _ in rows):
        lines.append(
            "ESS ≈ 1: the log-mean-exp is dominated by its best direction, so it is a lower "
            "bound (the paper's regime); more directions or a better preconditioner raise it."
        )
    first = [(c, r) for k, c, r, _ in rows if k == rows[0][0]] if rows else []
    if len(first) > 1:
        (c0, r0), (c1, r1) = first[0], first[1]
        slope = (r1.log_prob - r0.log_prob) / (math.log(c1) - math.log(c0))
        lines.append(
            f"slope of log P against ln(cutoff) at the smallest cutoffs: {slope:,.0f} "
            f"(D/2 = {n_params / 2:,.0f})"
        )
    return "\n".join(lines)


def _plots(rows: list, n_params: int, plan: Plan) -> None:
    from tyche import plotting

    at = {kind: res for kind, c, res, _ in rows if c == plan.cutoff}
    plotting.basin_histogram(at, plan.out / "histogram.png")
    if len(plan.cutoffs) > 1:
        by_kind: dict[str, list] = {}
        for kind, _, res, _ in rows:
            by_kind.setdefault(kind, []).append(res)
        plotting.basin_cutoff_scan(list(plan.cutoffs), by_kind, n_params,
                                   plan.out / "cutoff_scan.png")  # fmt: skip


def main(argv: list[str]) -> None:
    """``tyche basin [flags]``."""
    cmd = parse_config(BasinCommand, argv, PROG)
    run(cmd, argv)
