"""The output folders of ``tyche interaction build | ablate``: what each run owns there and
the settings that make its results (see :mod:`tyche.cli.run_folder`)."""

from __future__ import annotations

from typing import Any

from tyche.cli.commandline import flat_settings
from tyche.cli.run_folder import Owned

#: what a build writes in --out (and the ablations it holds by default, made from its graph)
BUILD_OWNED = Owned(
    names=(
        "grams",
        "bases",
        "graph",
        "sections",
        "graph.png",
        "summary.json",
        "ablate-nodes",
        "ablate-edges",
    ),  # fmt: skip
)
#: what an ablation writes in --out: one curve folder per node layer or section, the figure
ABLATE_OWNED = Owned(names=("curves.png",), patterns=("[0-9]*",))
#: flags that change nothing in the results
FREE = ("out", "resume", "overwrite", "plot", "batch_size", "allow_long_context")


def settings(cfg: Any) -> dict[str, Any]:
    """The flags that make a run's results, ``{"--flag": value}``, defaults filled in (the
    embedded options' flags among them, as the command line names them)."""
    return {f"--{k}": v for k, v in flat_settings(cfg).items() if k not in FREE}
