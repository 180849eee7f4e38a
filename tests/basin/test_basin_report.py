"""The basin report (results table, summary rows) and plots, on a curve whose slope is known."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from tyche.basin import learning_coefficient, plot_cutoff_scan, plot_histogram, results_table
from tyche.basin.core import estimate_basin
from tyche.basin.options import BasinOptions
from tyche.basin.report import Row, summary_rows

CUTOFFS = [1e-3, 1e-2, 1e-1]
DIM = 6


@pytest.fixture(scope="module")
def curve():
    """A pure quadratic in 6 dimensions under a uniform prior: every ray's radius grows as
    sqrt(cutoff), so log P against ln(cutoff) has slope exactly D/2 = 3."""

    def loss(off: torch.Tensor) -> torch.Tensor:
        return (off.double() ** 2).sum(-1)

    options = BasinOptions(cutoffs=CUTOFFS, n_samples=6, prior="uniform", seed=0)
    return estimate_basin(loss, torch.zeros(DIM, dtype=torch.float64), options, progress=False)


def _image(path):
    from matplotlib.image import imread

    return imread(path)


def test_results_table_rows_and_the_slope_line(curve):
    rows = [Row("none", None, curve, 1.5)]
    text = results_table(rows, DIM, fit_hint="fit it with λ")
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["preconditioner", "cutoff", "log"]
    body = [line for line in lines[2:] if line.startswith("none")]
    assert len(body) == len(CUTOFFS)
    for line, res in zip(body, curve.results):
        assert f"{res.log_prob:,.1f}" in line and line.rstrip().endswith("1.5")
    assert "each direction is searched once for all 3 cutoffs" in text
    # the quadratic's slope is D/2; the radius search's rtol 1e-2 moves it by far less than 0.5
    assert lines[-1] == (
        "slope of log P against ln(cutoff) at the smallest cutoffs: 3 (D/2 = 3); fit it with λ"
    )
    assert results_table(rows, DIM).splitlines()[-1].endswith("(D/2 = 3)")


def test_results_table_with_subsets_and_a_fit(curve):
    lam = learning_coefficient(curve)
    rows = [Row("none", "all", curve, 1.0, lam), Row("adam", "label=3", curve, 2.0, lam)]
    text = results_table(rows, DIM)
    assert "subset" in text.splitlines()[0]
    assert f"adam label=3: {lam.describe()}" in text and "slope of log P" not in text
    summary = summary_rows(rows)
    assert len(summary) == 2 * len(CUTOFFS)
    first = summary[0]
    assert (first["preconditioner"], first["subset"], first["cutoff"]) == ("none", "all", 1e-3)
    assert first["curve_cutoffs"] == len(CUTOFFS) and first["seconds"] == 1.0
    assert first["lambda"] == lam.value and first["lambda_ci"] == [lam.ci_low, lam.ci_high]
    assert not any(key.endswith("_") for row in summary for key in row)


def test_plots_write_pngs_that_open(curve, tmp_path):
    # an isotropic quadratic gives every direction the same estimate (up to rounding): the
    # histogram draws one bar instead of failing to make 5 bins of a zero-width range
    at = curve.at(1e-2)
    assert float(at.estimates.max() - at.estimates.min()) < 1e-6 * abs(at.log_prob)
    hist = plot_histogram({"none": at}, tmp_path / "a" / "histogram.png")
    assert hist == tmp_path / "a" / "histogram.png" and _image(hist).ndim == 3
    spread = replace(
        at, estimates=at.estimates + torch.linspace(-2.0, 2.0, 6, dtype=at.estimates.dtype)
    )
    assert _image(plot_histogram({"none": at, "spread": spread}, tmp_path / "h2.png")).ndim == 3
    lam = learning_coefficient(curve)
    scan = plot_cutoff_scan(CUTOFFS, {"none": list(curve.results)}, DIM,
                            tmp_path / "scan.png", fits={"none": lam})  # fmt: skip
    height, width, _ = _image(scan).shape
    assert height > 100 and width > 100 and math.isfinite(lam.value)


def test_cutoff_scan_reads_at_a_glance(curve, tmp_path, monkeypatch):
    """The x axis is the cutoff on a log scale, labelled at the cutoffs (1e-3 ... 1e-1, not
    ln values), and the legend lies outside the axes, so it covers none of the data."""
    from figure_checks import capture_figures, legend_clear_of_axes, tick_labels

    from tyche.basin import plot

    figures = capture_figures(monkeypatch, plot)
    plot_cutoff_scan(CUTOFFS, {"none": list(curve.results)}, DIM, tmp_path / "scan.png",
                     fits={"none": learning_coefficient(curve)})  # fmt: skip
    (ax,) = figures[0].axes
    assert ax.get_xscale() == "log"
    assert tick_labels(ax.xaxis) == ["1e-3", "1e-2", "1e-1"]
    assert "cutoff" in ax.get_xlabel() and "ln" not in ax.get_xlabel()
    assert legend_clear_of_axes(ax)


def test_histogram_names_its_cutoff_and_counts_in_whole_numbers(curve, tmp_path, monkeypatch):
    """Six directions in five bins, at most 2 a bin: matplotlib's default ticks would be 0,
    0.25, 0.5, ..."""
    from figure_checks import assert_count_axis, capture_figures, legend_clear_of_axes

    from tyche.basin import plot

    at = curve.at(1e-2)
    spread = replace(
        at, estimates=at.estimates + torch.linspace(-2.0, 2.0, 6, dtype=at.estimates.dtype)
    )
    figures = capture_figures(monkeypatch, plot)
    shifted = replace(spread, estimates=spread.estimates + 10.0)
    plot_histogram({"none": spread, "adam": shifted}, tmp_path / "hist.png")
    (ax,) = figures[0].axes
    assert "KL cutoff 1e-2 nats" in ax.get_title()
    assert_count_axis(ax.yaxis)
    assert legend_clear_of_axes(ax)
