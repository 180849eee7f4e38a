"""What ``tyche basin`` prints, writes and draws: summary.json, the table and the plots.

The rows, the table and the summary are built by :mod:`tyche.basin.report` (one `Row` per
preconditioner × subset; a single cutoff without ``--cutoffs``, λ with ``--lambda``), the
figures by :mod:`tyche.basin.plot`; here they are written, printed and drawn, each step's
failure reported, not fatal.
"""

from __future__ import annotations

from pathlib import Path

from tyche.basin.report import Row, results_table, summary_rows
from tyche.cli.commandline import best_effort

__all__ = ["Row", "draw", "finish"]

PROG = "tyche basin"
#: how to get λ with an interval, ending the table's slope line when it was not fitted
LAMBDA_HINT = "--lambda fits it with an interval"


def draw(rows: list[Row], cutoff: float, n_params: int, out: Path) -> None:
    """histogram.png at ``cutoff`` and, over several cutoffs, cutoff_scan.png (with λ fits;
    its D/2 line only when every row has the same D)."""
    from tyche.basin import plot

    at = {row.label: row.curve.at(cutoff) for row in rows}
    plot.plot_histogram(at, out / "histogram.png")
    if rows and len(rows[0].curve) > 1:
        cutoffs = rows[0].curve.cutoffs.tolist()
        by_label = {row.label: list(row.curve.results) for row in rows}
        fits = {row.label: row.lam for row in rows if row.lam is not None}
        same = len({row.curve.n_params for row in rows}) == 1
        plot.plot_cutoff_scan(cutoffs, by_label, n_params if same else None,
                              out / "cutoff_scan.png", fits=fits or None)  # fmt: skip


def finish(rows: list[Row], cutoff: float, out: Path, adapt: int = 0) -> None:
    """summary.json, the table (headed by the --adapt rounds when on), the plots: each one's
    failure is reported, not fatal."""
    from tyche.io import write_json

    n_params = rows[0].curve.n_params if rows else 0
    summary = lambda: write_json(out / "summary.json", summary_rows(rows))  # noqa: E731
    best_effort(PROG, "write summary.json", summary, out)
    heading = (f"--adapt {adapt}: {adapt} round{'s' if adapt > 1 else ''} of adaptive direction "
               "sampling before the estimate\n") if adapt else ""  # fmt: skip
    text = lambda: heading + results_table(rows, n_params, fit_hint=LAMBDA_HINT)  # noqa: E731
    best_effort(PROG, "print the table", lambda: print(text()), out)
    best_effort(PROG, "draw the plots", lambda: draw(rows, cutoff, n_params, out), out)
    print(f"results in {out}/ (one folder per preconditioner and cutoff)")
