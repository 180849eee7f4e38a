"""``tyche codebook <command>``: train, cache, search, intervene on, steer and browse codebooks.

Examples::

    tyche codebook train --model zoo:shakespeare-lm --sites 'attn_heads.*,mlp_out.*' \\
        --num_codes 512 --k 4 --steps 600 --out runs/cb-shakespeare
    tyche codebook cache --model runs/cb-shakespeare --out runs/cb-cache
    tyche codebook search --cache runs/cb-cache --pattern '\\bking\\b'
    tyche codebook topics --cache runs/cb-cache --word king     # codes of the rows with "king"
    tyche codebook intervene --cache runs/cb-cache --prompt 'My' --topic 'attn_heads.0/h1:3,...'
    tyche codebook contexts --cache runs/cb-cache --site mlp_out.1 --code 42
    tyche codebook intervene --model runs/cb-shakespeare --prompt 'To be' --force mlp_out.1:42
    tyche codebook steer --cache runs/cb-cache --words king,love,blood,death
    tyche codebook tokfsm --model zoo:tokfsm
    tyche codebook app --cache runs/cb-cache
    torchrun --nproc_per_node=2 -m tyche codebook train ...   # batches split over processes
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tyche.cli.codebook.args import (
    AppConfig,
    CacheConfig,
    CodebookTrainConfig,
    ContextsConfig,
    InterveneConfig,
    SearchConfig,
    SteerConfig,
    TokFSMEvalConfig,
    TopicsConfig,
)
from tyche.cli.codebook.checks import check_args
from tyche.cli.codebook.folders import claim
from tyche.cli.codebook.tools import (
    run_app,
    run_cache,
    run_contexts,
    run_intervene,
    run_search,
    run_steer,
    run_tokfsm,
    run_topics,
)
from tyche.cli.codebook.train import PROG, run_train
from tyche.cli.commandline import Subcommand, route

__all__ = ["COMMANDS", "main"]

def _checked(name: str, runner: Callable[..., Any], with_argv: bool = False) -> Subcommand:
    """Sub-command ``name``: its flags checked (nothing loaded), its output folder claimed
    (lock and record), then ``runner``; ``train`` also starts torchrun's process group."""

    def run(args: Any, argv: list[str]) -> Any:
        check_args(args)
        with claim(name, args):  # the output folder's lock and record, before any model loads
            if not with_argv:
                return runner(args)
            from tyche.distributed import init_distributed

            init_distributed()
            return runner(args, argv)

    return Subcommand(CONFIGS[name][0], run, CONFIGS[name][1])


#: sub-command -> (its flags, the line --help lists it with)
CONFIGS: dict[str, tuple[type, str]] = {
    "train": (CodebookTrainConfig, "attach codebooks and train them (and the model)"),
    "cache": (CacheConfig, "store every token's code ids over data"),
    "search": (SearchConfig, "find codes that fire on a regex"),
    "topics": (TopicsConfig, "find the topic codes of documents (rows, a regex, a word)"),
    "contexts": (ContextsConfig, "show where a code fires"),
    "intervene": (InterveneConfig, "generate with codes forced/blocked"),
    "steer": (SteerConfig, "topic steering table for words"),
    "tokfsm": (TokFSMEvalConfig, "evaluate a TokFSM codebook model"),
    "app": (AppConfig, "start the Streamlit code browser"),
}
COMMANDS: dict[str, Subcommand] = {
    "train": _checked("train", run_train, with_argv=True),
    "cache": _checked("cache", run_cache),
    "search": _checked("search", run_search),
    "topics": _checked("topics", run_topics),
    "contexts": _checked("contexts", run_contexts),
    "intervene": _checked("intervene", run_intervene),
    "steer": _checked("steer", run_steer),
    "tokfsm": _checked("tokfsm", run_tokfsm),
    "app": _checked("app", run_app),
}


def main(argv: list[str]) -> Any:
    """Entry point of ``tyche codebook``; returns what the sub-command returns."""
    return route(PROG, COMMANDS, argv)
