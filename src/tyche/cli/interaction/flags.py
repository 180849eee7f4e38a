"""The flags of ``tyche interaction build | ablate | plot`` and their checks (nothing is
loaded here: every flag is checked before a model is)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tyche.cli.commandline import (
    CommandError,
    check_number,
    check_writable_folder,
    split_list,
)
from tyche.cli.inputs import CLASSIFIERS, ModelSource, TextRows
from tyche.cli.run_folder import check_new_file, check_unlocked, differences, read_record

if TYPE_CHECKING:
    import torch

    from tyche.interaction.options import AblationOptions, GraphOptions

__all__ = [
    "AblateConfig",
    "AblationFlags",
    "BuildConfig",
    "GraphFlags",
    "PlotConfig",
    "validate_ablate",
    "validate_build",
    "validate_plot",
]

PROG = "tyche interaction"
#: integration rules by name (the same as tyche.interaction.integrate.RULES; a test checks)
RULE_NAMES = ("gradient", "trapezoidal", "gauss-legendre")
#: the files each build stage leaves under --out
STAGE_FILES = {"grams": "grams/meta.json", "bases": "bases/meta.json", "edges": "graph/meta.json"}


def _dtype(name: str) -> torch.dtype:
    """The dtype a ``--dtype`` / ``--gram_dtype`` name says (torch is imported only here)."""
    import torch

    return {"float64": torch.float64, "float32": torch.float32}[name]


def _text_rows() -> TextRows:
    return TextRows(n_sequences=16, seq_len=64)


@dataclass
class SourceConfig:
    """The model and the rows it is run on."""

    source: ModelSource = field(default_factory=lambda: ModelSource(model="zoo:modadd"))
    """the model: zoo:modadd, zoo:digits-mlp, zoo:fashion-mlp (classifiers that bring their
    rows), or a language model (--model, --allow_long_context)"""
    rows: TextRows = field(default_factory=_text_rows)
    """language models' token rows (--data, --n_sequences, --seq_len, --seed: also the seed of
    the stochastic sources)"""
    split: Literal["train", "test"] = "train"
    """classifiers: their training or test rows; language models: two disjoint draws (test:
    the held-out end of the seeded permutation)"""
    n_rows: int = 0
    """classifiers: use at most this many rows (0: all of the split)"""
    batch_size: int = 0
    """rows per forward pass (0: all at once)"""


@dataclass(frozen=True)
class GraphFlags:
    """The builder's settings in the command's words: :class:`tyche.interaction.GraphOptions`
    with dtype names, 0 for "every" stochastic source, ``none`` for no edges, the
    integration rule as text and ``--split_over`` for its ``split`` (``--split`` names the
    rows). ``batch_size`` and ``seed`` come from the shared source flags; ``cache_gb`` and
    ``check_cuts`` keep the library's defaults."""

    basis: Literal["jacobian", "(1-0)*alpha", "(1-alpha)^2", "svd", "neuron"] = "jacobian"
    """basis formula (svd: PCA, neuron: identity)"""
    edges: Literal["squared", "functional", "none"] = "squared"
    """edge formula, or none for bases only"""
    integration: str = "gradient"
    """gradient, trapezoidal or gauss-legendre, or per node layer: 'prefix=rule,prefix=rule'"""
    n_intervals: int = 0
    """intervals of the trapezoidal / gauss-legendre rule"""
    center: bool = True
    """centre the bases (the constant direction first); --no-center for the neuron basis"""
    dtype: Literal["float64", "float32"] = "float64"
    """dtype the model runs in"""
    gram_dtype: Literal["float64", "float32"] = "float64"
    """accumulation dtype of the Gram matrices"""
    rotate_final: bool = False
    """give the last node layer its PCA rotation (else raw coordinates)"""
    n_stochastic_sources: int = 0
    """random +-1 combinations of output positions per feature (0: every position)"""
    n_stochastic_sources_hidden: int = 0
    """random +-1 combinations of output features, jacobian basis only (0: every feature)"""
    truncation_threshold: float = 1e-14
    """drop directions whose Gram eigenvalue or Lambda is at most this fraction of the largest"""
    split_over: Literal["data", "outputs"] = "data"
    """under torchrun: split the rows, or the output features, over the ranks"""

    def library(self, batch_size: int, seed: int, *, edges: bool = True) -> GraphOptions:
        """The :class:`~tyche.interaction.GraphOptions` these flags say (``edges=False``: no
        edges, for ``--stage bases``); ``batch_size`` 0 is all rows at once."""
        from tyche.interaction.options import GraphOptions

        values = asdict(self)
        split = values.pop("split_over")
        values.update(
            edges=None if not edges or self.edges == "none" else self.edges,
            integration=parse_integration(self.integration),
            dtype=_dtype(self.dtype),
            gram_dtype=_dtype(self.gram_dtype),
            n_stochastic_sources=self.n_stochastic_sources or None,
            n_stochastic_sources_hidden=self.n_stochastic_sources_hidden or None,
        )
        return GraphOptions(**values, split=split, batch_size=batch_size or None, seed=seed)


@dataclass(frozen=True)
class AblationFlags:
    """The ablation settings in the command's words: :class:`tyche.interaction.AblationOptions`
    with a dtype name and the command's defaults (``--tolerance`` 0.001 and the exponential
    schedule for both kinds, float32); ``batch_size`` comes from the shared source flags."""

    schedule: Literal["exponential", "bisect", "thresholds"] = "exponential"
    """kept counts: every count up to --cutoff then steps of --base; a bisection for the fewest
    within --tolerance; or (edges) the edges above fractions of the largest"""
    cutoff: int = 16
    """exponential schedule: every count up to this"""
    base: float = 1.25
    """exponential schedule: then steps of this factor"""
    tolerance: float = 0.001
    """bisect: accuracy drop allowed against the unablated model"""
    dtype: Literal["float64", "float32"] = "float32"
    """dtype the model runs in"""

    def library(self, batch_size: int) -> AblationOptions:
        """The :class:`~tyche.interaction.AblationOptions` these flags say (``batch_size`` 0
        is all rows at once)."""
        from tyche.interaction.options import AblationOptions

        values = {**asdict(self), "dtype": _dtype(self.dtype)}
        return AblationOptions(**values, batch_size=batch_size or None)


@dataclass
class BuildConfig(SourceConfig):
    """Build the local interaction graph of a model (grams -> bases -> edges).

    Examples:

      tyche interaction build --model zoo:modadd --out runs/modadd-lib
      tyche interaction build --model zoo:modadd --basis svd --out runs/modadd-pca
      tyche interaction build --model zoo:shakespeare-lm --node_layers resid_pre.2,unembed
    """

    node_layers: str = ""
    """site patterns, comma separated, in forward order; 'output' for the logits (default: the
    paper's for zoo:modadd, the hidden layers for MLPs, the last residual sites for LMs)"""
    options: GraphFlags = field(default_factory=GraphFlags)
    """how the graph is built (its flags follow: --basis ... --split_over)"""
    stage: Literal["grams", "bases", "edges"] = "edges"
    """stop after this stage (each is saved under --out)"""
    resume: bool = False
    """continue from the stages and finished sections saved under --out (their settings must
    match)"""
    out: str = "runs/interaction"
    """output folder: grams/, bases/, graph/, graph.png, summary.json (and sections/ while the
    bases or edges are built)"""
    plot: bool = True
    """draw graph.png"""
    overwrite: bool = False
    """replace the build in --out (finished, of other settings, or interrupted): its files are
    removed first (a build of the same settings may run again without it)"""


@dataclass
class AblateConfig(SourceConfig):
    """Ablate directions (nodes) or edges of a saved graph and measure accuracy and loss.

    Examples:

      tyche interaction ablate --graph runs/modadd-lib --kind nodes
      tyche interaction ablate --graph runs/modadd-lib --kind edges --schedule thresholds
    """

    source: ModelSource = field(default_factory=lambda: ModelSource(model=""))
    """the model the graph was built on (--model; default: the build's, from its
    summary.json)"""
    graph: str = "runs/interaction"
    """a build's --out folder, or a saved graph folder"""
    kind: Literal["nodes", "edges"] = "nodes"
    """keep the top directions of each node layer, or the strongest edges of each section"""
    layers: str = ""
    """nodes: node layers to ablate, comma separated (default: all with a basis)"""
    options: AblationFlags = field(default_factory=AblationFlags)
    """how the counts kept are chosen and the model is run (--schedule ... --dtype)"""
    split: Literal["train", "test"] = "test"
    """rows to score on (the paper scores modadd on its test split)"""
    out: str = ""
    """output folder (default: <graph>/ablate-<kind>)"""
    plot: bool = True
    """draw curves.png"""
    overwrite: bool = False
    """replace curves of other settings in --out (they are removed first)"""


@dataclass
class PlotConfig:
    """Draw a saved interaction graph as a PNG."""

    graph: str = "runs/interaction"
    """a build's --out folder, or a saved graph folder"""
    out: str = ""
    """PNG file (default: graph.png next to the graph folder)"""
    nodes_per_layer: int = 30
    """features drawn per node layer (the most important)"""
    weight_share: float = 0.9
    """per layer pair, draw the fewest strongest edges that carry this share of its edge
    weight (among the drawn features)"""
    max_edges: int = 40
    """at most this many edges per layer pair (0: no cap)"""
    threshold: float = 0.0
    """drop, from the edges --weight_share and --max_edges choose, those below this fraction
    of the largest of their layer pair (after --norm; 0: drop none)"""
    norm: Literal["sqrt", "identity"] = "sqrt"
    """edge width from sqrt(E) (undoes the squaring of squared edges) or E"""
    labels: bool = False
    """label every feature (f0, f1, ...)"""
    hide_constant: bool = True
    """leave out the edges of the constant direction"""
    overwrite: bool = False
    """replace the PNG if it exists (e.g. the build's own graph.png)"""


# ----------------------------------------------------------------------------- checks
def _check_source(cfg: SourceConfig) -> None:
    """Flags naming the model and its rows, checked without loading anything."""
    for flag in ("n_rows", "batch_size"):
        check_number(getattr(cfg, flag), f"--{flag}", minimum=0, integer=True)
    cfg.rows.check()
    if cfg.rows.n_sequences is None or cfg.rows.seq_len is None:
        raise CommandError("--n_sequences and --seq_len need a value")
    if cfg.source.check(classifiers=CLASSIFIERS) is not None:  # they bring their own rows
        if cfg.rows.data:
            raise CommandError(f"--data does not apply to {cfg.source.model}, which brings its "
                               "rows")  # fmt: skip
        return
    if cfg.n_rows:
        raise CommandError("--n_rows is for the zoo classifiers; use --n_sequences for text")


def parse_integration(text: str) -> str | dict[str, str]:
    """``rule`` or ``'prefix=rule,prefix=rule'`` (a rule per node layer); checks the names."""
    parts = split_list(text)
    if not parts:
        raise CommandError(f"--integration is empty; choose from {', '.join(RULE_NAMES)}")
    if len(parts) == 1 and "=" not in parts[0]:
        rules = {"": parts[0]}
    else:
        rules = {}
        for part in parts:
            prefix, eq, rule = (p.strip() for p in part.partition("="))
            if not eq or not prefix:
                raise CommandError(f"--integration: {part!r} is not 'node_layer=rule'")
            if prefix in rules:
                raise CommandError(f"--integration names {prefix!r} twice")
            rules[prefix] = rule
    for rule in rules.values():
        if rule not in RULE_NAMES:
            raise CommandError(
                f"--integration: unknown rule {rule!r}; choose from {', '.join(RULE_NAMES)}"
            )
    return rules.get("", rules)


def validate_build(cfg: BuildConfig) -> None:
    """Check every flag of ``tyche interaction build`` without loading anything."""
    _check_source(cfg)
    if cfg.node_layers and len(split_list(cfg.node_layers)) < 2:
        raise CommandError(
            f"--node_layers {cfg.node_layers!r}: give at least two site patterns (a section "
            "runs between two), e.g. resid_pre.1,unembed"
        )
    graph = cfg.options
    parse_integration(graph.integration)
    for flag in ("n_intervals", "n_stochastic_sources", "n_stochastic_sources_hidden"):
        check_number(getattr(graph, flag), f"--{flag}", minimum=0, integer=True)
    check_number(graph.truncation_threshold, "--truncation_threshold", minimum=0)
    if graph.truncation_threshold >= 1:
        raise CommandError("--truncation_threshold is a fraction of the largest: below 1")
    out = Path(cfg.out).expanduser()
    check_unlocked(out)  # a build in progress is named as such, not as a leftover
    if cfg.resume and cfg.overwrite:
        raise CommandError("--overwrite discards the build that --resume continues; drop one")
    saved = [s for s, f in STAGE_FILES.items() if (out / f).is_file()]
    if cfg.resume and not saved:
        raise CommandError(f"--resume: no saved stage under {str(out)!r}; run without --resume")
    record = read_record(out)
    finished = (record or {}).get("finished")  # then its settings are compared
    if cfg.resume and record is not None:
        _check_resumed_settings(cfg, record, out)
    if saved and not cfg.resume and not cfg.overwrite and not finished:
        raise CommandError(
            f"--out {str(out)!r} holds a build already (stages {', '.join(saved)}); add --resume "
            "to continue it, pass --overwrite to start afresh, or choose another --out"
        )
    check_writable_folder(out, "--out")


def _check_resumed_settings(cfg: BuildConfig, record: dict, out: Path) -> None:
    """--resume continues the build recorded in ``out``: every flag that makes its results
    but --stage (a build goes on from grams to bases to edges) must be as it was."""
    from tyche.cli.interaction.folders import settings

    now = json.loads(json.dumps(settings(cfg)))
    drop = ("--stage",)
    differ = differences({k: v for k, v in record.get("settings", {}).items() if k not in drop},
                         {k: v for k, v in now.items() if k not in drop})  # fmt: skip
    if differ:
        raise CommandError(
            f"--resume: the build in --out {str(out)!r} was made with other settings: "
            f"{'; '.join(differ)}; give its flags, or pass --overwrite to start afresh"
        )


def _graph_folder(path: str) -> Path:
    root = Path(path).expanduser()
    for candidate in (root / "graph", root):
        if (candidate / "meta.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"--graph: no saved graph in {str(root)!r} (looked for {str(root / 'graph')!r} and "
        f"{str(root)!r}); run `tyche interaction build --out FOLDER` first"
    )


def validate_ablate(cfg: AblateConfig) -> Path:
    """Check every flag of ``tyche interaction ablate``; returns the graph folder.

    Without ``--model``, the build's model and text settings are taken from its
    ``summary.json`` (flags left at their defaults only).
    """
    folder = _graph_folder(cfg.graph)
    if not cfg.source.model:
        summary = folder.parent / "summary.json"
        if not summary.is_file():
            raise CommandError(f"--model: no {summary} to take the model from; pass --model")
        built = json.loads(summary.read_text())["config"]
        cfg.source.model = built["model"]
        default = _text_rows()
        for key in ("data", "seq_len", "n_sequences", "seed"):  # the same text source
            if getattr(cfg.rows, key) == getattr(default, key):
                setattr(cfg.rows, key, built[key] or None if key == "data" else built[key])
        cfg.source.allow_long_context = (cfg.source.allow_long_context
                                         or built.get("allow_long_context", False))  # fmt: skip
    _check_source(cfg)
    if cfg.kind == "nodes" and cfg.options.schedule == "thresholds":
        raise CommandError("--schedule thresholds is for --kind edges")
    if cfg.kind == "edges" and cfg.layers:
        raise CommandError("--layers is for --kind nodes (edges ablate every section)")
    check_number(cfg.options.cutoff, "--cutoff", minimum=0, integer=True)
    check_number(cfg.options.base, "--base", above=1)
    check_number(cfg.options.tolerance, "--tolerance", minimum=0)
    out = Path(cfg.out) if cfg.out else folder.parent / f"ablate-{cfg.kind}"
    check_writable_folder(out, "--out")
    check_unlocked(out)
    return folder


def validate_plot(cfg: PlotConfig) -> Path:
    """Check every flag of ``tyche interaction plot``; returns the graph folder."""
    folder = _graph_folder(cfg.graph)
    check_number(cfg.nodes_per_layer, "--nodes_per_layer", minimum=1, integer=True)
    check_number(cfg.threshold, "--threshold", minimum=0)
    if cfg.threshold > 1:
        raise CommandError("--threshold is a fraction of the largest edge: at most 1")
    check_number(cfg.weight_share, "--weight_share", minimum=0)
    if not 0 < cfg.weight_share <= 1:
        raise CommandError("--weight_share is a share of the edge weight: above 0, at most 1")
    check_number(cfg.max_edges, "--max_edges", minimum=0, integer=True)
    out = Path(cfg.out) if cfg.out else folder.parent / "graph.png"
    if out.suffix.lower() != ".png":
        raise CommandError(f"--out {str(out)!r}: give a .png file")
    check_writable_folder(out.parent, "--out")
    check_new_file(out, "--out", cfg.overwrite, "figure")
    return folder


# ----------------------------------------------------------------------------- sources
