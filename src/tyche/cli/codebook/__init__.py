"""``tyche codebook <command>``: train, cache, search, intervene on, steer and browse codebooks.

Examples::

    tyche codebook train --model zoo:shakespeare-lm --sites 'attn_heads.*,mlp_out.*' \\
        --num_codes 512 --k 4 --steps 600 --out runs/cb-shakespeare
    tyche codebook cache --model runs/cb-shakespeare --out runs/cb-cache
    tyche codebook search --cache runs/cb-cache --pattern '\\bking\\b'
    tyche codebook contexts --cache runs/cb-cache --site mlp_out.1 --code 42
    tyche codebook intervene --model runs/cb-shakespeare --prompt 'To be' --force mlp_out.1:42
    tyche codebook steer --cache runs/cb-cache --words king,love,blood,death
    tyche codebook tokfsm --model zoo:tokfsm
    tyche codebook app --cache runs/cb-cache
    torchrun --nproc_per_node=2 -m tyche codebook train ...   # batches split over processes
"""

from __future__ import annotations

from typing import Any

from tyche.cli.codebook.args import (
    AppArgs,
    CacheArgs,
    ContextsArgs,
    InterveneArgs,
    SearchArgs,
    SteerArgs,
    TokFSMArgs,
    TrainArgs,
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
)
from tyche.cli.codebook.train import PROG, run_train
from tyche.cli.commandline import CommandError, parse_config

__all__ = ["COMMANDS", "main"]

COMMANDS: dict[str, tuple[type, Any, str]] = {
    "train": (TrainArgs, run_train, "attach codebooks and train them (and the model)"),
    "cache": (CacheArgs, run_cache, "store every token's code ids over data"),
    "search": (SearchArgs, run_search, "find codes that fire on a regex"),
    "contexts": (ContextsArgs, run_contexts, "show where a code fires"),
    "intervene": (InterveneArgs, run_intervene, "generate with codes forced/blocked"),
    "steer": (SteerArgs, run_steer, "topic steering table for words"),
    "tokfsm": (TokFSMArgs, run_tokfsm, "evaluate a TokFSM codebook model"),
    "app": (AppArgs, run_app, "start the Streamlit code browser"),
}


def _usage() -> str:
    lines = ["usage: tyche codebook <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, _, desc) in COMMANDS.items()]
    lines += ["", "Run `tyche codebook <command> --help` for its options."]
    return "\n".join(lines)


def main(argv: list[str]) -> Any:
    """Entry point of ``tyche codebook``; returns what the sub-command returns."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return None
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        raise CommandError(f"unknown sub-command {name!r}; choose from {', '.join(COMMANDS)}")
    cls, runner, _ = COMMANDS[name]
    args = parse_config(cls, rest, prog=f"{PROG} {name}", description=cls.__doc__)
    check_args(args)
    with claim(name, args):  # the output folder's lock and record, before any model loads
        if name == "train":
            from tyche.distributed import init_distributed

            init_distributed()
            return runner(args, rest)
        return runner(args)
