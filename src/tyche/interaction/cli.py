"""``tyche interaction build | ablate | plot``: local interaction graphs from the command line.

Examples::

    tyche interaction build --model zoo:modadd --out runs/modadd-lib            # the paper's
    tyche interaction build --model zoo:modadd --basis svd --out runs/modadd-pca
    tyche interaction ablate --graph runs/modadd-lib --kind nodes --split test
    tyche interaction ablate --graph runs/modadd-lib --kind edges --schedule bisect
    tyche interaction plot --graph runs/modadd-lib --out runs/modadd-lib/graph.png
    tyche interaction build --model zoo:shakespeare-lm --rotate_final --n_stochastic_sources 4
    torchrun --nproc_per_node=2 -m tyche interaction build ...   # rows split over the ranks

``build`` saves its stages under ``--out`` (``grams/``, ``bases/``, ``graph/``, each
safetensors + JSON) and ``--resume`` continues from the last one saved (the settings must
match); ``--stage`` stops early. ``ablate`` saves one curve per node layer or section and
``curves.png``; ``plot`` draws the graph. Every flag is checked before a model is loaded.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tyche.commandline import (
    CommandError,
    best_effort,
    check_number,
    check_readable_text,
    check_writable_folder,
    on_interrupt,
    parse_config,
    resume_command,
    split_list,
)

if TYPE_CHECKING:
    import torch

__all__ = ["AblateConfig", "BuildConfig", "PlotConfig", "main"]

PROG = "tyche interaction"
#: zoo classifiers that bring their own rows and labels (no --data)
CLASS_MODELS = ("zoo:modadd", "zoo:digits-mlp", "zoo:fashion-mlp")
#: integration rules by name (the same as tyche.interaction.integrate.RULES; a test checks)
RULE_NAMES = ("gradient", "trapezoidal", "gauss-legendre")
#: the files each build stage leaves under --out
STAGE_FILES = {"grams": "grams/meta.json", "bases": "bases/meta.json", "edges": "graph/meta.json"}


@dataclass
class SourceConfig:
    """The model and the rows it is run on."""

    model: str = "zoo:modadd"
    """zoo:modadd, zoo:digits-mlp, zoo:fashion-mlp, zoo:shakespeare-lm, zoo:smollm2-135m or a
    local save_pretrained folder of a language model"""
    data: str = ""
    """text for language models: zoo:shakespeare, zoo:stdlib-docs or a UTF-8 text file
    (default: the model's own); the zoo classifiers bring their data"""
    split: Literal["train", "test"] = "train"
    """classifiers: their training or test rows; language models: two disjoint draws"""
    n_rows: int = 0
    """classifiers: use at most this many rows (0: all of the split)"""
    seq_len: int = 64
    """language models: tokens per sequence"""
    n_sequences: int = 16
    """language models: sequences drawn (seeded) from the tokenized text"""
    batch_size: int = 0
    """rows per forward pass (0: all at once)"""
    seed: int = 0
    """seed of the sequence draw and of the stochastic sources"""


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
    stage: Literal["grams", "bases", "edges"] = "edges"
    """stop after this stage (each is saved under --out)"""
    resume: bool = False
    """continue from the stages saved under --out (their settings must match)"""
    out: str = "runs/interaction"
    """output folder: grams/, bases/, graph/, graph.png, summary.json"""
    plot: bool = True
    """draw graph.png"""


@dataclass
class AblateConfig(SourceConfig):
    """Ablate directions (nodes) or edges of a saved graph and measure accuracy and loss.

    Examples:

      tyche interaction ablate --graph runs/modadd-lib --kind nodes
      tyche interaction ablate --graph runs/modadd-lib --kind edges --schedule thresholds
    """

    model: str = ""
    """the model the graph was built on (default: the build's, from its summary.json)"""
    graph: str = "runs/interaction"
    """a build's --out folder, or a saved graph folder"""
    kind: Literal["nodes", "edges"] = "nodes"
    """keep the top directions of each node layer, or the strongest edges of each section"""
    schedule: Literal["exponential", "bisect", "thresholds"] = "exponential"
    """kept counts: every count up to --cutoff then steps of --base; a bisection for the fewest
    within --tolerance; or (edges) the edges above fractions of the largest"""
    layers: str = ""
    """nodes: node layers to ablate, comma separated (default: all with a basis)"""
    cutoff: int = 16
    """exponential schedule: every count up to this"""
    base: float = 1.25
    """exponential schedule: then steps of this factor"""
    tolerance: float = 0.001
    """bisect: accuracy drop allowed against the unablated model"""
    split: Literal["train", "test"] = "test"
    """rows to score on (the paper scores modadd on its test split)"""
    dtype: Literal["float64", "float32"] = "float32"
    """dtype the model runs in"""
    out: str = ""
    """output folder (default: <graph>/ablate-<kind>)"""
    plot: bool = True
    """draw curves.png"""


@dataclass
class PlotConfig:
    """Draw a saved interaction graph as a PNG."""

    graph: str = "runs/interaction"
    """a build's --out folder, or a saved graph folder"""
    out: str = ""
    """PNG file (default: graph.png next to the graph folder)"""
    nodes_per_layer: int = 30
    """features drawn per node layer (the most important)"""
    threshold: float = 0.02
    """leave out edges below this fraction of the largest of their layer pair"""
    norm: Literal["sqrt", "identity"] = "sqrt"
    """edge width from sqrt(E) (undoes the squaring of squared edges) or E"""
    labels: bool = False
    """label every feature (f0, f1, ...)"""
    hide_constant: bool = True
    """leave out the edges of the constant direction"""


# ----------------------------------------------------------------------------- checks
def _check_source(cfg: SourceConfig) -> None:
    """Flags naming the model and its rows, checked without loading anything."""
    from tyche.zoo.catalogue import check_name

    for flag in ("n_rows", "batch_size", "seed"):
        check_number(getattr(cfg, flag), f"--{flag}", minimum=0, integer=True)
    check_number(cfg.seq_len, "--seq_len", minimum=2, integer=True)
    check_number(cfg.n_sequences, "--n_sequences", minimum=1, integer=True)
    if cfg.model in CLASS_MODELS:
        if cfg.data:
            raise CommandError(f"--data does not apply to {cfg.model}, which brings its rows")
        return
    if cfg.model.startswith("zoo:"):
        check_name(cfg.model, kind="model")
    elif not (Path(cfg.model).expanduser() / "config.json").is_file():
        raise CommandError(
            f"--model: {cfg.model!r} is not a save_pretrained folder (no config.json in it); "
            f"give one, or {', '.join(CLASS_MODELS)}, zoo:shakespeare-lm"
        )
    if cfg.n_rows:
        raise CommandError("--n_rows is for the zoo classifiers; use --n_sequences for text")
    if cfg.data.startswith("zoo:"):
        if check_name(cfg.data, kind="data") == "fashion-mnist":
            raise CommandError("--data: zoo:fashion-mnist is image data, not text")
    elif cfg.data:
        check_readable_text(cfg.data, "--data")


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
    parse_integration(cfg.integration)
    for flag in ("n_intervals", "n_stochastic_sources", "n_stochastic_sources_hidden"):
        check_number(getattr(cfg, flag), f"--{flag}", minimum=0, integer=True)
    check_number(cfg.truncation_threshold, "--truncation_threshold", minimum=0)
    if cfg.truncation_threshold >= 1:
        raise CommandError("--truncation_threshold is a fraction of the largest: below 1")
    out = Path(cfg.out).expanduser()
    saved = [s for s, f in STAGE_FILES.items() if (out / f).is_file()]
    if cfg.resume and not saved:
        raise CommandError(f"--resume: no saved stage under {str(out)!r}; run without --resume")
    if saved and not cfg.resume:
        raise CommandError(
            f"--out {str(out)!r} holds a build already (stages {', '.join(saved)}); add --resume "
            "to continue it, or choose another --out"
        )
    check_writable_folder(out, "--out")


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
    if not cfg.model:
        summary = folder.parent / "summary.json"
        if not summary.is_file():
            raise CommandError(f"--model: no {summary} to take the model from; pass --model")
        built = json.loads(summary.read_text())["config"]
        cfg.model = built["model"]
        for key in ("data", "seq_len", "n_sequences", "seed"):  # the same text source
            if getattr(cfg, key) == getattr(SourceConfig, key):
                setattr(cfg, key, built[key])
    _check_source(cfg)
    if cfg.kind == "nodes" and cfg.schedule == "thresholds":
        raise CommandError("--schedule thresholds is for --kind edges")
    if cfg.kind == "edges" and cfg.layers:
        raise CommandError("--layers is for --kind nodes (edges ablate every section)")
    check_number(cfg.cutoff, "--cutoff", minimum=0, integer=True)
    check_number(cfg.base, "--base", above=1)
    check_number(cfg.tolerance, "--tolerance", minimum=0)
    out = Path(cfg.out) if cfg.out else folder.parent / f"ablate-{cfg.kind}"
    check_writable_folder(out, "--out")
    return folder


def validate_plot(cfg: PlotConfig) -> Path:
    """Check every flag of ``tyche interaction plot``; returns the graph folder."""
    folder = _graph_folder(cfg.graph)
    check_number(cfg.nodes_per_layer, "--nodes_per_layer", minimum=1, integer=True)
    check_number(cfg.threshold, "--threshold", minimum=0)
    if cfg.threshold > 1:
        raise CommandError("--threshold is a fraction of the largest edge: at most 1")
    out = Path(cfg.out) if cfg.out else folder.parent / "graph.png"
    if out.suffix.lower() != ".png":
        raise CommandError(f"--out {str(out)!r}: give a .png file")
    check_writable_folder(out.parent, "--out")
    return folder


# ----------------------------------------------------------------------------- sources
def _lm_rows(cfg: SourceConfig, tokenizer: Any, default_data: str | None) -> dict:
    import torch

    from tyche.data import chunk_and_tokenize
    from tyche.zoo import resolve_texts

    spec = cfg.data or default_data or "zoo:shakespeare"
    tokens = chunk_and_tokenize(resolve_texts(spec), tokenizer, max_seq_len=cfg.seq_len)
    n = tokens["input_ids"].shape[0]
    if n < 2 * cfg.n_sequences:
        raise CommandError(
            f"--n_sequences {cfg.n_sequences}: {spec} gives {n} sequences of {cfg.seq_len} "
            f"tokens, and the train and test draws need {2 * cfg.n_sequences}; ask for fewer"
        )
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    half = pick[: cfg.n_sequences] if cfg.split == "train" else pick[-cfg.n_sequences :]
    return {k: v[half.sort().values] for k, v in tokens.items()}


def load_source(cfg: SourceConfig) -> tuple[torch.nn.Module, Any, torch.Tensor | None, list[str]]:
    """``(model, inputs, labels or None, default node layers)`` for ``cfg``."""
    name = cfg.model
    if name == "zoo:modadd":
        from tyche.zoo.modadd import NODE_LAYERS, load_modadd

        model, data = load_modadd()
        x, y = (data.x_train, data.y_train) if cfg.split == "train" else (data.x_test, data.y_test)
        layers = list(NODE_LAYERS)
    elif name == "zoo:digits-mlp":
        from tyche.zoo import load_digits_mlp

        mlp = load_digits_mlp()
        model = mlp.model
        x, y = (mlp.x_train, mlp.y_train) if cfg.split == "train" else (mlp.x_test, mlp.y_test)
        layers = ["0:input", "2:input", "output"]
    elif name == "zoo:fashion-mlp":
        from tyche.zoo.fashion_mlp import NODE_LAYERS, fashion_tensors, load_fashion_mlp

        model = load_fashion_mlp()
        x_tr, y_tr, x_te, y_te = fashion_tensors()
        x, y = (x_tr, y_tr) if cfg.split == "train" else (x_te, y_te)
        layers = list(NODE_LAYERS)
    else:
        from tyche.sites import n_layers
        from tyche.zoo import resolve_model

        zoo = resolve_model(name)
        if zoo.tokenizer is None:
            raise CommandError(
                f"--model {name} has no tokenizer: give a language model or one of "
                f"{', '.join(CLASS_MODELS)}"
            )
        n = n_layers(zoo.model)
        layers = [f"resid_pre.{i}" for i in range(max(0, n - 2), n)] + ["unembed"]
        return zoo.model, _lm_rows(cfg, zoo.tokenizer, zoo.default_data), None, layers
    if cfg.n_rows:
        x, y = x[: cfg.n_rows], y[: cfg.n_rows]
    return model, x, y, layers


# ----------------------------------------------------------------------------- commands
def run_build(cfg: BuildConfig, argv: list[str] | None = None):
    """``tyche interaction build``; returns the graph (or the grams with ``--stage grams``)."""
    validate_build(cfg)
    from tyche.distributed import get_rank, init_distributed, rank0_print
    from tyche.interaction.graph import build_grams, build_interaction_graph, check_settings
    from tyche.interaction.report import graph_summary, summary_table
    from tyche.interaction.result import InteractionGrams, InteractionGraph
    from tyche.io import write_json

    dtypes = _dtypes()
    integration = parse_integration(cfg.integration)
    edges = None if cfg.edges == "none" else cfg.edges
    sources = cfg.n_stochastic_sources or None
    hidden = cfg.n_stochastic_sources_hidden or None
    try:
        check_settings(cfg.basis, edges, cfg.center, integration, cfg.n_intervals,
                       dtypes[cfg.dtype], dtypes[cfg.gram_dtype], cfg.split_over, sources,
                       hidden)  # fmt: skip
    except ValueError as err:
        raise CommandError(f"{err} (see `{PROG} build --help`)") from None
    init_distributed()
    rank0_print("settings: " + json.dumps(asdict(cfg)))
    model, inputs, _, default_layers = load_source(cfg)
    layers = split_list(cfg.node_layers) or default_layers
    out = Path(cfg.out)
    grams = bases = None
    if cfg.resume and (out / STAGE_FILES["bases"]).is_file() and cfg.stage == "edges":
        bases = InteractionGraph.load(out / "bases")
        rank0_print(f"resuming from the bases in {out / 'bases'}")
    elif cfg.resume and (out / STAGE_FILES["grams"]).is_file():
        grams = InteractionGrams.load(out / "grams")
        rank0_print(f"resuming from the grams in {out / 'grams'}")
    common = dict(dtype=dtypes[cfg.dtype], rotate_final=cfg.rotate_final,
                  batch_size=cfg.batch_size or None, gram_dtype=dtypes[cfg.gram_dtype])  # fmt: skip
    if argv is not None:
        on_interrupt(f"finished stages are saved under {out}/; continue with: "
                     f"{resume_command(f'{PROG} build', argv[1:])}")  # fmt: skip
    start = time.perf_counter()
    if grams is None and bases is None:
        grams = build_grams(model, inputs, layers, **common)
        if get_rank() == 0:
            grams.save(out / "grams")
    if cfg.stage == "grams":
        on_interrupt(None)
        rank0_print(f"saved the grams of {grams.node_layers} under {out / 'grams'}")
        return grams
    graph = build_interaction_graph(
        model, inputs, layers, basis=cfg.basis, edges=None if cfg.stage == "bases" else edges,
        integration=integration, n_intervals=cfg.n_intervals, center=cfg.center,
        n_stochastic_sources=sources, n_stochastic_sources_hidden=hidden,
        truncation_threshold=cfg.truncation_threshold, seed=cfg.seed, split=cfg.split_over,
        grams=grams, bases=bases, **common,
    )  # fmt: skip
    on_interrupt(None)
    seconds = time.perf_counter() - start
    if get_rank() == 0:
        if bases is None:
            graph.without_edges().save(out / "bases")
        if graph.has_edges:
            graph.save(out / "graph")
        summary = {"config": asdict(cfg), "seconds": seconds, **graph_summary(graph)}
        best_effort(PROG, "write summary.json",
                    lambda: write_json(out / "summary.json", summary), out)  # fmt: skip
        if cfg.plot and graph.has_edges:
            from tyche.interaction.plot import plot_graph

            best_effort(PROG, "draw graph.png",
                        lambda: print(f"figure: {plot_graph(graph, out / 'graph.png')}"),
                        out)  # fmt: skip
        best_effort(PROG, "print the table", lambda: print(summary_table(graph, seconds)), out)
    return graph


def _dtypes() -> dict[str, torch.dtype]:
    import torch

    return {"float64": torch.float64, "float32": torch.float32}


def run_ablate(cfg: AblateConfig) -> dict:
    """``tyche interaction ablate``; returns ``{where: AblationCurve}``."""
    folder = validate_ablate(cfg)
    from tyche.distributed import get_rank, init_distributed, rank0_print
    from tyche.interaction.ablate import ablate_edges, ablate_nodes
    from tyche.interaction.result import InteractionGraph

    graph = InteractionGraph.load(folder)
    if cfg.kind == "edges" and not graph.has_edges:
        raise CommandError(f"--kind edges: the graph in {folder} has no edges; build it with "
                           "--edges squared")  # fmt: skip
    unknown = [w for w in split_list(cfg.layers) if w not in graph.node_layers]
    if unknown:
        raise CommandError(f"--layers: {', '.join(unknown)} not in the graph's node layers "
                           f"{', '.join(graph.node_layers)}")  # fmt: skip
    init_distributed()
    model, inputs, labels, _ = load_source(cfg)
    kw = dict(schedule=cfg.schedule, cutoff=cfg.cutoff, base=cfg.base, tolerance=cfg.tolerance,
              batch_size=cfg.batch_size or None, dtype=_dtypes()[cfg.dtype])  # fmt: skip
    if cfg.kind == "nodes":
        curves = ablate_nodes(model, graph, inputs, labels, layers=split_list(cfg.layers) or None,
                              **kw)  # fmt: skip
    else:
        curves = ablate_edges(model, graph, inputs, labels, **kw)
    out = Path(cfg.out) if cfg.out else folder.parent / f"ablate-{cfg.kind}"
    if get_rank() == 0:
        for i, curve in enumerate(curves.values()):
            curve.save(out / f"{i}")
        if cfg.plot:
            from tyche.interaction.plot import plot_ablation_curves

            label = graph.settings.get("basis", "graph")

            def draw() -> None:
                print(f"figure: {plot_ablation_curves({label: curves}, out / 'curves.png')}")

            best_effort(PROG, "draw curves.png", draw, out)
    for where, c in curves.items():
        extra = f", fewest within {cfg.tolerance}: {c.n_required}" if c.n_required is not None \
            else ""  # fmt: skip
        rank0_print(f"{where}: baseline accuracy {c.baseline_accuracy:.4f}, loss "
                    f"{c.baseline_loss:.4f}{extra}")  # fmt: skip
        rank0_print("  kept:     " + " ".join(f"{n:>6}" for n in c.n_kept))
        rank0_print("  accuracy: " + " ".join(f"{a:6.3f}" for a in c.accuracy))
    return curves


def run_plot(cfg: PlotConfig):
    """``tyche interaction plot``; returns the PNG path."""
    folder = validate_plot(cfg)
    from tyche.interaction.plot import plot_graph
    from tyche.interaction.result import InteractionGraph

    graph = InteractionGraph.load(folder)
    out = Path(cfg.out) if cfg.out else folder.parent / "graph.png"
    path = plot_graph(graph, out, nodes_per_layer=cfg.nodes_per_layer,
                      threshold=cfg.threshold, norm=cfg.norm, hide_constant=cfg.hide_constant,
                      labels=cfg.labels)  # fmt: skip
    print(f"figure: {path}")
    return path


SUBCOMMANDS = {"build": BuildConfig, "ablate": AblateConfig, "plot": PlotConfig}


def main(argv: list[str]) -> None:
    """``tyche interaction build|ablate|plot [--flags]``."""
    argv = list(argv)
    names = "|".join(SUBCOMMANDS)
    if argv and argv[0] in ("-h", "--help"):
        lines = [f"usage: {PROG} {{{','.join(SUBCOMMANDS)}}} ...", "", "commands:"]
        for name, cls in SUBCOMMANDS.items():
            lines.append(f"  {name:<7} {(cls.__doc__ or '').splitlines()[0]}")
        lines += ["", f"Run `{PROG} <command> --help` for its flags."]
        print("\n".join(lines))
        return
    if not argv or argv[0] not in SUBCOMMANDS:
        got = repr(argv[0]) if argv else "none"
        raise CommandError(f"{PROG} needs a command: {names} (got {got})")
    prog = f"{PROG} {argv[0]}"
    cfg = parse_config(SUBCOMMANDS[argv[0]], argv[1:], prog)
    if isinstance(cfg, BuildConfig):
        run_build(cfg, argv)
    elif isinstance(cfg, AblateConfig):
        run_ablate(cfg)
    else:
        run_plot(cfg)
