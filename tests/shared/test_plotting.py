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
    assert defined == {"pyplot", "save_figure"}


def test_save_figure_makes_folders_and_closes_the_figure(tmp_path):
    from matplotlib.image import imread

    plt = plotting.pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = plotting.save_figure(fig, tmp_path / "deep" / "er" / "line.png")
    assert path == tmp_path / "deep" / "er" / "line.png" and imread(path).ndim == 3
    assert fig.number not in plt.get_fignums()
