"""``tyche basin --checkpoints``: the basin of every training checkpoint of a model, so that
log P can be followed over training (the basin paper's Pythia figure: log P falls, the
information content -log P rises, as the model learns).

``--checkpoints`` names the folders: a glob in quotes (``'DIR/checkpoint-*'``), several
separated by ``,``, a folder holding ``checkpoint-*`` folders (standing for them), or
``zoo:NAME`` (the training checkpoints the zoo recipes save under
``$TYCHE_CACHE/NAME/checkpoints/``). Each folder is a model of the same kind: all
``save_pretrained`` language-model folders (``config.json``; a HuggingFace Trainer
``checkpoint-<step>`` with its ``optimizer.pt`` is one) or all digits MLP folders (a
``zoo.json`` of format ``digits-mlp``). The step is read from the name ``checkpoint-<step>``
(else from ``zoo.json``'s ``step``); folders are measured in the order of their steps.

Every checkpoint is one ordinary ``tyche basin`` run with this run's settings, into
``OUT/checkpoint-<step>/`` (its own results, summary.json, plots and run.json), with its own
Adam preconditioner (from its own optimizer state) beside the naive one. Then
``OUT/summary.json`` holds every row of theirs with ``step``, ``checkpoint`` and ``n_params``
added, the table shows log P, k̂ and the verdict per step at the histogram's cutoff, and
``OUT/log_p_by_step.png`` draws log P against the step (log axis). ``--resume`` keeps the
checkpoints already finished and resumes the interrupted one.

Nothing is loaded while the flags are checked; only file names and ``zoo.json`` are read.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tyche.cli.basin.resume import RUN_FILE, flag_identity
from tyche.cli.commandline import CommandError, best_effort
from tyche.cli.run_folder import Owned, claim_folder, read_record

if TYPE_CHECKING:
    from tyche.basin.result import VolumeResult

__all__ = [
    "PLOT_FILE",
    "Checkpoint",
    "check_checkpoints",
    "find_checkpoints",
    "owned",
    "run_checkpoints",
    "steps_table",
]

PROG = "tyche basin"
#: log P against the training step, in --out
PLOT_FILE = "log_p_by_step.png"
#: a checkpoint's result folder in --out, and the folder names a step is read from
STEP_FOLDER = "checkpoint-{step}"
_STEP_NAME = re.compile(r"^checkpoint-(\d+)$")
#: the zoo recipes that save training checkpoints
ZOO_RECIPES = ("digits-mlp", "digits-mlp-poisoned", "shakespeare-lm")
_DIGITS, _LM = "digits MLP", "language model"
_HOW = ("give a glob of checkpoint folders in quotes, e.g. 'runs/x/checkpoints/checkpoint-*', "
        f"or zoo:NAME for the checkpoints of {', '.join(f'zoo:{n}' for n in ZOO_RECIPES)}")


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint folder and its training step."""

    step: int
    folder: Path

    @property
    def out_name(self) -> str:
        """Its result folder's name in --out: ``checkpoint-<step>``."""
        return STEP_FOLDER.format(step=self.step)


# ----------------------------------------------------------------------------- finding them
def _kind(folder: Path) -> str:
    """``_LM`` or ``_DIGITS``; CommandError for a folder that is not a model."""
    from tyche.zoo.entry import DIGITS_FORMAT, folder_format

    if (folder / "config.json").is_file():
        return _LM
    if (folder / "model.safetensors").is_file() and folder_format(folder) == DIGITS_FORMAT:
        return _DIGITS
    raise CommandError(
        f"--checkpoints: {folder} is not a model folder (no config.json of a save_pretrained "
        "model, nor a digits MLP's model.safetensors and zoo.json); give model folders only"
    )


def _step(folder: Path) -> int:
    """The step in the name ``checkpoint-<step>``, else ``zoo.json``'s ``step``."""
    from tyche.zoo.entry import METRICS_FILE

    found = _STEP_NAME.match(folder.name)
    if found:
        return int(found.group(1))
    try:
        step = json.loads((folder / METRICS_FILE).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        step = None
    if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
        return step
    raise CommandError(
        f"--checkpoints: cannot tell the training step of {folder}: name the folder "
        "checkpoint-<step> (as the zoo and HuggingFace's Trainer do)"
    )


def _zoo_folder(spec: str) -> Path | None:
    """The checkpoints folder of ``zoo:NAME``, or None while the entry is not trained yet
    (it is trained when the run starts). CommandError for an entry without checkpoints."""
    from tyche.zoo.catalogue import check_name, get_entry
    from tyche.zoo.entry import CHECKPOINTS, UnknownEntryError

    try:
        name = check_name(spec, kind="model")
    except UnknownEntryError as err:
        raise CommandError(f"--checkpoints: {err}") from None
    if name not in ZOO_RECIPES:
        raise CommandError(f"--checkpoints {spec}: zoo:{name} saves no training checkpoints; "
                           f"{_HOW}")  # fmt: skip
    entry = get_entry(name)
    if not entry.is_ready():
        return None
    folder = entry.path / CHECKPOINTS
    if not any(folder.glob("checkpoint-*")):
        raise CommandError(
            f"--checkpoints {spec}: zoo:{name} was cached without training checkpoints; "
            f"`tyche zoo train {name} --force` retrains it with them"
        )
    return folder


def _expand(pattern: str) -> list[Path]:
    """The folders one glob (or folder) names; a folder holding checkpoint-* folders, and
    no model itself, stands for them."""
    found = [Path(p) for p in sorted(glob.glob(os.path.expanduser(pattern)))]
    out = []
    for path in found:
        inner = sorted(p for p in path.glob("checkpoint-*") if p.is_dir()) if path.is_dir() \
            else []  # fmt: skip
        if inner and not (path / "config.json").is_file():
            out += inner
        else:
            out.append(path)
    return out


def find_checkpoints(spec: str, *, prepare: bool = False) -> tuple[str, list[Checkpoint]]:
    """The kind (language model or digits MLP) and the checkpoints of ``--checkpoints spec``,
    sorted by step. ``prepare`` trains a zoo entry not cached yet (else it is listed as no
    checkpoints with its kind known from the recipe). Raises CommandError for an empty
    match, a folder that is not a model, mixed kinds or two folders of one step."""
    patterns = [p.strip() for p in spec.split(",") if p.strip()]
    if not patterns:
        raise CommandError(f"--checkpoints is empty; {_HOW}")
    folders: list[Path] = []
    kind = None
    for pattern in patterns:
        if pattern.startswith("zoo:"):
            folder = _zoo_folder(pattern)
            if folder is None and prepare:
                from tyche.zoo.catalogue import get_entry
                from tyche.zoo.resolve import ensure_prepared

                ensure_prepared(get_entry(pattern, kind="model"))
                folder = _zoo_folder(pattern)
            if folder is None:  # trained when the run starts
                kind = kind or (_LM if pattern == "zoo:shakespeare-lm" else _DIGITS)
                continue
            pattern = str(folder / "checkpoint-*")
        matched = _expand(pattern)
        if not matched:
            raise CommandError(f"--checkpoints: {pattern!r} matches no folder; {_HOW}")
        folders += matched
    checkpoints: dict[int, Checkpoint] = {}
    for folder in dict.fromkeys(folders):
        if not folder.is_dir():
            raise CommandError(f"--checkpoints: {folder} is not a folder; give model folders")
        this = _kind(folder)
        if kind is not None and this != kind:
            raise CommandError(f"--checkpoints: {folder} is a {this} but the others are "
                               f"{kind}s; measure one model's checkpoints per run")  # fmt: skip
        kind = this
        step = _step(folder)
        if step in checkpoints:
            raise CommandError(f"--checkpoints: {checkpoints[step].folder} and {folder} are "
                               f"both of step {step}; give one model's checkpoints")  # fmt: skip
        checkpoints[step] = Checkpoint(step, folder)
    return kind or _DIGITS, [checkpoints[s] for s in sorted(checkpoints)]


def check_checkpoints(cmd: Any, default_model: str) -> bool:
    """Check ``--checkpoints`` (nothing loaded); True when the checkpoints are digits MLPs.
    ``--model`` must be left at its default, ``default_model``."""
    if cmd.source.model != default_model:
        raise CommandError("--checkpoints names the models to measure: drop --model")
    kind, _ = find_checkpoints(cmd.checkpoints)
    return kind == _DIGITS


def owned(out: Path, single: Owned) -> Owned:
    """What a run owns in ``out``: a single run's entries (``single``), the plot of
    --checkpoints and the checkpoints' result folders (``checkpoint-<step>`` folders holding
    a basin run)."""
    steps = sorted(p.name for p in out.glob("checkpoint-*")
                   if _STEP_NAME.match(p.name) and read_record(p) is not None) \
        if out.is_dir() else []  # fmt: skip
    return replace(single, names=(*single.names, PLOT_FILE, *steps))


# ----------------------------------------------------------------------------- the run
def _settings(cmd: Any, plan: Any) -> dict[str, Any]:
    """A run's settings as ``run_basin`` records them in run.json."""
    return {**flag_identity(cmd, plan), "--cutoff": plan.cutoff, "--lambda": plan.lam}


def _finished(sub: Path, settings: dict[str, Any]) -> bool:
    """True when ``sub`` holds a finished run of exactly these settings."""
    record = read_record(sub)
    if record is None or not record.get("finished") or not (sub / "summary.json").is_file():
        return False
    return record.get("settings") == json.loads(json.dumps(settings))


def _results(sub: Path, cutoff: float) -> dict[str, VolumeResult]:
    """The results at ``cutoff`` saved in ``sub``, by their folder's name less the cutoff."""
    from tyche.basin.result import VolumeResult

    tail = f"-cutoff{cutoff:g}"
    return {p.name[: -len(tail)]: VolumeResult.load(p)
            for p in sorted(sub.glob(f"*{tail}")) if (p / "meta.json").is_file()}  # fmt: skip


def _label(row: dict[str, Any]) -> str:
    """A summary row's curve: preconditioner, then component and subset where there are."""
    return " ".join(str(row[k]) for k in ("preconditioner", "component", "subset")
                    if row.get(k) is not None)  # fmt: skip


#: one ordinary run of ``tyche basin`` in its claimed --out: (cmd, plan, argv) -> results
RunOne = Callable[[Any, Any, list[str]], Any]


def run_checkpoints(cmd: Any, plan: Any, argv: list[str], run_one: RunOne,
                    single: Owned) -> dict[str, VolumeResult]:  # fmt: skip
    """Measure every checkpoint with ``run_one`` (one ordinary run into its own folder), then
    write summary.json, print the table and draw the plot. Returns the results at the
    histogram's cutoff keyed ``"checkpoint-<step>/<result folder less -cutoff...>"``.
    ``single`` is what one run owns in its folder (each checkpoint's)."""
    from tyche.distributed import barrier, get_rank, rank0_print
    from tyche.io import write_json

    _, found = find_checkpoints(cmd.checkpoints, prepare=True)
    if not found:
        raise CommandError(f"--checkpoints {cmd.checkpoints}: no checkpoints; {_HOW}")
    record = plan.out / "checkpoints"
    if cmd.checkpoint and not cmd.resume and get_rank() == 0:
        record.mkdir(parents=True, exist_ok=True)
        write_json(record / RUN_FILE, {"flags": flag_identity(cmd, plan),
                                       "steps": [c.step for c in found]})  # fmt: skip
    barrier()
    rows: list[dict[str, Any]] = []
    results: dict[str, VolumeResult] = {}
    for i, ck in enumerate(found):
        sub = plan.out / ck.out_name
        sub_cmd = replace(cmd, source=replace(cmd.source, model=str(ck.folder)),
                          checkpoints=None, out=str(sub), resume=False)  # fmt: skip
        sub_plan = replace(plan, out=sub)
        settings = _settings(sub_cmd, sub_plan)
        rank0_print(f"checkpoint {i + 1}/{len(found)}: step {ck.step}, {ck.folder}")
        if cmd.resume and _finished(sub, settings):
            rank0_print(f"  finished before: its results in {sub}/ are kept")
        else:
            again = cmd.resume and (sub / "checkpoints" / RUN_FILE).is_file()
            sub_cmd = replace(sub_cmd, resume=again)
            # the run's own claim on --out checked it; its checkpoint folders are its own
            with claim_folder(sub, PROG, settings, single, overwrite=not again, resume=again):
                run_one(sub_cmd, sub_plan, argv)
        if get_rank() != 0:
            continue
        at = _results(sub, plan.cutoff)
        results.update({f"{ck.out_name}/{k}": v for k, v in at.items()})
        n_params = next(iter(at.values())).n_params if at else None
        for row in json.loads((sub / "summary.json").read_text()):
            rows.append({"step": ck.step, "checkpoint": str(ck.folder),
                         "n_params": row.get("n_params", n_params), **row})  # fmt: skip
    if get_rank() == 0:
        _finish(rows, plan.cutoff, plan.out)
        if cmd.checkpoint:
            import shutil

            shutil.rmtree(record, ignore_errors=True)
    barrier()
    return results


def _finish(rows: list[dict[str, Any]], cutoff: float, out: Path) -> None:
    """summary.json, the table and the plot; each one's failure is reported, not fatal."""
    from tyche.io import write_json

    best_effort(PROG, "write summary.json", lambda: write_json(out / "summary.json", rows), out)
    best_effort(PROG, "print the table", lambda: print(steps_table(rows, cutoff)), out)
    best_effort(PROG, "draw the plot", lambda: plot_steps(rows, cutoff, out / PLOT_FILE), out)
    print(f"results in {out}/ (one folder per checkpoint: checkpoint-<step>/)")


def steps_table(rows: list[dict[str, Any]], cutoff: float) -> str:
    """The table of log P (nats), k̂ and the verdict per step (rows) and curve (columns) at
    ``cutoff``, a line per curve with log P's change from the first step to the last, and
    the verdicts' footnote."""
    from tyche.basin.psis import ESTIMATE_BELOW, LOWER_BOUND, MIN_SAMPLES, NOISY, NOISY_BELOW

    at = [r for r in rows if r["cutoff"] == cutoff]
    labels = list(dict.fromkeys(_label(r) for r in at))
    cell = {(r["step"], _label(r)): r for r in at}
    steps = sorted({r["step"] for r in at})
    d_of = {r["step"]: r.get("n_params") for r in at}
    head = f"{'step':>8} {'D':>10}" + "".join(
        f" {f'log P {lab} (nats)':>24} {'k̂':>6} {'verdict':<16}" for lab in labels)
    lines = [f"log P of the basin at KL cutoff {cutoff:g} nats, by training step", head,
             "-" * (len(head) - len(labels))]  # k̂ is two code points in one column
    for step in steps:
        d = d_of.get(step)
        line = f"{step:>8} {f'{d:,}' if d is not None else '?':>10}"
        for lab in labels:
            r = cell.get((step, lab))
            if r is None:
                line += f" {'-':>24} {'-':>6} {'-':<16}"
                continue
            khat = r.get("khat")
            khat_text = "inf" if khat is None else f"{khat:.2f}"
            line += f" {r['log_prob']:>24,.1f} {khat_text:>6} {r['verdict']:<16}"
        lines.append(line)
    for lab in labels:
        ends = [cell[(s, lab)] for s in steps if (s, lab) in cell]
        if len(ends) > 1:
            first, last = ends[0], ends[-1]
            change = last["log_prob"] - first["log_prob"]
            trend = "falls" if change < 0 else "rises"
            lines.append(f"{lab}: log P {trend} from {first['log_prob']:,.1f} at step "
                         f"{first['step']} to {last['log_prob']:,.1f} at step {last['step']} "
                         f"({change:+,.1f} nats)")  # fmt: skip
    if any(r["verdict"] == LOWER_BOUND for r in at):
        lines.append(f"{LOWER_BOUND} (Pareto k̂ ≥ {NOISY_BELOW}, or fewer than {MIN_SAMPLES} "
                     "directions): log P lies below the truth, so a trend between steps is a "
                     "trend of lower bounds.")  # fmt: skip
    if any(r["verdict"] == NOISY for r in at):
        lines.append(f"{NOISY} (Pareto k̂ in [{ESTIMATE_BELOW}, {NOISY_BELOW})): log P converges "
                     "slowly and its interval is optimistic.")  # fmt: skip
    return "\n".join(lines)


def plot_steps(rows: list[dict[str, Any]], cutoff: float, path: Path) -> Path:
    """log P (nats) at ``cutoff`` against the training step (log axis), a line per curve
    with its bootstrap interval; hollow markers where log P is a lower bound only."""
    from tyche.basin.plot import _legend_beside
    from tyche.basin.psis import ESTIMATE
    from tyche.plotting import pyplot, save_figure, tick_label

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    at = [r for r in rows if r["cutoff"] == cutoff]
    for i, lab in enumerate(dict.fromkeys(_label(r) for r in at)):
        mine = sorted((r for r in at if _label(r) == lab), key=lambda r: r["step"])
        xs = [max(r["step"], 1) for r in mine]  # a step 0 (the initialisation) sits at 1
        ys = [r["log_prob"] for r in mine]
        ax.plot(xs, ys, "-", color=f"C{i}", label=lab)
        lo = [r["ci_low"] if r.get("ci_low") is not None else y for r, y in zip(mine, ys)]
        hi = [r["ci_high"] if r.get("ci_high") is not None else y for r, y in zip(mine, ys)]
        ax.fill_between(xs, lo, hi, color=f"C{i}", alpha=0.2)
        for x, y, r in zip(xs, ys, mine):
            solid = r.get("verdict") == ESTIMATE
            ax.plot([x], [y], "o", color=f"C{i}", markerfacecolor=f"C{i}" if solid else "white")
    if any(r.get("verdict") != ESTIMATE for r in at):
        ax.plot([], [], "o", color="grey", markerfacecolor="white",
                label="hollow: not an estimate (noisy or lower bound only)")
    ax.set_xscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("log-probability of the basin (nats)")
    ax.set_title(f"Basin volume over training, KL cutoff {tick_label(cutoff)} nats")
    _legend_beside(ax)
    return save_figure(fig, path)

