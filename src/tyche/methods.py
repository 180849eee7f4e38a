"""The registry: one row per method, the one place that names them.

The router (``tyche <command>``), ``tyche --help``, the layering test, the help tests and
the README check all read this table. A method is a library package (``tyche.<name>``, which
imports shared modules only) and a command-line module under ``tyche.cli`` (a face, which may
import the method, the shared modules and the zoo). ``docs/adding-a-method.md`` says what a
new method provides; adding its row here is what makes it known.

Standard library only: ``tyche --help`` reads this table without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FACES", "METHODS", "Command", "Method", "commands", "method_names", "register"]


@dataclass(frozen=True)
class Command:
    """A ``tyche <name>`` command: ``cli`` is the module whose ``main(argv)`` runs it."""

    name: str
    """the command word, ``tyche <name>``"""
    description: str
    """one line for ``tyche --help``"""
    cli: str
    """the module that runs it: ``main(argv: list[str]) -> None``"""
    torchrun: bool = True
    """whether it also runs under ``torchrun --nproc_per_node=N -m tyche <name>``"""


@dataclass(frozen=True)
class Method(Command):
    """A method: a command plus the library package that does the work."""

    library: str = ""
    """the library package (``tyche.<name>``); it imports shared modules only"""
    question: str = ""
    """the question it answers, in the user's words"""


#: the methods, in the order the front page presents them
METHODS: list[Method] = [
    Method(
        name="basin",
        description="estimate the basin volume (log-probability) of a model",
        cli="tyche.cli.basin",
        library="tyche.basin",
        question="how much of parameter space implements this behaviour?",
    ),
    Method(
        name="codebook",
        description="train, search, steer and browse codebook features",
        cli="tyche.cli.codebook",
        library="tyche.codebook",
        question="which sparse, discrete features does a layer use, and what if we force them?",
    ),
    Method(
        name="interaction",
        description="local interaction basis: build, ablate, plot",
        cli="tyche.cli.interaction",
        library="tyche.interaction",
        question="which directions of each layer matter, and how do layers interact?",
    ),
    Method(
        name="causal",
        description="extract causal bases (directions whose ablation matters)",
        cli="tyche.cli.causal",
        library="tyche.causal",
        question="which activation directions change the output most when ablated?",
    ),
]

#: commands that are faces, not methods
FACES: list[Command] = [
    Command(
        name="zoo",
        description="list, train and inspect the offline zoo of models and data",
        cli="tyche.cli.zoo",
        torchrun=False,
    ),
    Command(
        name="splice",
        description="spliced faithfulness of codebooks, SAEs and projections (KL, CE recovered)",
        cli="tyche.cli.splice",
    ),
]


def commands() -> dict[str, Command]:
    """Every ``tyche`` command by name: the methods, then the faces."""
    return {c.name: c for c in [*METHODS, *FACES]}


def method_names() -> tuple[str, ...]:
    """The names of the registered methods (their library packages are ``tyche.<name>``)."""
    return tuple(m.name for m in METHODS)


def register(method: Method) -> None:
    """Add ``method`` to the registry (a plug-in's, or a test's); its name must be new."""
    if method.name in commands():
        raise ValueError(f"a command named {method.name!r} is registered already")
    if not method.library or not method.cli:
        raise ValueError(f"method {method.name!r} needs both a library and a cli module")
    METHODS.append(method)


def unregister(name: str) -> None:
    """Remove the method ``name`` (undoes :func:`register`)."""
    METHODS[:] = [m for m in METHODS if m.name != name]
