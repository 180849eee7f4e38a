"""``parse_config``: a method's options object embedded in a command's config gives flat flags.

A command embeds its method's options dataclass whole (never copying its fields); the parser
lifts the inner fields to flat flags with the inner class's docstrings as help, builds the
inner dataclass from them (so its checks run), and ``config_flags`` gives the command back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tyche.cli.commandline import (
    CommandError,
    build_parser,
    config_flags,
    flat_settings,
    parse_config,
)
from tyche.errors import InputError


@dataclass(frozen=True)
class Search:
    max_iter: int = 100
    """iterations per search"""
    fast: bool = True
    """use the fast path"""
    tol: float | None = None
    """stop once the gradient is this small"""

    def __post_init__(self) -> None:
        if self.max_iter < 1:
            raise InputError(f"--max_iter must be at least 1, got {self.max_iter}")


@dataclass
class Command:
    model: str = "zoo:x"
    """the model"""
    search: Search = field(default_factory=lambda: Search(max_iter=50))
    """the search options (their fields are the flags)"""


def test_an_embedded_dataclass_gives_flat_flags_with_its_own_help() -> None:
    text = build_parser(Command, "tyche toy").format_help()
    assert "--max_iter N" in text and "iterations per search (default: 50)" in text
    assert "--fast, --no-fast" in text and "--search" not in text


def test_parsing_builds_the_inner_dataclass_and_round_trips() -> None:
    cfg = parse_config(Command, ["--max_iter", "7", "--no-fast", "--model", "m"], "tyche toy")
    assert cfg == Command(model="m", search=Search(max_iter=7, fast=False))
    assert parse_config(Command, [], "tyche toy").search == Search(max_iter=50)
    assert config_flags(cfg) == ["--model", "m", "--max_iter", "7", "--no-fast"]
    assert parse_config(Command, config_flags(cfg), "tyche toy") == cfg
    assert flat_settings(cfg) == {"model": "m", "max_iter": 7, "fast": False, "tol": None}


def test_the_inner_checks_run_and_speak_in_flags() -> None:
    with pytest.raises(InputError, match="--max_iter must be at least 1, got 0"):
        parse_config(Command, ["--max_iter", "0"], "tyche toy")
    with pytest.raises(CommandError, match="unrecognized arguments: --search"):
        parse_config(Command, ["--search", "1"], "tyche toy")


def test_a_flag_defined_twice_is_refused() -> None:
    @dataclass
    class Clash:
        max_iter: int = 3
        """outer"""
        search: Search = field(default_factory=Search)
        """inner"""

    with pytest.raises(TypeError, match="--max_iter is defined twice"):
        build_parser(Clash, "tyche toy")
