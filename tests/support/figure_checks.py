"""Read a figure back as a reader sees it: the tick labels drawn, where the legend lies.

:func:`capture_figures` patches a plot module's ``save_figure`` so the test keeps each figure
(drawn, so tick labels are final) after the PNG is written.
"""

from __future__ import annotations

import re
from typing import Any

import pytest


def capture_figures(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[Any]:
    """Figures that ``module`` saves from now on, drawn, in order (the PNGs are still written)."""
    figures: list[Any] = []
    original = module.save_figure

    def keep(fig: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        fig.canvas.draw()
        figures.append(fig)
        return original(fig, path, *args, **kwargs)

    monkeypatch.setattr(module, "save_figure", keep)
    return figures


def tick_labels(axis: Any) -> list[str]:
    """The non-empty major tick labels drawn on ``axis`` (inside its view limits)."""
    lo, hi = sorted(axis.get_view_interval())
    span = (hi - lo) * 1e-9
    return [t.label1.get_text() for t in axis.get_major_ticks()
            if t.label1.get_visible() and t.label1.get_text()
            and lo - span <= t.get_loc() <= hi + span]  # fmt: skip


def label_value(text: str) -> float:
    """The number a tick label shows: ``1,000``, ``−2``, ``0.5``, ``$\\mathdefault{10^{-1}}$``."""
    plain = text.replace("\u2212", "-").replace(",", "").replace("$", "")
    plain = plain.replace("\\mathdefault{", "").replace("}", "").replace("{", "")
    power = re.fullmatch(r"(?:([-\d.]+)\\times)?10\^([-\d]+)", plain)
    if power:
        return float(power.group(1) or 1) * 10.0 ** int(power.group(2))
    return float(plain)


def assert_count_axis(axis: Any) -> None:
    """Every drawn tick label of a count axis is a whole number, none negative."""
    labels = tick_labels(axis)
    assert labels, "the count axis has no tick labels"
    values = [label_value(text) for text in labels]
    bad = [t for t, v in zip(labels, values) if v < 0 or v != round(v)]
    assert not bad, f"fractional or negative ticks on a count axis: {bad} (all: {labels})"


def bboxes_overlap(a: Any, b: Any) -> bool:
    """Whether two display-space Bboxes share any area."""
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def legend_clear_of_axes(ax: Any) -> bool:
    """The legend of ``ax`` lies wholly outside the axes' data area."""
    legend = ax.get_legend()
    assert legend is not None, "the axes have no legend"
    return not bboxes_overlap(legend.get_window_extent(), ax.get_window_extent())
