"""The figure helpers of every method's ``plot`` module: matplotlib on the Agg backend (no
screen needed) and saving a figure as a PNG. The figures themselves live with their method."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: matplotlib is slow)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def integer_ticks(axis: Any) -> None:
    """Put the ticks of a count axis (``ax.xaxis`` or ``ax.yaxis``, linear) on whole numbers."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def log_count_ticks(axis: Any, top: float, zero: bool = False) -> None:
    """Label a log (or, with ``zero``, symlog from 0) count axis at whole numbers only.

    Ticks at 1, 2, 5, 10, 20, 50, 100 while the largest count ``top`` is at most 100, else at
    1, 10, 100, ...; 0 first with ``zero``; minor ticks unlabelled. No fractional, negative or
    ``3 × 10^0`` labels appear.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    subs = (1, 2, 5) if top <= 100 else (1,)
    ticks = [0] if zero else []
    for exponent in range(int(math.log10(max(top, 1.0))) + 1):
        ticks += [m * 10**exponent for m in subs if m * 10**exponent <= max(top, 1.0)]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    axis.set_minor_formatter(NullFormatter())


def tick_label(value: float) -> str:
    """A short tick label for a log axis: ``1e-5``, ``2.5e-3``, ``1e-1``, ``3``, ``1e4``."""
    if value == 0 or 1 <= abs(value) < 1e4:
        return f"{value:g}"
    exponent = math.floor(math.log10(abs(value)))
    mantissa = f"{value / 10**exponent:.3g}"
    if mantissa in ("10", "-10"):  # 9.9996e-3 rounds up a decade
        mantissa, exponent = mantissa[:-1], exponent + 1
    return f"{mantissa}e{exponent}"


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as an image at ``path`` (folders made as needed), close it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return path
