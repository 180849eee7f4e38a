"""``tyche splice``: spliced faithfulness of codebooks, sparse dictionaries and projections.

Examples::

    tyche splice --model zoo:shakespeare-lm --codebooks runs/codebooks --out runs/splice
    tyche splice --sae runs/sae-resid2 --sae runs/sae-mlp1 --out runs/splice-saes
    tyche splice --basis causal:runs/causal,lib:runs/lib,pca --sites resid_pre.2 \\
        --k 1,2,4,8,16,32 --out runs/splice-bases
    torchrun --nproc_per_node=2 -m tyche splice ...      # rows sharded over the processes

Each bottleneck replaces the activations at its sites (:mod:`tyche.splice`): a codebook model's
codebooks (``--codebooks``), each dictionary's reconstruction (``--sae``; a transcoder writes
its output site from its input site), and for every ``--basis`` and every ``--k`` the rank-k
projection ``h -> mu + (h - mu) V_k D_k`` that keeps the site's mean ``mu`` over the rows. It
prints one table (KL to the clean model, cross-entropy clean / spliced / ablated, CE
recovered, accuracy), saves it as ``--out/result`` (safetensors + JSON) and
``--out/summary.json``, and draws ``--out/kl.png`` (KL against k, one line per basis).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tyche.cli.commandline import (
    CommandError,
    best_effort,
    check_number,
    check_writable_folder,
    flat_settings,
    parse_config,
    split_list,
)
from tyche.cli.inputs import ModelSource, TextRows
from tyche.cli.run_folder import Owned, check_unlocked, claim_folder
from tyche.cli.splice_bottlenecks import BasisSpec
from tyche.splice.options import SpliceOptions

if TYPE_CHECKING:
    from tyche.splice import SpliceResult

__all__ = ["SpliceConfig", "main", "run_splice"]

PROG = "tyche splice"
OWNED = Owned(names=("summary.json", "kl.png", "result"))
#: flags that change nothing in the results
FREE = ("out", "overwrite", "plot", "batch_size", "allow_long_context")
#: flags that may be given several times (their values are joined by commas)
REPEATABLE = ("--sae", "--basis")
#: what --k is when not given
DEFAULT_K = "1,2,4,8,16,32"


@dataclass(frozen=True)
class SpliceFlags(SpliceOptions):
    """The :class:`~tyche.splice.SpliceOptions` of ``tyche splice``, checked in the command
    line's words."""

    def __post_init__(self) -> None:
        check_number(self.batch_size, "--batch_size", minimum=1, integer=True)
        super().__post_init__()


@dataclass
class SpliceConfig:
    """Splice bottlenecks into a model and measure what survives (KL, CE recovered, accuracy).

    A projection keeps the site's mean: h -> mu + P_k (h - mu), mu the mean of h over the
    rows, P_k the projection onto the top k directions of the basis (causal: orthogonal; LIB:
    the oblique projection C_k C_k+ of its directions and their dual; PCA: computed from the
    same rows). CE recovered = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean); it reads
    n/a where ablating changes the loss by at most 1e-6 nats.

    Examples:

      tyche splice --codebooks runs/codebooks --out runs/splice
      tyche splice --sae runs/sae --sites resid_pre.2
      tyche splice --basis causal:runs/causal,lib:runs/lib,pca --sites resid_pre.2 --k 1,4,16
    """

    source: ModelSource = field(default_factory=ModelSource)
    """the language model (--model, --allow_long_context)"""
    rows: TextRows = field(default_factory=lambda: TextRows(n_sequences=64, seq_len=128))
    """the token rows (--data, --n_sequences, --seq_len, --seed)"""
    codebooks: str | None = None
    """a codebook model folder (tyche codebook train --out); its codebooks' sites are spliced"""
    sae: str | None = None
    """SAE or transcoder folders (SAELens or sparsify), comma separated or the flag repeated;
    each is spliced at the site its folder names, or at --sites"""
    basis: str | None = None
    """bases to project onto: causal:RUN_DIR (a tyche causal --out), lib:RUN_DIR (a tyche
    interaction build --out) or pca (from the same rows), comma separated or repeated"""
    k: str | None = None
    """ranks of the --basis projections, comma separated whole numbers (0: mean ablation)
    (default: 1,2,4,8,16,32, up to each basis's number of directions)"""
    sites: str | None = None
    """sites of the --sae folders (one for all, or one per folder; a transcoder keeps its
    own) and of the projections (default: each folder's own sites; pca: the other
    bottlenecks' sites)"""
    splice: SpliceFlags = field(default_factory=SpliceFlags)
    """how bottlenecks are measured (--ablation, --each_site, --batch_size)"""
    out: str = "runs/splice"
    """output folder: result/, summary.json, kl.png"""
    plot: bool = True
    """write kl.png (with --basis)"""
    overwrite: bool = False
    """replace a run of other settings in --out"""


# ----------------------------------------------------------------------------- checks
def merge_repeated(argv: list[str]) -> list[str]:
    """``argv`` with every repeat of a :data:`REPEATABLE` flag joined into its first value
    (``--sae a --sae b`` -> ``--sae a,b``)."""
    out: list[str] = []
    first: dict[str, int] = {}
    i = 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag in REPEATABLE and (eq or i + 1 < len(argv)):
            if not eq:
                value, i = argv[i + 1], i + 1
            if flag in first:
                out[first[flag]] += "," + value
            else:
                first[flag] = len(out) + 1
                out += [flag, value]
        else:
            out.append(argv[i])
        i += 1
    return out


def parse_k(text: str | None) -> list[int]:
    """``--k``: distinct whole numbers >= 0, sorted."""
    parts = split_list(DEFAULT_K if text is None else text)
    if not parts:
        raise CommandError("--k is empty; give ranks such as 1,2,4,8")
    values = []
    for part in parts:
        if not part.isdigit():
            raise CommandError(f"--k: {part!r} is not a whole number >= 0; give ranks such as "
                               "1,2,4,8")  # fmt: skip
        values.append(int(part))
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise CommandError(f"--k lists {', '.join(map(str, repeated))} twice")
    return sorted(values)


def parse_bases(text: str | None) -> list[BasisSpec]:
    """``--basis`` entries, each folder checked for a saved basis."""
    specs = []
    for part in split_list(text):
        kind, _, folder = part.partition(":")
        if kind == "pca" and not folder:
            specs.append(BasisSpec("pca", None, "pca"))
        elif kind in ("causal", "lib") and folder:
            specs.append(BasisSpec(kind, Path(folder).expanduser(), kind))
        else:
            raise CommandError(f"--basis: {part!r} is not causal:RUN_DIR, lib:RUN_DIR or pca")
    labels = [s.kind for s in specs]
    if len(set(map(str, specs))) < len(specs):
        raise CommandError("--basis lists one basis twice; give each once")
    # two bases of one kind are told apart by their folders
    names = [s.folder.name if s.folder else "" for s in specs]

    def label(s: BasisSpec, name: str) -> str:  # a kind used twice: its folders' names tell
        if labels.count(s.kind) == 1:
            return s.label
        return f"{s.kind} {name}" if names.count(name) == 1 else f"{s.kind}:{s.folder}"

    return [BasisSpec(s.kind, s.folder, label(s, n)) for s, n in zip(specs, names)]


def validate(cfg: SpliceConfig) -> tuple[list[BasisSpec], list[int], list[str]]:
    """Check every flag without loading anything; returns the bases, the ranks and the
    --sae folders."""
    cfg.rows.check()
    if cfg.rows.n_sequences is None or cfg.rows.seq_len is None:
        raise CommandError("--n_sequences and --seq_len need a value")
    cfg.source.check()
    bases, saes = parse_bases(cfg.basis), split_list(cfg.sae)
    if not (bases or saes or cfg.codebooks):
        raise CommandError("give a bottleneck to splice: --codebooks DIR, --sae DIR or --basis "
                           "causal:RUN_DIR|lib:RUN_DIR|pca")  # fmt: skip
    if cfg.k is not None and not bases:
        raise CommandError("--k sets the ranks of --basis projections; give --basis too")
    ks = parse_k(cfg.k)
    if cfg.sites is not None and not split_list(cfg.sites):
        raise CommandError("--sites is empty; give site patterns such as resid_pre.2")
    if cfg.codebooks is not None:
        folder = Path(cfg.codebooks).expanduser()
        if not (folder / "codebooks.json").is_file():
            raise CommandError(f"--codebooks: no codebook model in {cfg.codebooks!r} (expected "
                               "codebooks.json; train one with tyche codebook train)")  # fmt: skip
    for sae in saes:
        if not Path(sae).expanduser().is_dir():
            raise CommandError(f"--sae: no folder {sae!r}")
    for spec in bases:
        if spec.folder is not None and not spec.folder.is_dir():
            raise CommandError(f"--basis {spec.kind}:{spec.folder}: no such folder")
    check_writable_folder(cfg.out, "--out")
    check_unlocked(cfg.out)
    return bases, ks, saes


def _settings(cfg: SpliceConfig) -> dict[str, Any]:
    """The flags that make the results, ``{"--flag": value}``."""
    return {f"--{k}": v for k, v in flat_settings(cfg).items() if k not in FREE}


# ----------------------------------------------------------------------------- run
def run_splice(cfg: SpliceConfig, argv: list[str] | None = None) -> SpliceResult:
    """Run ``tyche splice`` with a parsed config; returns the :class:`SpliceResult`."""
    bases, ks, saes = validate(cfg)
    with claim_folder(cfg.out, PROG, _settings(cfg), OWNED, overwrite=cfg.overwrite):
        return _splice(cfg, bases, ks, saes)


def _splice(cfg: SpliceConfig, bases: list[BasisSpec], ks: list[int],
            saes: list[str]) -> SpliceResult:  # fmt: skip
    """:func:`run_splice` in its claimed --out."""
    from tyche.cli.splice_bottlenecks import Sources, build_bottlenecks
    from tyche.distributed import get_rank, init_distributed, rank0_print
    from tyche.io import model_hash, write_json
    from tyche.splice import splice_faithfulness

    init_distributed()
    rank0_print("settings: " + json.dumps(flat_settings(cfg)))
    sources = Sources.load(cfg, bases, ks, saes)  # every folder read before the model
    zoo_model = cfg.source.load(cfg.rows.seq_len)
    model = zoo_model.model
    rows = cfg.rows.load(zoo_model.tokenizer, zoo_model.default_data)
    rank0_print(f"data {rows.note(cfg.rows.n_sequences)}")
    start = time.perf_counter()
    bottlenecks, moments, notes = build_bottlenecks(model, rows.tokens, sources, cfg)
    for note in notes:
        rank0_print(f"note: {note}")
    result = splice_faithfulness(model, rows.tokens, bottlenecks, cfg.splice, moments=moments,
                                 progress=get_rank() == 0)  # fmt: skip
    elapsed = time.perf_counter() - start
    out = Path(cfg.out)
    if get_rank() == 0:
        result.save(out / "result")
        summary = {"settings": flat_settings(cfg), "model": cfg.source.model,
                   "model_hash": model_hash(model), **rows.record(cfg.rows),
                   "seconds": elapsed, "ce_clean": result.ce_clean,
                   "accuracy_clean": result.accuracy_clean, "notes": notes,
                   "n_kl_positions": result.n_kl_positions,
                   "n_ce_positions": result.n_ce_positions, "rows": result.rows()}  # fmt: skip
        best_effort(PROG, "write summary.json",
                    lambda: write_json(out / "summary.json", summary), out)  # fmt: skip
        head = (f"\nspliced faithfulness on {cfg.source.model} ({result.n_kl_positions} tokens, "
                f"{cfg.splice.ablation} ablation, {elapsed:.1f} s)")  # fmt: skip
        best_effort(PROG, "print the table", lambda: print(head + "\n" + result.table()), out)
        if cfg.plot and any(k is not None for k in result.ks):
            figure = lambda: print(f"figure: {plot_kl(result, out / 'kl.png')}")  # noqa: E731
            best_effort(PROG, "draw kl.png", figure, out)
        print(f"saved the result under {out / 'result'}/")
    return result


# ----------------------------------------------------------------------------- figure
def plot_kl(result: SpliceResult, path: Path) -> Path:
    """KL to the clean model (log y) against k for every projection basis, with all its sites
    spliced; the other bottlenecks as dashed horizontal lines. KL 0 is left off the log axis."""
    from tyche.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    families = list(dict.fromkeys(f for f in result.families if f))
    ks: set[int] = set()
    for family in families:
        names = dict.fromkeys(n for n, f in zip(result.names, result.families) if f == family)
        line = sorted((result.ks[i], float(result.kl[i])) for i in map(result.index, names))
        ks.update(k for k, _ in line)
        ax.plot([k for k, _ in line], [v for _, v in line], "o-", ms=4, label=family)
    others = list(dict.fromkeys(n for n, f in zip(result.names, result.families) if not f))
    for j, name in enumerate(others):  # each at all its sites (its row with the most sites)
        kl = float(result.kl[result.index(name)])
        ax.axhline(kl, ls="--", lw=1, color=f"C{len(families) + j}", label=name)
    if ks and min(ks) == 0:  # k = 0 (mean ablation) on a log axis
        ax.set_xscale("symlog", base=2, linthresh=1)
    else:
        ax.set_xscale("log", base=2)
    ax.set_yscale("log", nonpositive="mask")
    ax.set_xticks(sorted(ks), [str(k) for k in sorted(ks)])
    ax.set_xlabel("k (directions kept)")
    ax.set_ylabel("KL to the clean model (nats/token)")
    ax.set_title(f"spliced projections ({result.ablation} ablation baseline)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: list[str]) -> Any:
    """``tyche splice [--flags]`` (``--sae`` and ``--basis`` may be repeated)."""
    cfg = parse_config(SpliceConfig, merge_repeated(list(argv)), PROG)
    return run_splice(cfg, argv)
