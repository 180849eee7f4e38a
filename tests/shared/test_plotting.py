"""The shared plotting module holds the figure helpers only; figures live with their method."""

from __future__ import annotations

import inspect

from tyche import plotting


def test_plotting_defines_only_the_figure_helpers():
    defined = {
        name
        for name, value in vars(plotting).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == plotting.__name__
    }
    assert defined == {"pyplot", "save_figure", "integer_ticks", "log_count_ticks", "tick_label"}


def test_tick_labels_of_cutoffs_and_counts():
    assert [plotting.tick_label(c) for c in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)] == [
        "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"]  # fmt: skip
    assert [plotting.tick_label(c) for c in (2.5e-3, 0.5, 3.0, 1e4, 9.99996e-3)] == [
        "2.5e-3", "5e-1", "3", "1e4", "1e-2"]  # fmt: skip
    plt = plotting.pyplot()
    fig, ax = plt.subplots()
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, 70)
    plotting.log_count_ticks(ax.xaxis, 65, zero=True)
    assert list(ax.xaxis.get_majorticklocs()) == [0, 1, 2, 5, 10, 20, 50]
    plotting.log_count_ticks(ax.xaxis, 5000)
    assert list(ax.xaxis.get_majorticklocs()) == [1, 10, 100, 1000]
    plt.close(fig)


def test_save_figure_makes_folders_and_closes_the_figure(tmp_path):
    from matplotlib.image import imread

    plt = plotting.pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = plotting.save_figure(fig, tmp_path / "deep" / "er" / "line.png")
    assert path == tmp_path / "deep" / "er" / "line.png" and imread(path).ndim == 3
    assert fig.number not in plt.get_fignums()
