"""The flags of ``tyche basin`` and their checks: everything is checked here before a model
or data is loaded, and turned into a :class:`Plan`."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tyche.cli.basin.include import parse_include
from tyche.cli.basin.resume import (
    RUN_FILE,
    flag_identity,
    refuse_mixing,
)
from tyche.cli.commandline import (
    CommandError,
    check_number,
    check_writable_folder,
    parse_choices,
    parse_numbers,
    split_list,
)
from tyche.cli.inputs import ModelSource, TextRows
from tyche.cli.run_folder import Owned, check_unlocked

if TYPE_CHECKING:
    from tyche.basin.where import Subset

PROG = "tyche basin"
PRECONDITIONERS = ("none", "adam", "fisher")
DEFAULT_PRECONDITIONERS = "none,adam"
DEFAULT_CUTOFF = 1e-2
LAMBDA_CUTOFFS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
DEFAULT_N_SEQUENCES = 8
DEFAULT_SEQ_LEN = 64
DIGITS = "zoo:digits-mlp"
#: the digits MLPs (measured on the same 1,024 clean training inputs)
DIGITS_MODELS = (DIGITS, "zoo:digits-mlp-poisoned")
SHAKESPEARE = "zoo:shakespeare"
PLAY_DATA = "--where play= needs the plays as data: --data zoo:shakespeare with a language model"
#: what a run writes in --out (result folders per preconditioner, subset and cutoff)
OWNED = Owned(
    names=("summary.json", "histogram.png", "cutoff_scan.png", "checkpoints"),
    patterns=("*-cutoff*", "*-curve", "*-lambda"),
)


@dataclass
class BasinConfig:
    """Estimate log P(basin) under a Gaussian prior (nats) for a model on some data.

    The basin is the region around the trained parameters where the mean KL from the trained
    model stays below the cutoff; P is its prior probability, estimated by Monte Carlo over
    directions. Examples:

      tyche basin                                    # the digits MLP, naive vs Adam
      tyche basin --cutoffs 1e-5,1e-4,1e-3,1e-2,1e-1 # and log P against the cutoff
      tyche basin --lambda                           # the learning coefficient λ
      tyche basin --where 'all;label=each'           # one basin per digit class
      tyche basin --model zoo:shakespeare-lm --data zoo:shakespeare --n_samples 16
      tyche basin --resume                           # continue an interrupted run
    """

    source: ModelSource = field(default_factory=lambda: ModelSource(model=DIGITS))
    """the model: zoo:digits-mlp (measured on its 1,024 training inputs), zoo:shakespeare-lm,
    zoo:smollm2-135m, or a save_pretrained folder (--model, --allow_long_context)"""
    rows: TextRows = field(default_factory=TextRows)
    """language models' evaluation rows (--data, --n_sequences: default 8, per play with
    --where play=; --seq_len: default 64; --seed: also the seed of the directions)"""
    checkpoints: str | None = None
    """measure every training checkpoint of a model instead of --model: a glob of checkpoint
    folders in quotes, e.g. 'runs/x/checkpoints/checkpoint-*' (several separated by ','; a
    folder of checkpoint-* folders stands for them), or zoo:NAME for the checkpoints the zoo
    recipes save (zoo:digits-mlp, zoo:digits-mlp-poisoned, zoo:shakespeare-lm). Each is
    measured with this run's settings and its own Adam state, in the order of its step (from
    the name checkpoint-<step>), into OUT/checkpoint-<step>/; the table, summary.json (rows
    with 'step') and log_p_by_step.png show log P over training"""
    n_samples: int = 100
    """Monte Carlo directions per preconditioner (and subset, and component)"""
    adapt: int = 0
    """rounds of adaptive direction sampling before the estimate, see docs/basin.md; 0: off;
    each round costs --n_samples directions"""
    cutoff: float | None = None
    """KL cutoff in nats (default 1e-2); with --cutoffs, the one whose histogram is drawn
    (default: the largest of them)"""
    cutoffs: str | None = None
    """comma-separated cutoffs (nats) for a log P against cutoff curve, e.g. 1e-4,1e-3,1e-2;
    each direction is searched once for all of them"""
    lambda_: bool = False
    """fit the learning coefficient λ, the slope of log P against ln(cutoff) at the three
    smallest cutoffs (bootstrap interval over directions), print it and draw it on
    cutoff_scan.png; without --cutoffs it scans 1e-5,1e-4,1e-3,1e-2,1e-1"""
    where: str | None = None
    """measure the basin of part of the data only, one basin per subset on the same
    directions, subsets separated by ';': all, label=3 or label=3,5 or label=each (digit
    classes), play=hamlet or play=each (lines of Shakespeare plays: the evaluation set is then
    --val_size sequences of each named play), mask=FILE (one tensor of True/False in a
    .safetensors or .npy file, over the evaluation examples (N,) or tokens (N, T)); e.g.
    'all;label=each'"""
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
    batch_size: int | None = None
    """directions searched together (default: as many as --max_memory holds, at most 16 and
    at most 2^25 parameters' worth); results do not depend on it"""
    max_memory: str | None = None
    """memory the batch of directions may use, e.g. 4GiB or 512MiB (default: half the memory
    free on the model's device when the run starts)"""
    val_size: int | None = None
    """deprecated: the old name of --n_sequences"""
    max_seq_len: int | None = None
    """deprecated: the old name of --seq_len"""
    exclude: str | None = None
    """comma-separated globs of parameter names held fixed, e.g. 'transformer.wte.*,*ln*';
    each must match a parameter"""
    include: str | None = None
    """one basin per component of the model, in one run: components separated by ';', each
    comma-separated globs of parameter names or a keyword found from the model's parameter
    names: layers (one per block of a numbered list, e.g. gpt_neox.layers.3, transformer.h.3,
    model.layers.3; the digits MLP: one per Linear layer), sublayers (each block's attention
    and MLP apart; norms in neither), embedding (the token and position embeddings); e.g.
    'embedding;sublayers' or 'gpt_neox.layers.0.*;gpt_neox.layers.1.*'. The other parameters
    stay trained; --exclude applies inside each component. Every component gets the run's
    settings and prior σ (--sigma's default is the whole model's, not the component's), --seed and
    --preconditioners, its p the entries the whole model's p gives its parameters; direction
    i is drawn from (--seed, i) over the component's own D_c coordinates (for disjoint
    components independent, as the restrictions of one isotropic draw to disjoint coordinates
    are). Results in KIND-COMPONENT-... folders; the table and summary.json rows name the
    component and its D (n_params)"""
    out: str = "runs/basin"
    """folder for results (safetensors + JSON), summary.json and PNG plots"""
    checkpoint: bool = True
    """save finished directions after every batch under OUT/checkpoints"""
    resume: bool = False
    """continue the interrupted run saved under OUT/checkpoints (every flag that changes a
    sample must match; --batch_size, --max_memory and --cutoff within --cutoffs may change)"""
    overwrite: bool = False
    """replace the run in --out (finished, of other settings, or interrupted): its results are
    removed first (a run of the same settings may run again without it)"""


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
    rows: TextRows
    subsets: tuple[Subset, ...] | None
    max_memory: int | None
    lam: bool
    include: tuple[str, ...] | None = None  # --include's components, keywords unexpanded


# ----------------------------------------------------------------------------- checks
def _renamed_flags(cmd: BasinConfig) -> TextRows:
    """The rows' flags with the deprecated --val_size / --max_seq_len folded in (a one-line
    note each on stderr; both a name and its old name given differently is refused)."""
    rows = cmd.rows
    for old, new, value in (("--val_size", "--n_sequences", cmd.val_size),
                            ("--max_seq_len", "--seq_len", cmd.max_seq_len)):  # fmt: skip
        if value is None:
            continue
        current = getattr(rows, new[2:])
        if current is not None and current != value:
            raise CommandError(f"{old} {value} and {new} {current} disagree; {old} is the old "
                               f"name of {new}: give {new} alone")  # fmt: skip
        print(f"{PROG}: note: {old} is deprecated; use {new}", file=sys.stderr)
        rows = replace(rows, **{new[2:]: value})
    return rows


def _check_where(cmd: BasinConfig, is_digits: bool) -> tuple[Subset, ...] | None:
    """Parse --where and check it against the model and data named (nothing loaded)."""
    if cmd.where is None:
        return None
    from tyche.basin.where import check_values, parse_where

    try:
        subsets = parse_where(cmd.where)
    except ValueError as err:
        raise CommandError(str(err)) from None
    keys = {s.key for s in subsets}
    if "label" in keys:
        if not is_digits:
            raise CommandError(f"--where label= is for {DIGITS} (its classes); for a language "
                               "model use play= or mask=")  # fmt: skip
        try:
            check_values(subsets, "label", [str(k) for k in range(10)], "digit class")
        except ValueError as err:
            raise CommandError(str(err)) from None
    if "play" in keys:
        # without --data the model's own data decides, checked once it is loaded
        if is_digits or cmd.rows.data not in (None, SHAKESPEARE):
            raise CommandError(PLAY_DATA)
        from tyche.zoo.text import play_titles

        try:
            check_values(subsets, "play", play_titles(), "play")
        except ValueError as err:
            raise CommandError(str(err)) from None
    for s in subsets:
        if s.key == "mask":
            path = Path(s.values[0]).expanduser()
            if not path.is_file():
                raise CommandError(f"--where mask={s.values[0]}: no such file")
            if path.suffix not in (".safetensors", ".npy"):
                raise CommandError(f"--where mask={s.values[0]}: give a .safetensors or .npy "
                                   "file holding one boolean tensor")  # fmt: skip
    return tuple(subsets)


def _check_cutoffs(cmd: BasinConfig) -> tuple[list[float], float]:
    if cmd.cutoffs is not None:
        cutoffs = sorted(parse_numbers(cmd.cutoffs, "--cutoffs"))
        if cmd.lambda_ and len(cutoffs) < 2:
            raise CommandError("--lambda needs at least two --cutoffs (three test straightness)")
    elif cmd.lambda_:
        cutoffs = list(LAMBDA_CUTOFFS)
    else:
        cutoff = cmd.cutoff if cmd.cutoff is not None else DEFAULT_CUTOFF
        return [cutoff], cutoff
    if cmd.cutoff is not None and cmd.cutoff not in cutoffs:
        flag = "--cutoffs" if cmd.cutoffs is not None else "the --lambda scan"
        raise CommandError(
            f"--cutoff {cmd.cutoff:g} is not among {flag} "
            f"{cmd.cutoffs or ','.join(f'{c:g}' for c in cutoffs)}; add it there or drop "
            "--cutoff (the histogram is then drawn at the largest cutoff)"
        )
    return cutoffs, cmd.cutoff if cmd.cutoff is not None else cutoffs[-1]


def validate(cmd: BasinConfig) -> Plan:
    """Check every flag and combination without loading anything; the filled-in plan."""
    check_number(cmd.n_samples, "--n_samples", minimum=1, integer=True)
    check_number(cmd.adapt, "--adapt", minimum=0, integer=True)
    check_number(cmd.batch_size, "--batch_size", minimum=1, integer=True)
    check_number(cmd.eps, "--eps", minimum=0)
    check_number(cmd.exponent, "--exponent", minimum=0)
    check_number(cmd.sigma, "--sigma", above=0)
    check_number(cmd.cutoff, "--cutoff", above=0)
    check_number(cmd.val_size, "--val_size", minimum=1, integer=True)
    check_number(cmd.max_seq_len, "--max_seq_len", minimum=2, integer=True)
    given = _renamed_flags(cmd)
    given.check()
    max_memory = None
    if cmd.max_memory is not None:
        from tyche.memory import parse_size

        try:
            max_memory = parse_size(cmd.max_memory)
        except ValueError as err:
            raise CommandError(f"--max_memory: {err}") from None
    kinds_given = cmd.preconditioners is not None
    kinds = parse_choices(cmd.preconditioners or DEFAULT_PRECONDITIONERS, "--preconditioners",
                          PRECONDITIONERS)  # fmt: skip
    cutoffs, cutoff = _check_cutoffs(cmd)
    exclude = split_list(cmd.exclude)
    if cmd.exclude is not None and not exclude:
        raise CommandError("--exclude is empty; give globs of parameter names or drop the flag")
    if cmd.checkpoints is not None:
        from tyche.cli.basin.checkpoints import check_checkpoints

        is_digits = check_checkpoints(cmd, DIGITS)
    else:
        is_digits = cmd.source.check(classifiers=DIGITS_MODELS) is not None
    if is_digits:
        for flag, value in (("--data", cmd.rows.data), ("--n_sequences", cmd.rows.n_sequences),
                            ("--seq_len", cmd.rows.seq_len), ("--val_size", cmd.val_size),
                            ("--max_seq_len", cmd.max_seq_len)):  # fmt: skip
            if value is not None:
                raise CommandError(
                    f"{flag} does not apply to {cmd.checkpoints or cmd.source.model}: it is "
                    "measured on its 1,024 training inputs; drop the flag"
                )
    subsets = _check_where(cmd, is_digits)
    if cmd.resume and not cmd.checkpoint:
        raise CommandError("--resume needs the checkpoints: drop --no-checkpoint")
    if cmd.resume and cmd.overwrite:
        raise CommandError("--overwrite discards the run that --resume continues; drop one")
    out = check_writable_folder(cmd.out, "--out")
    check_unlocked(out)  # a run in progress is named as such, not as an interrupted one
    checkpoints = out / "checkpoints"
    saved = list(checkpoints.glob("*/samples-rank*.safetensors")) if checkpoints.is_dir() else []
    if cmd.resume and not (checkpoints / RUN_FILE).is_file():
        raise CommandError(f"--resume: no interrupted run under {checkpoints}; drop --resume")
    leftover = saved or (checkpoints / RUN_FILE).is_file()
    if not cmd.resume and not cmd.overwrite and leftover:
        raise CommandError(
            f"{checkpoints} holds an interrupted run: add --resume to continue it, or pass "
            "--overwrite (or choose another --out) to start afresh"
        )
    plan = Plan(
        kinds=tuple(kinds),
        kinds_given=kinds_given,
        cutoffs=tuple(cutoffs),
        cutoff=cutoff,
        exclude=tuple(exclude),
        out=out,
        is_digits=is_digits,
        rows=given.filled(DEFAULT_N_SEQUENCES, DEFAULT_SEQ_LEN),
        subsets=subsets,
        max_memory=max_memory,
        lam=cmd.lambda_,
        include=parse_include(cmd.include),
    )
    if cmd.resume:
        saved_run = json.loads((checkpoints / RUN_FILE).read_text())
        refuse_mixing(saved_run["flags"], flag_identity(cmd, plan), checkpoints)
    if cmd.adapt and cmd.n_samples < 2 * (len(cutoffs) + 1):
        raise CommandError(
            f"--adapt needs --n_samples >= {2 * (len(cutoffs) + 1)} with {len(cutoffs)} "
            "cutoff(s): each round draws at least two directions from the base law and from "
            "each cutoff's fitted law"
        )
    return plan
