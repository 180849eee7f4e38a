"""`tyche interaction build | ablate | plot` end to end; every flag is used and checked."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from conftest import Run, cli
from tyche.__main__ import main
from tyche.cli.commandline import parse_config
from tyche.cli.interaction import BuildConfig, run_build
from tyche.interaction import AblationCurve, InteractionGrams, InteractionGraph


def _assert_one_line_error(run: Run, pattern: str) -> None:
    import re

    assert run.code == 2, (run.code, run.err)
    lines = [line for line in run.err.splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and "Traceback" not in run.err, run.err
    assert lines[0].startswith("tyche interaction: error: "), lines[0]
    assert re.search(pattern, lines[0]), (pattern, lines[0])


def _graph(out) -> InteractionGraph:  # noqa: ANN001
    return InteractionGraph.load(out / "graph")


def test_build_on_the_digits_mlp(tmp_path, capsys) -> None:
    out = tmp_path / "lib"
    main(["interaction", "build", "--model", "zoo:digits-mlp", "--n_rows", "300",
          "--batch_size", "128", "--out", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert "90% of the weight in" in text and "jacobian basis" in text
    graph = _graph(out)
    assert graph.node_layers == ["0:input", "2:input", "output"]
    assert graph.settings["n_rows"] == 300 and graph.settings["batch_size"] == 128
    assert InteractionGrams.load(out / "grams").counts[0] == 300
    assert not InteractionGraph.load(out / "bases").has_edges
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sections"][0]["edges_for_90pct"] == graph.edge_weight_concentration(0)
    assert (out / "graph.png").stat().st_size > 5000


def test_build_flags_reach_the_builder(tmp_path) -> None:
    out = tmp_path / "flags"
    main(["interaction", "build", "--model", "zoo:digits-mlp", "--split", "test",
          "--n_rows", "120", "--node_layers", "0:input,1:input,2:input",
          "--basis", "(1-alpha)^2", "--edges", "functional",
          "--integration", "0=trapezoidal,1=gauss-legendre", "--n_intervals", "2",
          "--dtype", "float32", "--gram_dtype", "float32", "--rotate_final",
          "--truncation_threshold", "1e-5", "--seed", "3", "--no-plot",
          "--out", str(out)])  # fmt: skip
    graph = _graph(out)
    s = graph.settings
    assert graph.node_layers == ["0:input", "1:input", "2:input"]
    assert (s["basis"], s["edges"], s["n_intervals"]) == ("(1-alpha)^2", "functional", 2)
    assert s["integration"] == {"0": "trapezoidal", "1": "gauss-legendre"}
    assert (s["dtype"], s["gram_dtype"]) == ("torch.float32", "torch.float32")
    assert s["rotate_final"] and graph.bases[-1].C is not None and s["seed"] == 3
    assert s["truncation_threshold"] == 1e-5 and s["n_rows"] == 120
    assert not (out / "graph.png").exists()
    # the test split: 773 rows exist, the first 120 were used
    assert InteractionGrams.load(out / "grams").counts[0] == 120
    # --edges none: bases only; --center false with the neuron basis
    main(["interaction", "build", "--model", "zoo:digits-mlp", "--n_rows", "100",
          "--basis", "neuron", "--no-center", "--edges", "none",
          "--out", str(tmp_path / "neuron")])  # fmt: skip
    neuron = InteractionGraph.load(tmp_path / "neuron" / "bases")
    assert neuron.settings["basis"] == "neuron" and not neuron.settings["center"]
    assert not (tmp_path / "neuron" / "graph").exists()


def test_stages_resume_and_sources(tmp_path, capsys) -> None:
    out = tmp_path / "staged"
    args = ["interaction", "build", "--model", "zoo:digits-mlp", "--n_rows", "200",
            "--out", str(out)]  # fmt: skip
    main([*args, "--stage", "grams"])
    assert (out / "grams").is_dir() and not (out / "bases").exists()
    main([*args, "--stage", "bases", "--resume"])
    assert "resuming from the grams" in capsys.readouterr().out
    assert not (out / "graph").exists()
    main([*args, "--resume"])
    assert "resuming from the bases" in capsys.readouterr().out
    main([*args, "--out", str(tmp_path / "whole")])
    staged, whole = _graph(out), _graph(tmp_path / "whole")
    for a, b in zip(staged.edges, whole.edges):
        # the same sums; the one-pass build reuses its gradients, the staged one recomputes
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14 * a.abs().max())
    run = cli(capsys, *args, "--resume", "--no-center")
    _assert_one_line_error(run, "other settings")
    # stochastic sources and the outputs split (one process: the same as the data split)
    main([*args, "--n_stochastic_sources", "2", "--n_stochastic_sources_hidden", "3",
          "--split_over", "outputs", "--out", str(tmp_path / "sources")])  # fmt: skip
    sources = _graph(tmp_path / "sources").settings
    assert (sources["n_stochastic_sources"], sources["n_stochastic_sources_hidden"]) == (2, 3)
    assert sources["split"] == "outputs"


def test_ctrl_c_keeps_the_finished_sections(tmp_path, capsys, monkeypatch) -> None:
    """Ctrl-C in the bases stage keeps the sections finished; --resume computes the rest."""
    import tyche.interaction.graph as graph_module

    out = tmp_path / "run"
    args = ["interaction", "build", "--model", "zoo:digits-mlp", "--n_rows", "100",
            "--node_layers", "0:input,1:input,2:input,output", "--no-plot"]  # fmt: skip
    whole = cli(capsys, *args, "--out", str(tmp_path / "whole"))
    assert whole.code == 0 and not (tmp_path / "whole" / "sections").exists()
    inner, calls = graph_module.lib_moments, []

    def ctrl_c_in_the_second_section(*a, **k):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 2 and stop:
            raise KeyboardInterrupt
        return inner(*a, **k)

    monkeypatch.setattr(graph_module, "lib_moments", ctrl_c_in_the_second_section)
    stop = True
    run = cli(capsys, *args, "--out", str(out))
    assert run.code == 130, run.err
    assert f"finished sections under {out / 'sections'}/; continue with: " in run.err
    assert run.err.rstrip().endswith("--resume")
    assert sorted(p.name for p in (out / "sections").iterdir()) == ["section-2"]
    stop, calls[:] = False, []
    run = cli(capsys, *args, "--out", str(out), "--resume")
    assert run.code == 0, run.err
    assert "resuming from the grams" in run.out
    assert f"resuming from the finished sections 2 (2:input -> output) in {out}" in run.out
    assert len(calls) == 2  # sections 1 and 0; section 2 was not computed again
    assert not (out / "sections").exists()  # the graph holds them all now
    a, b = _graph(out), _graph(tmp_path / "whole")
    for x, y in zip(a.edges, b.edges):
        assert torch.equal(x, y)  # same path: the same sums on the same rows, bit for bit


def test_ablate_and_plot(tmp_path, capsys) -> None:
    out = tmp_path / "g"
    main(["interaction", "build", "--model", "zoo:digits-mlp", "--n_rows", "300",
          "--out", str(out)])  # fmt: skip
    main(["interaction", "ablate", "--graph", str(out), "--kind", "nodes", "--model",
          "zoo:digits-mlp", "--layers", "2:input", "--cutoff", "2", "--base", "4",
          "--n_rows", "200", "--dtype", "float64", "--out", str(tmp_path / "nodes")])  # fmt: skip
    curve = AblationCurve.load(tmp_path / "nodes" / "0")
    assert curve.where == "2:input" and curve.n_kept[:3] == [0, 1, 2]
    assert curve.n_kept[3] == 8 and curve.n_kept[-1] == 65  # 2 * 4, then the full width
    assert curve.settings["base"] == 4 and (tmp_path / "nodes" / "curves.png").is_file()
    main(["interaction", "ablate", "--graph", str(out / "graph"), "--kind", "edges",
          "--schedule", "bisect", "--tolerance", "0.05", "--split", "train",
          "--n_rows", "200", "--no-plot"])  # fmt: skip
    text = capsys.readouterr().out
    assert "fewest within 0.05" in text
    edges = AblationCurve.load(out / "ablate-edges" / "1")
    assert edges.schedule == "bisect" and edges.n_required is not None
    assert not (out / "ablate-edges" / "curves.png").exists()
    main(["interaction", "ablate", "--graph", str(out), "--kind", "edges", "--schedule",
          "thresholds", "--n_rows", "100", "--out", str(tmp_path / "thr")])  # fmt: skip
    assert AblationCurve.load(tmp_path / "thr" / "0").schedule == "thresholds"
    png = tmp_path / "p.png"
    main(["interaction", "plot", "--graph", str(out), "--out", str(png), "--labels",
          "--nodes_per_layer", "6", "--threshold", "0.1", "--norm", "identity",
          "--no-hide_constant"])  # fmt: skip
    assert png.stat().st_size > 5000
    main(["interaction", "plot", "--graph", str(out), "--overwrite"])  # the build drew one
    assert (out / "graph.png").is_file()


def test_a_local_language_model_folder(tmp_path, gpt2_model, tiny_tokenizer, tiny_texts) -> None:
    folder = tmp_path / "lm"
    gpt2_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(tiny_texts * 4))
    out = tmp_path / "run"
    main(["interaction", "build", "--model", str(folder), "--data", str(text),
          "--seq_len", "8", "--n_sequences", "3", "--rotate_final",
          "--n_stochastic_sources", "2", "--out", str(out)])  # fmt: skip
    graph = _graph(out)
    assert graph.node_layers == ["resid_pre.0", "resid_pre.1", "unembed"]
    assert graph.n_positions[0] == 3 * 8
    main(["interaction", "ablate", "--graph", str(out), "--model", str(folder), "--data",
          str(text), "--seq_len", "8", "--n_sequences", "3", "--cutoff", "1", "--base", "16",
          "--no-plot"])  # fmt: skip
    curve = AblationCurve.load(out / "ablate-nodes" / "0")
    assert 0 <= curve.baseline_accuracy <= 1 and curve.n_kept[-1] == 65
    with pytest.raises(ValueError, match="--n_sequences 500: .* ask for fewer"):
        argv = ["--model", str(folder), "--data", str(text), "--seq_len", "8",
                "--n_sequences", "500", "--out", str(tmp_path / "many")]  # fmt: skip
        run_build(parse_config(BuildConfig, argv, "build"))


# ----------------------------------------------------------------------------- bad input
#: (arguments, what the one-line error must say); none of these loads a model
FLAG_ERRORS = [
    (["draw"], r"unknown sub-command 'draw'; tyche interaction needs a command: build\|ablate"),
    ([], r"needs a command"),
    (["build", "--basis", "pca"], r"--basis: invalid choice: 'pca'"),
    (["build", "--no-such-flag"], r"unrecognized arguments: --no-such-flag"),
    (["build", "--n_rows", "-1"], r"--n_rows must be at least 0"),
    (["build", "--batch_size", "many"], r"--batch_size.*'many' is not an integer"),
    (["build", "--seq_len", "1", "--model", "zoo:shakespeare-lm"], r"--seq_len must be at least 2"),
    (["build", "--n_sequences", "0"], r"--n_sequences must be at least 1"),
    (["build", "--model", "zoo:nope"], r"unknown zoo model 'nope'; known: digits-mlp"),
    (["build", "--model", "zoo:shakespeare"], r"unknown zoo model 'shakespeare'"),
    (["build", "--model", "/nonexistent/folder"], r"--model: no folder '/nonexistent/folder'"),
    (["build", "--data", "zoo:shakespeare"], r"--data does not apply to zoo:modadd"),
    (["build", "--model", "zoo:shakespeare-lm", "--data", "zoo:fashion-mnist"], r"image data"),
    (["build", "--model", "zoo:shakespeare-lm", "--data", "/no/file.txt"], r"--data: no file"),
    (["build", "--model", "zoo:shakespeare-lm", "--n_rows", "5"], r"use --n_sequences"),
    (["build", "--node_layers", "unembed"], r"--node_layers 'unembed': give at least two"),
    (["build", "--integration", "simpson"], r"--integration: unknown rule 'simpson'"),
    (["build", "--integration", "a=gradient,b"], r"--integration: 'b' is not 'node_layer=rule'"),
    (["build", "--integration", "a=gradient,a=trapezoidal"], r"--integration names 'a' twice"),
    (["build", "--integration", ","], r"--integration is empty"),
    (["build", "--n_intervals", "-2"], r"--n_intervals must be at least 0"),
    (["build", "--n_stochastic_sources", "-1"], r"--n_stochastic_sources must be at least 0"),
    (["build", "--n_stochastic_sources_hidden", "-1"], r"--n_stochastic_sources_hidden must"),
    (["build", "--truncation_threshold", "2"], r"--truncation_threshold .* below 1"),
    (["build", "--truncation_threshold", "nan"], r"--truncation_threshold.*not a finite"),
    (["build", "--basis", "neuron"], r"cannot be centred"),
    (["build", "--basis", "(1-alpha)^2"], r"integrates over alpha"),
    (["build", "--n_stochastic_sources_hidden", "2", "--basis", "svd"], r"only applies to the"),
    (["build", "--edges", "functional", "--n_stochastic_sources", "2"], r"functional edges are"),
    (["build", "--out", "/proc/tyche-cannot-write"], r"--out: cannot write to"),
    (["ablate", "--graph", "/nonexistent"], r"--graph: no saved graph in '/nonexistent'"),
    (["plot", "--graph", "/nonexistent"], r"--graph: no saved graph"),
    (["ablate", "--kind", "nodes", "--schedule", "thresholds"], r"thresholds is for --kind edges"),
    (["ablate", "--kind", "edges", "--layers", "unembed"], r"--layers is for --kind nodes"),
    (["ablate", "--base", "1"], r"--base must be greater than 1"),
    (["ablate", "--cutoff", "-1"], r"--cutoff must be at least 0"),
    (["ablate", "--tolerance", "-0.1"], r"--tolerance must be at least 0"),
    (["ablate", "--model", "zoo:nope"], r"unknown zoo model 'nope'"),
    (["plot", "--nodes_per_layer", "0"], r"--nodes_per_layer must be at least 1"),
    (["plot", "--threshold", "1.5"], r"--threshold is a fraction .* at most 1"),
    (["plot", "--weight_share", "0"], r"--weight_share is a share .* above 0, at most 1"),
    (["plot", "--weight_share", "1.2"], r"--weight_share is a share .* above 0, at most 1"),
    (["plot", "--max_edges", "-1"], r"--max_edges must be at least 0"),
    (["plot", "--out", "graph.pdf"], r"give a .png file"),
    (["plot", "--norm", "log"], r"--norm: invalid choice: 'log'"),
]


@pytest.fixture(scope="module")
def saved_graph(tmp_path_factory) -> str:
    """A tiny saved build (digits MLP, 60 rows) for the checks that need a graph folder."""
    out = tmp_path_factory.mktemp("saved") / "g"
    main(["interaction", "build", "--model", "zoo:digits-mlp", "--n_rows", "60", "--no-plot",
          "--out", str(out)])  # fmt: skip
    return str(out)


@pytest.mark.parametrize(
    "args,pattern", FLAG_ERRORS, ids=lambda x: " ".join(x) if isinstance(x, list) else ""
)
def test_flag_errors_are_one_line_before_loading(args, pattern, saved_graph, capsys, monkeypatch,
                                                 tmp_path) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    if args[:1] in (["ablate"], ["plot"]) and "--graph" not in args:
        args = [*args, "--graph", saved_graph]

    def no_loading(*_a, **_k):  # a flag error must come before any model is loaded
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("tyche.cli.interaction.load_source", no_loading)
    run = cli(capsys, "interaction", *args)
    _assert_one_line_error(run, pattern)


def test_plot_draws_the_edges_its_flags_choose(saved_graph, tmp_path, capsys,
                                               monkeypatch) -> None:  # fmt: skip
    from figure_checks import capture_figures

    from tyche.interaction import plot

    figures = capture_figures(monkeypatch, plot)
    png = tmp_path / "few.png"
    run = cli(capsys, "interaction", "plot", "--graph", saved_graph, "--out", str(png),
              "--max_edges", "3", "--weight_share", "1")  # fmt: skip
    assert run.code == 0 and png.is_file(), run.err
    (ax,) = figures[0].axes
    (lines,) = ax.collections[:1]
    n_pairs = len(InteractionGraph.load(f"{saved_graph}/graph").edges)
    assert len(lines.get_segments()) == 3 * n_pairs
    assert f"{3 * n_pairs} strongest of" in ax.get_title()
    run = cli(capsys, "interaction", "plot", "--graph", saved_graph, "--out",
              str(tmp_path / "all.png"), "--max_edges", "0", "--weight_share", "1")  # fmt: skip
    assert run.code == 0 and len(figures[1].axes[0].collections[0].get_segments()) > 3 * n_pairs


def test_resume_and_leftover_builds(tmp_path, capsys, saved_graph) -> None:
    import shutil

    run = cli(capsys, "interaction", "build", "--out", saved_graph)
    _assert_one_line_error(run, r"holds a finished run of other settings: --model \(saved "
                                r"zoo:digits-mlp, now zoo:modadd\)")  # fmt: skip
    leftover = tmp_path / "leftover"  # an interrupted build: its record says unfinished
    shutil.copytree(saved_graph, leftover)
    record = json.loads((leftover / "run.json").read_text())
    (leftover / "run.json").write_text(json.dumps({**record, "finished": False}))
    run = cli(capsys, "interaction", "build", "--out", str(leftover))
    _assert_one_line_error(run, r"holds a build already \(stages grams, bases, edges\); add "
                                r"--resume")  # fmt: skip
    # resuming it with other data is refused by name (it would mix two builds' stages)
    run = cli(capsys, "interaction", "build", "--resume", "--out", str(leftover), "--model",
              "zoo:digits-mlp", "--n_rows", "60", "--no-plot", "--seed", "5")  # fmt: skip
    _assert_one_line_error(run, r"--resume: the build in --out .* was made with other "
                                r"settings: --seed \(saved 0, now 5\)")  # fmt: skip
    run = cli(capsys, "interaction", "build", "--resume", "--out", str(tmp_path / "empty"))
    _assert_one_line_error(run, r"--resume: no saved stage under")
    # --layers naming a node layer the graph lacks: after the (cheap) graph load, no model
    run = cli(capsys, "interaction", "ablate", "--graph", saved_graph, "--layers", "9:input")
    _assert_one_line_error(run, r"--layers: 9:input not in the graph's node layers 0:input")


def test_ablate_without_edges_and_no_summary(tmp_path, capsys, saved_graph) -> None:
    import shutil
    from pathlib import Path

    bases = tmp_path / "only" / "bases"  # a bases folder with no build's summary.json above it
    shutil.copytree(Path(saved_graph) / "bases", bases)
    run = cli(capsys, "interaction", "ablate", "--graph", str(bases), "--kind", "edges",
               "--model", "zoo:digits-mlp", "--out", str(tmp_path / "a"))  # fmt: skip
    _assert_one_line_error(run, r"--kind edges: the graph in .* has no edges")
    run = cli(capsys, "interaction", "ablate", "--graph", str(bases))
    _assert_one_line_error(run, r"--model: no .*summary.json to take the model from")


def test_help_and_rules(capsys) -> None:
    from tyche.cli.interaction import RULE_NAMES, SUBCOMMANDS
    from tyche.interaction.integrate import RULES

    assert RULE_NAMES == RULES
    for name in SUBCOMMANDS:
        run = cli(capsys, "interaction", name, "--help")
        assert run.code == 0 and "Config" not in run.out and "(default: None)" not in run.out
        assert "--plot, --no-plot" in run.out or name == "plot"
    top = cli(capsys, "interaction", "--help")
    assert top.code == 0 and "build" in top.out and "ablate" in top.out


def test_real_process_prints_one_line_fast(tmp_path) -> None:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tyche", "interaction", "build", "--n_intervals",
                           "-1"], capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    seconds = time.perf_counter() - start
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--n_intervals must be at least 0" in proc.stderr
    assert seconds < 5.0  # flag errors come before torch is imported
