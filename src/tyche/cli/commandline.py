"""What every ``tyche`` command shares: config dataclasses as flags, checks, one error path.

A command describes its flags as a dataclass whose attribute docstrings are the help text
(as in ``tyche.cli.basin``); :func:`parse_config` turns it into an ``argparse`` parser:

- ``--name VALUE`` for every field (a trailing underscore is dropped, so a field ``lambda_``
  is the flag ``--lambda``), the help text from the attribute's docstring, the default shown
  once;
- booleans as ``--flag`` / ``--no-flag``; ``Literal[...]`` fields as choices;
  ``X | None`` fields take an ``X`` and default to None;
- a field whose type is itself a dataclass (a method's options object, embedded whole) gives
  its fields as flat flags (``--max_iter``, not ``--search.max_iter``), with that class's
  attribute docstrings as help and the embedded default instance's values as defaults; the
  parsed values build the inner dataclass, so its ``__post_init__`` checks run.

Bad input raises :class:`CommandError` (an :class:`~tyche.errors.InputError`) naming the
flag and what to fix.
``tyche.__main__`` prints the project's errors as one line, ``tyche <command>: error: ...``,
exit code 2, and, on Ctrl-C, the hint a command registered with :func:`on_interrupt`.

This module imports only the standard library, so flag errors are reported before torch
is imported.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import os
import re
import shlex
import sys
import tempfile
import textwrap
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

from tyche.errors import InputError

T = TypeVar("T")

__all__ = [
    "CommandError",
    "Subcommand",
    "check_number",
    "check_readable_text",
    "best_effort",
    "check_context",
    "check_writable_folder",
    "config_flags",
    "flat_settings",
    "interrupt_hint",
    "on_interrupt",
    "parse_choices",
    "parse_config",
    "parse_numbers",
    "resume_command",
    "reworded_text_errors",
    "route",
    "split_list",
]


class CommandError(InputError):
    """Bad command-line input; the message names the flag and says what to fix."""


# ----------------------------------------------------------------------------- interrupts
_INTERRUPT_HINT: list[str] = []


def on_interrupt(hint: str | None) -> None:
    """Register what to print if the user presses Ctrl-C now (None clears it)."""
    _INTERRUPT_HINT[:] = [] if hint is None else [hint]


def interrupt_hint() -> str | None:
    """The hint registered by :func:`on_interrupt`, if any."""
    return _INTERRUPT_HINT[0] if _INTERRUPT_HINT else None


def resume_command(prog: str, argv: Sequence[str]) -> str:
    """``prog argv... --resume`` as one shell line (any earlier ``--resume`` dropped)."""
    kept = [a for a in argv if a not in ("--resume", "--no-resume", "--debug")]
    return shlex.join([*prog.split(), *kept, "--resume"])


def _default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None if f.default is dataclasses.MISSING else f.default


def _is_nested(value_or_type: Any) -> bool:
    """A dataclass instance or class embedded whole (its fields become flat flags)."""
    return dataclasses.is_dataclass(value_or_type)


def flat_settings(cfg: Any) -> dict[str, Any]:
    """``{field: value}`` of the dataclass ``cfg`` with every embedded dataclass's fields
    lifted to the top (as the flags name them), init fields only."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        value = getattr(cfg, f.name)
        out.update(flat_settings(value) if _is_nested(value) else {f.name: value})
    return out


def config_flags(cfg: Any) -> list[str]:
    """The flags that give the dataclass ``cfg`` back from :func:`parse_config`: one per
    field that differs from its default (``--name VALUE``, ``--flag`` / ``--no-flag``);
    an embedded dataclass's fields are compared with the embedded default's."""
    return _flags_against(cfg, None)


def _flags_against(cfg: Any, defaults: Any) -> list[str]:
    flags: list[str] = []
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        value = getattr(cfg, f.name)
        default = _default_of(f) if defaults is None else getattr(defaults, f.name)
        if _is_nested(value):
            flags += _flags_against(value, default)
            continue
        if value == default:
            continue
        name = f"--{f.name.rstrip('_')}"
        if isinstance(value, bool):
            flags.append(name if value else f"--no-{name[2:]}")
        elif value is not None:
            flags += [name, str(value)]
    return flags


# ----------------------------------------------------------------------------- parsing
def _attribute_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal under each annotated attribute."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else str), True
    return tp, False


def _converter(tp: Any) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = tp(text)
        except ValueError:
            kind = {int: "an integer", float: "a number"}.get(tp, tp.__name__)
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if tp is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        return value

    return convert


#: a value that starts like a negative number (``-1``, ``-1e-2``, ``-.5``, ``-1e-2,1e-3``,
#: ``-inf``): what argparse takes for a flag's value, as Python 3.13's argparse does (``-\.?\d``;
#: 3.11 knows only ``-1`` and ``-.5``); no flag of ours starts with a digit
_NEGATIVE_NUMBER = re.compile(r"-\.?\d|-(?:inf|nan)", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: message (see prog --help)``; a negative
    number is a flag's value (``--cutoff -1e-2``), so the command's own check speaks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message: str) -> typing.NoReturn:
        raise CommandError(f"{message} (see `{self.prog} --help`)")


def _describe_default(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return ""
    return f" (default: {value})"


def build_parser(cls: type, prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of the dataclass ``cls`` (the fields of an
    embedded dataclass flattened in, see the module docstring)."""
    parser = _Parser(
        prog=prog,
        description=description or inspect.getdoc(cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_fields(parser, cls, None, (), set())
    return parser


def _init_fields(cls: type, defaults: Any) -> Iterator[tuple[dataclasses.Field, Any, Any]]:
    """``(field, type without Optional, default)`` of each init field of ``cls``; the default
    is the embedded instance's value where ``defaults`` is one, else the field's own."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.init:
            default = _default_of(f) if defaults is None else getattr(defaults, f.name)
            yield f, _unwrap_optional(hints[f.name])[0], default


def _add_fields(parser: argparse.ArgumentParser, cls: type, defaults: Any,
                path: tuple[str, ...], seen: set[str]) -> None:  # fmt: skip
    """Add a flag per field of ``cls`` (recursing into embedded dataclasses); ``defaults`` is
    the embedded default instance (None at the top: the fields' own defaults); a flag's dest
    is its field path joined by ``__``."""
    docs = _attribute_docs(cls)
    for f, tp, default in _init_fields(cls, defaults):
        if dataclasses.is_dataclass(tp):
            if not _is_nested(default):
                raise TypeError(f"{cls.__name__}.{f.name} embeds {tp.__name__}: give it a "
                                "default_factory")  # fmt: skip
            _add_fields(parser, type(default), default, (*path, f.name), seen)
            continue
        flag = f.name.rstrip("_")  # `lambda_` (a Python keyword) is the flag --lambda
        if flag in seen:
            raise TypeError(f"{cls.__name__}.{f.name}: the flag --{flag} is defined twice")
        seen.add(flag)
        names = [f"--{flag}"]
        dest = "__".join((*path, f.name))
        help_text = docs.get(f.name)
        if not help_text:
            raise TypeError(f"{cls.__name__}.{f.name} has no docstring: every flag needs help")
        if tp is bool:
            state = "on" if default else "off"
            parser.add_argument(
                *names,
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=f"{help_text} (default: {state})",
            )
            continue
        kwargs: dict[str, Any] = {"dest": dest, "default": default}
        if typing.get_origin(tp) is Literal:
            choices = list(typing.get_args(tp))
            kwargs.update(choices=choices, metavar="{" + ",".join(map(str, choices)) + "}")
            kwargs["type"] = type(choices[0])
        elif tp in (int, float):
            kwargs["type"] = _converter(tp)
            kwargs["metavar"] = "N" if tp is int else "X"
        else:
            kwargs["type"] = str
            kwargs["metavar"] = "TEXT"
        parser.add_argument(*names, help=help_text + _describe_default(default), **kwargs)


def _build(cls: type, values: dict[str, Any], defaults: Any, path: tuple[str, ...]) -> Any:
    """An instance of ``cls`` from the parsed ``values`` (keyed by dest)."""
    kwargs: dict[str, Any] = {}
    for f, tp, default in _init_fields(cls, defaults):
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(type(default), values, default, (*path, f.name))
        else:
            kwargs[f.name] = values["__".join((*path, f.name))]
    return cls(**kwargs)


def parse_config(cls: type[T], argv: Sequence[str], prog: str, description: str | None = None,
                 epilog: str | None = None) -> T:  # fmt: skip
    """Parse ``argv`` into an instance of the dataclass ``cls`` (see the module docstring).

    ``epilog`` is printed after the flags by ``--help``. Raises :class:`CommandError` for an
    unknown flag or a value of the wrong type; ``--help`` prints the help and exits 0.
    """
    parser = build_parser(cls, prog, description)
    parser.epilog = epilog
    namespace = parser.parse_args(list(argv))
    return _build(cls, vars(namespace), None, ())


# ----------------------------------------------------------------------------- sub-commands
@dataclasses.dataclass(frozen=True)
class Subcommand:
    """One sub-command of a command: its config dataclass (the flags) and its runner.

    ``run(config, argv)`` gets the parsed config and the sub-command's flags as given (for
    a Ctrl-C resume line); ``summary`` is the line ``--help`` lists it with (default: the
    first line of the config's docstring).
    """

    config: type
    run: Callable[[Any, list[str]], Any]
    summary: str = ""

    def line(self) -> str:
        return self.summary or (inspect.getdoc(self.config) or "").splitlines()[0]


def commands_block(table: dict[str, Subcommand], prog: str) -> str:
    """The ``commands:`` list of ``--help`` (one line per sub-command)."""
    width = max(map(len, table))
    lines = ["commands:"] + [f"  {name:<{width}}  {sub.line()}" for name, sub in table.items()]
    return "\n".join([*lines, "", f"Run `{prog} <command> --help` for its flags."])


def route(prog: str, table: dict[str, Subcommand], argv: Sequence[str],
          default: str | None = None) -> Any:  # fmt: skip
    """Run the sub-command that ``argv[0]`` names with the rest of ``argv``; returns what
    it returns. With a ``default``, flags without a name run that sub-command, and its
    ``--help`` lists the others after its flags; without one, no name (or ``--help``) prints
    the list of sub-commands, and a missing or unknown name is refused."""
    argv = list(argv)
    if argv and argv[0] in table:
        name, rest = argv[0], argv[1:]
    elif default is not None:
        name, rest = default, argv
    elif argv and argv[0] in ("-h", "--help", "help"):
        print(f"usage: {prog} <command> [flags]\n\n{commands_block(table, prog)}")
        return None
    else:
        got = f"unknown sub-command {argv[0]!r}" if argv else "no sub-command given"
        raise CommandError(f"{got}; {prog} needs a command: {'|'.join(table)} (see "
                           f"`{prog} --help`)")  # fmt: skip
    sub = table[name]
    others = {k: v for k, v in table.items() if k != name}
    epilog = commands_block(others, prog) if name == default and others else None
    sub_prog = prog if name == default else f"{prog} {name}"
    config = parse_config(sub.config, rest, sub_prog, epilog=epilog)
    return sub.run(config, rest)


# ----------------------------------------------------------------------------- checks
def split_list(text: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; None -> ``[]``."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def parse_numbers(text: str, flag: str, *, positive: bool = True) -> list[float]:
    """Comma-separated numbers, each finite (and > 0), no duplicates, at least one."""
    parts = split_list(text)
    if not parts:
        raise CommandError(f"{flag} is empty; give comma-separated numbers such as 1e-3,1e-2")
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise CommandError(
                f"{flag}: {part!r} is not a number; give comma-separated numbers such as 1e-3,1e-2"
            ) from None
        if not math.isfinite(value) or (positive and value <= 0):
            raise CommandError(f"{flag}: {part} must be a positive finite number")
        values.append(value)
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise CommandError(f"{flag} lists {', '.join(f'{v:g}' for v in repeated)} twice")
    return values


def parse_choices(text: str, flag: str, allowed: Sequence[str]) -> list[str]:
    """Comma-separated names, each one of ``allowed``, no duplicates, at least one."""
    parts = split_list(text)
    if not parts:
        raise CommandError(f"{flag} is empty; choose from {', '.join(allowed)}")
    unknown = [p for p in parts if p not in allowed]
    if unknown:
        raise CommandError(
            f"{flag}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(allowed)}"
        )
    repeated = sorted({p for p in parts if parts.count(p) > 1})
    if repeated:
        raise CommandError(f"{flag} lists {', '.join(repeated)} twice; give each once")
    return parts


def check_number(
    value: float | int | None,
    flag: str,
    *,
    minimum: float | None = None,
    above: float | None = None,
    integer: bool = False,
) -> None:
    """Raise :class:`CommandError` unless ``value`` is finite, ``>= minimum``, ``> above``."""
    if value is None:
        return
    if integer and (not isinstance(value, int) or isinstance(value, bool)):
        raise CommandError(f"{flag} must be a whole number, got {value!r}")
    if not math.isfinite(value):
        raise CommandError(f"{flag} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise CommandError(f"{flag} must be at least {minimum:g}, got {value:g}")
    if above is not None and value <= above:
        raise CommandError(f"{flag} must be greater than {above:g}, got {value:g}")


#: the flag that lets a sequence length past a model's context through
ALLOW_LONG = "--allow_long_context"


def check_context(model: Any, seq_len: int, flag: str, *, allow_long: bool, name: str) -> None:
    """Refuse ``flag seq_len`` past the context length of ``model`` (called ``name``): always
    for learned position tables (no embedding exists past them), else unless ``allow_long``
    (rotary positions run past their trained length, at the user's risk).

    The model is inspected by :func:`tyche.sites.context_field` and
    :func:`tyche.sites.learned_positions`; a model whose config gives no length passes.
    """
    from tyche.sites import context_field, learned_positions

    found = context_field(model)
    if found is None or seq_len <= found[1]:
        return
    field, limit = found
    if learned_positions(model):
        raise CommandError(
            f"{flag} {seq_len} is past the {limit} positions of {name}: it learned one "
            f"embedding per position ({field} {limit}) and has none past them, so "
            f"{ALLOW_LONG} cannot help; give {flag} {limit} or less"
        )
    if not allow_long:
        raise CommandError(
            f"{flag} {seq_len} is past the context of {name} ({field} {limit} tokens); give "
            f"{flag} {limit} or less, or add {ALLOW_LONG} to run it past that length (its "
            "positions are not a learned table, but it was not built for longer sequences)"
        )


@contextmanager
def reworded_text_errors(data_flag: str, data: str, length_flag: str) -> Iterator[None]:
    """Say the errors of :func:`tyche.data.chunk_and_tokenize` about the text (too few tokens
    for one sequence, no EOS token) in the command's flags: ``data_flag data`` is the text,
    ``length_flag`` the tokens per sequence."""
    from tyche.data import NoEOSToken, TooFewTokens

    try:
        yield
    except TooFewTokens as err:
        raise CommandError(
            f"{data_flag} {data} has only {err.n_tokens} tokens ({err.n_documents} "
            f"document{'s' * (err.n_documents != 1)}), fewer than one sequence of {length_flag} "
            f"{err.max_seq_len}; give a smaller {length_flag} or more text"
        ) from None
    except NoEOSToken:
        raise CommandError(
            f"the model's tokenizer has no EOS token, which separates the documents of "
            f"{data_flag} {data}; give a model whose tokenizer has one (eos_token in its "
            "tokenizer_config.json)"
        ) from None


def check_readable_text(path: str | os.PathLike[str], flag: str) -> None:
    """A text file that exists, can be read, decodes as UTF-8 and is not empty."""
    file = Path(path).expanduser()
    if not file.exists():
        raise CommandError(f"{flag}: no file at {str(file)!r}")
    if not file.is_file():
        raise CommandError(f"{flag}: {str(file)!r} is not a file")
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise CommandError(f"{flag}: cannot read {str(file)!r}: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CommandError(
            f"{flag}: {str(file)!r} is not UTF-8 text (byte {err.start} is {raw[err.start]:#04x});"
            " give a plain text file"
        ) from None
    if not text.strip():
        raise CommandError(f"{flag}: {str(file)!r} is empty")


def check_writable_folder(path: str | os.PathLike[str], flag: str) -> Path:
    """Create ``path`` if needed and prove a file can be written in it; returns it."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise CommandError(f"{flag}: {str(folder)!r} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tyche-write-check-"):
            pass
    except OSError as err:
        raise CommandError(
            f"{flag}: cannot write to {str(folder)!r} ({err.strerror}); choose another folder"
        ) from None
    return folder


def best_effort(prog: str, what: str, step: Callable[[], Any], saved_in: Path) -> bool:
    """Run a reporting ``step`` (a table, a plot); on failure warn on stderr and go on.

    Results are saved before their reports, so a failing report must not end the command or
    lose them. Returns whether the step succeeded.
    """
    try:
        step()
        return True
    except Exception as err:  # a report never loses the results saved before it
        print(
            f"{prog}: warning: could not {what} ({type(err).__name__}: {err}); the results are "
            f"saved in {saved_in}/",
            file=sys.stderr,
        )
        return False
