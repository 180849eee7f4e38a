"""`tyche basin`: estimate a model's basin volume, naive and preconditioned, and plot it.

With no arguments it runs the project's main job: the digits MLP of the basin paper
(``zoo:digits-mlp``), naive against Adam-preconditioned, printed as a table, saved, plotted.

Every flag is checked before anything is loaded, the model's own settings (parameter
globs, optimizer state, ``--where`` masks) right after it loads. Each direction is searched
once for all ``--cutoffs``; each component × subset × preconditioner curve (``--include``:
:mod:`tyche.cli.basin.include`) is saved as soon as it is
finished (one result folder per cutoff), then ``summary.json``, then the table and the
plots; a failing plot never loses a result. Finished directions are checkpointed after every
batch, and a resumed run refuses any setting that would change a sample.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from tyche.cli.basin.flags import (
    OWNED,
    PLAY_DATA,
    PROG,
    SHAKESPEARE,
    BasinConfig,
    Plan,
    validate,
)
from tyche.cli.basin.include import restrict
from tyche.cli.basin.resume import (
    CLI_WORDS,
    RUN_FILE,
    flag_identity,
    mismatch_message,
)
from tyche.cli.commandline import (
    CommandError,
    check_context,
    config_flags,
    flat_settings,
    on_interrupt,
    parse_config,
    resume_command,
    reworded_text_errors,
)
from tyche.cli.run_folder import claim_folder

if TYPE_CHECKING:
    import torch

    from tyche.basin.result import VolumeResult
    from tyche.cli.basin.report import Row

__all__ = ["BasinConfig", "main", "run_basin", "validate"]


def _record_run(cmd: BasinConfig, plan: Plan, setup: Setup) -> None:
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
        write_json(folder / RUN_FILE, {"flags": flag_identity(cmd, plan), **hashes})
    barrier()


# ----------------------------------------------------------------------------- setup
@dataclass
class Setup:
    """The loaded model and data, and everything a sample depends on."""

    model: torch.nn.Module
    inputs: Any  # classifier inputs (N, ...) or LM token dict, on the model's device
    names: list[str]
    default_sigma: float | None
    optimizer_state: Any
    name: str
    data: str
    data_note: str
    identity: dict[str, Any]
    subsets: list[tuple[str | None, Any]]  # (subset text or None, mask or None)


def _lm_tokens(plan: Plan, zm: Any, data: str) -> tuple[dict, str, list[str] | None, dict]:
    """The evaluation tokens, a note on them, with play= subsets each row's play, and the
    record of the rows read (``input_ids_sha256``)."""
    from tyche.data import token_ids_sha256

    rows = plan.rows
    plays = [s for s in plan.subsets or () if s.key == "play"]
    if not plays:
        drawn = rows.load(zm.tokenizer, default_data=data)
        return drawn.tokens, drawn.note(rows.n_sequences), None, drawn.record(rows)
    import torch

    from tyche.basin.where import named_plays
    from tyche.zoo.text import load_shakespeare, play_titles

    titles = play_titles()
    by_title = dict(zip(titles, load_shakespeare()))
    parts, row_plays = [], []
    for title in named_plays(plays, titles):
        part = rows.load(zm.tokenizer, default_data=data, texts=[by_title[title]]).tokens
        parts.append(part)
        row_plays += [title] * len(part["input_ids"])
    tokens = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    n, width = tokens["input_ids"].shape
    note = f"{data}: {n} sequences × {width} tokens ({rows.n_sequences} of each of " \
           f"{len(parts)} plays)"  # fmt: skip
    record = {"data": data, "n_sequences": n, "seq_len": width, "seed": rows.seed,
              "plays": list(dict.fromkeys(row_plays)),
              "input_ids_sha256": token_ids_sha256(tokens["input_ids"])}  # fmt: skip
    return tokens, note, row_plays, record


def _setup(cmd: BasinConfig, plan: Plan) -> Setup:
    """Load the model and data, check the model's own settings; no estimation yet."""
    from tyche.basin.params import select_parameters
    from tyche.io import model_hash

    labels = row_plays = None
    if plan.is_digits:
        from tyche.zoo.digits import load_digits_model

        mlp = load_digits_model(cmd.source.model)  # a zoo name or a checkpoint's folder
        model, inputs, labels = mlp.model, mlp.x_train, mlp.y_train
        _check_globs(model, plan.exclude)
        data, note = "digits training inputs", f"{len(mlp.x_train):,} digits training inputs"
        data_hash = model_hash({"x": mlp.x_train})
        sigma, state, name = mlp.prior_sigma, mlp.optimizer_state, cmd.source.model
        inputs_record: dict[str, Any] = {}  # the data_hash of its fixed inputs says it all
    else:
        zm = cmd.source.load(plan.rows.seq_len)
        model, name, sigma, state = zm.model, zm.name, None, zm.optimizer_state
        _check_globs(model, plan.exclude)
        data = plan.rows.spec(zm.default_data)
        if any(s.key == "play" for s in plan.subsets or ()) and data != SHAKESPEARE:
            raise CommandError(f"{PLAY_DATA} ({zm.name} is measured on {data} by default)")
        tokens, note, row_plays, inputs_record = _lm_tokens(plan, zm, data)
        data_hash = model_hash(tokens)
        device = next(model.parameters()).device
        inputs = {k: v.to(device) for k, v in tokens.items()}
    named = select_parameters(model, "*", list(plan.exclude) or None)
    identity = {
        "model": name,
        "model_hash": model_hash(model),
        "data": data,
        "data_hash": data_hash,
        "n_sequences": None if plan.is_digits else plan.rows.n_sequences,
        "seq_len": None if plan.is_digits else plan.rows.seq_len,
        "exclude": list(plan.exclude),
        "eps": cmd.eps,
        "exponent": cmd.exponent,
        **{k: v for k, v in inputs_record.items() if k.endswith("sha256")},
    }
    subsets = _subset_masks(plan, inputs, labels, row_plays)
    return Setup(model, inputs, [n for n, _ in named], sigma, state, name, data, note, identity,
                 subsets)  # fmt: skip


def _subset_masks(plan: Plan, inputs: Any, labels: Any, row_plays: Any) -> list:
    """(subset text, mask) per subset, 'each' expanded; [(None, None)] without --where."""
    if plan.subsets is None:
        return [(None, None)]
    from tyche.basin.where import expand, subset_mask

    subsets = list(plan.subsets)
    if labels is not None:
        subsets = expand(subsets, "label", [str(v) for v in sorted(set(labels.tolist()))])
    if row_plays is not None:
        subsets = expand(subsets, "play", list(dict.fromkeys(row_plays)))
    ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs
    shape = tuple(ids.shape[:2]) if isinstance(inputs, dict) else (len(ids),)
    try:
        return [(s.text, subset_mask(s, shape, labels=labels, row_plays=row_plays))
                for s in subsets]  # fmt: skip
    except ValueError as err:
        raise CommandError(str(err)) from None


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


def _preconditioner_in_flags(kind: str, setup: Setup, cmd: BasinConfig) -> torch.Tensor | None:
    """The ``--preconditioners`` kind's p (`tyche.basin.preconditioners.build_preconditioner`
    with --eps, --exponent and --seed), its division by zero said in the flags' words."""
    from tyche.basin.preconditioners import ZeroSpectrum, build_preconditioner

    # the Fisher's sampled labels are seeded, so every rank and every resumed run get the same
    # p; computed on all the evaluation data, so every --where subset gets the same directions
    try:
        return build_preconditioner(kind, setup.model, setup.inputs, names=setup.names,
                                    optimizer_state=setup.optimizer_state, eps=cmd.eps,
                                    exponent=cmd.exponent, seed=cmd.rows.seed)  # fmt: skip
    except ZeroSpectrum as err:
        what = "second moment (Adam)" if kind == "adam" else "Fisher diagonal"
        raise CommandError(
            f"--preconditioners {kind}: {err.n_zero} entries of the {what} are zero and --eps "
            f"is 0, so p = 1/(s^exponent + eps) divides by zero; give --eps above 0"
        ) from None


def _components(plan: Plan, setup: Setup, sigma: float | None) -> tuple[list, Any, Any]:
    """--include's components on the loaded model ([None] without it: the whole selection),
    the whole selection's layout (to restrict its preconditioners) and the prior σ every
    component shares: --sigma, the zoo model's, else the RMS of the whole selection (so each
    component's prior is the marginal of the whole model's)."""
    if plan.include is None:
        return [None], None, sigma
    import math

    from tyche.basin.params import ParameterLayout, select_parameters
    from tyche.cli.basin.include import expand_components

    components = expand_components(plan.include, setup.model, plan.exclude)
    named = select_parameters(setup.model, "*", list(plan.exclude) or None)
    if sigma is None:
        total = sum(float(p.detach().double().square().sum()) for _, p in named)
        sigma = math.sqrt(total / sum(p.numel() for _, p in named)) or 1.0
    return components, ParameterLayout.of(named), sigma


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
def run_basin(cmd: BasinConfig, argv: list[str] | None = None) -> dict[str, VolumeResult]:
    """Run the command; returns the results at the histogram's cutoff by preconditioner
    (``"kind component subset"`` keys with --include and --where). ``argv`` (the flags as
    given; default: those of ``cmd``) makes the Ctrl-C resume line."""
    plan = validate(cmd)
    results = {**flag_identity(cmd, plan), "--cutoff": plan.cutoff, "--lambda": plan.lam}
    from tyche.cli.basin import checkpoints

    with claim_folder(plan.out, PROG, results, checkpoints.owned(plan.out, OWNED),
                      overwrite=cmd.overwrite, resume=cmd.resume):  # fmt: skip
        argv = config_flags(cmd) if argv is None else argv
        if cmd.checkpoints is not None:  # one run per checkpoint, into OUT/checkpoint-<step>
            return checkpoints.run_checkpoints(cmd, plan, argv, _run, OWNED)
        return _run(cmd, plan, argv)


def _run(cmd: BasinConfig, plan: Plan, argv: list[str]) -> dict[str, VolumeResult]:
    """:func:`run_basin` in its claimed --out: load, estimate, save, report."""
    from tyche import distributed as dist
    from tyche.basin.checkpoint import SettingsMismatch
    from tyche.basin.core import estimate_basin
    from tyche.basin.lambda_fit import learning_coefficient
    from tyche.basin.loss import ModelLoss
    from tyche.basin.options import BasinOptions
    from tyche.cli.basin import report
    from tyche.cli.basin.report import Row
    from tyche.io import model_hash

    dist.init_distributed()
    dist.rank0_print("settings: " + json.dumps({k.rstrip("_"): v
                                                for k, v in flat_settings(cmd).items()}))
    setup = _setup(cmd, plan)
    kinds = _kinds(plan, setup)
    sigma = cmd.sigma if cmd.sigma is not None else setup.default_sigma
    components, layout, whole_sigma = _components(plan, setup, sigma)  # checked before saving
    if cmd.checkpoint:
        _record_run(cmd, plan, setup)
    options = BasinOptions(
        cutoffs=plan.cutoffs,
        sigma=sigma,
        n_samples=cmd.n_samples,
        seed=cmd.rows.seed,
        batch_size=cmd.batch_size,
        max_memory=plan.max_memory,
        adapt=cmd.adapt,
    )
    checkpoints = plan.out / "checkpoints"
    if cmd.checkpoint:
        again = resume_command(PROG, argv)
        on_interrupt(f"finished directions are saved under {checkpoints}/; resume with:\n  {again}")
    else:
        on_interrupt("nothing was saved (--no-checkpoint)")
    exclude = list(plan.exclude) or None
    pres = {kind: _preconditioner_in_flags(kind, setup, cmd) for kind in kinds}
    rows: list[Row] = []
    for part in components:
        # a component: its p entries of the whole model's p, the whole selection's σ
        include = "*" if part is None else list(part.globs)
        part_pres = pres if part is None else {k: restrict(p, layout, part.names)
                                               for k, p in pres.items()}  # fmt: skip
        part_options = options if part is None else replace(options, sigma=whole_sigma)
        part_tag = "" if part is None else "-" + part.slug
        part_settings = {} if part is None else {"include": list(part.globs),
                                                 "component": part.label}  # fmt: skip
        for text, mask in setup.subsets:
            loss = ModelLoss(setup.model, setup.inputs, include=include, exclude=exclude,
                             where=mask)  # fmt: skip
            if text is None or text == setup.subsets[0][0]:
                if part is components[0]:
                    whole = loss.n_params if part is None else layout.size
                    dist.rank0_print(
                        f"model {setup.name}: D = {whole:,} parameters; data "
                        f"{setup.data_note}; anchor cache {loss.cache_bytes / 2**20:.2f} MiB"
                    )
                if part is not None:
                    dist.rank0_print(f"component {part.label}: D = {loss.n_params:,} "
                                     f"parameters ({', '.join(part.globs)})")  # fmt: skip
            where = {} if text is None else {"where": text, "where_hash": model_hash({"m": mask})}
            tag = part_tag + ("" if text is None else "-" + _slug(text))
            for kind in kinds:
                t0 = time.perf_counter()
                try:
                    with warnings.catch_warnings():  # the verdict column and footnote say it
                        warnings.filterwarnings("ignore", message="effective sample size")
                        curve = estimate_basin(
                            loss,
                            loss.anchor,
                            part_options,
                            preconditioner=part_pres[kind],
                            checkpoint=checkpoints / f"{kind}{tag}" if cmd.checkpoint else None,
                            resume=cmd.resume,
                            extra_settings={**setup.identity, "preconditioner_kind": kind,
                                            **where, **part_settings},  # fmt: skip
                        )
                except SettingsMismatch as err:
                    raise CommandError(mismatch_message(err)) from None
                seconds = time.perf_counter() - t0
                lam = learning_coefficient(curve) if plan.lam else None
                if dist.get_rank() == 0:
                    for res in curve.results:
                        res.save(plan.out / f"{kind}{tag}-cutoff{res.cutoff:g}")
                    if len(curve) > 1:
                        curve.save(plan.out / f"{kind}{tag}-curve")
                    if lam is not None:
                        lam.save(plan.out / f"{kind}{tag}-lambda")
                rows.append(Row(kind, text, curve, seconds, lam,
                                component=None if part is None else part.label))  # fmt: skip
            del loss
    if dist.get_rank() == 0:
        report.finish(rows, plan.cutoff, plan.out, adapt=cmd.adapt)
        if cmd.checkpoint:
            shutil.rmtree(checkpoints, ignore_errors=True)
    on_interrupt(None)
    dist.barrier()
    return {row.label: row.curve.at(plan.cutoff) for row in rows}


def _slug(text: str) -> str:
    from tyche.basin.where import parse_where

    return parse_where(text)[0].slug


def main(argv: list[str]) -> None:
    """``tyche basin [flags]``."""
    cmd = parse_config(BasinConfig, argv, PROG)
    run_basin(cmd, argv)
