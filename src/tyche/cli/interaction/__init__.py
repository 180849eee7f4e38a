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
match); within the bases and edges stages each finished section is saved under
``sections/`` as soon as it is done, so a resumed build computes only the sections not
finished (the folder is removed once the stage's result is saved); ``--stage`` stops
early. ``ablate`` saves one curve per node layer or section and ``curves.png``; ``plot``
draws the graph. Every flag is checked before a model is loaded.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from tyche.cli.commandline import (
    CommandError,
    Subcommand,
    best_effort,
    flat_settings,
    on_interrupt,
    resume_command,
    route,
    split_list,
)
from tyche.cli.inputs import Rows
from tyche.cli.interaction.flags import (
    PROG,
    RULE_NAMES,
    STAGE_FILES,
    AblateConfig,
    BuildConfig,
    PlotConfig,
    SourceConfig,
    validate_ablate,
    validate_build,
    validate_plot,
)
from tyche.cli.interaction.folders import ABLATE_OWNED, BUILD_OWNED, settings
from tyche.cli.run_folder import claim_folder

if TYPE_CHECKING:
    import torch

#: the folder under --out where the bases and edges stages save each finished section
SECTIONS_DIR = "sections"

__all__ = ["RULE_NAMES", "AblateConfig", "BuildConfig", "PlotConfig", "main", "run_build"]


class Source(NamedTuple):
    """What a build or an ablation runs on: the model, its inputs (a classifier's rows ``(N,
    ...)`` or a token dict ``(N, T)``), the labels (None for text), the default node layers
    and the JSON record of the inputs (the model's hash; ``input_ids_sha256`` for text)."""

    model: torch.nn.Module
    inputs: Any
    labels: torch.Tensor | None
    layers: list[str]
    record: dict[str, Any]


def _lm_rows(cfg: SourceConfig, tokenizer: Any, default_data: str | None) -> Rows:
    """The train draw, or the held-out test draw, of ``--n_sequences`` rows of the text."""
    n = cfg.rows.n_sequences
    rows = cfg.rows.load(tokenizer, default_data, held_out=n)  # the two draws need 2n rows
    if cfg.split == "test":  # the held-out end of the same permutation
        return Rows(rows.held_out, None, rows.available, rows.data)
    return Rows(rows.tokens, None, rows.available, rows.data)


def load_source(cfg: SourceConfig) -> Source:
    """The model, its rows and labels, its default node layers and the record of its inputs."""
    from tyche.io import model_hash

    name = cfg.source.model
    if name == "zoo:modadd":
        from tyche.zoo.modadd import NODE_LAYERS, load_modadd

        model, data = load_modadd()
        x, y = (data.x_train, data.y_train) if cfg.split == "train" else (data.x_test, data.y_test)
        layers = list(NODE_LAYERS)
    elif name in ("zoo:digits-mlp", "zoo:digits-mlp-poisoned"):
        from tyche.zoo import load_digits_mlp

        mlp = load_digits_mlp(poisoned=name == "zoo:digits-mlp-poisoned")
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

        zoo = cfg.source.load(cfg.rows.seq_len)
        n = n_layers(zoo.model)
        layers = [f"resid_pre.{i}" for i in range(max(0, n - 2), n)] + ["unembed"]
        rows = _lm_rows(cfg, zoo.tokenizer, zoo.default_data)
        record = {"model": name, "model_hash": model_hash(zoo.model), "split": cfg.split,
                  **rows.record(cfg.rows)}  # fmt: skip
        return Source(zoo.model, rows.tokens, None, layers, record)
    if cfg.n_rows:
        x, y = x[: cfg.n_rows], y[: cfg.n_rows]
    record = {"model": name, "model_hash": model_hash(model), "split": cfg.split,
              "n_rows": len(x), "inputs_sha256": model_hash({"x": x, "y": y})}  # fmt: skip
    return Source(model, x, y, layers, record)


# ----------------------------------------------------------------------------- commands
def run_build(cfg: BuildConfig, argv: list[str] | None = None):
    """``tyche interaction build``; returns the graph (or the grams with ``--stage grams``)."""
    validate_build(cfg)
    _check_build_settings(cfg)
    with claim_folder(cfg.out, f"{PROG} build", settings(cfg), BUILD_OWNED,
                      overwrite=cfg.overwrite, resume=cfg.resume):  # fmt: skip
        return _build(cfg, argv)


def _check_build_settings(cfg: BuildConfig) -> None:
    """The builder's own check of the combination of settings (before --out is claimed): the
    library's options are made, and their checks run, from the flags."""
    try:
        cfg.options.library(cfg.batch_size, cfg.rows.seed)
    except ValueError as err:
        raise CommandError(f"{_in_flags(str(err))} (see `{PROG} build --help`)") from None


#: the builder's words for its settings (keywords) -> the flags of ``tyche interaction build``
_FLAG_WORDS = {
    "center=False": "give --no-center",
    "integration='trapezoidal' or 'gauss-legendre' with n_intervals > 0":
        "--integration trapezoidal or gauss-legendre with --n_intervals above 0",
    "n_stochastic_sources_hidden": "--n_stochastic_sources_hidden",
    "n_stochastic_sources": "--n_stochastic_sources",
    "n_intervals": "--n_intervals",
    "use squared": "use --edges squared",
}  # fmt: skip
_KEYWORDS = re.compile("|".join(rf"(?<![-\w]){re.escape(k)}(?!\w)" for k in _FLAG_WORDS))


def _in_flags(message: str) -> str:
    """A message of :func:`tyche.interaction.graph.check_settings` in the command's flags."""
    return _KEYWORDS.sub(lambda m: _FLAG_WORDS[m.group(0)], message)


def _build(cfg: BuildConfig, argv: list[str] | None):
    """:func:`run_build` once its flags are checked and its --out is claimed."""
    from tyche.distributed import get_rank, init_distributed, rank0_print
    from tyche.interaction.graph import build_grams, build_interaction_graph
    from tyche.interaction.report import graph_summary, summary_table
    from tyche.interaction.result import InteractionGrams, InteractionGraph
    from tyche.io import write_json

    options = cfg.options.library(cfg.batch_size, cfg.rows.seed, edges=cfg.stage != "bases")
    init_distributed()
    rank0_print("settings: " + json.dumps(flat_settings(cfg)))
    model, inputs, _, default_layers, record = load_source(cfg)
    layers = split_list(cfg.node_layers) or default_layers
    out = Path(cfg.out)
    sections = out / SECTIONS_DIR
    grams = bases = None
    if cfg.resume and (out / STAGE_FILES["bases"]).is_file() and cfg.stage == "edges":
        bases = InteractionGraph.load(out / "bases")
        rank0_print(f"resuming from the bases in {out / 'bases'}")
    elif cfg.resume and (out / STAGE_FILES["grams"]).is_file():
        grams = InteractionGrams.load(out / "grams")
        rank0_print(f"resuming from the grams in {out / 'grams'}")
    if argv is not None:
        on_interrupt(f"finished stages are saved under {out}/ and finished sections under "
                     f"{sections}/; continue with: "
                     f"{resume_command(f'{PROG} build', argv[1:])}")  # fmt: skip
    start = time.perf_counter()
    if grams is None and bases is None:
        grams = build_grams(model, inputs, layers, options)
        if get_rank() == 0:
            grams.save(out / "grams")
    if cfg.stage == "grams":
        on_interrupt(None)
        rank0_print(f"saved the grams of {grams.node_layers} under {out / 'grams'}")
        return grams
    graph = build_interaction_graph(model, inputs, layers, options, grams=grams, bases=bases,
                                    checkpoint=sections, resume=cfg.resume)  # fmt: skip
    on_interrupt(None)
    seconds = time.perf_counter() - start
    if get_rank() == 0:
        if bases is None:
            graph.without_edges().save(out / "bases")
        if graph.has_edges:
            graph.save(out / "graph")
        shutil.rmtree(sections, ignore_errors=True)  # the stage's result holds them all now
        summary = {"config": flat_settings(cfg), "seconds": seconds, "inputs": record,
                   **graph_summary(graph)}
        best_effort(PROG, "write summary.json",
                    lambda: write_json(out / "summary.json", summary), out)  # fmt: skip
        if cfg.plot and graph.has_edges:
            from tyche.interaction.plot import plot_graph

            best_effort(PROG, "draw graph.png",
                        lambda: print(f"figure: {plot_graph(graph, out / 'graph.png')}"),
                        out)  # fmt: skip
        best_effort(PROG, "print the table", lambda: print(summary_table(graph, seconds)), out)
    return graph


def run_ablate(cfg: AblateConfig) -> dict:
    """``tyche interaction ablate``; returns ``{where: AblationCurve}``."""
    folder = validate_ablate(cfg)
    from tyche.interaction.result import InteractionGraph

    graph = InteractionGraph.load(folder)
    if cfg.kind == "edges" and not graph.has_edges:
        raise CommandError(f"--kind edges: the graph in {folder} has no edges; build it with "
                           "--edges squared")  # fmt: skip
    unknown = [w for w in split_list(cfg.layers) if w not in graph.node_layers]
    if unknown:
        raise CommandError(f"--layers: {', '.join(unknown)} not in the graph's node layers "
                           f"{', '.join(graph.node_layers)}")  # fmt: skip
    out = Path(cfg.out) if cfg.out else folder.parent / f"ablate-{cfg.kind}"
    with claim_folder(out, f"{PROG} ablate", settings(cfg), ABLATE_OWNED,
                      overwrite=cfg.overwrite):  # fmt: skip
        return _ablate(cfg, graph, out)


def _ablate(cfg: AblateConfig, graph: Any, out: Path) -> dict:
    """:func:`run_ablate` in its claimed --out."""
    from tyche.distributed import get_rank, init_distributed, rank0_print
    from tyche.interaction.ablate import ablate_edges, ablate_nodes

    init_distributed()
    model, inputs, labels, _, _ = load_source(cfg)
    options = cfg.options.library(cfg.batch_size)
    if cfg.kind == "nodes":
        curves = ablate_nodes(model, graph, inputs, labels, options,
                              layers=split_list(cfg.layers) or None)  # fmt: skip
    else:
        curves = ablate_edges(model, graph, inputs, labels, options)
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
        extra = "" if c.n_required is None else \
            f", fewest within {cfg.options.tolerance}: {c.n_required}"  # fmt: skip
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
                      weight_share=cfg.weight_share, max_edges=cfg.max_edges or None,
                      threshold=cfg.threshold, norm=cfg.norm, hide_constant=cfg.hide_constant,
                      labels=cfg.labels)  # fmt: skip
    print(f"figure: {path}")
    return path


SUBCOMMANDS = {
    "build": Subcommand(BuildConfig, lambda cfg, argv: run_build(cfg, ["build", *argv])),
    "ablate": Subcommand(AblateConfig, lambda cfg, argv: run_ablate(cfg)),
    "plot": Subcommand(PlotConfig, lambda cfg, argv: run_plot(cfg)),
}


def main(argv: list[str]) -> Any:
    """``tyche interaction build|ablate|plot [--flags]``."""
    return route(PROG, SUBCOMMANDS, argv)
