"""The settings of a build and of an ablation as objects: checked when made, taken whole, the
same on the command line (``GraphFlags`` / ``AblationFlags``) as in the library."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_interaction_graph import MLP_LAYERS, TinyMLP, mlp_data

from conftest import cli, one_line_error
from tyche.cli.commandline import parse_config
from tyche.cli.interaction.flags import AblateConfig, AblationFlags, BuildConfig, GraphFlags
from tyche.cli.interaction.folders import settings
from tyche.errors import InputError
from tyche.interaction import (
    AblationOptions,
    GraphOptions,
    ablate_edges,
    ablate_nodes,
    build_interaction_graph,
)

#: the keys a graph records (a resumed build compares them): as before the options existed
GRAPH_SETTINGS = {
    "node_layers", "basis", "edges", "integration", "n_intervals", "center", "dtype",
    "rotate_final", "n_stochastic_sources", "n_stochastic_sources_hidden",
    "truncation_threshold", "gram_dtype", "seed", "split", "n_rows", "batch_size", "inputs",
}  # fmt: skip


# ----------------------------------------------------------------------------- GraphOptions
BAD_GRAPH = [
    ({"truncation_threshold": 1.0}, r"truncation_threshold is a fraction .* \[0, 1\), got 1.0"),
    ({"truncation_threshold": -1e-3}, r"truncation_threshold .* got -0.001"),
    ({"truncation_threshold": math.nan}, r"truncation_threshold .* got nan"),
    ({"batch_size": 0}, r"batch_size must be >= 1 or None, got 0"),
    ({"cache_gb": -1.0}, r"cache_gb must be >= 0"),
    ({"dtype": torch.int64}, r"dtype must be a floating dtype \(or None\), got torch.int64"),
    ({"dtype": "float64"}, r"dtype must be a floating dtype \(or None\), got 'float64'"),
    ({"gram_dtype": torch.float16}, r"gram_dtype must be torch.float64 or torch.float32"),
    ({"center": "yes"}, r"center must be True or False, got 'yes'"),
    ({"check_cuts": None}, r"check_cuts must be True or False"),
    ({"integration": 3}, r"integration must be a rule name or a dict, got int"),
    ({"integration": {"layers.1": "simpson"}}, r"unknown integration rule 'simpson'"),
    ({"integration": "gradient", "n_intervals": 2}, r"n_intervals must be 0"),
    ({"n_intervals": 1.5, "integration": "trapezoidal"}, r"n_intervals must be an int"),
    ({"seed": 1.5}, r"seed must be an int, got 1.5"),
    ({"n_stochastic_sources": 0}, r"n_stochastic_sources must be a positive int or None"),
    ({"n_stochastic_sources_hidden": True}, r"n_stochastic_sources_hidden must be a positive"),
    ({"split": "rows"}, r"split must be 'data' or 'outputs', got 'rows'"),
    ({"basis": "pca"}, r"unknown basis 'pca'"),
    ({"edges": "none"}, r"unknown edges 'none'"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_GRAPH, ids=lambda x: str(x)[:40])
def test_graph_options_refuse_a_bad_field_by_name(fields: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        GraphOptions(**fields)


def test_graph_options_are_frozen_and_keep_their_own_rules() -> None:
    rules = {"layers.1": "trapezoidal", "layers.2": "gauss-legendre"}
    options = GraphOptions(integration=rules, n_intervals=2)
    rules["layers.1"] = "simpson"  # the caller's dict changes; the options do not
    assert options.integration == {"layers.1": "trapezoidal", "layers.2": "gauss-legendre"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.basis = "svd"  # type: ignore[misc]


def test_the_build_takes_options_whole_and_records_the_same_settings() -> None:
    model, x = TinyMLP(), mlp_data()
    with pytest.raises(InputError, match=r"options must be a GraphOptions \(or None\), got dict"):
        build_interaction_graph(model, x, MLP_LAYERS, {"basis": "svd"}, progress=False)
    graph = build_interaction_graph(model, x, MLP_LAYERS, GraphOptions(basis="svd", seed=3),
                                    progress=False)  # fmt: skip
    assert set(graph.settings) == GRAPH_SETTINGS
    assert (graph.settings["basis"], graph.settings["seed"]) == ("svd", 3)
    assert graph.settings["dtype"] == "torch.float64" and graph.settings["split"] == "data"


# ----------------------------------------------------------------------------- AblationOptions
BAD_ABLATION = [
    ({"schedule": "linear"}, r"unknown schedule 'linear'; choose 'exponential', 'bisect' or"),
    ({"cutoff": -1}, r"cutoff must be an int >= 0, got -1"),
    ({"base": 1.0}, r"base must be > 1, got 1.0"),
    ({"tolerance": -0.1}, r"tolerance must be a number >= 0 or None, got -0.1"),
    ({"thresholds": "0.1"}, r"thresholds must be fractions >= 0"),
    ({"thresholds": (0.1, -1.0)}, r"thresholds must be fractions >= 0"),
    ({"batch_size": 0}, r"batch_size must be >= 1 or None"),
    ({"dtype": torch.int32}, r"dtype must be a floating dtype"),
    ({"group_chunk": 0}, r"group_chunk must be a positive int, got 0"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_ABLATION, ids=lambda x: str(x)[:40])
def test_ablation_options_refuse_a_bad_field_by_name(fields: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        AblationOptions(**fields)


def test_unset_schedule_and_tolerance_take_each_functions_default() -> None:
    """None (and ``AblationOptions()``) keep the defaults each function had: nodes
    exponential with tolerance 0.01, edges bisect with tolerance 0.001."""
    model, x = TinyMLP(), mlp_data()[:60]
    y = torch.randint(0, 3, (60,), generator=torch.Generator().manual_seed(0))
    graph = build_interaction_graph(model, x, MLP_LAYERS, progress=False)
    for options in (None, AblationOptions()):
        nodes = ablate_nodes(model, graph, x, y, options, layers=["layers.2:input"],
                             progress=False)["layers.2:input"]  # fmt: skip
        assert (nodes.schedule, nodes.settings["tolerance"]) == ("exponential", 0.01)
        edges = ablate_edges(model, graph, x, y, options, sections=[1], progress=False)
        edge = edges["layers.2:input -> output"]
        assert (edge.schedule, edge.settings["tolerance"]) == ("bisect", 0.001)
        assert edge.settings["thresholds"] == list(AblationOptions().thresholds)
    with pytest.raises(InputError, match=r"options must be an AblationOptions"):
        ablate_nodes(model, graph, x, y, {"cutoff": 2}, progress=False)


# ----------------------------------------------------------------------------- the CLI's words
def test_graph_flags_say_the_library_options() -> None:
    cfg = parse_config(BuildConfig, ["--edges", "none", "--n_stochastic_sources", "3",
                                     "--dtype", "float32", "--split_over", "outputs",
                                     "--integration", "layers.1=trapezoidal,layers.2=gradient",
                                     "--n_intervals", "2", "--batch_size", "4", "--seed", "7",
                                     "--no-center", "--basis", "svd"], "t")  # fmt: skip
    assert cfg.options.library(cfg.batch_size, cfg.rows.seed) == GraphOptions(
        basis="svd", edges=None, center=False, n_stochastic_sources=3, dtype=torch.float32,
        split="outputs", integration={"layers.1": "trapezoidal", "layers.2": "gradient"},
        n_intervals=2, batch_size=4, seed=7,
    )  # fmt: skip
    # the command's defaults are the library's (0 sources and batch size 0: None)
    assert GraphFlags().library(0, 0) == GraphOptions()
    assert GraphFlags().library(0, 0, edges=False) == GraphOptions(edges=None)
    # every flag but --split_over is a field of the library's options, of the same name
    library = {f.name for f in dataclasses.fields(GraphOptions)}
    assert {f.name for f in dataclasses.fields(GraphFlags)} - library == {"split_over"}
    assert library - {f.name for f in dataclasses.fields(GraphFlags)} == {
        "batch_size", "seed", "split", "cache_gb", "check_cuts",
    }  # fmt: skip


def test_ablation_flags_say_the_library_options() -> None:
    cfg = parse_config(AblateConfig, ["--schedule", "bisect", "--cutoff", "3", "--base", "2",
                                      "--tolerance", "0.02", "--dtype", "float64",
                                      "--batch_size", "8"], "t")  # fmt: skip
    assert cfg.options.library(cfg.batch_size) == AblationOptions(
        schedule="bisect", cutoff=3, base=2.0, tolerance=0.02, dtype=torch.float64, batch_size=8
    )
    # the command's own defaults: exponential and 0.001 for both kinds, float32
    assert AblationFlags().library(0) == AblationOptions(
        schedule="exponential", tolerance=0.001, dtype=torch.float32
    )
    library = {f.name for f in dataclasses.fields(AblationOptions)}
    assert {f.name for f in dataclasses.fields(AblationFlags)} <= library


def test_recorded_settings_name_the_flags_flat() -> None:
    """run.json records ``{"--flag": value}`` for the embedded options' flags too, as before
    they were grouped (a resumed build compares them)."""
    build = settings(parse_config(BuildConfig, ["--basis", "svd"], "t"))
    assert build["--basis"] == "svd" and build["--split_over"] == "data"
    assert "--options" not in build and "--dtype" in build and "--truncation_threshold" in build
    ablate = settings(parse_config(AblateConfig, ["--tolerance", "0.02"], "t"))
    assert ablate["--tolerance"] == 0.02 and ablate["--schedule"] == "exponential"
    assert "--options" not in ablate


def test_a_rule_without_intervals_given_some_is_refused_before_out_is_claimed(tmp_path, capsys):
    """The builder's options are made from the flags before --out is claimed or a model is
    loaded, so their checks speak in flags and leave nothing in --out."""
    out = tmp_path / "g"
    run = cli(capsys, "interaction", "build", "--n_intervals", "2", "--out", str(out))
    one_line_error(run, "interaction", r"so --n_intervals must be 0 \(got 2\)")
    assert not out.exists() or not any(out.iterdir())  # --out checked writable, not claimed
