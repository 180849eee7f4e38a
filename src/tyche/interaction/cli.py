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
``curves.png``; ``plot`` draws the graph.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import simple_parsing
import torch

__all__ = ["AblateConfig", "BuildConfig", "PlotConfig", "main"]

CLASS_MODELS = ("zoo:modadd", "zoo:digits-mlp", "zoo:fashion-mlp")
DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class SourceConfig:
    """The model and the rows it is run on."""

    model: str = "zoo:modadd"
    """zoo:modadd, zoo:digits-mlp, zoo:fashion-mlp, zoo:shakespeare-lm, zoo:smollm2-135m or a
    local HF model folder"""
    data: str = ""
    """text for language models: zoo:shakespeare, zoo:stdlib-docs or a .txt file (default: the
    model's own); not used by the classifiers, which bring their data"""
    split: Literal["train", "test"] = "train"
    """classifiers: their training or test rows; language models: two disjoint draws"""
    n_rows: int = 0
    """use at most this many rows (0: all of the split; language models: --n_sequences)"""
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
    """Build the local interaction graph of a model (grams -> bases -> edges)."""

    node_layers: str = ""
    """site patterns, comma separated, in forward order; 'output' for the logits (default: the
    paper's for zoo:modadd, the hidden layers for MLPs, the last residual sites for LMs)"""
    basis: Literal["jacobian", "(1-0)*alpha", "(1-alpha)^2", "svd", "neuron"] = "jacobian"
    """basis formula (svd: PCA, neuron: identity)"""
    edges: Literal["squared", "functional", "none"] = "squared"
    """edge formula, or none for bases only"""
    integration: str = "gradient"
    """gradient, trapezoidal or gauss-legendre, or per layer: 'prefix=rule,prefix=rule'"""
    n_intervals: int = 0
    """intervals of the trapezoidal / gauss-legendre rule"""
    center: bool = True
    """centre the bases (the constant direction first); false for the neuron basis"""
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
    """Ablate directions (nodes) or edges of a saved graph and measure accuracy and loss."""

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
    """PNG file (default: <graph>/graph.png)"""
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


# ----------------------------------------------------------------------------- sources
def _lm_rows(cfg: SourceConfig, tokenizer: Any, default_data: str | None) -> dict:
    from tyche.data import chunk_and_tokenize
    from tyche.zoo import resolve_texts

    spec = cfg.data or default_data or "zoo:shakespeare"
    tokens = chunk_and_tokenize(resolve_texts(spec), tokenizer, max_seq_len=cfg.seq_len)
    n = tokens["input_ids"].shape[0]
    if n < 2 * cfg.n_sequences:
        raise ValueError(f"{spec} gives {n} sequences of {cfg.seq_len} tokens; ask for fewer")
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
            raise ValueError(f"{name} has no tokenizer: give a language model or {CLASS_MODELS}")
        n = n_layers(zoo.model)
        layers = [f"resid_pre.{i}" for i in range(max(0, n - 2), n)] + ["unembed"]
        return zoo.model, _lm_rows(cfg, zoo.tokenizer, zoo.default_data), None, layers
    if cfg.n_rows:
        x, y = x[: cfg.n_rows], y[: cfg.n_rows]
    return model, x, y, layers


def _patterns(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _integration(text: str) -> str | dict[str, str]:
    if "=" not in text:
        return text
    pairs = [p.split("=", 1) for p in _patterns(text)]
    return {k.strip(): v.strip() for k, v in pairs}


def _graph_folder(path: str) -> Path:
    root = Path(path)
    for candidate in (root / "graph", root):
        if (candidate / "meta.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"no saved graph in {root} (looked for {root / 'graph'} and {root}); run "
        "`tyche interaction build --out FOLDER` first"
    )


# ----------------------------------------------------------------------------- commands
def run_build(cfg: BuildConfig):
    """``tyche interaction build``; returns the graph (or the grams with ``--stage grams``)."""
    from tyche.distributed import get_rank, rank0_print
    from tyche.interaction import InteractionGrams, InteractionGraph, build_grams
    from tyche.interaction.graph import build_interaction_graph, check_settings

    integration = _integration(cfg.integration)
    edges = None if cfg.edges == "none" else cfg.edges
    sources = cfg.n_stochastic_sources or None
    hidden = cfg.n_stochastic_sources_hidden or None
    check_settings(cfg.basis, edges, cfg.center, integration, cfg.n_intervals,
                   DTYPES[cfg.dtype], DTYPES[cfg.gram_dtype], cfg.split_over, sources,
                   hidden)  # fmt: skip
    model, inputs, _, default_layers = load_source(cfg)
    layers = _patterns(cfg.node_layers) or default_layers
    out = Path(cfg.out)
    grams = bases = None
    if cfg.resume and (out / "bases" / "meta.json").is_file() and cfg.stage == "edges":
        bases = InteractionGraph.load(out / "bases")
        rank0_print(f"resuming from the bases in {out / 'bases'}")
    elif cfg.resume and (out / "grams" / "meta.json").is_file():
        grams = InteractionGrams.load(out / "grams")
        rank0_print(f"resuming from the grams in {out / 'grams'}")
    common = dict(dtype=DTYPES[cfg.dtype], rotate_final=cfg.rotate_final,
                  batch_size=cfg.batch_size or None, gram_dtype=DTYPES[cfg.gram_dtype])  # fmt: skip
    start = time.perf_counter()
    if grams is None and bases is None:
        grams = build_grams(model, inputs, layers, **common)
        if get_rank() == 0:
            grams.save(out / "grams")
    if cfg.stage == "grams":
        rank0_print(f"saved the grams of {grams.node_layers} under {out / 'grams'}")
        return grams
    graph = build_interaction_graph(
        model, inputs, layers, basis=cfg.basis, edges=None if cfg.stage == "bases" else edges,
        integration=integration, n_intervals=cfg.n_intervals, center=cfg.center,
        n_stochastic_sources=sources, n_stochastic_sources_hidden=hidden,
        truncation_threshold=cfg.truncation_threshold, seed=cfg.seed, split=cfg.split_over,
        grams=grams, bases=bases, **common,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if get_rank() == 0:
        if bases is None:
            graph.without_edges().save(out / "bases")
        if graph.has_edges:
            graph.save(out / "graph")
        summary = {"config": asdict(cfg), "seconds": seconds, **graph_summary(graph)}
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        if cfg.plot and graph.has_edges:
            from tyche.interaction.plot import plot_graph

            rank0_print(f"figure: {plot_graph(graph, out / 'graph.png')}")
    rank0_print(summary_table(graph, seconds))
    return graph


def graph_summary(graph) -> dict:  # noqa: ANN001
    """Per node layer: width, kept directions, top Lambda; per section: edge concentration."""
    layers = []
    for basis in graph.bases:
        imp = basis.importance
        layers.append({"node_layer": basis.node_layer, "orig_dim": basis.orig_dim,
                       "kept": basis.dim, "top_importance": None if imp is None else
                       imp[: min(8, len(imp))].tolist()})  # fmt: skip
    sections = [{"edges": list(e.shape), "edges_for_90pct": graph.edge_weight_concentration(i),
                 "edges_for_99pct": graph.edge_weight_concentration(i, 0.99)}
                for i, e in enumerate(graph.edges)]  # fmt: skip
    return {"layers": layers, "sections": sections, "stage_seconds": graph.seconds}


def summary_table(graph, seconds: float) -> str:  # noqa: ANN001
    """A text table of the graph: kept directions per layer, edge concentration per section."""
    lines = [f"{'node layer':<24} {'width':>6} {'kept':>6}  top importance"]
    for basis in graph.bases:
        imp = basis.importance
        top = "-" if imp is None else " ".join(f"{v:.3g}" for v in imp[:4].tolist())
        lines.append(f"{basis.node_layer:<24} {basis.orig_dim:>6} {basis.dim:>6}  {top}")
    for i, e in enumerate(graph.edges):
        lines.append(f"edges {graph.node_layers[i]} -> {graph.node_layers[i + 1]}: "
                     f"{e.numel()} edges, 90% of the weight in "
                     f"{graph.edge_weight_concentration(i)}, 99% in "
                     f"{graph.edge_weight_concentration(i, 0.99)}")  # fmt: skip
    lines.append(
        f"({graph.settings.get('basis')} basis, {seconds:.1f} s; stages "
        + ", ".join(f"{k} {v:.1f} s" for k, v in graph.seconds.items())
        + ")"
    )
    return "\n".join(lines)


def run_ablate(cfg: AblateConfig) -> dict:
    """``tyche interaction ablate``; returns ``{where: AblationCurve}``."""
    from tyche.distributed import get_rank, rank0_print
    from tyche.interaction import InteractionGraph, ablate_edges, ablate_nodes

    folder = _graph_folder(cfg.graph)  # before loading a model: a missing graph fails fast
    graph = InteractionGraph.load(folder)
    if not cfg.model:
        summary = folder.parent / "summary.json"
        if not summary.is_file():
            raise ValueError(f"no {summary} to take the model from: pass --model")
        built = json.loads(summary.read_text())["config"]
        cfg.model = built["model"]
        for key in ("data", "seq_len", "n_sequences", "seed"):  # the same text source
            if getattr(cfg, key) == getattr(SourceConfig, key):
                setattr(cfg, key, built[key])
    if cfg.kind == "edges" and not graph.has_edges:
        raise ValueError(f"the graph in {folder} has no edges; build it with --edges squared")
    if cfg.kind == "nodes" and cfg.schedule == "thresholds":
        raise ValueError("--schedule thresholds is for --kind edges")
    model, inputs, labels, _ = load_source(cfg)
    kw = dict(schedule=cfg.schedule, cutoff=cfg.cutoff, base=cfg.base, tolerance=cfg.tolerance,
              batch_size=cfg.batch_size or None, dtype=DTYPES[cfg.dtype])  # fmt: skip
    if cfg.kind == "nodes":
        curves = ablate_nodes(model, graph, inputs, labels, layers=_patterns(cfg.layers) or None,
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
            rank0_print(f"figure: {plot_ablation_curves({label: curves}, out / 'curves.png')}")
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
    from tyche.interaction import InteractionGraph
    from tyche.interaction.plot import plot_graph

    folder = _graph_folder(cfg.graph)
    graph = InteractionGraph.load(folder)
    out = Path(cfg.out) if cfg.out else folder.parent / "graph.png"
    path = plot_graph(graph, out, nodes_per_layer=cfg.nodes_per_layer,
                      threshold=cfg.threshold, norm=cfg.norm, hide_constant=cfg.hide_constant,
                      labels=cfg.labels)  # fmt: skip
    print(f"figure: {path}")
    return path


COMMANDS = {"build": (BuildConfig, run_build), "ablate": (AblateConfig, run_ablate),
            "plot": (PlotConfig, run_plot)}  # fmt: skip


def main(argv: list[str]) -> None:
    """``tyche interaction build|ablate|plot [--flags]``."""
    from tyche.distributed import init_distributed

    argv = list(argv)
    if not argv or argv[0] not in COMMANDS:
        names = "|".join(COMMANDS)
        if argv and argv[0] in ("-h", "--help"):
            print(f"usage: tyche interaction {{{names}}} [--flags]   (--help after a command)")
            return
        raise ValueError(f"tyche interaction needs a command: {names} (got {argv[:1] or 'none'})")
    config_type, run = COMMANDS[argv[0]]
    cfg = simple_parsing.parse(config_type, args=argv[1:], prog=f"tyche interaction {argv[0]}",
                               description=config_type.__doc__)  # fmt: skip
    init_distributed()
    run(cfg)
