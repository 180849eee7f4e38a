"""`tyche <command>` / `python -m tyche <command>`: the command-line router.

Each command lives in its own module and exposes ``main(argv: list[str]) -> None``; the
module is imported only when its command runs, so ``tyche --help`` stays instant. Every
command's flags come from a config dataclass (see that module's ``--help``).
"""

from __future__ import annotations

import importlib
import sys

#: command name -> (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "basin": ("tyche.basin.cli", "estimate the basin volume (log-probability) of a model"),
    "causal": ("tyche.causal.cli", "extract causal bases (directions whose ablation matters)"),
    "interaction": ("tyche.interaction.cli", "local interaction basis: build, ablate, plot"),
    "zoo": ("tyche.zoo.cli", "list, train and inspect the offline zoo of models and data"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: tyche <command> [options]   (or: python -m tyche <command> ...)",
        "",
        "Tyche measures and maps the inside of trained networks.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += [
        "",
        "Run `tyche <command> --help` for a command's options.",
        "Every command also runs under `torchrun --nproc_per_node=N -m tyche <command>`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to the named command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tyche: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(COMMANDS[name][0])
    module.main(rest)


if __name__ == "__main__":
    main()
