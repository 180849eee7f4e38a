"""The causal report (energy and joint tables, the summary) and plot, on hand-made bases."""

from __future__ import annotations

import json

import torch

from tyche.causal import CausalBasis, bases_summary, energy_table, joint_table, plot_energies


def _basis(site: str, energies: list[float], pca: list[float] | None, greedy=None) -> CausalBasis:
    k = len(energies)
    vectors = torch.eye(5, k)
    joint = torch.tensor(energies).cumsum(0) * 0.9
    return CausalBasis(
        vectors=vectors,
        energies=torch.tensor(energies),
        subspace_energies=joint,
        greedy_subspace_energies=None if greedy is None else torch.tensor(greedy),
        site=site,
        n_evals=[4.0] * k,
        seconds=[0.5] * k,
        pca_energies=None if pca is None else torch.tensor(pca),
    )


def _bases() -> dict[str, CausalBasis]:
    return {
        "resid_pre.0": _basis("resid_pre.0", [2.0, 1.0, 0.5], [0.8, 0.4]),
        "resid_pre.10": _basis("resid_pre.10", [0.25], None, greedy=[0.2]),
    }


def test_energy_table_columns_ratio_and_missing_pca():
    lines = energy_table(_bases()).splitlines()
    assert lines[0].split() == ["site", "E1", "E2", "E3", "joint", "PCA", "best", "E1/PCA",
                                "evals/dir", "s/dir"]  # fmt: skip
    first = lines[1].split()
    # E1..E3, the joint energy of all 3 (0.9 × 3.5), the best PCA 0.8, E1/PCA 2.0 / 0.8
    assert first == ["resid_pre.0", "2", "1", "0.5", "3.15", "0.8", "2.50", "4.0", "0.50"]
    second = lines[2].split()
    assert second == ["resid_pre.10", "0.25", "0.225", "-", "-", "4.0", "0.50"]
    assert lines[3].startswith("(energies in nats")
    assert energy_table(_bases(), n_show=1).splitlines()[0].split()[:3] == ["site", "E1", "joint"]


def test_joint_table_greedy_then_refined():
    lines = joint_table(_bases()).splitlines()
    assert lines[0].startswith("joint energy of the first i directions")
    assert lines[1].split(maxsplit=1) == ["resid_pre.0", "-/1.8, -/2.7, -/3.15"]
    assert lines[2].split() == ["resid_pre.10", "0.2/0.225"]


def test_summary_is_json_ready_and_keeps_every_energy():
    bases = _bases()
    summary = bases_summary(bases, 1.25, {"--k": 3}, {"model": "m", "model_hash": "abc"})
    assert list(summary) == ["config", "seconds", "inputs", "sites"]
    back = json.loads(json.dumps(summary))
    assert back["config"] == {"--k": 3} and back["seconds"] == 1.25
    site = back["sites"]["resid_pre.0"]
    assert site["energies"] == bases["resid_pre.0"].energies.tolist()
    assert site["pca_energies"] == bases["resid_pre.0"].pca_energies.tolist()
    assert site["greedy_subspace_energies"] is None and site["n_evals"] == [4.0] * 3
    assert back["sites"]["resid_pre.10"]["pca_energies"] is None
    assert "inputs" not in bases_summary(bases, 1.0, {})


def test_plot_energies_writes_a_png_that_opens(tmp_path):
    from matplotlib.image import imread

    path = plot_energies(_bases(), tmp_path / "energies.png")
    assert path == tmp_path / "energies.png"
    height, width, _ = imread(path).shape
    assert height > 100 and width > 300  # the site panels and the summary panel side by side


def test_energy_plot_ranks_are_whole_numbers(tmp_path, monkeypatch):
    """A site with one direction: matplotlib's default ticks would be 0.96, 0.98, 1.00, ..."""
    from figure_checks import assert_count_axis, capture_figures

    from tyche.causal import plot

    figures = capture_figures(monkeypatch, plot)
    plot_energies(_bases(), tmp_path / "energies.png")
    for ax in figures[0].axes[:2]:
        assert ax.get_xlabel() == "direction"
        assert_count_axis(ax.xaxis)
