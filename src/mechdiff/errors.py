"""One error type whose message is a single actionable line."""

from __future__ import annotations


class MechdiffError(Exception):
    """A user-facing error: bad input, params or environment, with a one-line fix."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message ("" when it has none), cut to `limit` characters: what a one-line
    error quotes of the library error under it."""
    line = (str(exc).splitlines() or [""])[0]
    return line if limit is None else line[:limit]
