"""The one exception that means "bad input", raised on purpose by the library's checks.

The command line prints an :class:`InputError` (and the zoo's ``ZooError`` and an
``OSError`` about a file) as one line, ``tyche <command>: error: <message>``, exit code 2.
Any other exception is a bug: it keeps its traceback and asks for a report. A library user
can catch ``InputError`` (or ``ValueError``, its base) around a call.

Standard library only, so the command line can name it before torch is imported.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """The input (a flag, an argument, a file, a model or data) cannot be used as given; the
    message says what was wrong and how to fix it."""
