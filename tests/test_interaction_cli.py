"""`tyche interaction build | ablate | plot` end to end; every flag is used and checked."""

from __future__ import annotations

import json

import pytest
import torch

from tyche.__main__ import main
from tyche.interaction import AblationCurve, InteractionGrams, InteractionGraph


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
          "--truncation_threshold", "1e-5", "--seed", "3", "--plot", "false",
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
          "--basis", "neuron", "--center", "false", "--edges", "none",
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
    with pytest.raises(ValueError, match="other settings"):
        main([*args, "--resume", "--center", "false"])
    # stochastic sources and the outputs split (one process: the same as the data split)
    main([*args, "--n_stochastic_sources", "2", "--n_stochastic_sources_hidden", "3",
          "--split_over", "outputs", "--out", str(tmp_path / "sources")])  # fmt: skip
    sources = _graph(tmp_path / "sources").settings
    assert (sources["n_stochastic_sources"], sources["n_stochastic_sources_hidden"]) == (2, 3)
    assert sources["split"] == "outputs"


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
          "--n_rows", "200", "--plot", "false"])  # fmt: skip
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
          "--hide_constant", "false"])  # fmt: skip
    assert png.stat().st_size > 5000
    main(["interaction", "plot", "--graph", str(out)])
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
          "--plot", "false"])  # fmt: skip
    curve = AblationCurve.load(out / "ablate-nodes" / "0")
    assert 0 <= curve.baseline_accuracy <= 1 and curve.n_kept[-1] == 65


def test_bad_options_fail_before_the_model_loads(tmp_path) -> None:
    with pytest.raises(ValueError, match="cannot be centred"):
        main(["interaction", "build", "--model", "zoo:nothing", "--basis", "neuron"])
    with pytest.raises(ValueError, match="integrates over alpha"):
        main(["interaction", "build", "--model", "zoo:nothing", "--basis", "(1-alpha)^2"])
    with pytest.raises(FileNotFoundError, match="no saved graph"):
        main(["interaction", "ablate", "--graph", str(tmp_path / "none")])
    with pytest.raises(ValueError, match="needs a command"):
        main(["interaction", "draw"])
    with pytest.raises(SystemExit):
        main(["interaction", "build", "--basis", "pca"])
