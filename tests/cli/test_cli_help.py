"""Every command and sub-command of `tyche` has help that speaks the user's language.

A method's flags are dataclass fields parsed by ``tyche.cli.commandline.parse_config``, which
refuses to build a parser for a field without a docstring; so ``--help`` succeeding for a
command proves that every one of its flags has help text. Sub-commands are read from each
command's own help (its "commands:" list or argparse's ``{a,b,c}``), so a new one cannot be
missed.
"""

from __future__ import annotations

import re

import pytest

from tyche.__main__ import main
from tyche.methods import commands

#: words that would mean an internal name leaked into the help
INTERNAL = re.compile(r"\b\w+(Command|Config|Args)\b|\['|\bbool\b|\[str\]")


def _undashed_negation(text: str) -> str | None:
    """``--noflag`` beside ``--flag`` (a negation spelled without its dash), if any; flags
    that merely start with "no" (``--node_layers``, ``--norm``) are fine."""
    for rest in re.findall(r"--no([a-z]\w*)", text):
        if re.search(rf"--{rest}\b", text):
            return f"--no{rest}"
    return None


def _help(capsys, *argv: str) -> str:
    try:
        main([*argv, "--help"])
    except SystemExit as stop:  # argparse exits after printing help; others just return
        assert stop.code in (0, None), argv
    return capsys.readouterr().out


def _subcommands(text: str) -> list[str]:
    """Sub-command names listed by a command's help."""
    braces = re.search(r"^usage: .*?\{([\w,-]+)\} \.\.\.", text, re.S | re.M)
    if braces:
        return braces.group(1).split(",")
    block = re.search(r"^commands:\n((?:  \S.*\n)+)", text, re.M)
    return [line.split()[0] for line in block.group(1).splitlines()] if block else []


@pytest.mark.parametrize("command", sorted(commands()))
def test_every_command_and_subcommand_has_plain_help(capsys, command):
    top = _help(capsys, command)
    subs = _subcommands(top)
    for text in [top] + [_help(capsys, command, sub) for sub in subs]:
        assert text.strip(), command
        leaked = INTERNAL.search(text)
        assert leaked is None, f"`tyche {command}` help shows {leaked.group(0)!r}:\n{text}"
        assert "(default: None)" not in text
        assert _undashed_negation(text) is None, f"`tyche {command}` help:\n{text}"


def test_a_default_subcommand_lists_the_others_in_its_help(capsys):
    # `tyche causal` extracts without a name; its help lists train-lens after the flags
    assert _subcommands(_help(capsys, "causal")) == ["train-lens"]


def test_subcommands_are_found_from_the_help():
    assert _subcommands("usage: tyche zoo [-h] {list,train,info} ...\n") == [
        "list",
        "train",
        "info",
    ]
    assert _undashed_negation("--resume --noresume") == "--noresume"
    assert _undashed_negation("--norm X --node_layers Y --no-plot --plot") is None
    assert _subcommands("usage: tyche causal [--mode {mean,zero}] [--k N]\n") == []  # choices
    assert _subcommands("usage: x\n\ncommands:\n  train  a\n  cache  b\n\nRun") == [
        "train",
        "cache",
    ]
