"""`tyche <command>` / `python -m tyche <command>`: the command-line router.

Each command lives in its own module and exposes ``main(argv: list[str]) -> None``; the
module is imported only when its command runs, so ``tyche --help`` stays instant.

One error path for every command: the project's own errors (bad flags, missing files,
unknown zoo names, models or data that do not fit) print as one line,
``tyche <command>: error: <message>``, with exit code 2; ``--debug`` anywhere on the line
(or ``TYCHE_DEBUG=1``) shows the traceback instead. Ctrl-C prints where finished work is
saved and how to resume, with exit code 130. Anything else is a bug: it prints its traceback
and a line asking for a report, with exit code 1.

The commands are read from the registry, :mod:`tyche.methods`.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

from tyche.methods import commands

#: exit codes
USAGE_ERROR = 2
INTERRUPTED = 130


def _usage() -> str:
    table = commands()
    width = max(len(name) for name in table)
    lines = [
        "usage: tyche <command> [options]   (or: python -m tyche <command> ...)",
        "",
        "Tyche measures and maps the inside of trained networks.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {c.description}" for name, c in table.items()]
    lines += [
        "",
        "Run `tyche <command> --help` for a command's options; add --debug (or set",
        "TYCHE_DEBUG=1) to see the traceback of an error.",
        "Every command also runs under `torchrun --nproc_per_node=N -m tyche <command>`.",
    ]
    return "\n".join(lines)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input rather than a bug: the library's :class:`InputError`
    (raised on purpose by its checks; ``CommandError`` is one), the zoo's ``ZooError``, a file
    that cannot be read or written, and running out of memory."""
    from tyche.errors import InputError

    errors: list[type[BaseException]] = [InputError, OSError, MemoryError]
    zoo_entry = sys.modules.get("tyche.zoo.entry")
    if zoo_entry is not None:
        errors.append(zoo_entry.ZooError)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "OutOfMemoryError"):
        errors.append(torch.OutOfMemoryError)
    return tuple(errors)


BUG_REPORT = (
    "this is a bug in tyche, not in your input: please report it with the command line and "
    "the traceback above"
)


def _message(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.strerror}: {err.filename}"
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return f"out of memory ({err}); try a smaller --batch_size or fewer examples"
    text = str(err).strip() or type(err).__name__
    return text


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _mark_failed() -> None:
    """Under ``torchrun``, let the exit skip waiting for the other ranks (only if the
    distributed helpers were loaded: a flag error must not import torch)."""
    distributed = sys.modules.get("tyche.distributed")
    if distributed is not None:
        distributed.mark_failed()


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to the named command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TYCHE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    name, rest = argv[0], argv[1:]
    table = commands()
    if name not in table:
        print(f"tyche: error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR)
    from tyche.cli import commandline

    commandline.on_interrupt(None)
    try:
        module = importlib.import_module(table[name].cli)
        module.main(rest)
    except KeyboardInterrupt:
        if debug:
            raise
        _mark_failed()
        hint = commandline.interrupt_hint()
        if _is_rank0():
            print(f"\ntyche {name}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
    except _user_errors() as err:
        if debug:
            raise
        _mark_failed()
        if _is_rank0():
            print(f"tyche {name}: error: {_message(err)}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR) from None
    except Exception:
        if debug:
            raise
        _mark_failed()
        if _is_rank0():
            traceback.print_exc()
            print(f"tyche {name}: {BUG_REPORT}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
